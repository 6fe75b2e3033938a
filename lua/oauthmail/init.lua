-- oauthmail — the API most users touch: oauthmail.new(profile) -> mailer,
-- mailer:send(message) -> receipt, mailer:close(). The mailer keeps one
-- authenticated SMTP session while its token has margin left, and applies the
-- send policy (oauthmail.policy): re-authenticate once on 535, reconnect and
-- send again on 421 / a dropped connection / a timeout before the final reply,
-- back off on 4xx, stop on 5xx; a message counts as sent only after the
-- server's 2xx to the end of its data. See docs/mailer.md.
local errors = require "oauthmail.errors"
local profile_mod = require "oauthmail.profile"
local policy_mod = require "oauthmail.policy"
local redact = require "oauthmail.redact"
local decoder = require "oauthmail.decoder"
local smtp = require "oauthmail.smtp"
local tokens = require "oauthmail.tokens"

local M = { _VERSION = "oauthmail 0.1" }

local Mailer = {}
Mailer.__index = Mailer

-- ------------------------------------------------------------ tracing

local function flatten(ev, skip)
  local parts = {}
  for k, v in pairs(ev) do
    if not (skip and skip[k]) and type(v) ~= "table" and type(v) ~= "function" then
      parts[#parts + 1] = tostring(k) .. "=" .. tostring(v)
    end
  end
  table.sort(parts)
  return table.concat(parts, " ")
end

local ARROWS = { C = "C:", S = "S:", send = ">", recv = "<", info = "*" }
local SKIP = { type = true, event = true, kind = true, profile = true }

-- oauthmail.format_event(ev) -> one readable line for a trace event (SMTP and
-- HTTP lines arrive redacted; other events carry no secrets).
-- Control bytes are escaped whatever the event's origin, so one event is
-- always one line.
function M.format_event(ev)
  if ev.proto then
    return redact.escape(string.format("%-4s %s %s", ev.proto, ARROWS[ev.dir] or tostring(ev.dir), tostring(ev.text or "")))
  end
  local what = ev.type or ev.kind or "event"
  local rest = flatten(ev, SKIP)
  return redact.escape(what .. " " .. tostring(ev.event or "") .. (rest ~= "" and (" " .. rest) or ""))
end

-- A trace given as a path appends one line per event to that file. A file
-- that does not exist yet is made 0600 (fs.atomic_write sets the mode
-- whatever the umask) before anything is written to it; an existing file
-- keeps its mode, which is then the owner's choice.
local function file_trace(path)
  local checked = false
  return function(ev)
    if not checked then
      checked = true
      local fs = require("oauthmail.core").fs
      local st, serr = fs.stat(path)
      if not st and serr and serr.reason == "missing" then fs.atomic_write(path, "", 384) end
    end
    local f = io.open(path, "a")
    if not f then return end
    f:write(os.date("!%Y-%m-%dT%H:%M:%SZ "), M.format_event(ev), "\n")
    f:close()
  end
end

-- The user's trace function is called protected: a trace that raises must
-- not turn a delivered message into an exception (a caller that retries on
-- exceptions would send it again). Its first error of a send is kept for
-- the receipt (or the error) as trace_error; later events still go to it.
function Mailer:_trace(ev)
  if self.trace then
    if not ev.proto and not ev.kind then ev.type = ev.type or "mailer" end
    ev.profile = self.name
    local ok, terr = pcall(self.trace, ev)
    if not ok and not self.trace_error then
      self.trace_error = (tostring(terr):gsub("^[^:]*:%d+: ", ""))
    end
  end
end

-- ------------------------------------------------------------ construction

-- oauthmail.new(profile) -> mailer | nil, err
-- profile: a table or the path of a Lua file returning one (docs/profiles.md).
function M.new(profile)
  if type(profile) ~= "table" and type(profile) ~= "string" then
    error("oauthmail.new: expected a profile table or a file path, got " .. type(profile), 2)
  end
  local s, err = profile_mod.read(profile)
  if not s then return nil, err end
  local pol = s.policy
  local clock = pol.clock or policy_mod.default_clock()
  local self = setmetatable({
    settings = s, name = s.name, user = s.user, hooks = s.hooks,
    sent = 0, closed = false,
  }, Mailer)
  if type(s.trace) == "string" then self.trace = file_trace(s.trace) else self.trace = s.trace end
  local policy_opts = {}
  for k, v in pairs(pol) do if k ~= "governor" then policy_opts[k] = v end end
  policy_opts.clock = clock
  self.policy = policy_mod.new(policy_opts)
  self.governor = pol.governor or policy_mod.governor(s.limits, {
    clock = clock, sleep = self.policy.sleep, trace = self.trace and function(ev) self:_trace(ev) end,
  })
  local flow = {}
  for k, v in pairs(s.oauth) do flow[k] = v end
  if self.trace then flow.trace = function(ev) self:_trace(ev) end end
  local ok, mgr = pcall(tokens.new, {
    flow = flow, store = s.store, margin = s.margin, interactive = s.interactive,
    profile = s.name, clock = function() return math.floor(clock()) end,
    trace = self.trace and function(ev) self:_trace(ev) end,
  })
  if not ok then
    -- name the option tokens.new refused; only store problems are the store's
    local msg = tostring(mgr):gsub("^[^:]*:%d+: ", "")
    local field = msg:match("^tokens%.new: '([%w_]+)'")
    if msg:find("store", 1, true) then field = "store" end
    field = field or "profile"
    return errors.fail("config", field .. ": " .. msg:gsub("^tokens%.new: ", ""),
      { reason = "profile", field = field, retryable = false })
  end
  self.tokens = mgr
  self.clock = clock
  return self
end

-- ------------------------------------------------------------ messages

local function list_of(v)
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  return v
end

-- Bring any accepted message shape to {from, to, data() -> fresh source, message_id}.
function Mailer:_prepare(msg)
  if type(msg) ~= "table" then error("mailer:send: expected a message table", 3) end
  if type(msg.reader) == "function" and type(msg.envelope) == "table" then
    -- a message composed by oauthmail.message: a new reader for every attempt
    local env = msg.envelope
    -- its exact size goes into SIZE= (an oversized message is refused before
    -- any data is sent), and BODY=8BITMIME only when it really has 8-bit bytes
    return { from = env.from, to = list_of(env.to), message_id = msg.message_id,
      size = msg.size and msg:size() or nil, eight_bit = msg.has_8bit and true or false,
      data = function() return msg:reader() end }
  end
  local message = require "oauthmail.message"
  local raw = msg.raw or msg.data
  if raw ~= nil then
    -- raw text is read the one way message.from_raw reads it: Bcc removed,
    -- Date and Message-ID added when missing, every address header checked;
    -- the envelope is the call's to/cc/bcc, else the headers'
    if type(raw) ~= "string" then error("mailer:send: 'raw' must be the message text (a string)", 3) end
    local to = {}
    for _, field in ipairs { "to", "cc", "bcc" } do
      local l = list_of(msg[field])
      if type(l) ~= "table" then error("mailer:send: '" .. field .. "' must be an address or a list", 3) end
      for _, a in ipairs(l) do to[#to + 1] = a end
    end
    local m, err = message.from_raw(raw, { from = msg.from or self.settings.from, to = #to > 0 and to or nil })
    if not m then return nil, err end
    return self:_prepare(m)
  end
  local t = {}
  for k, v in pairs(msg) do t[k] = v end
  t.from = t.from or self.settings.from
  local m, err = message.compose(t)
  if not m then return nil, err end
  return self:_prepare(m)
end

-- ------------------------------------------------------------ sessions

function Mailer:_drop_session(reason)
  local s = self.session
  if not s then return end
  self.session = nil
  self:_trace { event = "session_closed", reason = reason }
  s:close()
  self.governor:release()
end

function Mailer:_session_usable()
  local s = self.session
  if not s or s.broken or s.closed then return false end
  if not self.policy.reuse then return false end
  if self.session_sent >= self.policy.max_messages_per_session then return false end
  local exp = self.session_token_expires
  if exp and exp - self.clock() < self.session_margin then return false end
  return true
end

function Mailer:_explain(err)
  if errors.is(err) or type(err) == "table" then decoder.explain(err, self.settings.ctx) end
  return err
end

function Mailer:_token()
  local tok, err = self.tokens:get()
  if not tok then
    -- the token layer retried what it could: the send policy must not multiply it
    if type(err) == "table" then err.stage = err.stage or "token" end
    return nil, self:_explain(err)
  end
  if tok.access_token ~= self.last_access_token then
    self.last_access_token = tok.access_token
    self:_trace { event = "token", expires_at = tok.expires_at }
    if self.hooks.on_token then self.hooks.on_token(tok) end
  end
  return tok
end

function Mailer:_auth(s, tok)
  local o = self.settings.smtp
  return s:auth { mechanism = o.mechanism, user = self.user, token = tok.access_token, two_step = o.two_step }
end

function Mailer:_connect()
  local o = {}
  for k, v in pairs(self.settings.smtp) do o[k] = v end
  o.mechanism, o.two_step = nil, nil
  o.trace = self.trace and function(ev) self:_trace(ev) end
  return smtp.open(o)
end

-- Connect and authenticate while holding a governor slot. On a refused
-- authentication the token is invalidated, refreshed once, and tried once
-- more. Returns s, tok | nil, err; self.opening is the session to close
-- when it does not return one.
function Mailer:_connect_auth(tok)
  local s, err = self:_connect()
  if not s then return nil, self:_explain(err) end
  self.opening = s
  local ok
  ok, err = self:_auth(s, tok)
  if not ok and self.policy.reauth and policy_mod.classify(err) == "reauth" then
    self:_trace { event = "reauth", code = err.code, enhanced = err.enhanced }
    self.tokens:invalidate(tok)
    local terr
    tok, terr = self:_token()
    if not tok then return nil, terr, s end
    if s.broken then
      s:close()
      s, err = self:_connect()
      if not s then return nil, self:_explain(err) end
      self.opening = s
    end
    ok, err = self:_auth(s, tok)
  end
  if not ok then return nil, self:_explain(err), s end
  return s, tok
end

-- A session authenticated with a token that has margin left. The governor
-- slot taken here is given back on every path that does not keep the
-- session, a raise below included (re-raised once the slot is free).
function Mailer:_open()
  if self:_session_usable() then return self.session end
  if self.session then self:_drop_session("renew") end
  local tok, err = self:_token()
  if not tok then return nil, err end
  local ok
  ok, err = self.governor:acquire()
  if not ok then return nil, err end
  self.opening = nil
  local done, s, tok2 = errors.pcall(self._connect_auth, self, tok)
  local opened = self.opening
  self.opening = nil
  if not done or not s then
    if opened then pcall(opened.close, opened) end
    self.governor:release()
    if not done then error(s, 0) end
    return nil, tok2
  end
  tok = tok2
  self.session, self.session_sent = s, 0
  self.session_token_expires = tok.expires_at
  -- the token manager's rule: a token that lives shorter than the margin
  -- is used for half its remaining life, not refused outright
  self.session_margin = self.tokens:margin_for { expires_at = tok.expires_at, obtained_at = self.clock() }
  self:_trace { event = "session_open", host = self.settings.smtp.host }
  return s
end

-- ------------------------------------------------------------ sending

local function rejected_list(map)
  local out = {}
  for addr, r in pairs(map or {}) do
    local e = { address = addr, code = r.code, enhanced = r.enhanced, text = r.text }
    out[#out + 1] = decoder.explain(e)
  end
  table.sort(out, function(a, b) return a.address < b.address end)
  return out
end

local ACTIONS = { reauth = true, reconnect = true, throttle = true, retry = true, fail = true }

-- mailer:send(message) -> receipt | nil, err
-- receipt = {message_id, accepted, rejected, attempts, transport="smtp", reply={code, enhanced, text}}
function Mailer:send(msg)
  if self.closed then error("mailer:send: the mailer is closed", 2) end
  self.trace_error = nil
  if self.hooks.before_send then
    local r, why = self.hooks.before_send(msg)
    if r == false then
      return errors.fail("policy", "before_send refused the message" .. (why and (": " .. tostring(why)) or ""),
        { reason = "before_send", retryable = false })
    elseif type(r) == "table" then
      msg = r
    end
  end
  local m, perr = self:_prepare(msg)
  if not m then return nil, perr end
  if type(m.from) ~= "string" then error("mailer:send: no sender: set from in the message or the profile", 2) end
  local ok, err = self.governor:admit(#m.to)
  if not ok then return nil, err end
  local pol = self.policy
  local started = self.clock()
  local attempt, last = 0, nil
  while attempt < pol.attempts do
    attempt = attempt + 1
    local action
    local s, oerr = self:_open()
    if not s then
      err = oerr
    else
      local receipt
      receipt, err = s:send { from = m.from, to = m.to, data = m.data(), size = m.size, eight_bit = m.eight_bit }
      if receipt then
        -- delivered: from here on nothing may raise (the receipt is built
        -- first, the trace is protected), or a retry would send it twice
        local out = {
          message_id = m.message_id, accepted = receipt.accepted, rejected = rejected_list(receipt.rejected),
          attempts = attempt, transport = "smtp",
          reply = { code = receipt.code, enhanced = receipt.enhanced, text = receipt.text },
        }
        self.session_sent = self.session_sent + 1
        self.sent = self.sent + 1
        self.governor:record(#m.to)
        self:_trace { event = "sent", message_id = m.message_id, attempts = attempt, code = receipt.code }
        out.trace_error = self.trace_error
        return out
      end
    end
    self:_explain(err)
    action = policy_mod.classify(err)
    if self.hooks.classify then
      local custom = self.hooks.classify(err, { attempt = attempt, stage = s and "send" or "open" })
      if custom ~= nil and not ACTIONS[custom] then
        -- a typo must not become a silent retry loop: give up, and say why
        self:_trace { event = "classify_invalid", returned = tostring(custom), action = "fail" }
        custom = "fail"
      end
      if custom ~= nil then action = custom end
    end
    -- a 535 that survived the refresh inside _open is final
    if action == "reauth" then action = "fail" end
    last = err
    self:_trace { event = "attempt_failed", attempt = attempt, action = action, kind = err.kind,
      code = err.code, enhanced = err.enhanced }
    if action == "fail" then break end
    local wait = 0
    if action == "reconnect" then
      self:_drop_session("reconnect")
      if attempt > 1 then wait = pol:backoff(attempt - 1) end
    elseif action == "throttle" then
      self:_drop_session("throttle")
      self.governor:lower()
      wait = pol:backoff(attempt)
    else -- retry
      if self.session and self.session.broken then self:_drop_session("broken") end
      wait = pol:backoff(attempt)
    end
    if attempt >= pol.attempts then break end
    if self.clock() - started + wait > pol.max_time then
      self:_trace { event = "give_up", reason = "max_time" }
      break
    end
    if wait > 0 then pol.sleep(wait) end
  end
  if self.session and self.session.broken then self:_drop_session("broken") end
  if last.stage == "token" then
    last.attempts = last.attempts or 1   -- requests to the token endpoint
  else
    last.attempts = attempt
    if attempt > 1 or last.kind == "network" then
      last.message = last.message .. string.format(" (%d attempt%s in %.1f s)", attempt, attempt == 1 and "" or "s",
        self.clock() - started)
    end
  end
  if last.retryable == nil then last.retryable = false end
  last.trace_error = self.trace_error
  return nil, last
end

-- mailer:close(): QUIT the session (if any). Idempotent; send after close raises.
function Mailer:close()
  if self.closed then return true end
  self.closed = true
  self:_drop_session("close")
  return true
end
Mailer.__close = Mailer.close
Mailer.__gc = function(self) if not self.closed then pcall(Mailer.close, self) end end

-- mailer:login() -> token | nil, err: run the profile's flow now, interactive
-- ones included (device code, browser), and store the result.
function Mailer:login()
  if self.closed then error("mailer:login: the mailer is closed", 2) end
  local tok, err = self.tokens:login()
  if not tok then return nil, self:_explain(err) end
  return tok
end

-- mailer:stats() -> {sent=, connections=, session_open=}
function Mailer:stats()
  return { sent = self.sent, connections = self.governor.connections, session_open = self.session ~= nil }
end

-- oauthmail.run(fn, ...) / oauthmail.spawn(fn, ...): the built-in loop
-- (oauthmail.loop); oauthmail.wait: the one waiter (docs/concurrency.md).
local loop = require "oauthmail.loop"
M.run, M.spawn = loop.run, loop.spawn
M.wait = require "oauthmail.wait"

M.Mailer = Mailer
M.errors = errors
M.profile = profile_mod
M.decoder = decoder

return M
