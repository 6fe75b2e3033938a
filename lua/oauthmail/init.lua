-- oauthmail — the API most users touch: oauthmail.new(profile) -> mailer,
-- mailer:send(message) -> receipt, mailer:send_many(list), mailer:close().
-- The mailer keeps a pool of authenticated sessions (oauthmail.pool, up to
-- the mailbox's connection limit, each while its token has margin left) over
-- a transport (oauthmail.transport.smtp), shared by every coroutine that
-- sends, and applies the send policy (policy:deliver): re-authenticate once on 535, reconnect and
-- send again on 421 / a dropped connection / a timeout before the final reply,
-- back off on 4xx, stop on 5xx; a message counts as sent only after the
-- server's 2xx to the end of its data. With transport = {"smtp", "graph"}
-- a message that the first transport certainly did not accept goes through
-- the next (failover_on); see docs/graph.md. See docs/mailer.md.
local errors = require "oauthmail.errors"
local profile_mod = require "oauthmail.profile"
local policy_mod = require "oauthmail.policy"
local redact = require "oauthmail.redact"
local decoder = require "oauthmail.decoder"
local pool_mod = require "oauthmail.pool"
local smtp_transport = require "oauthmail.transport.smtp"
-- loaded when a profile uses Graph: it brings oauthmail.http, and with it
-- libcurl, which a mailer that only speaks SMTP with a stored token never needs
local function graph_transport() return require "oauthmail.transport.graph" end
local crypto = require "oauthmail.crypto"
local cjson = require("cjson.safe").new()
local wait = require "oauthmail.wait"
local tokens = require "oauthmail.tokens"

local M = { _VERSION = require "oauthmail.version" }

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
      local fs = require("oauthmail.sys").fs
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
    sent = 0, closed = false, _raw_opts = {},
  }, Mailer)
  if type(s.trace) == "string" then self.trace = file_trace(s.trace) else self.trace = s.trace end
  self.clock = clock
  local policy_opts = {}
  for k, v in pairs(pol) do if k ~= "governor" then policy_opts[k] = v end end
  policy_opts.clock = clock
  self.policy = policy_mod.new(policy_opts)
  local gov_opts = { clock = clock, sleep = self.policy.sleep, trace = self.trace and function(ev) self:_trace(ev) end }
  if pol.governor then
    self.governor = pol.governor
  elseif s.limits.shared then
    -- counted in Redis with every other process sending as this mailbox
    gov_opts.mailbox = s.user
    local ok, gov = pcall(require("oauthmail.policy.shared").new, s.limits, gov_opts)
    if not ok then return errors.fail("config", (tostring(gov):gsub("^[^:]*:%d+: ", ""))) end
    self.governor = gov
  else
    self.governor = policy_mod.governor(s.limits, gov_opts)
  end
  local mgr, merr = self:_manager(s.oauth)
  if not mgr then return nil, merr end
  if s.graph_oauth then
    -- Entra's refresh tokens serve every consented resource and stay valid when used; a
    -- provider that rotates them would lose the SMTP one, so only microsoft seeds
    local gm, gerr = self:_manager(s.graph_oauth, s.provider == "microsoft" and mgr or nil)
    if not gm then return nil, gerr end
    self.graph_tokens = gm
  end
  -- the manager login() and logout() act on: the first transport's
  self.tokens = (s.transports[1] == "graph") and self.graph_tokens or mgr
  self.smtp_tokens = mgr
  self:_setup_lanes()
  return self
end

-- A token manager for one flow table (the SMTP scope, or the Graph scope)
-- with the profile's store; `seed` (the SMTP manager) lends its refresh
-- token to a delegated Graph manager that has none yet.
function Mailer:_manager(oauth, seed)
  local clock = self.clock
  return tokens.for_settings(self.settings, oauth, {
    clock = function() return math.floor(clock()) end,
    trace = self.trace and function(ev) self:_trace(ev) end,
    seed = seed,
  })
end

-- ------------------------------------------------------------ messages

local function list_of(v)
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  return v
end

local RCPT_FIELDS = { "to", "cc", "bcc" }

local function not_a_list(v)
  return v ~= nil and type(v) ~= "string" and type(v) ~= "table"
end

-- What is wrong with a message's shape (a programmer error: send raises
-- it), or nil. send_many asks before anything goes out.
local function shape_error(msg)
  if type(msg) ~= "table" then return "expected a message table" end
  if type(msg.reader) == "function" and type(msg.envelope) == "table" then
    if type(msg.envelope.from) ~= "string" then return "no sender: set from in the message or the profile" end
    return nil
  end
  local raw = msg.raw or msg.data
  if raw ~= nil then
    if type(raw) ~= "string" then return "'raw' must be the message text (a string)" end
    -- (the three fields by name: send_many asks this of every message)
    if not_a_list(msg.to) then return "'to' must be an address or a list" end
    if not_a_list(msg.cc) then return "'cc' must be an address or a list" end
    if not_a_list(msg.bcc) then return "'bcc' must be an address or a list" end
  end
  return nil
end

-- A message composed by oauthmail.message (or shaped like one), prepared:
-- a new reader for every attempt.
-- m.data(m): a fresh reader of the message (one function for every message)
local function message_reader(m)
  return m.message:reader()
end

local function prepared(msg, theirs)
  local env = msg.envelope
  local to = list_of(env.to)
  if theirs then
    -- the caller's own object: its recipients list is theirs, and a
    -- receipt may hand m.to out as `accepted`
    local copy = {}
    for i = 1, #to do copy[i] = to[i] end
    to = copy
  end
  -- its exact size goes into SIZE= (an oversized message is refused before
  -- any data is sent), and BODY=8BITMIME only when it really has 8-bit bytes
  -- (text and reservation are send_many's, made here so the table does not grow)
  return { from = env.from, to = to, message_id = msg.message_id,
    size = msg.size and msg:size() or nil, eight_bit = msg.has_8bit and true or false,
    data = message_reader, message = msg, text = false, reservation = false }
end

-- oauthmail.message, loaded on first use (a mailer that only sends composed
-- message objects never needs it)
local message_mod
local function load_message()
  message_mod = require "oauthmail.message"
  return message_mod
end

-- Bring any accepted message shape to {from, to, data(m) -> fresh source,
-- message_id, message (the oauthmail.message object)}. `ids`: the random
-- part of new ids (message.id_pool, for a batch), else drawn for each.
function Mailer:_prepare(msg, ids, checked)
  local why = not checked and shape_error(msg)
  if why and not why:find("^no sender") then error("mailer:send: " .. why, 3) end
  if type(msg.reader) == "function" and type(msg.envelope) == "table" then return prepared(msg, true) end
  local message = message_mod or load_message()
  local raw = msg.raw or msg.data
  if raw ~= nil then
    -- raw text is read the one way message.from_raw reads it: Bcc removed,
    -- Date and Message-ID added when missing, every address header checked;
    -- the envelope is the call's to/cc/bcc, else the headers'
    local to = msg.to
    if msg.cc ~= nil or msg.bcc ~= nil then
      to = {}
      for _, field in ipairs(RCPT_FIELDS) do
        local l = list_of(msg[field])
        for i = 1, #l do to[#to + 1] = l[i] end
      end
    end
    if type(to) == "table" and #to == 0 then to = nil end
    -- one options table for every message (from_raw keeps nothing of it)
    local o = self._raw_opts
    o.from, o.to, o.ids = msg.from or self.settings.from, to, ids
    local m, err = message.from_raw(raw, o)
    o.from, o.to, o.ids = nil, nil, nil
    if not m then return nil, err end
    return prepared(m)
  end
  local t = {}
  for k, v in pairs(msg) do t[k] = v end
  t.from = t.from or self.settings.from
  local m, err = message.compose(t, ids and { ids = ids } or nil)
  if not m then return nil, err end
  return prepared(m)
end

-- ------------------------------------------------------------ sessions

function Mailer:_explain(err)
  if errors.is(err) or type(err) == "table" then decoder.explain(err, self.settings.ctx) end
  return err
end

-- The non-secret claims of a JWT access token, for the trace: who issued
-- it for whom, with which permissions, until when. Never the token.
local CLAIMS = { "aud", "scp", "roles", "tid", "appid", "azp", "upn", "exp" }
function M.token_claims(access_token)
  local payload = type(access_token) == "string" and access_token:match("^[%w_%-]+%.([%w_%-]+)%.[%w_%-]*$")
  local json = payload and crypto.b64url_decode(payload)
  local doc = type(json) == "string" and cjson.decode(json)
  if type(doc) ~= "table" then return nil end
  local out = {}
  for _, k in ipairs(CLAIMS) do
    local v = doc[k]
    if type(v) == "table" then
      local l = {}
      for _, x in ipairs(v) do if type(x) == "string" then l[#l + 1] = x end end
      v = table.concat(l, " ")
    end
    if type(v) == "string" then
      v = redact.escape(v)
      if #v > 200 then v = v:sub(1, 200) .. "..." end
      out["claim_" .. k] = v
    elseif type(v) == "number" and v == v and v > -2 ^ 53 and v < 2 ^ 53 then
      -- cjson reads 1796148539 as a float on 5.3+: write it as the whole number it is
      out["claim_" .. k] = v == math.floor(v) and string.format("%d", v) or v
    end
  end
  -- oidc-provider and others say scope where Entra says scp
  if not out.claim_scp and type(doc.scope) == "string" then out.claim_scp = redact.escape(doc.scope):sub(1, 200) end
  return out
end

function Mailer:_token(mgr, lane)
  mgr = mgr or self.smtp_tokens
  local tok, err = mgr:get()
  if not tok then
    -- the token layer retried what it could: the send policy must not multiply it
    if type(err) == "table" then err.stage = err.stage or "token" end
    return nil, self:_explain(err)
  end
  local seen = self.last_tokens or {}
  self.last_tokens = seen
  if tok.access_token ~= seen[mgr] then
    seen[mgr] = tok.access_token
    local ev = { event = "token", expires_at = tok.expires_at, transport = lane }
    for k, v in pairs(M.token_claims(tok.access_token) or {}) do ev[k] = v end
    self:_trace(ev)
    if self.hooks.on_token then self.hooks.on_token(tok) end
  end
  return tok
end

-- One lane per transport, in the profile's order: the transport and the
-- pool of its sessions (oauthmail.pool), made once. SMTP sessions hold the
-- mailbox's connections (the governor); Graph requests hold Graph's own
-- slots (4 per mailbox). The governor's rate and volume limits apply to
-- every lane alike (admit before, record after).
function Mailer:_setup_lanes()
  local trace = function(ev) self:_trace(ev) end
  local s = self.settings
  self.lanes = {}
  for _, name in ipairs(s.transports) do
    local lane = { name = name }
    local mgr, slots, host
    if name == "smtp" then
      mgr, slots, host = self.smtp_tokens, self.governor, s.smtp.host
      lane.transport = smtp_transport.new(s.smtp, { user = self.user, trace = self.trace and trace or nil })
    else
      mgr, host = self.graph_tokens, s.graph.endpoint
      slots = graph_transport().slots(s.graph.concurrency)
      slots.max_wait = self.governor.max_wait
      lane.transport = graph_transport().new(s.graph, {
        user = self.user, trace = self.trace and trace or nil,
        token = function() return self:_token(mgr, name) end,
        invalidate = function(tok) mgr:invalidate(tok) end,
      })
    end
    lane.tokens = mgr
    lane.pool = pool_mod.new {
      transport = lane.transport, governor = slots, policy = self.policy, clock = self.clock,
      host = host, max_wait = self.governor.max_wait,
      token = function() return self:_token(mgr, name) end,
      invalidate = function(tok) mgr:invalidate(tok) end,
      explain = function(err) return self:_explain(err) end,
      -- the token manager's rule: a token that lives shorter than the margin
      -- is used for half its remaining life, not refused outright
      margin_for = function(tok) return mgr:margin_for { expires_at = tok.expires_at, obtained_at = self.clock() } end,
      trace = trace,
    }
    self.lanes[#self.lanes + 1] = lane
  end
  -- the first lane serves send_many's pipelined batches and stats()
  self.transport, self.pool = self.lanes[1].transport, self.lanes[1].pool
end

-- ------------------------------------------------------------ sending

local function by_address(a, b) return a.address < b.address end

local function rejected_list(map)
  local out = {}
  if map == nil or next(map) == nil then return out end
  for addr, r in pairs(map) do
    local e = { address = addr, code = r.code, enhanced = r.enhanced, text = r.text }
    out[#out + 1] = decoder.explain(e)
  end
  table.sort(out, by_address)
  return out
end

local ACTIONS = { reauth = true, reconnect = true, throttle = true, retry = true, fail = true }

function Mailer:_classify(err, attempt, stage, lane)
  self:_explain(err)
  local action = (lane or self.lanes[1]).transport:classify(err)
  if self.hooks.classify then
    local custom = self.hooks.classify(err, { attempt = attempt, stage = stage })
    if custom ~= nil and not ACTIONS[custom] then
      -- a typo must not become a silent retry loop: give up, and say why
      self:_trace { event = "classify_invalid", returned = tostring(custom), action = "fail" }
      custom = "fail"
    end
    if custom ~= nil then action = custom end
  end
  return action
end

-- A failed attempt gives back what it holds: the session goes unless the
-- failure was a transient refusal on a session still usable; 432 4.3.2
-- lowers the mailbox's concurrency.
function Mailer:_failed(err, action, attempt, e, lane)
  lane = lane or self.lanes[1]
  self:_trace { event = "attempt_failed", attempt = attempt, action = action == "reauth" and "fail" or action,
    kind = err.kind, code = err.code, enhanced = err.enhanced, transport = lane.name, graph_code = err.graph_code }
  -- lowered before the slot is given back: with shared limits, nobody may
  -- take the freed slot under the old limit in between
  if action == "throttle" then self.governor:lower() end
  if e then
    if action == "retry" or action == "fail" then lane.pool:release(e) else lane.pool:release(e, action) end
  end
end

-- The receipt for a delivered message; built before anything else happens.
-- state: "accepted" — the server took the message for delivery (an SMTP
-- 250 to the data, a Graph 202); neither is a delivery confirmation.
local function receipt_for(m, receipt, attempt, lane)
  return {
    message_id = m.message_id, accepted = receipt.accepted, rejected = rejected_list(receipt.rejected),
    attempts = attempt, transport = lane, state = "accepted",
    reply = { code = receipt.code, enhanced = receipt.enhanced, text = receipt.text, request_id = receipt.request_id },
  }
end

-- The same from a receipt of session:send_many (code, enhanced, text, and
-- accepted and rejected unless compact: tables the batch made for this
-- message alone), with no new table but the receipt's own: the reply keeps
-- code, enhanced and text, and an empty rejected map serves as the empty
-- rejected list.
local function batch_receipt_for(m, receipt, lane)
  local accepted, rejected = receipt.accepted, receipt.rejected
  if accepted == nil then
    -- a compact receipt: every recipient took it (m.to is the mailer's own)
    accepted, rejected = m.to, {}
  end
  receipt.accepted, receipt.rejected = nil, nil
  return {
    message_id = m.message_id, accepted = accepted,
    rejected = next(rejected) == nil and rejected or rejected_list(rejected),
    attempts = 1, transport = lane, state = "accepted", reply = receipt,
  }
end

-- After a delivery nothing may raise (a caller that retries on exceptions
-- would send the message twice): the receipt is made first, the pool's
-- release and the trace are protected.
function Mailer:_delivered(m, receipt, attempt, e, lane, keep)
  lane = lane or self.lanes[1]
  local out
  if keep then out = batch_receipt_for(m, receipt, lane.name) else out = receipt_for(m, receipt, attempt, lane.name) end
  e.sent = e.sent + 1
  self.sent = self.sent + 1
  if not keep then errors.pcall(lane.pool.release, lane.pool, e) end
  errors.pcall(self.governor.record, self.governor, #m.to, m.reservation)
  if self.trace then
    self:_trace { event = "sent", message_id = m.message_id, attempts = attempt, code = receipt.code, transport = lane.name }
  end
  return out
end

-- Did the server certainly not take the message? A refusal it answered
-- (an SMTP reply, a Graph error status other than 504), or anything before
-- the message was handed over (stage "open": connect, TLS, AUTH; a
-- configuration or policy error) is certain; a dropped connection or a
-- timeout after the data went out is not.
local function certainly_refused(err, stage)
  if stage == "open" then return true end
  if type(err) ~= "table" then return false end
  if err.maybe_sent then return false end
  if err.maybe_sent == false then return true end   -- the transport knows nothing left
  if err.kind == "config" or err.kind == "policy" then return true end
  if (err.kind == "smtp" or err.kind == "auth") and type(err.code) == "number" then return true end
  if err.reason == "graph" then return true end
  return false
end

-- Which failover_on entry an error matches: an enhanced code, a reply or
-- HTTP status, a Graph error code, an error kind, or a network reason
-- ("refused", "timeout") when the connection itself failed (SMTP's open
-- stage, a Graph request that never left).
-- "refused" covers a connection that could not be made at all (libcurl's
-- multi interface often cannot tell refused from unreachable).
local REASONS = { refused = { refused = true, unreachable = true } }

local function failover_match(err, list, stage)
  if type(err) ~= "table" then return nil end
  local connect_failed = err.kind == "network" and (stage == "open" or err.maybe_sent == false)
  for _, v in ipairs(list) do
    if err.enhanced == v or (err.code ~= nil and tostring(err.code) == v) or err.graph_code == v
      or err.kind == v or (err.kind == "policy" and err.reason == v)   -- "too_large" (Graph's 4 MB)
      or (connect_failed and (err.reason == v or (REASONS[v] and REASONS[v][err.reason]))) then
      return v
    end
  end
  return nil
end

-- One message through one lane's policy loop (policy:deliver) over its pool.
-- Returns receipt | nil, err, attempts, failover (the failover_on entry that
-- sends the message on to the next lane, when the lane certainly did not
-- accept it).
function Mailer:_deliver_on(lane, m, next_lane, first_attempt)
  local pool = lane.pool
  local uncertain, failover = false, nil
  local receipt, last, attempts = self.policy:deliver {
    clock = self.clock,
    trace = function(ev) self:_trace(ev) end,
    try = function(attempt)
      local e, oerr = pool:acquire()
      if not e then return nil, oerr, "open" end
      local ok, r, serr = errors.pcall(lane.transport.submit, lane.transport, e.s, m)
      if not ok then
        pool:release(e, "error")
        error(r, 0)
      end
      if not r then return nil, serr, "send", e end
      return self:_delivered(m, r, first_attempt + attempt - 1, e, lane)
    end,
    classify = function(err, attempt, stage)
      local action = self:_classify(err, attempt, stage, lane)
      if not certainly_refused(err, stage) then uncertain = true end
      if next_lane and not uncertain then
        local hit = failover_match(err, self.settings.failover_on, stage)
        if hit then
          failover = hit
          return "fail"
        end
      end
      return action
    end,
    failed = function(err, action, attempt, e) self:_failed(err, action, attempt, e, lane) end,
  }
  if receipt then return receipt end
  if next_lane then
    if failover then
      self:_trace { event = "failover", from = lane.name, to = next_lane.name, matched = failover,
        code = last.code, enhanced = last.enhanced, graph_code = last.graph_code,
        why = "the " .. lane.name .. " transport certainly did not accept the message" }
    else
      local why = uncertain and ("the " .. lane.name .. " transport may have accepted the message (" ..
        tostring(last.message):sub(1, 120) .. "); it is never sent twice") or "the error is not in failover_on"
      self:_trace { event = "no_failover", from = lane.name, to = next_lane.name, why = why,
        code = last.code, enhanced = last.enhanced, kind = last.kind }
      last.failover = why
    end
  end
  return nil, last, attempts, failover
end

-- One message through the lanes in order: the next lane only when the one
-- before certainly did not accept it and the error is in failover_on.
function Mailer:_deliver(m)
  local total, last, tried = 0, nil, {}
  local started = self.clock()
  for i, lane in ipairs(self.lanes) do
    local next_lane = self.lanes[i + 1]
    local receipt, err, attempts, failover = self:_deliver_on(lane, m, next_lane, total + 1)
    if receipt then
      if #tried > 0 then receipt.failed_over = tried end
      receipt.trace_error = self.trace_error
      return receipt
    end
    total = total + (attempts or 0)
    last = err
    if not failover then break end
    tried[#tried + 1] = { transport = lane.name, kind = err.kind, code = err.code, enhanced = err.enhanced,
      graph_code = err.graph_code, matched = failover, message = err.message }
  end
  if last.stage == "token" then
    last.attempts = last.attempts or 1   -- requests to the token endpoint
  else
    last.attempts = total
    if total > 1 or last.kind == "network" then
      last.message = last.message .. string.format(" (%d attempt%s in %.1f s)", total, total == 1 and "" or "s",
        self.clock() - started)
    end
  end
  if #tried > 0 then last.failed_over = tried end
  if last.retryable == nil then last.retryable = false end
  last.trace_error = self.trace_error
  return nil, last
end

-- Run hooks and checks that come before any attempt: m (prepared, with
-- the governor's reservation for it in m.reservation) | nil, err.
function Mailer:_accept(msg, level)
  local m, err = self:_ready(msg, level + 1)
  if not m then return nil, err end
  m.reservation, err = self.governor:reserve(#m.to)
  if not m.reservation then return nil, err end
  return m
end

-- The before_send hook and the message read: m (prepared) | nil, err; the
-- governor is not asked yet.
function Mailer:_ready(msg, level, ids, checked)
  if self.hooks.before_send then
    local r, why = self.hooks.before_send(msg)
    if r == false then
      return errors.fail("policy", "before_send refused the message" .. (why and (": " .. tostring(why)) or ""),
        { reason = "before_send", retryable = false })
    elseif type(r) == "table" then
      checked = checked and r == msg
      msg = r
    end
  end
  local m, perr = self:_prepare(msg, ids, checked)
  if not m then return nil, perr end
  if type(m.from) ~= "string" then error("mailer:send: no sender: set from in the message or the profile", level + 1) end
  return m
end

-- mailer:send(message) -> receipt | nil, err
-- receipt = {message_id, accepted, rejected, attempts, transport="smtp"|"graph", state="accepted",
--   reply={code, enhanced, text, request_id}, failed_over={...} when an earlier transport refused it}
-- Safe to call from many coroutines at once: each message takes a session
-- of the pool, and its room under the limits from admission to delivery
-- (docs/concurrency.md).
function Mailer:send(msg)
  if self.closed then error("mailer:send: the mailer is closed", 2) end
  self.trace_error = nil
  local m, err = self:_accept(msg, 2)
  if not m then return nil, err end
  -- a delivery turned the reservation into a send (_delivered); any other
  -- way out, a raise included, gives the room back
  local ok, r, derr = errors.pcall(self._deliver, self, m)
  self.governor:cancel(m.reservation)
  if not ok then error(r, 0) end
  return r, derr
end

-- The whole text of a prepared message, for a pipelined group: an
-- oauthmail.message held in memory gives its strings as they are (a list:
-- nothing is copied), any other is read to the end (Message:tostring) |
-- nil, err (a file that cannot be read, or changed since the message was made).
local reader_mod
local function whole_text(m)
  reader_mod = reader_mod or require "oauthmail.message.reader"
  local msg = m.message
  if getmetatable(msg) == reader_mod.Message then
    local parts = reader_mod.parts_of(msg)
    if parts then return parts end
  end
  return reader_mod.Message.tostring(msg)
end

-- The next batch of send_many's list, taken in list order: up to `size`
-- messages read, in memory, each holding a reservation of the governor
-- (m.reservation), so that concurrent sends and other batches count them
-- until they are sent or given back. The batch's first message waits for
-- room as send's would (or fails with send's error); a later one that does
-- not fit now goes back (run.back) to open the next batch, and this one
-- goes first. Returns the batch, or nil when the list is done.
function Mailer:_take(list, run, size, results)
  local batch = { m = {}, i = {} }
  local back, gov = run.back, self.governor
  while #batch.m < size do
    local i, m
    if #back > 0 then
      local b = table.remove(back, 1)
      i, m = b[1], b[2]
    else
      i = run.next
      if i > #list then break end
      run.next = i + 1
    end
    local err
    if not m then m, err = self:_ready(list[i], 2, run.ids, true) end
    if m then
      local res
      if #batch.m == 0 or not gov.try_reserve then
        res, err = gov:reserve(#m.to)
      else
        res, err = gov:try_reserve(#m.to)
        if res == false then
          back[#back + 1] = { i, m }
          break
        end
      end
      m.reservation = res
      if res then
        local text
        text, err = whole_text(m)
        if text then
          m.text = text
          local k = #batch.m + 1
          batch.m[k], batch.i[k] = m, i
        else
          gov:cancel(res)
          m = nil
        end
      else
        m = nil
      end
    end
    if not m then results[i] = err end
  end
  if #batch.m == 0 then return nil end
  return batch
end

-- Give back the reservations of a batch's messages not sent (a raise).
local function cancel_all(gov, batch)
  for k = 1, #batch.m do gov:cancel(batch.m[k].reservation) end
end

-- One batch on one session, pipelined; what the batch could not settle
-- (the session broke, or a transient refusal) goes again through send's
-- policy loop, one by one. A message delivered turns its reservation into
-- a send (_delivered); any other gives it back.
function Mailer:_batch(batch, results)
  local gov = self.governor
  local e, oerr = self.pool:acquire()
  local out
  if e then
    local ok, r = errors.pcall(self.transport.submit_many, self.transport, e.s, batch.m)
    if not ok then
      self.pool:release(e, "error")
      error(r, 0)
    end
    out = r
  end
  local lane, single = self.lanes[1], #self.lanes == 1
  local redo
  for k, i in ipairs(batch.i) do
    local r = out and out[k]
    if r and r.code and not errors.is(r) then
      results[i] = self:_delivered(batch.m[k], r, 1, e, lane, true)   -- the batch gives the session back once
    elseif r and single and errors.is(r) and self:_classify(r, 1, "send") == "fail" then
      r.attempts = 1
      results[i] = r
      gov:cancel(batch.m[k].reservation)
    else
      redo = redo or {}
      redo[#redo + 1] = k
    end
  end
  if e then self.pool:release(e) end
  if not e then self:_trace { event = "batch_open_failed", kind = oerr.kind, code = oerr.code } end
  for n, k in ipairs(redo or {}) do
    local m = batch.m[k]
    local ok, r, err = errors.pcall(self._deliver, self, m)
    gov:cancel(m.reservation)
    if not ok then
      for j = n + 1, #redo do gov:cancel(batch.m[redo[j]].reservation) end
      error(r, 0)
    end
    results[batch.i[k]] = r or err
  end
end

-- mailer:send_many(list [, {batch=50}]) -> results aligned with list (receipts or errors)
-- Pipelines each batch on one session (MAIL/RCPT/BDAT LAST per message when
-- the server offers PIPELINING and CHUNKING) and spreads the batches over
-- the pool when the waiter can run tasks side by side (oauthmail.run,
-- cqueues, luv); otherwise one batch after the other. Each batch is read
-- and reserved with the governor just before it goes, so a long list never
-- sits in memory whole and the limits count every message in flight.
function Mailer:send_many(list, o)
  if self.closed then error("mailer:send_many: the mailer is closed", 2) end
  if type(list) ~= "table" then error("mailer:send_many: expected a list of messages", 2) end
  local size = (o and o.batch) or 50
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then error("mailer:send_many: batch must be a positive whole number", 2) end
  -- a message of the wrong shape raises before anything goes out
  for _, msg in ipairs(list) do
    local why = shape_error(msg)
    if why then error("mailer:send: " .. why, 2) end
  end
  self.trace_error = nil
  local results = {}
  -- the random part of the batch's new Message-IDs, drawn 64 at a time
  local ids = require("oauthmail.message").id_pool(64)
  local run = { next = 1, back = {}, ids = ids }
  local gov = self.governor
  local function work()
    while not run.failure do
      local b = self:_take(list, run, size, results)
      if not b then return end
      local ok, err = errors.pcall(self._batch, self, b, results)
      if not ok then
        cancel_all(gov, b)
        error(err, 0)
      end
      -- the session just given back goes to the task whose batch is
      -- ready, not to this task's next batch (it would sit idle meanwhile)
      if run.tasks > 1 then wait.sleep(0) end
    end
  end
  -- one task more than the pool has sessions: while every session waits
  -- for its batch's replies, the spare task reads and reserves the next
  local spawn = wait.current().spawn
  local workers = math.min(math.ceil(#list / size), self.pool:limit() + 1)
  run.tasks = spawn and workers or 1
  if spawn and workers > 1 then
    local running = workers
    local finished = wait.cond()
    for _ = 1, workers do
      spawn(function()
        local ok, err = errors.pcall(work)
        if not ok then run.failure = run.failure or err end
        running = running - 1
        finished:signal()
      end)
    end
    while running > 0 do finished:wait(wait.now() + 86400) end
    if run.failure then error(run.failure, 0) end
  else
    work()
  end
  -- a message read but never sent (another task raised) keeps no room
  for _, b in ipairs(run.back) do gov:cancel(b[2].reservation) end
  return results
end

-- mailer:close_idle() -> n: QUIT the sessions no message is using now and
-- give back their connection slots (shared limits: to the other processes);
-- the mailer stays usable. For hosts that go quiet between bursts.
function Mailer:close_idle()
  if self.closed then return 0 end
  local n = 0
  for _, lane in ipairs(self.lanes) do n = n + lane.pool:close_idle() end
  return n
end

-- mailer:close(): QUIT the idle sessions (busy ones close when their
-- message is done). Idempotent; send after close raises.
function Mailer:close()
  if self.closed then return true end
  self.closed = true
  for _, lane in ipairs(self.lanes) do lane.pool:close() end
  return true
end
Mailer.__close = Mailer.close
-- A finalizer must not talk to the network: the sockets are closed, no QUIT.
Mailer.__gc = function(self)
  if not self.closed and self.lanes then
    self.closed = true
    for _, lane in ipairs(self.lanes) do errors.pcall(lane.pool.abandon, lane.pool) end
  end
end

-- mailer:login() -> token | nil, err: run the profile's flow now, interactive
-- ones included (device code, browser), and store the result.
function Mailer:login()
  if self.closed then error("mailer:login: the mailer is closed", 2) end
  local tok, err = self.tokens:login()
  if not tok then return nil, self:_explain(err) end
  return tok
end

-- mailer:stats() -> {sent=, connections= (the limit now), sessions=, busy=, session_open=}
function Mailer:stats()
  local n, busy = self.pool:count()
  return { sent = self.sent, connections = self.governor.connections, sessions = n, busy = busy,
    session_open = n > 0 }
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
