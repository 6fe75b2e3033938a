-- oauthmail.oauth2.endpoint — one call to an OAuth2 endpoint, the way every
-- flow makes it: a form body, client authentication (RFC 6749 2.3.1, RFC 7523),
-- bounded retries on 429/5xx/network errors honouring Retry-After, and the
-- decoding of OAuth error answers into the shared error value. Nothing here
-- ever puts a secret (client secret, assertion, code, verifier, token) into an
-- error message or a trace event.
local waiter = require "oauthmail.wait"
local errors = require "oauthmail.errors"
local urls = require "oauthmail.url"
local crypto = require "oauthmail.crypto"
local options = require "oauthmail.options"

local M = {}

-- A private decoder: NaN, Infinity and hex are not JSON, and a server must
-- not be able to slip them into an interval or a lifetime.
local cjson = require("cjson.safe").new()
cjson.decode_invalid_numbers(false)

-- Decode JSON text from a server; nil when it is not valid JSON.
function M.json_decode(text)
  return cjson.decode(text)
end

-- A number of seconds taken from a server's answer: `default` when absent
-- (nil or JSON null), nil when present but not a number (NaN included),
-- else clamped into [lo, hi], so an infinite or absurd value becomes hi.
function M.seconds(v, default, lo, hi)
  if v == nil or v == cjson.null then return default end
  local n = tonumber(v)
  if not n or n ~= n then return nil end
  if n < lo then return lo end
  if n > hi then return hi end
  return n
end

-- "3 s" on every Lua version (5.3+ would print a float as "3.0").
function M.fmt_secs(n)
  if n == math.floor(n) and n > -2 ^ 53 and n < 2 ^ 53 then return string.format("%d", n) end
  return string.format("%.1f", n)
end

-- Masks the known secret values of one request (and their form-, percent-
-- and base64 encodings) in text a server sent back: a server may echo what
-- it was given in error_description or an error page.
function M.mask_secrets(text, secrets)
  return require("oauthmail.redact").values(text, secrets)
end

local function http() return require "oauthmail.http" end

-- Form encoding and query parsing: oauthmail.url's, under the names the
-- flows and specs use.
M.urlencode = urls.form_component
M.urldecode = urls.decode
M.form = urls.form
M.parse_query = urls.parse_query

function M.scope_string(scope)
  if scope == nil then return nil end
  if type(scope) == "table" then return table.concat(scope, " ") end
  return scope
end

function M.has_scope(scope, name)
  local s = M.scope_string(scope)
  if not s then return false end
  for w in s:gmatch("%S+") do if w == name then return true end end
  return false
end

-- Server text (an error_description) with credentials taken out: key=value
-- and JSON secrets by oauthmail.redact, the request's own secrets by value.
function M.redact_text(text, secrets)
  local s = M.mask_secrets(tostring(text or ""), secrets)
  local ok, redact = pcall(require, "oauthmail.redact")
  if ok and type(redact) == "table" and type(redact.text) == "function" then
    local r = redact.text(s)
    if type(r) == "string" then s = r end
  end
  return s
end

-- Keep a quoted body useful for diagnosis without leaking: long opaque runs
-- (tokens, codes, assertions) are masked and the text is cut short.
function M.redact_body(body, secrets)
  local s = M.redact_text(body, secrets)
  s = s:gsub("[%w%-_%.~+/=]+", function(run)
    if #run >= 20 then return "[redacted " .. #run .. " chars]" end
  end)
  s = s:gsub("[%c]", " ")
  if #s > 200 then s = s:sub(1, 200) .. "..." end
  return s
end

function M.trace(cfg, ev)
  if cfg.trace then
    ev.kind = ev.kind or "oauth2"
    cfg.trace(ev)
  end
end

-- http.request wants a plain function; a trace may be any callable.
function M.trace_fn(cfg)
  local t = cfg.trace
  if t == nil or type(t) == "function" then return t end
  return function(ev) return t(ev) end
end

-- Retry-After (RFC 9110 10.2.3): delay-seconds or an HTTP-date.
local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The longest wait a server can ask for; a longer one (even one too long
-- to be a number) is taken as this, so callers never see inf or NaN.
M.MAX_RETRY_AFTER = 86400

function M.retry_after(value, now)
  if type(value) ~= "string" then return nil end
  local secs = value:match("^%s*(%d+)%s*$")
  if secs then return M.seconds(secs, nil, 0, M.MAX_RETRY_AFTER) end
  local d, mon, y, hh, mm, ss = value:match("%a+,%s*(%d+)%s+(%a+)%s+(%d+)%s+(%d+):(%d+):(%d+)%s+GMT")
  if d and MONTHS[mon] and #y <= 6 then
    local t = days_from_civil(tonumber(y), MONTHS[mon], tonumber(d)) * 86400
      + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
    return M.seconds(t - (now or os.time()), nil, 0, M.MAX_RETRY_AFTER)
  end
  return nil
end

-- The client assertion of RFC 7523 section 2.2 (private_key_jwt), signed with
-- the client certificate's key; Microsoft identifies the key by x5t / x5t#S256.
local function read_file(path, what)
  local f, ferr = io.open(path, "rb")
  if not f then return errors.fail("config", "cannot read the " .. what .. ": " .. tostring(ferr), { reason = "file" }) end
  local s = f:read("*a")
  f:close()
  return s
end

function M.client_assertion(cfg, audience)
  local cc = cfg.client_certificate
  if type(cc) ~= "table" or type(cc.key) ~= "string" then
    return errors.fail("config", "client_auth private_key_jwt needs client_certificate = {cert=, key=}")
  end
  local key, kerr = read_file(cc.key, "client certificate key")
  if not key then return nil, kerr end
  local header = { kid = cc.kid }
  if cc.cert then
    local cert, cerr = read_file(cc.cert, "client certificate")
    if not cert then return nil, cerr end
    local s256, e1 = crypto.x5t_s256(cert)
    if not s256 then return errors.fail("config", "client certificate is not a PEM certificate: " .. tostring(e1.message)) end
    header["x5t#S256"] = s256
    header.x5t = crypto.x5t(cert)
  end
  local now = os.time()
  local jws, err = crypto.jws_sign {
    alg = cc.alg or "PS256", key = key, passphrase = cc.passphrase, header = header,
    payload = {
      aud = audience, iss = cfg.client_id, sub = cfg.client_id,
      jti = crypto.b64url_encode(crypto.random(18)),
      iat = now, nbf = now, exp = now + 300,
    },
  }
  if not jws then
    return errors.fail("config", "cannot sign the client assertion: " .. tostring(err and err.message), { reason = "sign" })
  end
  return jws
end

function M.client_auth_method(cfg)
  if cfg.client_auth then return cfg.client_auth end
  if cfg.client_certificate then return "private_key_jwt" end
  if cfg.client_secret then return "client_secret_basic" end
  return "none"
end

-- Add the client's credentials to a request (params list and headers).
-- A client assertion's aud names the authorization server (RFC 7523 3): the
-- token endpoint, whichever endpoint is called (Entra ID wants exactly that).
local function apply_client_auth(cfg, url, params, headers)
  local method = M.client_auth_method(cfg)
  if method == "client_secret_basic" then
    if type(cfg.client_secret) ~= "string" then
      return errors.fail("config", "client_auth client_secret_basic needs client_secret")
    end
    headers["Authorization"] = "Basic "
      .. crypto.b64encode(M.urlencode(cfg.client_id) .. ":" .. M.urlencode(cfg.client_secret))
  elseif method == "client_secret_post" then
    if type(cfg.client_secret) ~= "string" then
      return errors.fail("config", "client_auth client_secret_post needs client_secret")
    end
    params[#params + 1] = { "client_id", cfg.client_id }
    params[#params + 1] = { "client_secret", cfg.client_secret }
  elseif method == "private_key_jwt" then
    local jws, err = M.client_assertion(cfg, cfg.token_endpoint or url)
    if not jws then return nil, err end
    params[#params + 1] = { "client_id", cfg.client_id }
    params[#params + 1] = { "client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" }
    params[#params + 1] = { "client_assertion", jws }
  elseif method == "none" then
    params[#params + 1] = { "client_id", cfg.client_id }
  elseif method == "tls_client_auth" or method == "self_signed_tls_client_auth" then
    -- RFC 8705: the TLS client certificate is the credential; the form names the client only
    local tls = M.mtls_certificate(cfg)
    if not tls then
      return errors.fail("config", "client_auth " .. method .. " needs a TLS client certificate: "
        .. "client_certificate = {cert=, key=} (or oauth.tls_client_cert and oauth.tls_client_key)",
        { reason = "profile", field = "client_certificate" })
    end
    params[#params + 1] = { "client_id", cfg.client_id }
  else
    return errors.fail("config", "unknown client_auth '" .. tostring(method)
      .. "' (client_secret_basic, client_secret_post, private_key_jwt, tls_client_auth, "
      .. "self_signed_tls_client_auth or none)")
  end
  return true
end

-- The TLS client certificate of a token request: oauth.tls_client_cert/key,
-- or for mutual-TLS client authentication the profile's client_certificate.
-- Returns {cert=, key=, passphrase=} or nil.
function M.mtls_certificate(cfg)
  if cfg.tls_client_cert then
    return { cert = cfg.tls_client_cert, key = cfg.tls_client_key or cfg.tls_client_cert }
  end
  local method = cfg.client_auth
  local cc = cfg.client_certificate
  if (method == "tls_client_auth" or method == "self_signed_tls_client_auth") and type(cc) == "table" and cc.cert then
    return { cert = cc.cert, key = cc.key or cc.cert, passphrase = cc.passphrase }
  end
  return nil
end

-- An identifier a server sends for support requests (Entra's trace_id and
-- correlation_id are GUIDs): kept only when it looks like one, so a hostile
-- or confused server cannot put a secret, a line break or a page into it.
function M.server_id(v, secrets)
  if type(v) ~= "string" or #v > 128 or not v:find("^[%w%-%.:_]+$") then return nil end
  if M.mask_secrets(v, secrets) ~= v then return nil end
  return v
end

-- Server text kept in an error: at most this many bytes.
local MAX_SERVER_TEXT = 1000

local NOT_RETRYABLE = {
  invalid_grant = true, invalid_client = true, invalid_request = true, unauthorized_client = true,
  unsupported_grant_type = true, invalid_scope = true, access_denied = true, expired_token = true,
  invalid_target = true,
}

-- Turn an error answer into the shared error value. `secrets`: the values
-- this request sent, masked if the server echoes them.
function M.oauth_error(resp, doc, what, secrets)
  local status = resp.status
  local code = type(doc.error) == "string" and doc.error or nil
  local desc = type(doc.error_description) == "string" and M.redact_text(doc.error_description, secrets) or nil
  if code then code = M.redact_text(code, secrets) end
  local provider_code = desc and desc:match("(AADSTS%d+)")
  local first = type(doc.error_codes) == "table" and tonumber(doc.error_codes[1])
  -- %d raises on 5.3+ for a number with a fraction, an inf or a NaN.
  if not provider_code and first and first == math.floor(first) and first >= 0 and first < 2 ^ 53 then
    provider_code = "AADSTS" .. string.format("%d", first)
  end
  local retryable = status == 429 or status >= 500
  if code and NOT_RETRYABLE[code] then retryable = false end
  if code == "temporarily_unavailable" or code == "server_error" then retryable = true end
  if desc and #desc > MAX_SERVER_TEXT then desc = desc:sub(1, MAX_SERVER_TEXT) .. "..." end
  if code and (#code > 100 or code:find("[^%w_%-%.]")) then code = "(malformed error code)" end
  local msg = desc and desc:gsub("[%c]+", " ") or
    ((code and (what .. " refused: " .. code)) or (what .. " failed with HTTP " .. tostring(status)))
  return errors.new("oauth", msg, {
    oauth_error = code, provider_code = provider_code, status = status, code = status,
    trace_id = M.server_id(doc.trace_id, secrets),
    correlation_id = M.server_id(doc.correlation_id, secrets),
    retryable = retryable,
  })
end

-- The form fields whose values are credentials: masked if a server echoes them.
local SECRET_PARAMS = {
  client_secret = true, client_assertion = true, code = true, code_verifier = true, refresh_token = true,
  password = true, device_code = true, assertion = true, token = true,
}

-- Failures where the request provably never reached the server: a
-- single-use request (an authorization code) may be sent again only then.
local NOT_SENT = { refused = true, dns = true, unreachable = true }

local function backoff(attempt) return math.min(2 ^ (attempt - 1), 8) end

-- The error of a call that gives up says how hard it tried, so a user who
-- waited knows why: "(3 attempts in 3.0 s)". This layer owns the retries of
-- an endpoint call; stage = "token" tells the mailer not to retry on top.
local function give_up(err, attempt, started)
  local elapsed = waiter.now() - started
  err.attempts = attempt
  err.elapsed = math.floor(elapsed * 10 + 0.5) / 10
  err.stage = "token"
  if attempt > 1 or err.kind == "network" or err.retryable then
    err.message = err.message .. string.format(" (%d attempt%s in %.1f s)", attempt, attempt == 1 and "" or "s",
      elapsed)
  end
  return nil, err
end

-- M.call(cfg, url, params, opts) -> doc (decoded JSON object), resp | nil, err
--   params: list of {name, value}; client authentication is added unless opts.client_auth == false.
--   opts.what names the call in messages ("token request", "device authorization", ...).
--   opts.accept_error(doc, resp) -> true: return the error document instead of failing
--   (device polling reads authorization_pending this way).
--   opts.single_use: the request spends something (an authorization code): it is
--   retried only when it cannot have reached the server (RFC 6749 4.1.2: a
--   code used twice may revoke what the first use issued).
--   opts.ignore_body: any 2xx is success whatever the body (revocation, RFC 7009 2.2); returns {}.
function M.call(cfg, url, params, opts)
  opts = opts or {}
  local what = opts.what or "token request"
  local retry = cfg.retry or {}
  local attempts = retry.attempts or 3
  local max_wait = retry.max_wait or 30
  local sleep = cfg.sleep or waiter.sleep
  local waited = 0
  local attempt = 0
  local started = waiter.now()
  local last_err
  local tls_cert = M.mtls_certificate(cfg)
  while true do
    attempt = attempt + 1
    local list = {}
    for i, p in ipairs(params) do list[i] = p end
    local headers = { ["Accept"] = "application/json", ["Content-Type"] = "application/x-www-form-urlencoded" }
    if opts.client_auth ~= false then
      local ok, aerr = apply_client_auth(cfg, url, list, headers)
      if not ok then return nil, aerr end
    end
    local secrets = { cfg.client_secret, headers["Authorization"] and headers["Authorization"]:match("^Basic (.+)$") }
    for _, p in ipairs(list) do
      if SECRET_PARAMS[p[1]] then secrets[#secrets + 1] = p[2] end
    end
    M.trace(cfg, { event = "request", what = what, url = url, attempt = attempt })
    local resp, err = http().request {
      method = "POST", url = url, headers = headers, body = M.form(list),
      timeout = cfg.timeout or 30, ca_file = cfg.ca_file, verify = cfg.verify,
      client_cert = tls_cert and tls_cert.cert, client_key = tls_cert and tls_cert.key,
      client_key_passphrase = tls_cert and tls_cert.passphrase, proxy = cfg.proxy,
      follow_redirects = false, max_body = 1024 * 1024, trace = M.trace_fn(cfg), secrets = secrets,
    }
    local wait, asked
    if not resp then
      -- A TLS verification failure will not heal by itself; a lost connection may.
      last_err = err
      if err.kind == "network" and err.reason == "dns" then
        -- libcurl cannot tell a name that does not exist from a resolver
        -- that failed, and the resolver has already retried: not again here
        err.retryable = false
        err.hint = "check the host name in the endpoint URL (and the DNS settings of this machine)"
      elseif err.kind == "network" then
        if opts.single_use and not NOT_SENT[err.reason] then
          err.retryable = false
          err.hint = "the request may have reached the server, and a code is good for one use only: sign in again"
        else
          err.retryable = true
          wait = backoff(attempt)
        end
      end
    elseif opts.ignore_body and resp.status >= 200 and resp.status < 300 then
      return {}, resp
    else
      local doc = cjson.decode(resp.body or "")
      if type(doc) ~= "table" then
        last_err = errors.new(resp.status >= 500 and "http" or "oauth",
          what .. ": the server answered HTTP " .. tostring(resp.status) .. " with a body that is not JSON: "
            .. M.redact_body(resp.body, secrets),
          { status = resp.status, code = resp.status, reason = "malformed", retryable = resp.status == 429 or resp.status >= 500 })
        if last_err.retryable then
          asked = M.retry_after(resp.headers and resp.headers["retry-after"])
          last_err.retry_after = asked
          wait = asked or backoff(attempt)
        end
      elseif resp.status >= 200 and resp.status < 300 then
        return doc, resp
      else
        if opts.accept_error and doc.error and opts.accept_error(doc, resp) then return doc, resp end
        last_err = M.oauth_error(resp, doc, what, secrets)
        if last_err.retryable then
          asked = M.retry_after(resp.headers and resp.headers["retry-after"])
          last_err.retry_after = asked
          wait = asked or backoff(attempt)
        end
      end
      -- The server answered: a spent code is spent, whatever the status said.
      if opts.single_use and wait then
        wait = nil
        last_err.retryable = false
      end
    end
    if not wait or attempt >= attempts or waited + wait > max_wait then
      if wait and attempt < attempts then
        last_err.message = last_err.message .. " (" .. (asked and "server asked to wait " or "next retry would wait ")
          .. M.fmt_secs(wait) .. " s, over the retry budget of " .. M.fmt_secs(max_wait) .. " s)"
      end
      return give_up(last_err, attempt, started)
    end
    M.trace(cfg, { event = "retry", what = what, attempt = attempt, wait = wait,
      status = resp and resp.status or nil, reason = last_err.oauth_error or last_err.reason })
    sleep(wait)
    waited = waited + wait
  end
end

-- What an access token may be (visible ASCII, at most 16 KiB), checked here
-- where a token arrives (oauthmail.options holds the rule).
M.MAX_ACCESS_TOKEN = options.MAX_ACCESS_TOKEN
M.access_token_problem = options.access_token_problem

-- Decode a token answer into the token table every flow returns.
function M.token(doc, what)
  if type(doc.access_token) ~= "string" or doc.access_token == "" then
    return errors.fail("oauth", (what or "token request") .. ": the answer has no access_token", { reason = "malformed" })
  end
  local problem = M.access_token_problem(doc.access_token)
  if problem then
    return errors.fail("oauth", (what or "token request") .. ": the access_token in the answer " .. problem,
      { reason = "malformed", retryable = false })
  end
  -- Absent: one hour (RFC 6749 makes it optional). A day at most, so a
  -- server's Infinity or 1e300 cannot make a token look eternal.
  local expires_in = M.seconds(doc.expires_in, 3600, 0, 86400)
  if not expires_in then
    return errors.fail("oauth", (what or "token request") .. ": expires_in in the answer is not a number",
      { reason = "malformed" })
  end
  local t = {
    access_token = doc.access_token,
    token_type = type(doc.token_type) == "string" and doc.token_type or "Bearer",
    expires_at = math.floor(os.time() + expires_in),  -- whole epoch seconds (an integer on 5.3+)
  }
  if type(doc.refresh_token) == "string" and doc.refresh_token ~= "" then t.refresh_token = doc.refresh_token end
  if type(doc.scope) == "string" then t.scope = doc.scope end
  if type(doc.id_token) == "string" then t.id_token = doc.id_token end
  return t
end

-- POST to the token endpoint and decode the token.
-- cfg.token_params adds form fields to every token request: resource
-- (RFC 8707), audience (Auth0 and others), or whatever a provider needs;
-- a field the flow sets itself is never overridden.
function M.token_request(cfg, params, opts)
  opts = opts or {}
  if type(cfg.token_params) == "table" then
    local have, names = {}, {}
    for _, p in ipairs(params) do have[p[1]] = true end
    for k in pairs(cfg.token_params) do names[#names + 1] = k end
    table.sort(names)
    local list = {}
    for i, p in ipairs(params) do list[i] = p end
    for _, k in ipairs(names) do
      local v = cfg.token_params[k]
      if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
        error("token_params: expected string names and string values", 0)
      end
      if not have[k] then list[#list + 1] = { k, tostring(v) } end
    end
    params = list
  end
  local doc, err = M.call(cfg, cfg.token_endpoint, params, opts)
  if not doc then return nil, err end
  local tok, terr = M.token(doc, opts.what)
  if tok then M.trace(cfg, { event = "token", grant = opts.grant, expires_at = tok.expires_at, scope = tok.scope,
    refresh_token = tok.refresh_token and "present" or "absent" }) end
  return tok, terr
end

return M
