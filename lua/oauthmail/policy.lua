-- oauthmail.policy — how sending behaves under errors and limits: what to do
-- with each failure (re-authenticate, reconnect, back off, give up), how long
-- to wait between attempts, and the governor that keeps a mailbox under its
-- provider's rate, volume and connection limits. The clock, the sleep and the
-- random source are injectable so tests can run a day in a millisecond.
local sys = require "oauthmail.sys"
local waiter = require "oauthmail.wait"
local errors = require "oauthmail.errors"

local M = {}

M.DEFAULTS = {
  reuse = true,                   -- keep an authenticated session for the next message
  max_messages_per_session = 100, -- then QUIT and open a fresh one
  attempts = 5,                   -- transactions tried per message, reconnects included
  max_time = 120,                 -- seconds from the first attempt to the last wait
  backoff_base = 1,               -- first wait after a 4xx, doubled each time
  backoff_max = 30,
  jitter = 0.5,                   -- each wait is shortened by up to this fraction, at random
  reauth = true,                  -- on 535: invalidate the token, refresh once, re-authenticate once
}

-- Wall-clock seconds with sub-second resolution that never jump back.
function M.default_clock()
  local base = os.time() - sys.monotime()
  return function() return base + sys.monotime() end
end

-- ------------------------------------------------------------ decisions

local FINAL_KINDS = { config = true, oauth = true, store = true, policy = true, http = true, tls = true }

-- policy.classify(err) -> action:
--   "reauth"    the server refused the credentials
--   "reconnect" the session is gone or unusable (421, network, timeout): new session, same message
--   "throttle"  too many connections (432 4.3.2): fewer connections, wait, new session
--   "retry"     a transient refusal (other 4xx): wait, same session
--   "fail"      permanent (5xx, configuration, OAuth, TLS verification)
function M.classify(err)
  if type(err) ~= "table" then return "fail" end
  local code = tonumber(err.code)
  -- these carry HTTP statuses in code, or come before any SMTP: their own
  -- layers retried what could be retried
  if FINAL_KINDS[err.kind] then return "fail" end
  -- one layer owns each retry: the token endpoint's call retried already
  -- (oauth2/endpoint), and a host name that does not exist stays so
  if err.stage == "token" then return "fail" end
  if err.kind == "network" and err.reason == "dns" then return "fail" end
  if err.retryable == false and err.kind ~= "auth" then return "fail" end
  if err.kind == "auth" and (code == 535 or code == 334 or err.challenge) then return "reauth" end
  -- Exchange: "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon" (a clock behind, or a
  -- token kept too long): a fresh token cures it
  if err.kind == "auth" and code == 501 and err.enhanced == "5.5.127" then return "reauth" end
  if code == 432 and (err.enhanced == nil or err.enhanced == "4.3.2") then return "throttle" end
  if code == 421 then return "reconnect" end
  if err.kind == "network" then return "reconnect" end
  if code and code >= 400 and code < 500 then return "retry" end
  return "fail"
end

-- ------------------------------------------------------------ arguments

-- Numbers are checked here too (the profile checks them first, with field
-- names): a zero, fractional or NaN limit would index a window that is not
-- there, and %d refuses a fraction on 5.3+.
local finite = require("oauthmail.options").finite

local function need(fn, name, v, ok, what)
  if not ok then error(string.format("%s: %s must be %s, got %s", fn, name, what, tostring(v)), 3) end
end

local function count(fn, name, v, allow_off)
  if v == nil or (allow_off and v == false) then return end
  need(fn, name, v, finite(v) and v >= 1 and v == math.floor(v),
    "a positive whole number" .. (allow_off and " or false" or ""))
end

local function seconds(fn, name, v)
  if v == nil then return end
  need(fn, name, v, finite(v) and v >= 0, "a finite number of seconds >= 0")
end

-- ------------------------------------------------------------ policy object

local Policy = {}
Policy.__index = Policy

-- policy.new(opts) with the fields of DEFAULTS plus clock, sleep, random.
function M.new(opts)
  opts = opts or {}
  local self = setmetatable({}, Policy)
  for k, v in pairs(M.DEFAULTS) do self[k] = v end
  for k, v in pairs(opts) do self[k] = v end
  self.clock = opts.clock or M.default_clock()
  self.sleep = opts.sleep or waiter.sleep
  self.random = opts.random or math.random
  count("policy.new", "attempts", self.attempts)
  count("policy.new", "max_messages_per_session", self.max_messages_per_session)
  for _, k in ipairs { "max_time", "backoff_base", "backoff_max" } do seconds("policy.new", k, self[k]) end
  need("policy.new", "jitter", self.jitter, finite(self.jitter) and self.jitter >= 0 and self.jitter <= 1,
    "a number from 0 to 1")
  return self
end

-- policy:backoff(n) -> seconds to wait before attempt n+1 (n >= 1).
function Policy:backoff(n)
  local d = self.backoff_base * 2 ^ (n - 1)
  if d > self.backoff_max then d = self.backoff_max end
  return d * (1 - self.jitter * self.random())
end

-- ------------------------------------------------------------ the send loop

-- policy:deliver(ops) -> result, attempts | nil, last_err, attempts
-- The retry / re-auth / reconnect loop for any transport. ops:
--   clock()                         seconds
--   try(attempt) -> result | nil, err, stage, handle   one attempt ("open" or "send" failed)
--   classify(err, attempt, stage)   -> action (policy.classify plus the profile's hook)
--   failed(err, action, attempt, handle)   undo what the attempt holds (drop the session,
--                                   lower the concurrency on "throttle", ...)
--   trace(ev)
-- "reauth" here is final: the transport's open already refreshed and retried once.
function Policy:deliver(ops)
  local started = ops.clock()
  local attempt, last = 0, nil
  while attempt < self.attempts do
    attempt = attempt + 1
    local result, err, stage, handle = ops.try(attempt)
    if result then return result, attempt end
    local action = ops.classify(err, attempt, stage)
    if action == "reauth" then action = "fail" end
    last = err
    ops.failed(err, action, attempt, handle)
    if action == "fail" then break end
    local pause = 0
    if action == "reconnect" then
      if attempt > 1 then pause = self:backoff(attempt - 1) end
    else -- throttle, retry
      pause = self:backoff(attempt)
      -- a server that says how long to wait (HTTP Retry-After) is believed
      local asked = type(err) == "table" and tonumber(err.retry_after)
      if asked and asked == asked and asked >= 0 then pause = asked end
    end
    if attempt >= self.attempts then break end
    if ops.clock() - started + pause > self.max_time then
      ops.trace { event = "give_up", reason = "max_time" }
      break
    end
    if pause > 0 then self.sleep(pause) end
  end
  return nil, last, attempt
end

-- ------------------------------------------------------------ governor

local Governor = {}
Governor.__index = Governor

-- A sliding window of sends: a queue with a head index and a running sum
-- of recipients, so pruning and the recipients-per-day check cost O(1)
-- amortized per message (a day can hold 10,000 sends under Exchange's limit;
-- summing or shifting the whole day per message made batches quadratic).
local Window = {}
Window.__index = Window

local function window()
  return setmetatable({ t = {}, n = {}, head = 1, tail = 0, sum = 0 }, Window)
end

function Window:count() return self.tail - self.head + 1 end

-- the k-th oldest send in the window (1-based): its time and recipients
function Window:at(k)
  local i = self.head + k - 1
  return self.t[i], self.n[i]
end

function Window:push(t, n)
  self.tail = self.tail + 1
  self.t[self.tail], self.n[self.tail] = t, n
  self.sum = self.sum + n
end

function Window:prune(horizon)
  while self.head <= self.tail and self.t[self.head] <= horizon do
    self.sum = self.sum - self.n[self.head]
    self.t[self.head], self.n[self.head] = nil, nil
    self.head = self.head + 1
  end
end

-- policy.governor(limits, {clock=, sleep=}) -> governor
-- limits: messages_per_minute, messages_per_day, recipients_per_day,
-- recipients_per_message, connections, on_limit ("wait"|"fail"), max_wait.
-- Share one governor between mailers of the same mailbox to count them together.
function M.governor(limits, opts)
  limits = limits or {}
  opts = opts or {}
  for _, k in ipairs { "messages_per_minute", "messages_per_day", "recipients_per_day", "recipients_per_message",
    "connections" } do
    count("policy.governor", k, limits[k], true)
  end
  seconds("policy.governor", "max_wait", limits.max_wait)
  return setmetatable({
    limits = limits,
    connections = limits.connections,     -- lowered by 432 4.3.2
    on_limit = limits.on_limit or "wait",
    max_wait = limits.max_wait or 120,
    clock = opts.clock or M.default_clock(),
    sleep = opts.sleep or waiter.sleep,
    minute = window(),   -- sends within the last minute
    day = window(),      -- sends within the last 24 hours, with their recipients
    -- messages admitted and still in flight (reserve), not yet in a window:
    -- concurrent senders yield between admit and record, and each must see
    -- the room the others took
    reserved = { messages = 0, recipients = 0 },
    changed = waiter.cond(),   -- signalled when a reservation ends
    waiting = 0,               -- senders waiting on it
    open = 0,      -- connections held now
    trace = opts.trace,
  }, Governor)
end

local function limit_error(what, wait, fields)
  local f = { reason = "rate_limit", retryable = true, retry_after = wait }
  for k, v in pairs(fields or {}) do f[k] = v end
  return errors.new("policy", what, f)
end

-- policy.recipients_problem(limits, n) -> nil | error: a message with n
-- recipients that no wait can let through (the local and the shared
-- governor both refuse it at once).
function M.recipients_problem(L, n)
  if L.recipients_per_message and n > L.recipients_per_message then
    return errors.new("policy", string.format("%d recipients in one message; the limit is %d",
      n, L.recipients_per_message), { reason = "recipients_per_message", retryable = false })
  end
  if L.recipients_per_day and n > L.recipients_per_day then
    return errors.new("policy", string.format("%d recipients exceed the daily limit of %d",
      n, L.recipients_per_day), { reason = "recipients_per_day", retryable = false })
  end
end

-- Messages and recipients admitted and not yet in a window: the
-- reservations, and the caller's own batch (`ahead`).
function Governor:in_flight(ahead)
  local m, r = self.reserved.messages, self.reserved.recipients
  if ahead then m, r = m + ahead.messages, r + ahead.recipients end
  return m, r
end

-- Seconds until one more message fits a window that holds `extra` in-flight
-- messages beside its sends: 0 now, or nil when the in-flight ones alone
-- fill it (they leave only by being released, or `span` after they are sent).
local function room_in(win, limit, extra, span, now)
  local over = win:count() + extra - limit + 1   -- sends that must leave first
  if over <= 0 then return 0 end
  if over > win:count() then return nil end
  return win:at(over) + span - now
end

-- governor:wait_for(n [, ahead]) -> seconds, why, in_flight | nil, err:
-- seconds until a message with n recipients fits every window beside the
-- messages in flight (0: now). in_flight: the longest wait is for messages
-- in flight, and `seconds` is how long they would take to leave the window
-- once sent; one that is cancelled gives its room back at once.
-- the longest wait so far (wait, why, blocked) against one more limit's:
-- w seconds, or nil when only messages in flight stand in the way (then
-- `span`, and blocked = true)
local function worse(wait, why, blocked, w, what, span)
  local flight = not w
  if flight then w = span end
  if w > wait then return w, what, flight end
  return wait, why, blocked
end

function Governor:wait_for(n, ahead)
  local L = self.limits
  local never = M.recipients_problem(L, n)
  if never then return nil, never end
  -- no window to wait for (the profile sets no rate)
  if not (L.messages_per_minute or L.messages_per_day or L.recipients_per_day) then return 0, nil, false end
  local now = self.clock()
  self.minute:prune(now - 60)
  self.day:prune(now - 86400)
  local fm, fr = self:in_flight(ahead)
  local wait, why, blocked = 0, nil, false
  if L.messages_per_minute then
    wait, why, blocked = worse(wait, why, blocked, room_in(self.minute, L.messages_per_minute, fm, 60, now),
      "messages_per_minute", 60)
  end
  if L.messages_per_day then
    wait, why, blocked = worse(wait, why, blocked, room_in(self.day, L.messages_per_day, fm, 86400, now),
      "messages_per_day", 86400)
  end
  if L.recipients_per_day then
    -- the oldest sends that must leave the window before n more fit
    local day = self.day
    local total, k = day.sum + fr, 1
    while total + n > L.recipients_per_day and k <= day:count() do
      local t, m = day:at(k)
      total = total - m
      wait, why, blocked = worse(wait, why, blocked, t + 86400 - now, "recipients_per_day")
      k = k + 1
    end
    if total + n > L.recipients_per_day then
      wait, why, blocked = worse(wait, why, blocked, nil, "recipients_per_day", 86400)
    end
  end
  return wait, why, blocked
end

-- Does a message with n recipients fit every window now, beside the
-- messages in flight (the reservations, and `ahead`: {messages=, recipients=}
-- a batch admitted and has not sent yet)?
function Governor:fits(n, ahead)
  return self:wait_for(n, ahead) == 0
end

-- Wait (bounded by max_wait) or fail until a message with n recipients fits:
-- true | nil, err. A wait that only messages in flight cause ends as soon as
-- one of them is released or sent (re-checked every second); a wait for the
-- window to slide sleeps until it has.
function Governor:room(n)
  local waited, told = 0, nil
  while true do
    local wait, why, in_flight = self:wait_for(n)
    if not wait then return nil, why end
    if wait <= 0 then return true end
    if self.on_limit == "fail" or waited >= self.max_wait or (not in_flight and waited + wait > self.max_wait) then
      return nil, limit_error(string.format("sending limit reached (%s = %d); the next message may go in %.0f s",
        why, self.limits[why], wait), wait, { limit = why, in_flight = in_flight or nil })
    end
    if self.trace and told ~= why then
      told = why
      self.trace { type = "policy", event = "hold", limit = why, seconds = wait, in_flight = in_flight or nil }
    end
    if in_flight then
      local slice = math.min(wait, self.max_wait - waited, 1)
      local t0 = waiter.now()
      self.waiting = self.waiting + 1
      local woken = self.changed:wait(t0 + slice)
      self.waiting = self.waiting - 1
      if woken then
        waited = waited + (waiter.now() - t0)
      else
        -- the deadline passed, or this thread cannot park (the main
        -- thread under the default waiter): the slice is slept
        local left = t0 + slice - waiter.now()
        if left > 0 then self.sleep(left) end
        waited = waited + slice
      end
    else
      self.sleep(wait)
      waited = waited + wait
    end
  end
end

-- governor:admit(n [, ahead]) -> true | nil, err | false: wait (bounded by
-- max_wait) or fail until a message with n recipients may go, reserving
-- nothing (reserve does). With `ahead` (messages a batch admitted and has
-- not sent yet: {messages=, recipients=}, the batch's own reservation) a
-- message that does not fit beside them and the reservations now is not
-- waited for: false, and the batch goes first (send_many).
function Governor:admit(n, ahead)
  if ahead and ahead.messages > 0 then return self:fits(n, ahead) end
  return self:room(n)
end

-- governor:reserve(n) -> reservation | nil, err: admit, and hold the
-- message's room (one message, n recipients) until record(n, reservation)
-- counts it as sent or cancel(reservation) gives it back. Every other
-- sender sees the room as taken meanwhile, so senders in flight together
-- never exceed a limit.
function Governor:reserve(n)
  local ok, err = self:room(n)
  if not ok then return nil, err end
  local r = self.reserved
  r.messages, r.recipients = r.messages + 1, r.recipients + n
  return { n = n, done = false }
end

-- governor:try_reserve(n) -> reservation | false (no room now: nothing
-- waited, nothing taken) | nil, err (it never fits). For a batch that
-- fills up with what fits and sends that first (mailer:send_many).
function Governor:try_reserve(n)
  local wait, why = self:wait_for(n)
  if not wait then return nil, why end
  if wait > 0 then return false end
  local r = self.reserved
  r.messages, r.recipients = r.messages + 1, r.recipients + n
  return { n = n, done = false }
end

-- Ends a reservation once: true when this call ended it.
local function settle(self, res)
  if not res or res.done then return false end
  res.done = true
  local r = self.reserved
  r.messages, r.recipients = r.messages - 1, r.recipients - res.n
  return true
end

-- governor:cancel(reservation): the message was not sent (refused, failed,
-- an error raised); its room is free again. A second call does nothing.
function Governor:cancel(res)
  if settle(self, res) and self.waiting > 0 then self.changed:signal() end
end

-- governor:record(n [, reservation]): a message with n recipients was
-- sent; its reservation, if any, ends. Counted in the windows a limit reads
-- (a limit set later counts from then on).
function Governor:record(n, res)
  local ended = settle(self, res)
  local L = self.limits
  local minute, day = L.messages_per_minute, L.messages_per_day or L.recipients_per_day
  if minute or day then
    local now = self.clock()
    if minute then self.minute:push(now, 1) end
    if day then self.day:push(now, n) end
  end
  -- a sender waiting on messages in flight now waits for the window instead
  if ended and self.waiting > 0 then self.changed:signal() end
end

-- governor:acquire() -> true | nil, err: take one of the mailbox's connections.
-- A single mailer holds at most one; a governor shared by several mailers
-- (coroutines) makes them wait for each other, polling, within max_wait.
function Governor:acquire()
  local waited = 0
  while self.connections and self.open >= self.connections do
    if self.on_limit == "fail" or waited >= self.max_wait then
      return nil, limit_error(string.format("all %d connections to this mailbox are in use", self.connections), 1,
        { limit = "connections" })
    end
    self.sleep(0.05)
    waited = waited + 0.05
  end
  self.open = self.open + 1
  return true
end

function Governor:release()
  if self.open > 0 then self.open = self.open - 1 end
end

-- governor:lower(): the server said too many connections; allow one fewer
-- (never fewer than one).
function Governor:lower()
  local cur = self.connections or math.max(self.open, 1)
  local new = math.max(1, cur - 1)
  self.connections = new
  if self.trace then self.trace { type = "policy", event = "concurrency", connections = new } end
  return new
end

return M
