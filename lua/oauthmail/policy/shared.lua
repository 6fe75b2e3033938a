-- oauthmail.policy.shared — the mailbox governor shared through Redis, so the
-- provider's per-mailbox limits hold across processes and machines
-- (limits.shared = { kind = "redis", url = ... }). Same interface as the
-- in-memory governor of oauthmail.policy (admit, record, acquire, release,
-- lower, connections), kept in a few Redis keys per mailbox and changed only
-- by scripts, each one round trip, all on the Redis server's clock:
--   sem   sorted set: connection holders, scored by the end of their lease
--         (a crashed holder's slot comes back when its lease runs out)
--   low   the connection limit lowered by a 432 4.3.2, for `throttle` seconds
--   min   sorted set: messages of the last minute
--   day   sorted set: messages of the last day, members "id:recipients"
-- admit reserves the message's place in the windows (two workers cannot both
-- take the last one); record has nothing left to do, cancel takes the place
-- back for a message that was not sent. See docs/redis.md.
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local redis = require "oauthmail.redis"
local policy = require "oauthmail.policy"
local wait = require "oauthmail.wait"

local M = {}
local Shared = {}
Shared.__index = Shared

local FIELDS = {
  kind = "string", url = "string", prefix = "string", lease = "number", linger = "number", throttle = "number",
  minute = "number", day = "number", timeout = "number", ca_file = "string", ca_path = "string",
  verify = "boolean", servername = "string", client_cert = "string", client_key = "string",
  username = "string", password = "string", password_env = "string", client = "table",
}

local ACQUIRE = [[
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[3])
local low = tonumber(redis.call('GET', KEYS[2]) or '')
if low and low < limit then limit = low end
local held = redis.call('ZCARD', KEYS[1])
if held < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return {1, limit, held + 1}
end
return {0, limit, held}]]

-- A given-back slot lingers a moment: the server counts a connection until
-- it has processed its close, and a new one from another process must not
-- arrive before that.
local RELEASE = [[
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])]]

-- Extend our own leases; return the ids whose lease ran out and whose slot
-- may have gone to someone else (an idle process loses its slots).
local RENEW = [[
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost]]

local LOWER = [[
local cur = tonumber(redis.call('GET', KEYS[1]) or '') or tonumber(ARGV[1])
if cur > tonumber(ARGV[1]) then cur = tonumber(ARGV[1]) end
local new = cur - 1
if new < 1 then new = 1 end
redis.call('SET', KEYS[1], new, 'PX', tonumber(ARGV[2]))
return new]]

-- ARGV: id, n, per_minute, per_day, recipients_per_day, minute_ms, day_ms (0: no limit)
local ADMIT = [[
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n, pm, pd, rd = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local mms, dms = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - mms)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - dms)
local wait, why = 0, ''
if pm > 0 then
  local c = redis.call('ZCARD', KEYS[1])
  if c >= pm then
    local e = redis.call('ZRANGE', KEYS[1], c - pm, c - pm, 'WITHSCORES')
    local w = tonumber(e[2]) + mms - now
    if w > wait then wait, why = w, 'messages_per_minute' end
  end
end
if pd > 0 then
  local c = redis.call('ZCARD', KEYS[2])
  if c >= pd then
    local e = redis.call('ZRANGE', KEYS[2], c - pd, c - pd, 'WITHSCORES')
    local w = tonumber(e[2]) + dms - now
    if w > wait then wait, why = w, 'messages_per_day' end
  end
end
if rd > 0 then
  local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #all, 2 do total = total + tonumber(string.match(all[i], ':(%d+)$')) end
  local i = 1
  while total + n > rd and all[i] do
    total = total - tonumber(string.match(all[i], ':(%d+)$'))
    local w = tonumber(all[i + 1]) + dms - now
    if w > wait then wait, why = w, 'recipients_per_day' end
    i = i + 2
  end
end
if wait > 0 then return {0, wait, why} end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1] .. ':' .. n)
redis.call('PEXPIRE', KEYS[1], mms + 1000)
redis.call('PEXPIRE', KEYS[2], dms + 1000)
return {1}]]

-- A reserved place given back: the message was not sent.
local CANCEL = [[
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1] .. ':' .. ARGV[2])]]

-- shared.new(limits, {mailbox=, trace=, sleep=}) -> governor
-- limits: the profile's limits table, limits.shared the Redis options:
--   url, prefix ("oauthmail:"), lease (120 s), linger (1 s: a given-back slot
--   stays taken that long, while the server sees the close), throttle (600 s: how long a
--   432 4.3.2 lowers the limit for all), minute (60) and day (86400) window
--   lengths in seconds, timeout, TLS options, username/password/password_env.
function M.new(limits, opts)
  opts = opts or {}
  local spec = limits.shared
  if type(spec) ~= "table" then error("limits.shared: expected a table", 2) end
  require("oauthmail.store").check_options("limits.shared", spec, FIELDS, 2)
  if spec.kind ~= "redis" then error("limits.shared: 'kind' must be \"redis\"", 2) end
  if not spec.url and not spec.client then error("limits.shared: 'url' is required (redis:// or rediss://)", 2) end
  if type(opts.mailbox) ~= "string" or opts.mailbox == "" then
    error("limits.shared: the mailer has no user, so there is no mailbox to share limits for", 2)
  end
  local ropts = redis.client_options("limits.shared", spec)
  local client = spec.client
  if not client then
    local ok, c = pcall(redis.new, ropts)
    if not ok then error("limits.shared: " .. tostring(c):gsub("^redis%.new: ", ""), 2) end
    client = c
  end
  local base = (spec.prefix or "oauthmail:") .. "gov:" .. crypto.hex(crypto.sha256(opts.mailbox)):sub(1, 32) .. ":"
  local self = setmetatable({
    shared = true,
    client = client,
    limits = limits,
    configured = limits.connections,
    connections = limits.connections,   -- the local pool's size; follows the shared limit
    on_limit = limits.on_limit or "wait",
    max_wait = limits.max_wait or 120,
    sleep = opts.sleep or wait.sleep,
    trace = opts.trace,
    lease_ms = math.floor((spec.lease or 120) * 1000),
    linger_ms = math.max(1, math.floor((spec.linger or 1) * 1000)),
    throttle_ms = math.floor((spec.throttle or 600) * 1000),
    minute_ms = math.floor((spec.minute or 60) * 1000),
    day_ms = math.floor((spec.day or 86400) * 1000),
    keys = { sem = base .. "sem", low = base .. "low", min = base .. "min", day = base .. "day" },
    me = crypto.hex(crypto.random(8)),
    seq = 0,
    held = {},
    lost = {},    -- slots whose lease ran out while their sessions stayed open
  }, Shared)
  return self
end

function Shared:describe() return "shared limits on " .. self.client:describe() end

local function unavailable(self, err)
  return errors.fail("policy", self:describe() .. ": " .. tostring(err.message),
    { reason = "shared", retryable = true, cause = err.reason })
end

local function limit_error(what, seconds, fields)
  local f = { reason = "rate_limit", retryable = true, retry_after = seconds }
  for k, v in pairs(fields or {}) do f[k] = v end
  return errors.new("policy", what, f)
end

function Shared:next_id()
  self.seq = self.seq + 1
  return self.me .. "-" .. self.seq
end

-- governor:acquire() -> true | nil, err: one of the mailbox's connections,
-- counted across every process that shares the limits; waits (polling the
-- semaphore) within max_wait.
function Shared:acquire()
  if not self.configured then return true end
  local deadline = wait.now() + self.max_wait
  local pause = 0.02
  while true do
    local ok, err = self:try_acquire()
    if ok or err then return ok, err end
    if wait.now() + pause > deadline then
      return nil, limit_error(string.format("all %d connections to this mailbox are in use (shared)",
        self.connections), 1, { limit = "connections" })
    end
    self.sleep(pause)
    if pause < 0.2 then pause = pause * 2 end
  end
end

-- governor:try_acquire() -> true | false, nil, retry_after_seconds | nil, err:
-- one attempt, no waiting (the pool waits, so it can take back a session of
-- its own meanwhile).
function Shared:try_acquire()
  if not self.configured then return true end
  local id = self:next_id()
  local r, err = self.client:eval(ACQUIRE, { self.keys.sem, self.keys.low }, { id, self.lease_ms, self.configured })
  if not r then return unavailable(self, err) end
  if r[2] ~= self.connections then
    self.connections = r[2]
    if self.trace then self.trace { type = "policy", event = "concurrency", connections = r[2], shared = true } end
  end
  if r[1] == 1 then
    self.held[#self.held + 1] = id
    return true
  end
  if self.on_limit == "fail" then
    return nil, limit_error(string.format("all %d connections to this mailbox are in use (shared)", r[2]), 1,
      { limit = "connections" })
  end
  return false, nil, 0.05
end

-- A session given back: a slot whose lease was lost goes first (it is no
-- longer in Redis), so the sessions left match the slots still held.
function Shared:release()
  if #self.lost > 0 then
    table.remove(self.lost)
    return
  end
  local id = table.remove(self.held)
  if not id then return end
  self.client:eval(RELEASE, { self.keys.sem }, { id, self.linger_ms })
end

-- Extend the leases this process holds (done on every admit, so a busy
-- session never loses its slot). A slot found lost (this process was idle
-- longer than the lease) is counted in lost_count(): the pool closes that
-- many idle sessions before it uses one, so the mailbox never has more
-- connections than slots.
function Shared:renew()
  if #self.held == 0 then return true end
  local args = { self.lease_ms }
  for _, id in ipairs(self.held) do args[#args + 1] = id end
  local lost, err = self.client:eval(RENEW, { self.keys.sem }, args)
  if err then return unavailable(self, err) end
  if type(lost) == "table" and #lost > 0 then
    local gone = {}
    for _, id in ipairs(lost) do gone[id] = true end
    local keep = {}
    for _, id in ipairs(self.held) do
      if gone[id] then self.lost[#self.lost + 1] = id else keep[#keep + 1] = id end
    end
    self.held = keep
    if self.trace then self.trace { type = "policy", event = "lease_lost", slots = #lost, shared = true } end
  end
  return true
end

function Shared:lost_count() return #self.lost end

-- governor:lower(): a 432 4.3.2 seen here lowers the limit for everyone
-- sharing it, for `throttle` seconds.
function Shared:lower()
  local cur = self.configured or math.max(#self.held, 1)
  local new, err = self.client:eval(LOWER, { self.keys.low }, { cur, self.throttle_ms })
  if not new then new = math.max(1, (self.connections or cur) - 1) end
  self.connections = new
  if self.trace then self.trace { type = "policy", event = "concurrency", connections = new, shared = true,
    error = err and err.message or nil } end
  return new
end

-- governor:reserve(n) -> reservation | nil, err: the message's place in the
-- shared windows, reserved; waits within max_wait or fails, like the local
-- governor. record(n, reservation) keeps the place, cancel(reservation)
-- gives it back.
-- One look at the shared windows: a reservation, or false and how long
-- until there is room and which limit says so | nil, err.
local function attempt(self, n)
  local L = self.limits
  local id = self:next_id()
  local r, err = self.client:eval(ADMIT, { self.keys.min, self.keys.day }, { id, n,
    L.messages_per_minute or 0, L.messages_per_day or 0, L.recipients_per_day or 0, self.minute_ms, self.day_ms })
  if not r then return unavailable(self, err) end
  if r[1] ~= 1 then return false, r[2] / 1000, r[3] end
  local res = { n = n, id = id }
  if #self.held > 0 then
    local ok, rerr = self:renew()
    if not ok then
      self:cancel(res)
      return nil, rerr
    end
  end
  return res
end

-- What settles a reservation before any window is asked: a message no
-- wait lets through (nil, err), or a profile without windows (a
-- reservation; the leases are still kept alive). Nothing: ask the windows.
local function settled_at_once(self, n)
  local L = self.limits
  local never = policy.recipients_problem(L, n)
  if never then return true, nil, never end
  if L.messages_per_minute or L.messages_per_day or L.recipients_per_day then return false end
  local ok, err = self:renew()
  if not ok then return true, nil, err end
  return true, { n = n }
end

function Shared:reserve(n)
  local done, now, err = settled_at_once(self, n)
  if done then return now, err end
  local L = self.limits
  local waited = 0
  while true do
    local res, secs, why = attempt(self, n)
    if res ~= false then return res, secs end
    if self.on_limit == "fail" or waited + secs > self.max_wait then
      return nil, limit_error(string.format("sending limit reached (%s = %d, shared); the next message may go in %.0f s",
        why, L[why], secs), secs, { limit = why })
    end
    if self.trace then self.trace { type = "policy", event = "hold", limit = why, seconds = secs, shared = true } end
    self.sleep(secs)
    waited = waited + secs
  end
end

-- shared:try_reserve(n) -> reservation | false (no room now) | nil, err:
-- as the local governor's, for send_many's batches.
function Shared:try_reserve(n)
  local done, res, err = settled_at_once(self, n)
  if done then return res, err end
  res, err = attempt(self, n)
  if res == false then return false end
  return res, err
end

function Shared:admit(n)
  local res, err = self:reserve(n)
  if not res then return nil, err end
  return true
end

-- governor:record(n [, reservation]): reserve already counted the message.
function Shared.record(_, _, res)
  if res then res.done = true end
end

-- governor:cancel(reservation): the message was not sent; its place in the
-- windows is given back (once). If Redis cannot be reached the place stays
-- counted until it leaves the window: the error is on the safe side.
function Shared:cancel(res)
  if not res or res.done then return end
  res.done = true
  if not res.id then return end
  local ok, r, err = errors.pcall(self.client.eval, self.client, CANCEL, { self.keys.min, self.keys.day },
    { res.id, res.n })
  if self.trace and not (ok and r) then
    self.trace { type = "policy", event = "cancel_failed", shared = true,
      error = tostring(ok and err and err.message or r) }
  end
end

function Shared:close()
  self.lost = {}
  while #self.held > 0 do self:release() end
end

M.Shared = Shared
return M
