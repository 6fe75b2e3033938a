-- oauthmail.http — HTTPS requests for token, device, discovery, revocation
-- and Graph endpoints. The transfer itself is oauthmail.curl (libcurl, a C
-- module of its own so that loading oauthmail.core does not load libcurl); this file
-- owns the policy: argument checks, form encoding, which URLs may go out in
-- clear text, and the redacted trace.
local core = require "oauthmail.core"
local errors = require "oauthmail.errors"
local options = require "oauthmail.options"
local redact = require "oauthmail.redact"
local urls = require "oauthmail.url"
local wait = require "oauthmail.wait"

local C = require "oauthmail.curl"
local cjson = require("cjson.safe").new()
local M = {}

M.curl_version = C.curl_version

-- Percent-encode everything but RFC 3986 unreserved characters.
M.url_encode = urls.percent

-- http.form_encode{k=v,...} -> "a=1&b=2" with keys sorted, so the same
-- table always gives the same bytes.
function M.form_encode(t)
  if type(t) ~= "table" then error("http.form_encode: expected a table", 2) end
  local keys = {}
  for k, v in pairs(t) do
    if type(k) ~= "string" then error("http.form_encode: keys must be strings", 2) end
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
      error("http.form_encode: value of '" .. k .. "' must be a string, number or boolean", 2)
    end
    keys[#keys + 1] = k
  end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = urls.form_component(k) .. "=" .. urls.form_component(tostring(t[k])) end
  return table.concat(parts, "&")
end

-- http.form_decode("a=1&b=x+y") -> {a="1", b="x y"} (last value wins)
function M.form_decode(s)
  local t = {}
  for pair in tostring(s):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    t[urls.decode(k)] = urls.decode(v)
  end
  return t
end

local function check_url(url, allow_http)
  local scheme, host = url:match("^(%a[%w+.-]*)://([^/?#]*)")
  if not scheme then
    return errors.fail("config", "invalid URL (expected https://host/path)", { reason = "url" })
  end
  scheme = scheme:lower()
  host = (host:gsub("^.*@", ""):gsub(":%d*$", "")):lower()
  if scheme == "https" then return true end
  if scheme == "http" then
    if urls.is_loopback(host) or allow_http then return true end
    return errors.fail("config", "refusing plain http:// to " .. host .. ": tokens and secrets must travel over " ..
      "TLS (use https://, or allow_http=true for a trusted test endpoint)", { reason = "insecure" })
  end
  return errors.fail("config", "unsupported URL scheme '" .. scheme .. "' (expected https)", { reason = "url" })
end

local function find_header(headers, name)
  for k, v in pairs(headers) do
    if type(k) == "string" and k:lower() == name then return v end
  end
end

local OPT_TYPES = {
  method = "string", url = "string", headers = "table", body = "string", form = "table",
  timeout = "number", connect_timeout = "number", ca_file = "string", ca_path = "string",
  verify = "boolean", client_cert = "string", client_key = "string", client_key_passphrase = "string",
  follow_redirects = "boolean", max_body = "number", trace = "function", allow_http = "boolean",
  secrets = "table", trace_body = "boolean",
}

-- Over HTTP/2 libcurl lists every request header as an informational line
-- ("h2h3 [name: value]" in 7.88, "[HTTP/2] [1] [name: value]" from 8.x),
-- Authorization included: those get header redaction, :path URL redaction.
local H2_HEADER_LINES = { "^(h2h3 %[)([^%]]-): (.*)(%])$", "^(%[HTTP/2%] %[%d+%] %[)([^%]]-): (.*)(%])$" }

local function info_line(line, secrets)
  line = redact.values(line, secrets)
  for _, pat in ipairs(H2_HEADER_LINES) do
    local pre, name, value, post = line:match(pat)
    if pre then
      value = name == ":path" and redact.url(value) or redact.header(name, value)
      return pre .. name .. ": " .. value .. post
    end
  end
  return redact.text(line)
end

-- The secret values one exchange holds, beyond those the caller names:
-- the credential of an Authorization header (and, for Basic, the secret in
-- it), the values of secret fields in a form body, and those of secret keys
-- in a JSON answer. The trace masks each wherever it appears.
local function exchange_secrets(list, headers, body, resp)
  local out = {}
  for _, v in ipairs(list or {}) do out[#out + 1] = v end
  local auth = find_header(headers, "authorization")
  local cred = auth and auth:match("^%s*%S+%s+(%S+)")
  if cred then
    out[#out + 1] = cred
    local plain = auth:match("^%s*[Bb][Aa][Ss][Ii][Cc]%s") and core.crypto.b64decode(cred)
    local secret = type(plain) == "string" and plain:match("^[^:]*:(.*)$")
    if secret then
      out[#out + 1] = secret
      out[#out + 1] = urls.decode(secret)
    end
  end
  if type(body) == "string" then
    for k, v in body:gmatch("([^&=]+)=([^&]*)") do
      if redact.FIELDS[urls.decode(k):lower()] then out[#out + 1] = urls.decode(v) end
    end
  end
  local doc = resp and resp.body and resp.body:find("^%s*{") and cjson.decode(resp.body)
  if type(doc) == "table" then
    for k, v in pairs(doc) do
      if type(k) == "string" and type(v) == "string" and redact.FIELDS[k:lower()] then out[#out + 1] = v end
    end
  end
  return out
end

-- Turn the raw events collected in C into redacted trace events, in order:
-- the exchange's secrets by value, the key and header rules of
-- oauthmail.redact, control bytes escaped (a line per event, never forged).
local function emit_trace(trace, events, secrets, trace_body)
  local function emit(dir, text)
    return trace { proto = "http", dir = dir, text = redact.escape(redact.values(text, secrets)) }
  end
  local function note(text, omitted)
    if omitted and omitted > 0 then return text .. " [... " .. string.format("%d", omitted) .. " more bytes]" end
    return text
  end
  local calls = {}
  for _, ev in ipairs(events) do
    local t = ev.type
    if t == "info" then
      for line in ev.text:gmatch("[^\r\n]+") do calls[#calls + 1] = { "info", info_line(line, secrets) } end
    elseif t == "header_out" then
      local first = true
      for line in ev.text:gmatch("[^\r\n]+") do
        if first then
          local m, target, rest = line:match("^(%S+) (%S+)(.*)$")
          line = m and (m .. " " .. redact.url(target) .. rest) or line
          first = false
        else
          line = redact.header_line(line)
        end
        calls[#calls + 1] = { "send", line }
      end
    elseif t == "data_out" then
      if trace_body == false then
        -- a message (Graph sendMail) is content, not protocol: its size only
        calls[#calls + 1] = { "send", string.format("[%d bytes of request body, not traced]", #ev.text + (ev.omitted or 0)) }
      else
        calls[#calls + 1] = { "send", note(redact.body(ev.text), ev.omitted) }
      end
    elseif t == "header_in" then
      local line, e = ev.text, #ev.text
      while e > 0 and (line:byte(e) == 10 or line:byte(e) == 13) do e = e - 1 end
      line = line:sub(1, e)
      if not line:match("^HTTP/") then line = redact.header_line(line) end
      if line ~= "" then calls[#calls + 1] = { "recv", line } end
    elseif t == "data_in" then
      calls[#calls + 1] = { "recv", note(redact.body(ev.text), ev.omitted) }
    end
  end
  if events.dropped then calls[#calls + 1] = { "info", string.format("%d", events.dropped) .. " trace events dropped (limit reached)" } end
  for _, c in ipairs(calls) do
    local ok, err = pcall(emit, c[1], c[2])
    if not ok then
      return errors.fail("config", "the trace function failed: " .. redact.text(tostring(err)), { reason = "trace" })
    end
  end
  return true
end

-- Run one oauthmail.curl request to its end, waiting on curl's descriptors
-- through oauthmail.wait (curl's own timer bounds each wait; the request's
-- timeout, enforced by curl, bounds the whole).
function M.perform(o)
  local req = C.start(o)
  local cap = (o.timeout or 30) + 5
  local stop = core.monotime() + cap
  while true do
    local a, b, fd, seconds = req:step()
    if a ~= false then return a, b, fd end
    local now = core.monotime()
    if now > stop then
      -- curl enforces the timeout; this bounds a curl that stopped asking
      return nil, errors.new("network", string.format("HTTP request timed out after %g s", o.timeout or 30),
        { reason = "timeout" })
    end
    local d = seconds and (now + seconds) or stop
    if d > stop then d = stop end
    if seconds ~= 0 then wait.fd(fd, b, d) end
  end
end

-- http.request{...} -> {status=, headers=, body=, url=} | nil, err
-- HTTP error statuses are responses, not errors: the OAuth layer reads them.
function M.request(opts)
  if type(opts) ~= "table" then error("http.request: expected an options table", 2) end
  for k, v in pairs(opts) do
    local want = OPT_TYPES[k]
    if k == "trace" then
      if not options.callable(v) then
        error("http.request: option 'trace' must be a function (or a callable table)", 2)
      end
    elseif k == "proxy" then
      if type(v) ~= "string" and v ~= false then error("http.request: option 'proxy' must be a URL string or false", 2) end
    elseif not want then
      error("http.request: unknown option '" .. tostring(k) .. "'", 2)
    elseif type(v) ~= want then
      error("http.request: option '" .. k .. "' must be a " .. want .. ", got " .. type(v), 2)
    end
  end
  if not opts.url then error("http.request: option 'url' is required", 2) end
  if opts.body and opts.form then error("http.request: give either body or form, not both", 2) end
  local method = (opts.method or ((opts.body or opts.form) and "POST" or "GET")):upper()
  if not method:match("^%u+$") then error("http.request: invalid method", 2) end

  local ok, err = check_url(opts.url, opts.allow_http)
  if not ok then return nil, err end

  local headers, body = {}, opts.body
  for k, v in pairs(opts.headers or {}) do
    if type(k) ~= "string" or type(v) ~= "string" then error("http.request: header names and values must be strings", 2) end
    if k:find("[%c:%s]") or k == "" then error("http.request: invalid header name", 2) end
    if v:find("[\r\n%z]") then error("http.request: header '" .. k .. "' contains CR, LF or NUL", 2) end
    headers[k] = v
  end
  if opts.form then
    body = M.form_encode(opts.form)
    if not find_header(headers, "content-type") then headers["Content-Type"] = "application/x-www-form-urlencoded" end
  end

  local resp, events
  resp, err, events = M.perform {
    method = method, url = opts.url, headers = headers, body = body,
    timeout = opts.timeout, connect_timeout = opts.connect_timeout, max_body = opts.max_body,
    ca_file = opts.ca_file, ca_path = opts.ca_path, verify = opts.verify,
    client_cert = opts.client_cert, client_key = opts.client_key,
    client_key_passphrase = opts.client_key_passphrase,
    proxy = opts.proxy, follow_redirects = opts.follow_redirects,
    trace = opts.trace ~= nil,
  }
  if resp then events = err end
  if opts.trace and events then
    local tok, terr = emit_trace(opts.trace, events, exchange_secrets(opts.secrets, headers, body, resp), opts.trace_body)
    if not tok then return nil, terr end
  end
  if not resp then
    -- libcurl's wording may quote a URL; keep its secrets out of the error.
    err.message = redact.escape(redact.text(redact.values(err.message, opts.secrets)))
    return nil, err
  end
  return resp
end

return M
