-- oauthmail.smtp — an SMTP submission session: connect, STARTTLS, SASL
-- (XOAUTH2, OAUTHBEARER, PLAIN, LOGIN), send messages one by one or in
-- pipelined batches. The bytes are handled by the C engine (csrc/smtp.c);
-- this file decides what to say next and when to stop. See docs/smtp.md.
local core = require "oauthmail.core"
local errors = require "oauthmail.errors"
local options = require "oauthmail.options"
local redact = require "oauthmail.redact"
local wait = require "oauthmail.wait"
local crypto = core.crypto

local M = {}
local Session = {}
Session.__index = Session

local DEFAULT_PORT = { starttls = 587, implicit = 465, none = 25 }
local CHUNK = 256 * 1024          -- body bytes handed to the engine at a time
local RECV_MAX = 64 * 1024

local function reply_error(kind, what, r, fields)
  local e = {
    code = r.code, enhanced = r.enhanced, text = r.text,
    retryable = r.code >= 400 and r.code < 500,
  }
  for k, v in pairs(fields or {}) do e[k] = v end
  local msg = string.format("%s: %d%s %s", what, r.code, r.enhanced and (" " .. r.enhanced) or "",
    (r.text or ""):gsub("\n", " / "))
  return errors.new(kind, msg, e)
end

-- Marks transport and engine failures as docs/architecture.md ("Errors") asks.
local function as_error(err)
  if errors.is(err) or type(err) == "table" then
    if err.retryable == nil then err.retryable = err.kind == "network" and err.reason ~= "dns" end
    return setmetatable(err, errors.metatable)
  end
  return errors.new("network", tostring(err), { retryable = true })
end

-- ---------------------------------------------------------------- waiting

-- What a trace line may show of server or engine text: the session's
-- secrets (token, password) masked by value in every encoding, a 334
-- challenge whose decoded form quotes one masked whole, control bytes
-- escaped so no text can start a forged line.
function Session:_clean(text, ours)
  if type(text) ~= "string" then return text end
  -- server text of unknown content also gets the key and header rules
  if not ours then text = redact.text(text) end
  local secrets = self.secrets
  if secrets then
    text = redact.values(text, secrets)
    local b64 = text:match("^334 (%S+)$")
    local plain = b64 and crypto.b64decode(b64)
    if type(plain) == "string" and redact.values(plain, secrets) ~= plain then text = "334 " .. redact.MASK end
  end
  return redact.escape(text)
end

function Session:_trace()
  if not self.trace then return end   -- the engine keeps no events then
  local evs = self.eng:trace_events()
  if evs then
    for i = 1, #evs do
      local ev = evs[i]
      ev.text = self:_clean(ev.text, ev.dir == "C")
      self.trace(ev)
    end
  end
end

function Session:_info(text)
  if self.trace then self.trace { proto = "smtp", dir = "info", text = self:_clean(text) } end
end

-- A failure of the transport or of the reply syntax ends the session: what
-- the server thinks happened is unknown from here on.
function Session:_broken(err)
  err = as_error(err)
  self:_info("session abandoned: " .. tostring(err.message))
  self.broken = err
  if self.conn then self.conn:close() end
  return nil, err
end

function Session:_flush()
  self:_trace()
  local c = self.core_conn
  if c then
    -- a connection of oauthmail.conn: the engine writes to it itself
    local eng, d = self.eng, nil
    while true do
      local r, fd, rd = eng:write_to(c, d or (core.monotime() + c:gettimeout()))
      if r == true then return true end
      if r == nil then return self:_broken(fd) end
      d = rd
      wait.fd(fd, r, d)
    end
  end
  local out = self.eng:output()
  if #out > 0 then
    local ok, err = self.conn:send(out)
    if not ok then return self:_broken(err) end
  end
  return true
end

-- No reply to the end of the data in time. RFC 5321 6.1: the message may
-- have been accepted, and delivering it twice is preferred to losing it, so
-- this stays retryable; the error says so.
local function final_timeout(timeout)
  return errors.new("network", string.format("no reply to the end of the message within %g s (data_timeout): "
    .. "the server may have accepted it, so sending it again may deliver it twice", timeout),
    { reason = "timeout", retryable = true, after_data = true })
end

-- The one place that reads: the next reply, reading more bytes as needed.
-- One deadline covers the whole reply, so a server that dribbles a byte now
-- and then cannot keep it alive for max_reply waits. The transport waits
-- (through oauthmail.wait) until that deadline; its timeout error states the
-- session's timeout, not what was left of it.
function Session:_reply(timeout, final)
  timeout = timeout or self.timeout
  local deadline
  while true do
    local r, err = self.eng:reply()
    self:_trace()
    if r and r.command == "IDLE" then
      -- a reply nobody asked for: a 421 shutdown, or a server out of step
      if r.code == 421 then return self:_broken(reply_error("smtp", "server closed the session", r)) end
      return self:_broken(reply_error("smtp", "unexpected reply", r, { reason = "malformed", retryable = false }))
    end
    if r then
      if r.code == 421 then self.closing = r end
      return r
    end
    if err then return self:_broken(err) end
    local now = core.monotime()
    if not deadline then
      deadline = now + timeout
    elseif deadline - now <= 0 then
      if final then return self:_broken(final_timeout(timeout)) end
      return self:_broken(errors.new("network", string.format("no complete reply from the server within %g s",
        timeout), { reason = "timeout", retryable = true }))
    end
    local got, rerr = self:_receive(deadline)
    if not got then return self:_receive_failed(rerr, final and timeout) end
  end
end

-- Read what the server sends next into the engine: true | nil, err. Over
-- an oauthmail.conn connection the engine takes the bytes itself.
function Session:_receive(deadline)
  local c = self.core_conn
  if c then
    local eng = self.eng
    while true do
      local r, fd, rd = eng:read_from(c, deadline)
      if r == true then return true end
      if r == nil then return nil, fd end
      wait.fd(fd, r, rd)
    end
  end
  local data, err = self.conn:receive_some(RECV_MAX, deadline)
  if not data then return nil, err end
  self.eng:feed(data)
  return true
end

-- A read that failed ends the session. final_timeout: the data_timeout
-- when the reply awaited ends a message's data (its timeout says so).
function Session:_receive_failed(rerr, final_after)
  if final_after and type(rerr) == "table" and rerr.reason == "timeout" then
    return self:_broken(final_timeout(final_after))
  end
  -- a server that said 421 to a pipelined command closes at once: its
  -- reply, not the closed connection, is what the caller needs to see
  if self.closing and rerr and rerr.reason == "closed" then
    return self:_broken(reply_error("smtp", "server closed the session", self.closing))
  end
  return self:_broken(rerr)
end

-- The reply to the end of a message's data: RFC 5321 4.5.3.2.6 gives the
-- server 10 minutes for it (it may be scanning or relaying the message), and
-- a client that gives up sooner makes a retry that may deliver it twice.
function Session:_final_reply()
  return self:_reply(self.data_timeout, true)
end

-- Send what is queued, then read one reply.
function Session:_ask()
  local ok, err = self:_flush()
  if not ok then return nil, err end
  return self:_reply()
end

local function check_usable(self)
  if self.closed then error("oauthmail.smtp: session is closed", 3) end
  if self.broken then return nil, self.broken end
  return true
end

-- ---------------------------------------------------------------- opening

function Session:_ehlo()
  local ok, err = self.eng:ehlo(self.helo)
  if not ok then return nil, err end
  local r
  r, err = self:_ask()
  if not r then return nil, err end
  if r.code >= 200 and r.code < 300 then return r.caps or {} end
  if r.code == 421 then return nil, reply_error("smtp", "server closed the session", r) end
  -- an old server without ESMTP: HELO and no extensions (RFC 5321 4.1.1.1)
  self:_info("EHLO refused; falling back to HELO")
  self.eng:helo(self.helo)
  r, err = self:_ask()
  if not r then return nil, err end
  if r.code >= 200 and r.code < 300 then return {} end
  return nil, reply_error("smtp", "HELO refused", r)
end

local TLS_KEYS = { "ca_file", "ca_path", "verify", "min_tls", "client_cert", "client_key", "servername", "ciphers" }

local function tls_options(opts)
  local t = {}
  for _, k in ipairs(TLS_KEYS) do t[k] = opts[k] end
  t.servername = t.servername or opts.host
  return t
end

local OPTIONS = {
  port = "number", connect = "function", trace = "callable",
  timeout = function(v) if not options.finite(v) or v <= 0 then return "must be a positive number" end end,
  data_timeout = function(v) if not options.finite(v) or v <= 0 then return "must be a positive number" end end,
  tls = function(v)
    if not DEFAULT_PORT[v] then return 'must be "starttls", "implicit" or "none"' end
  end,
}

local function check_opts(opts)
  if type(opts) ~= "table" then error("oauthmail.smtp.open: expected a table of options", 3) end
  if opts.transport == nil and type(opts.host) ~= "string" then error("oauthmail.smtp.open: 'host' must be a string", 3) end
  options.check("oauthmail.smtp.open", opts, OPTIONS, 3)
end

-- smtp.open{host=, port=, tls=, timeout=, data_timeout=, helo=, trace=, allow_plaintext_auth=, ...TLS options}
-- `transport` (a table with send/receive_some/starttls/close) replaces the
-- connection, for tests; `connect(conn_opts) -> transport | nil, err` makes
-- one per session (a host's sockets: oauthmail.transport.cosocket).
function M.open(opts)
  check_opts(opts)
  local tls = opts.tls or "starttls"
  local self = setmetatable({
    host = opts.host or "localhost", port = opts.port or DEFAULT_PORT[tls], tls = tls,
    helo = opts.helo or "localhost", trace = opts.trace, timeout = opts.timeout or 30,
    -- the reply to the end of the data: RFC 5321's 10 minutes, never less than timeout
    data_timeout = opts.data_timeout or math.max(600, opts.timeout or 30),
    allow_plaintext_auth = opts.allow_plaintext_auth == true,
    opts = opts, capabilities = {},
  }, Session)
  self.eng = core.smtp.engine { trace = self.trace ~= nil, max_line = opts.max_line, max_reply = opts.max_reply }
  local conn, err = opts.transport
  if not conn then
    local c = tls_options(opts)
    c.host, c.port, c.timeout = self.host, self.port, self.timeout
    c.tls = tls == "implicit" and "implicit" or "none"
    -- a host that cannot let oauthmail wait on its own sockets (nginx) gives
    -- a connect function whose connection speaks the same contract
    conn, err = (opts.connect or require("oauthmail.conn").connect)(c)
    if not conn then return nil, as_error(err) end
  end
  self.conn = conn
  if not opts.transport and not opts.connect then
    self.core_conn = require("oauthmail.conn").core_of(conn)
  end
  self:_info(string.format("connected to %s:%d (%s)", self.host, self.port, tls))
  local ok, caps
  ok, err = self:_start()
  if not ok then
    self:close()
    return nil, err
  end
  caps = ok
  self.capabilities = caps
  self.secure = tls ~= "none"
  return self
end

function Session:_start()
  self.eng:expect_greeting()
  local r, err = self:_reply()
  if not r then return nil, err end
  if r.code ~= 220 then return nil, reply_error("smtp", "server refused the session", r) end
  local caps
  caps, err = self:_ehlo()
  if not caps then return nil, err end
  if self.tls ~= "starttls" then return caps end
  -- Never carry on in plain text: no STARTTLS, no session.
  if not caps.STARTTLS then
    return self:_broken(errors.new("tls", "the server does not offer STARTTLS; refusing to continue without TLS",
      { reason = "starttls_not_offered", retryable = false }))
  end
  self.eng:starttls()
  r, err = self:_ask()
  if not r then return nil, err end
  if r.code ~= 220 then
    return self:_broken(reply_error("tls", "STARTTLS refused", r, { reason = "starttls_refused" }))
  end
  if r.injected then
    return self:_broken(errors.new("tls", "the server sent data after its STARTTLS reply and before TLS; refusing to continue",
      { reason = "injection", retryable = false }))
  end
  local ok
  ok, err = self.conn:starttls(tls_options(self.opts))
  if not ok then return self:_broken(err) end
  self.eng:reset()
  return self:_ehlo()
end

-- ---------------------------------------------------------------- auth

local MECHS = { xoauth2 = "XOAUTH2", oauthbearer = "OAUTHBEARER", plain = "PLAIN", login = "LOGIN" }

-- The error challenge is a small flat JSON object; only its string fields
-- matter. What the server wrote is kept only after the session's secrets
-- and any secret JSON keys are masked, and control bytes escaped.
local function decode_challenge(json, clean)
  json = clean(redact.json(json))
  local t = { json = json }
  for _, k in ipairs { "status", "schemes", "scope", "openid-configuration" } do
    local q = k:gsub("%p", "%%%0")
    local v = json:match('"' .. q .. '"%s*:%s*"([^"]*)"') or json:match('"' .. q .. '"%s*:%s*(%d+)')
    t[k] = v
  end
  return t
end

-- Where allow_plaintext_auth may apply: this machine, by name or literal.
local is_loopback = require("oauthmail.url").is_loopback

-- More 334s than any mechanism here needs (two-step XOAUTH2 with an error
-- challenge, LOGIN) means a server out of step; the engine stops sooner.
local MAX_SASL_ROUNDS = 4

-- session:auth{mechanism=, user=, token= | password=, two_step=} -> true | nil, err
function Session:auth(o)
  local ok, err = check_usable(self)
  if not ok then return nil, err end
  if type(o) ~= "table" then error("session:auth: expected a table of options", 2) end
  local mech = MECHS[(o.mechanism or "xoauth2"):lower()]
  if not mech then error("session:auth: mechanism must be xoauth2, oauthbearer, plain or login", 2) end
  if type(o.user) ~= "string" then error("session:auth: 'user' must be a string", 2) end
  local secret_key = (mech == "PLAIN" or mech == "LOGIN") and "password" or "token"
  if type(o[secret_key]) ~= "string" then error("session:auth: '" .. secret_key .. "' must be a string", 2) end
  if not self.secure and not self.allow_plaintext_auth then
    return errors.fail("config", "refusing to authenticate over a connection without TLS " ..
      "(allow_plaintext_auth exists for loopback test servers only)", { reason = "plaintext_auth", retryable = false })
  end
  if not self.secure and not is_loopback(self.host) then
    return errors.fail("config", string.format("refusing to send credentials in clear text to %s: " ..
      "allow_plaintext_auth applies only to a loopback host (127.0.0.0/8, ::1, localhost)", self.host),
      { reason = "plaintext_auth", retryable = false })
  end
  local offered = self.capabilities.AUTH or {}
  if not offered[mech] and not o.force then
    local list = {}
    for m in pairs(offered) do list[#list + 1] = m end
    table.sort(list)
    return errors.fail("auth", string.format("the server does not offer AUTH %s (it offers: %s)", mech,
      #list > 0 and table.concat(list, " ") or "none"), { reason = "mechanism", retryable = false })
  end
  -- from here on this session's trace and errors mask the credential by value
  self.secrets = { o[secret_key] }
  local initial
  if o.two_step == true then initial = false elseif o.two_step == false then initial = true end
  ok, err = self.eng:auth(mech, {
    user = o.user, token = o.token, password = o.password, initial = initial,
    max_initial = o.max_initial or 1000, host = self.host, port = self.port,
  })
  if ok == nil then return nil, err end
  local r, challenge
  local rounds = 0
  r, err = self:_ask()
  while r and r.continue do
    rounds = rounds + 1
    if rounds > MAX_SASL_ROUNDS then
      return self:_broken(errors.new("smtp", "the server keeps sending 334 challenges; abandoning the exchange",
        { reason = "malformed", code = r.code, retryable = false }))
    end
    local function clean(text) return self:_clean(text) end
    if r.challenge then
      challenge = decode_challenge(r.challenge, clean)
    elseif r.challenge_text then
      challenge = { text = clean(r.challenge_text) }
    end
    r, err = self:_ask()
  end
  if not r then return nil, err end
  if r.code == 235 then
    self.authenticated = true
    return true
  end
  local what = "authentication refused"
  if challenge and challenge.status then
    what = what .. string.format(" (error challenge: status %s, scope %s)", challenge.status, challenge.scope or "-")
  end
  return nil, reply_error("auth", what, r, { challenge = challenge, mechanism = mech })
end

-- ---------------------------------------------------------------- messages

local function recipients(to)
  if type(to) == "string" then return { to } end
  if type(to) ~= "table" or #to == 0 then error("session:send: 'to' must be an address or a non-empty list", 3) end
  for i = 1, #to do
    if type(to[i]) ~= "string" then error("session:send: 'to[" .. i .. "]' must be a string", 3) end
  end
  return to
end

-- A function returning the next chunk (nil at the end) for any data source.
local function source(data)
  if type(data) == "string" then
    local pos = 1
    return function()
      if pos > #data then return nil end
      local c = data:sub(pos, pos + CHUNK - 1)
      pos = pos + CHUNK
      return c
    end
  elseif io.type(data) == "file" then
    return function()
      local c, err = data:read(CHUNK)
      if c == nil and err then error({ reader_error = err }) end
      return c
    end
  elseif type(data) == "function" then
    return function()
      local c, err = data()
      if c == nil and err then error({ reader_error = err }) end
      if c ~= nil and type(c) ~= "string" then error({ reader_error = "reader returned a " .. type(c) }) end
      return c
    end
  end
  error("session:send: 'data' must be a string, a file or a reader function", 3)
end

-- The MAIL parameters this message needs and the server offers, after
-- checking every address so that nothing is sent for a message that cannot go.
function Session:_prepare(msg)
  if type(msg) ~= "table" then error("session:send: expected a table", 3) end
  if type(msg.from) ~= "string" then error("session:send: 'from' must be a string", 3) end
  local to = recipients(msg.to)
  local caps = self.capabilities
  local utf8 = msg.from:find("[\128-\255]") ~= nil
  for i = 1, #to do utf8 = utf8 or to[i]:find("[\128-\255]") ~= nil end
  local ok, err = true, nil
  if msg.from ~= "" and msg.from ~= "<>" then ok, err = core.smtp.check_address(msg.from, caps.SMTPUTF8 ~= nil) end
  for i = 1, #to do
    if not ok then break end
    ok, err = core.smtp.check_address(to[i], caps.SMTPUTF8 ~= nil)
  end
  if not ok then
    err.retryable = false
    return nil, err
  end
  if msg.size ~= nil and (type(msg.size) ~= "number" or msg.size < 0 or msg.size % 1 ~= 0) then
    error("session:send: 'size' must be a whole number of octets", 3)
  end
  if msg.eight_bit ~= nil and type(msg.eight_bit) ~= "boolean" then
    error("session:send: 'eight_bit' must be a boolean", 3)
  end
  local params = {}
  local data = msg.data
  local size = type(data) == "string" and #data or msg.size
  if size and type(caps.SIZE) == "number" then
    if caps.SIZE > 0 and size > caps.SIZE then
      return errors.fail("smtp", string.format("message is %d bytes; the server accepts at most %d", size, caps.SIZE),
        { reason = "too_large", retryable = false })
    end
    params[#params + 1] = string.format("SIZE=%d", size)
  end
  -- the caller's word when given (the mailer has looked at the message
  -- already); else a string is looked at, and a stream assumed 8-bit
  local eight = msg.eight_bit
  if eight == nil then
    if type(data) == "string" then
      -- one anchored run over the 7-bit bytes, three times faster than a
      -- search for the first 8-bit one
      eight = not data:find("^[^\128-\255]*$")
    else
      eight = true
    end
  end
  if caps["8BITMIME"] and eight then
    params[#params + 1] = "BODY=8BITMIME"
  end
  if utf8 then params[#params + 1] = "SMTPUTF8" end
  return to, params
end

-- Queue MAIL and RCPTs; the engine re-checks what _prepare checked.
function Session:_envelope(msg, to, params)
  local ok, err = self.eng:mail(msg.from, params)
  if not ok then return nil, err end
  for i = 1, #to do
    ok, err = self.eng:rcpt(to[i])
    if not ok then return nil, err end
  end
  return true
end

-- Read MAIL and RCPT replies; returns mail reply, accepted list, rejected map.
-- Pipelined, the commands are already out; otherwise each goes out and waits.
function Session:_envelope_replies(to, pipelined)
  local mr, err
  if pipelined then mr, err = self:_reply() else mr, err = self:_ask() end
  if not mr then return nil, err end
  local accepted, rejected = {}, {}
  if not pipelined and mr.code >= 300 then return mr, accepted, rejected end
  for i = 1, #to do
    local r
    if pipelined then
      r, err = self:_reply()
    else
      self.eng:rcpt(to[i])
      r, err = self:_ask()
    end
    if not r then return nil, err end
    if r.code < 300 then accepted[#accepted + 1] = to[i] else rejected[to[i]] = r end
  end
  return mr, accepted, rejected
end

function Session:_rset()
  self.eng:rset()
  local r, err = self:_ask()
  if not r then return nil, err end
  return r.code < 300
end

-- Turn the reply to the end of data into a receipt or an error.
local function outcome(mr, accepted, rejected, fr)
  if mr.code >= 300 then return nil, reply_error("smtp", "sender refused", mr) end
  if #accepted == 0 then
    local _, any = next(rejected)
    return nil, reply_error("smtp", "every recipient was refused", any or fr, { rejected = rejected })
  end
  if fr.code >= 300 then return nil, reply_error("smtp", "message refused", fr, { rejected = rejected }) end
  return { code = fr.code, enhanced = fr.enhanced, text = fr.text, accepted = accepted, rejected = rejected }
end

-- Stream the body through DATA: the terminator goes out with the last chunk.
function Session:_data_body(next_chunk)
  local c = next_chunk()
  local n = 0
  while true do
    local following = c and next_chunk()
    if c then
      self.eng:body(c)
      n = n + #c
    end
    if not following then self.eng:body_end() end
    local ok, err = self:_flush()
    if not ok then return nil, err end
    if not following then return n end
    c = following
  end
end

-- Stream the body as BDAT chunks. Pipelined, nothing is read until the last
-- chunk is out (the envelope travels in the same write as the first chunk);
-- otherwise each chunk but the last waits for its reply.
function Session:_bdat_body(next_chunk, pipelined)
  local c = next_chunk()
  local sent = 0
  while true do
    local following = c and next_chunk()
    self.eng:bdat(c or "", not following)
    sent = sent + 1
    local ok, err = self:_flush()
    if not ok then return nil, err end
    if not following then return sent end
    if not pipelined then
      local r
      r, err = self:_reply()
      if not r then return nil, err end
      sent = sent - 1
      if r.code >= 300 then return nil, r end
    end
    c = following
  end
end

-- session:send{from=, to=, data=, chunking=} -> receipt | nil, err
function Session:send(msg)
  local ok, err = check_usable(self)
  if not ok then return nil, err end
  local to, params = self:_prepare(msg)
  if not to then return nil, params end
  local next_chunk = source(msg.data)
  local ret = { errors.pcall(self._transaction, self, msg, to, params, next_chunk) }
  if not ret[1] then
    if type(ret[2]) == "table" and ret[2].reader_error then
      -- a half-sent message must never be completed: drop the connection
      local why = ret[2].reader_error
      if type(why) == "table" and why.message ~= nil then why = why.message end
      return self:_broken(errors.new("config", "reading the message failed: " .. tostring(why),
        { reason = "reader", retryable = false, cause = ret[2].reader_error }))
    end
    -- a raising reader (or a bug) left the dialogue at an unknown point
    self:_broken(errors.new("config", "sending stopped by an error: " .. tostring(ret[2]), { reason = "reader" }))
    error(ret[2], 0)
  end
  return ret[2], ret[3]
end

-- BDAT: the envelope's replies, then one per chunk; the last chunk's reply
-- is the final one. Pipelined, the envelope and every chunk go out before
-- anything is read. Returns mr, accepted, rejected, fr | nil, err.
function Session:_bdat_transaction(to, pipelined, next_chunk)
  local mr, accepted, rejected, fr
  if pipelined then
    local sent, err = self:_bdat_body(next_chunk, true)
    if not sent then return nil, err end
    mr, accepted, rejected = self:_envelope_replies(to, true)
    if not mr then return nil, accepted end
    for _ = 1, sent do
      local r
      r, err = self:_final_reply()
      if not r then return nil, err end
      if not fr or fr.code < 300 then fr = r end  -- keep the first refusal
    end
    return mr, accepted, rejected, fr
  end
  mr, accepted, rejected = self:_envelope_replies(to, false)
  if not mr then return nil, accepted end
  if mr.code < 300 and #accepted > 0 then
    local sent, last = self:_bdat_body(next_chunk, false)
    if sent then
      local err
      fr, err = self:_final_reply()
      if not fr then return nil, err end
    elseif type(last) == "table" and last.command then
      fr = last
    else
      return nil, last
    end
  end
  return mr, accepted, rejected, fr
end

-- DATA: only a 354 leads to the body (RFC 5321 4.1.1.4). Any other positive
-- reply means the dialogue is out of step and nothing was sent, so it is an
-- error that drops the session, never a receipt. Returns as above.
function Session:_data_transaction(to, pipelined, next_chunk)
  local ok, err, dr
  if pipelined then
    self.eng:data()
    ok, err = self:_flush()
    if not ok then return nil, err end
  end
  local mr, accepted, rejected = self:_envelope_replies(to, pipelined)
  if not mr then return nil, accepted end
  local envelope_ok = mr.code < 300 and #accepted > 0
  if pipelined then
    dr, err = self:_reply()
    if not dr then return nil, err end
  elseif envelope_ok then
    self.eng:data()
    dr, err = self:_ask()
    if not dr then return nil, err end
  else
    return mr, accepted, rejected, nil
  end
  if dr.code >= 400 then return mr, accepted, rejected, dr end
  if dr.code ~= 354 then
    return self:_broken(reply_error("smtp",
      string.format("server answered DATA with %d instead of 354, the message was not sent", dr.code),
      dr, { reason = "protocol", retryable = dr.code == 221 }))
  end
  if envelope_ok then
    local n
    n, err = self:_data_body(next_chunk)
    if not n then return nil, err end
  else
    -- RFC 2920 3.1: a server that said 354 anyway gets an empty message
    self.eng:body_end()
    ok, err = self:_flush()
    if not ok then return nil, err end
  end
  local fr
  fr, err = self:_final_reply()
  if not fr then return nil, err end
  if not envelope_ok then fr = nil end
  return mr, accepted, rejected, fr
end

-- One message: MAIL (with the envelope pipelined when offered), then DATA or
-- BDAT. A message counts as sent only after the 2xx to the end of its data.
function Session:_transaction(msg, to, params, next_chunk)
  local caps = self.capabilities
  local pipelined = caps.PIPELINING ~= nil
  local ok, err
  if pipelined then
    ok, err = self:_envelope(msg, to, params)
  else
    ok, err = self.eng:mail(msg.from, params)
  end
  if not ok then return nil, err end
  local mr, accepted, rejected, fr
  if msg.chunking == true and caps.CHUNKING ~= nil then
    mr, accepted, rejected, fr = self:_bdat_transaction(to, pipelined, next_chunk)
  else
    mr, accepted, rejected, fr = self:_data_transaction(to, pipelined, next_chunk)
  end
  if not mr then return nil, accepted end
  local receipt
  receipt, err = outcome(mr, accepted, rejected, fr or mr)
  if not receipt and not self.broken then
    -- keep the session usable for the next message; if even RSET fails the
    -- session is marked broken and the next call says so
    self:_rset()
  end
  return receipt, err
end

-- ---------------------------------------------------------------- batches

-- A pipelined batch: windows of messages written as RSET/MAIL/RCPT/BDAT
-- LAST each and matched back to the messages in order; the engine does both
-- (csrc/smtp_batch.c, which says why every MAIL but the very first follows
-- an RSET). Two windows are in flight at most: while the server works
-- through one, the next is on its way, and the replies the client has not
-- read stay a few kilobytes (RFC 2920 3.1: a client that writes without
-- reading could fill both directions' buffers and deadlock).

-- Write one window: the number of messages queued (those refused before
-- sending get their error in results at once) | nil, err.
function Session:_batch_write(list, idx, results, rset_first, field)
  local caps = self.capabilities
  local size_limit = type(caps.SIZE) == "number" and caps.SIZE or -1
  local queued, problems = self.eng:batch(list, idx, size_limit, rset_first, field)
  if queued == false then error(problems, 5) end
  if problems then
    for i, err in pairs(problems) do results[i] = err end
  end
  if queued == 0 then return 0 end
  local ok, err = self:_flush()
  if not ok then return nil, err end
  return queued
end

-- Read replies until the next n messages in flight are settled (each
-- reply within the timeout, the one to the end of a message's data within
-- data_timeout); then what no 2xx settled gets its reason, as session:send
-- would give it. st: the engine's notes, kept across calls.
function Session:_batch_read(list, results, st, n)
  local deadline
  while true do
    local done, progressed, final_next = self.eng:batch_replies(list, results, st, n, st.compact)
    self:_trace()
    if st.closing then self.closing = st.closing end
    if done == nil then return self:_broken(progressed) end
    if done then break end
    local timeout = final_next and self.data_timeout or self.timeout
    local now = core.monotime()
    if progressed > 0 or not deadline then
      deadline = now + timeout
    elseif deadline - now <= 0 then
      if final_next then return self:_broken(final_timeout(timeout)) end
      return self:_broken(errors.new("network", string.format("no complete reply from the server within %g s",
        timeout), { reason = "timeout", retryable = true }))
    end
    local got, rerr = self:_receive(deadline)
    if not got then return self:_receive_failed(rerr, final_next and timeout) end
  end
  local failed = st.failed
  if failed and #failed > 0 then
    for k = 1, #failed do
      local i = failed[k]
      local p = results[i]
      local _, why = outcome(p.mr, p.accepted, p.rejected, p.fr)
      results[i] = why
    end
    st.failed = {}
  end
  if st.rset_failed then
    -- without a working RSET the next transaction could inherit this one
    return self:_broken(reply_error("smtp", "RSET refused in a pipelined batch", st.rset_failed,
      { reason = "rset_refused", retryable = true }))
  end
  return true
end

-- session:send_many(list [, {window=64, field="data", compact=false}]) ->
-- list of receipts or errors, aligned with list. A message's data may also
-- be a list of strings, sent one after the other as one message. field:
-- where each message keeps its data, for callers whose messages hold
-- something else in `data`. compact: a batched message that every
-- recipient took gets the final reply alone ({code, enhanced, text}; its
-- accepted list is its `to`), for callers that keep many receipts.
function Session:send_many(list, o)
  local ok, err = check_usable(self)
  if not ok then return nil, err end
  if type(list) ~= "table" then error("session:send_many: expected a list of messages", 2) end
  local window = (o and o.window) or 64
  local field = (o and o.field) or "data"
  local compact = (o and o.compact) == true
  if type(window) ~= "number" or window < 1 or window % 1 ~= 0 then
    error("session:send_many: window must be a positive whole number", 2)
  end
  if type(field) ~= "string" then error("session:send_many: field must be a string", 2) end
  local results = {}
  local done, derr = self:_send_many(list, window, results, field, compact)
  if not done then
    -- the session broke: what was not confirmed did not go
    for i = 1, #list do
      if results[i] == nil then results[i] = self.broken or derr end
    end
  end
  return results
end

function Session:_send_many(list, window, results, field, compact)
  local caps = self.capabilities
  local batch = caps.PIPELINING ~= nil and caps.CHUNKING ~= nil
  local st = { compact = compact }
  local written = false     -- a window went out in this call: the next starts with RSET
  local inflight = 0        -- messages of the window before the last one written
  local last = 0            -- messages of the last window written
  local pending = {}
  -- settle what is in flight; a failed last message leaves no transaction open
  local function settle_all()
    if inflight + last > 0 then
      local ok, err = self:_batch_read(list, results, st)
      if not ok then return nil, err end
      inflight, last = 0, 0
      if st.last_ok == false then
        st.last_ok = nil
        local rok, rerr = self:_rset()
        if rok == nil then return nil, rerr end
      end
    end
    written = false
    return true
  end
  local function write(idx)
    local q, err = self:_batch_write(list, idx, results, written, field)
    if not q then return nil, err end
    if q == 0 then return true end
    written = true
    -- the window before the last one must be settled before a third goes
    if inflight > 0 then
      local ok, rerr = self:_batch_read(list, results, st, inflight)
      if not ok then return nil, rerr end
    end
    inflight, last = last, q
    return true
  end
  local i, n = 1, #list
  while i <= n do
    local msg = list[i]
    local data = type(msg) == "table" and msg[field]
    if batch and (type(data) == "string" or type(data) == "table") then
      pending[#pending + 1] = i
      if #pending >= window then
        local ok, err = write(pending)
        if not ok then return nil, err end
        pending = {}
      end
    else
      if #pending > 0 then
        local ok, err = write(pending)
        if not ok then return nil, err end
        pending = {}
      end
      local ok, err = settle_all()
      if not ok then return nil, err end
      if type(data) == "table" or (field ~= "data" and type(msg) == "table") then
        if type(data) == "table" then data = table.concat(data) end
        msg = { from = msg.from, to = msg.to, data = data, size = msg.size, eight_bit = msg.eight_bit }
      end
      local r, serr = self:send(msg)
      results[i] = r or serr
      if self.broken then return nil, serr end
    end
    i = i + 1
  end
  if #pending > 0 then
    local ok, err = write(pending)
    if not ok then return nil, err end
  end
  return settle_all()
end

-- ---------------------------------------------------------------- misc

function Session:noop()
  local ok, err = check_usable(self)
  if not ok then return nil, err end
  self.eng:noop()
  local r
  r, err = self:_ask()
  if not r then return nil, err end
  if r.code >= 300 then return nil, reply_error("smtp", "NOOP refused", r) end
  return true
end

function Session:reset()
  local ok, err = check_usable(self)
  if not ok then return nil, err end
  return self:_rset()
end

-- session:close(): QUIT (best effort, bounded by the connection's timeout) and close.
function Session:close()
  if self.closed then return true end
  self.closed = true
  if self.conn and not self.broken then
    local ok = errors.pcall(function()
      if select(1, self.eng:pending()) == 0 then
        self.eng:quit()
        if self:_flush() then self:_reply() end
      end
    end)
    if not ok then self:_info("QUIT failed") end
  end
  if self.conn then self.conn:close() end
  self:_trace()
  self.eng:close()
  return true
end
Session.__close = Session.close

M.Session = Session
return M
