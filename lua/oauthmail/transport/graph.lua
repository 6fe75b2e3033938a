-- oauthmail.transport.graph — Microsoft Graph sendMail as a transport with
-- the shape of transport.smtp (connect/authenticate/submit/classify/close/
-- abandon): the message goes as MIME, the base64 of the bytes the SMTP
-- transport would send, in one POST {graph}/v1.0/users/{user}/sendMail.
-- 202 means Graph accepted the message for delivery, nothing more. A
-- session is only the token it carries: connect makes no connection.
-- See docs/graph.md.
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local http = require "oauthmail.http"
local policy = require "oauthmail.policy"
local endpoint = require "oauthmail.oauth2.endpoint"
local address = require "oauthmail.message.address"

local cjson = require("cjson.safe").new()

local M = {}
local T = {}
T.__index = T

-- Graph refuses a request body over 4 MB (sendMail with MIME included);
-- the base64 of the message is 4/3 of its size.
M.MAX_REQUEST = 4 * 1024 * 1024

-- Graph hosts per national cloud (profile.cloud).
M.HOSTS = {
  global = "https://graph.microsoft.com",
  usgov = "https://graph.microsoft.us",
  china = "https://microsoftgraph.chinacloudapi.cn",
}

-- transport.graph.new(opts, ctx)
--   opts: the profile's resolved graph table {endpoint=, timeout=, ca_file=, verify=, proxy=,
--         max_request=, allow_http=}
--   ctx:  {user=, trace=fn, token=fn() -> tok|nil,err, invalidate=fn(tok)}
function M.new(opts, ctx)
  return setmetatable({ opts = opts, user = ctx.user, trace = ctx.trace, token = ctx.token,
    invalidate = ctx.invalidate, name = "graph" }, T)
end

function T.connect()
  return { closed = false }
end

function T.authenticate(_, s, token)
  s.token = token
  return true
end

function T.usable(_, s) return not (s.closed or s.broken) end
function T.close(_, s) s.closed = true return true end
function T.abandon(_, s) s.closed = true end

-- ------------------------------------------------------------ the message

local function whole(data)
  if type(data) == "string" then return data end
  local parts = {}
  if io.type(data) == "file" then
    parts[1] = data:read("*a")
  else
    for chunk in data do parts[#parts + 1] = chunk end
  end
  return table.concat(parts)
end

-- The addresses of the To, Cc and Bcc fields of a message's header (unfolded).
local function header_recipients(head)
  local set = {}
  local unfolded = head:gsub("\r?\n[ \t]+", " ")
  for line in (unfolded .. "\n"):gmatch("([^\n]*)\n") do
    local name, value = line:match("^([%w%-]+):(.*)$")
    local lname = name and name:lower()
    if lname == "to" or lname == "cc" or lname == "bcc" then
      for _, item in ipairs(address.split_list(value)) do
        local mb = address.parse(item)
        if mb then set[mb.address:lower()] = true end
      end
    end
  end
  return set
end

-- Graph sends to the recipients the MIME header names and ignores any
-- envelope. The SMTP bytes carry no Bcc field (it is envelope only), so an
-- envelope recipient that the header does not name is written into one Bcc
-- field put in front of the header; Exchange removes it before the message
-- leaves (docs/graph.md). A header recipient missing from the envelope would
-- receive a copy over Graph but not over SMTP: refused, so both transports
-- deliver to the same people.
function M.mime_for(m)
  local data = whole(m.data(m))
  local head = data:match("^(.-\r?\n)\r?\n") or data
  local named = header_recipients(head)
  local extra, env = {}, {}
  for _, a in ipairs(m.to) do
    local la = a:lower()
    env[la] = true
    if not named[la] then extra[#extra + 1] = a end
  end
  for a in pairs(named) do
    if not env[a] then
      return errors.fail("config", "the message's To/Cc/Bcc names " .. a .. ", which is not among its recipients; "
        .. "Graph sends to every address the header names, so this message cannot go through Graph as it is "
        .. "(make the recipients match the header)", { reason = "recipients", retryable = false })
    end
  end
  if #extra > 0 then
    for _, a in ipairs(extra) do
      local ok, why = address.check(a)
      if not ok then return errors.fail("config", "recipient: " .. why, { reason = "recipients", retryable = false }) end
    end
    data = "Bcc: " .. table.concat(extra, ",\r\n ") .. "\r\n" .. data
  end
  return data, #extra
end

-- ------------------------------------------------------------ errors

-- Graph's JSON error body into the error value: {error={code, message, innerError={request-id, date}}}.
function M.graph_error(resp, what)
  local doc = cjson.decode(resp.body or "")
  local e = type(doc) == "table" and type(doc.error) == "table" and doc.error or {}
  local inner = type(e.innerError) == "table" and e.innerError or (type(e.innererror) == "table" and e.innererror) or {}
  local status = resp.status
  local code = type(e.code) == "string" and e.code or nil
  local text = type(e.message) == "string" and e.message or nil
  local function ident(v) return type(v) == "string" and v:match("^[%w%-:%.T]+$") and #v <= 100 and v or nil end
  local fields = {
    code = status, status = status, graph_code = code, reason = "graph",
    text = text and endpoint.redact_text(text) or nil,
    request_id = ident(inner["request-id"]), client_request_id = ident(inner["client-request-id"]),
    date = ident(inner.date),
    retryable = status == 429 or status == 503 or status == 504,
  }
  if fields.retryable then
    local h = resp.headers or {}
    fields.retry_after = endpoint.retry_after(h["retry-after"])
  end
  local msg = string.format("%s: HTTP %d%s%s", what, status, code and (" " .. code) or "",
    fields.text and (": " .. fields.text:sub(1, 300)) or "")
  return errors.new("http", msg, fields)
end

-- Network failures where the request certainly never reached Graph.
local NOT_SENT = { refused = true, dns = true, unreachable = true }

-- ------------------------------------------------------------ sending

function T:_url()
  local base = (self.opts.endpoint or M.HOSTS.global):gsub("/+$", "")
  return base .. "/v1.0/users/" .. http.url_encode(self.user) .. "/sendMail"
end

function T:_post(s, body)
  local tok = s.token.access_token
  return http.request {
    method = "POST", url = self:_url(), body = body,
    headers = { ["Authorization"] = "Bearer " .. tok, ["Content-Type"] = "text/plain", ["Accept"] = "application/json" },
    timeout = self.opts.timeout or 60, ca_file = self.opts.ca_file, verify = self.opts.verify,
    proxy = self.opts.proxy, allow_http = self.opts.allow_http, follow_redirects = false,
    max_body = 256 * 1024, trace = self.trace, secrets = { tok }, trace_body = false,
  }
end

function T:_trace(ev)
  if self.trace then
    ev.type = "graph"
    pcall(self.trace, ev)
  end
end

-- transport:submit(s, m) -> receipt | nil, err
-- receipt = {code=202, text="Accepted", accepted={...}, rejected={}, request_id=, state="accepted"}
-- A 401 invalidates the token, takes a fresh one and tries once more.
function T:submit(s, m)
  local data, nbcc = M.mime_for(m)
  if not data then return nil, nbcc end
  local limit = self.opts.max_request or M.MAX_REQUEST
  local encoded = 4 * math.ceil(#data / 3)
  if encoded > limit then
    return errors.fail("policy", string.format("the message is %d bytes, %d in base64; a Graph sendMail request "
      .. "carries at most %d bytes (about %d bytes of message). Send it over SMTP (up to 35 MB in Exchange "
      .. "Online), or make it smaller (attachments as links)", #data, encoded, limit, math.floor(limit * 3 / 4)),
      { reason = "too_large", limit = limit, size = #data, retryable = false, transport = "graph" })
  end
  local body = crypto.b64encode(data)
  self:_trace { event = "submit", bytes = #data, bcc_added = nbcc, message_id = m.message_id }
  local resp, err
  for round = 1, 2 do
    resp, err = self:_post(s, body)
    if not resp then
      err.transport = "graph"
      -- a request that may have reached Graph is never sent again here
      -- (a TLS failure is the handshake's: no request went out)
      err.maybe_sent = err.kind ~= "tls" and not NOT_SENT[err.reason]
      if err.maybe_sent then
        err.retryable = false
        err.hint = (err.hint and (err.hint .. " ") or "") .. "The request may have reached Graph before the "
          .. "failure, so it is not sent again (check the mailbox's Sent Items)."
      end
      return nil, err
    end
    if resp.status ~= 401 or round == 2 or not self.token then break end
    self:_trace { event = "reauth", status = 401 }
    self.invalidate(s.token)
    local tok, terr = self.token()
    if not tok then return nil, terr end
    s.token = tok
  end
  if resp.status == 202 then
    return { code = 202, text = "Accepted", accepted = m.to, rejected = {}, state = "accepted",
      request_id = resp.headers and resp.headers["request-id"] or nil }
  end
  err = M.graph_error(resp, "Graph sendMail")
  err.transport = "graph"
  -- a gateway timeout leaves open whether Graph took the message
  err.maybe_sent = resp.status == 504 or nil
  return nil, err
end

-- The request slots a Graph pool may hold: Graph serves at most 4
-- concurrent requests per mailbox (and app). Shaped like the governor's
-- connection half, which oauthmail.pool uses.
function M.slots(n)
  return {
    connections = n, open = 0, max_wait = 120,
    acquire = function(self) self.open = self.open + 1 return true end,
    release = function(self) if self.open > 0 then self.open = self.open - 1 end end,
    lower = function(self) self.connections = math.max(1, self.connections - 1) return self.connections end,
  }
end

-- One by one: Graph has no pipelining.
function T:submit_many(s, list)
  local out = {}
  for i, m in ipairs(list) do
    local r, err = self:submit(s, m)
    out[i] = r or err
  end
  return out
end

-- What the send policy does with a Graph error: 429/503/504 wait (Retry-After
-- when given) and try again; a 401 that survived a refresh, a 4xx and any
-- request that may have reached Graph end it.
function T.classify(_, err)
  if type(err) ~= "table" then return "fail" end
  if err.reason == "graph" then
    if err.retryable then return "retry" end
    return "fail"
  end
  if err.kind == "network" then
    if err.maybe_sent then return "fail" end
    return "reconnect"
  end
  return policy.classify(err)
end

return M
