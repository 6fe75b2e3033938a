-- oauthmail.oauth2.browser — the authorization code flow for a program on the
-- user's machine: PKCE S256 (RFC 7636), a loopback redirect (RFC 8252 7.3)
-- answered by a tiny bounded HTTP/1.1 reader, or a manual mode where the user
-- pastes the redirected URL. The state is checked before any token request.
local sys = require "oauthmail.sys"
local errors = require "oauthmail.errors"
local crypto = require "oauthmail.crypto"
local endpoint = require "oauthmail.oauth2.endpoint"
local discovery = require "oauthmail.oauth2.discovery"

local M = {}

local MAX_REQUEST_LINE = 8192
local MAX_HEADER_LINES = 100
local MAX_HEADER_BYTES = 32768
local MAX_STRAY_REQUESTS = 50   -- favicon and friends, before the real redirect

local shell_quote = require("oauthmail.store.shell").quote

local function html_escape(s)
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }))
end

local function page(title, text)
  return "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" .. html_escape(title) .. "</title></head>"
    .. "<body style=\"font-family:sans-serif\"><h1>" .. html_escape(title) .. "</h1><p>" .. html_escape(text)
    .. "</p></body></html>"
end

local function respond(c, status, reason, body)
  c:send("HTTP/1.1 " .. status .. " " .. reason .. "\r\nContent-Type: text/html; charset=utf-8\r\n"
    .. "Content-Length: " .. #body .. "\r\nConnection: close\r\nCache-Control: no-store\r\n"
    .. "Referrer-Policy: no-referrer\r\n\r\n" .. body)
end

-- The parts of the redirect URI the listener needs: port and path.
local function loopback_target(cfg)
  local uri = cfg.redirect_uri
  if uri == nil then return 0, cfg.redirect_path or "/" end
  if type(uri) ~= "string" then error("oauth2.authorization_code: redirect_uri must be a string", 4) end
  local authority, path = uri:match("^http://([^/?#]+)(/?[^?#]*)$")
  local host, port
  if authority then host, port = authority:match("^([^:]+):?(%d*)$") end
  if path == "" then path = "/" end
  if not host or (host ~= "127.0.0.1" and host ~= "localhost") then
    return errors.fail("config", "the loopback redirect_uri must be http://127.0.0.1[:port]/path (RFC 8252 7.3); got "
      .. uri .. " — use manual = true for any other redirect URI")
  end
  return tonumber(port) or 0, path, host
end

-- Read one HTTP/1.1 request head within the deadline; returns method,
-- target, or nil for anything else. No error leaves here: one for a request
-- cut off mid-line would carry the code in err.partial.
local function read_request(c, deadline)
  local function line(max)
    local left = deadline - sys.monotime()
    if left <= 0 then return nil end
    c:settimeout(math.min(left, 5))  -- a browser preconnect that never speaks must not stall us long
    return (c:receive_line(max))
  end
  local first = line(MAX_REQUEST_LINE)
  if not first then return nil end
  local method, target = first:match("^(%u+) (%S+) HTTP/1%.[01]$")
  if not method then return nil end
  local total = 0
  for _ = 1, MAX_HEADER_LINES do
    local h = line(MAX_REQUEST_LINE)
    if not h then return nil end
    total = total + #h
    if total > MAX_HEADER_BYTES then return nil end
    if h == "" then return method, target end
  end
  return nil
end

local function timeout_error(wait, mismatched)
  if mismatched then
    return errors.fail("oauth", "no authorization response for this sign-in arrived within " .. endpoint.fmt_secs(wait)
      .. " s; a redirect with another state was refused (stale tab or forged redirect); no token was requested", {
      reason = "state_mismatch", retryable = true,
      hint = "sign in again from the newest link only; close older sign-in tabs",
    })
  end
  return errors.fail("oauth", "no authorization response arrived within " .. endpoint.fmt_secs(wait) .. " s", {
    reason = "timeout", retryable = true,
    hint = "finish the sign-in in the browser sooner, or raise wait_timeout",
  })
end

-- Wait until the deadline for the one redirect to `path` that carries our
-- state. Anything else is answered and dropped, and the wait goes on: a
-- browser preconnect that never speaks or closes early, a request that is
-- not HTTP, /favicon.ico (404), a redirect with another state (400; any
-- local page can send one, so it must not end the sign-in).
-- Returns the connection and the redirect's parameters.
local function wait_redirect(c, listener, path, deadline, wait, state)
  local mismatched = false
  for _ = 1, MAX_STRAY_REQUESTS do
    local left = deadline - sys.monotime()
    if left <= 0 then return timeout_error(wait, mismatched) end
    local req, aerr = listener:accept(left)
    if not req then
      if aerr.reason == "timeout" then return timeout_error(wait, mismatched) end
      return nil, aerr
    end
    -- The read error is dropped unseen: a redirect cut off mid-line carries
    -- the code in err.partial.
    local method, target = read_request(req, deadline)
    if method then
      local req_path, query = target:match("^([^?#]*)%??([^#]*)")
      local params = method == "GET" and req_path == path and endpoint.parse_query(query or "")
      if params and params.state == state then return req, params end
      if params then
        mismatched = true
        endpoint.trace(c, { event = "redirect_refused", reason = "state_mismatch" })
        pcall(respond, req, 400, "Bad Request", page("Sign-in failed",
          "This redirect does not belong to the sign-in in progress (stale tab or forged link); it was ignored."))
      else
        pcall(respond, req, 404, "Not Found", page("Not found", "This address only receives the sign-in redirect."))
      end
    end
    req:close()
  end
  return errors.fail("oauth", "too many unrelated requests reached the loopback listener", { reason = "stray" })
end

local function redirect_error(params)
  local code = params.error
  local desc = params.error_description
  local hint
  if code == "access_denied" then
    hint = "the user (or a tenant policy) declined the consent; sign in again and accept, or ask an admin to grant consent"
  end
  if desc then desc = endpoint.redact_text(desc) end
  return errors.new("oauth", desc and desc ~= "" and desc or ("the authorization server refused: " .. code), {
    oauth_error = code, provider_code = desc and desc:match("(AADSTS%d+)"), retryable = false, hint = hint,
    reason = "authorization",
  })
end

-- Check one redirect's parameters. Returns the code, or nil and the error.
local function check_redirect(cfg, params, state)
  if params.state ~= state then
    return errors.fail("oauth", "the redirect's state does not match this sign-in (stale tab or forged redirect); "
      .. "no token was requested", { reason = "state_mismatch", retryable = false })
  end
  -- RFC 9207: when the server names itself, it must be the issuer we talk to.
  if params.iss and cfg.issuer and params.iss:gsub("/+$", "") ~= cfg.issuer:gsub("/+$", "") then
    return errors.fail("oauth", "the redirect comes from issuer '" .. params.iss .. "', expected '" .. cfg.issuer .. "'",
      { reason = "issuer_mismatch", retryable = false })
  end
  if params.error then return nil, redirect_error(params) end
  if not params.code or params.code == "" then
    return errors.fail("oauth", "the redirect carries neither a code nor an error", { reason = "malformed" })
  end
  return params.code
end

local function authorization_url(c, redirect_uri, state, challenge, nonce)
  local params = {
    { "response_type", "code" },
    { "client_id", c.client_id },
    { "redirect_uri", redirect_uri },
    { "scope", endpoint.scope_string(c.scope) },
    { "state", state },
    { "code_challenge", challenge },
    { "code_challenge_method", "S256" },
    { "nonce", nonce },
    { "prompt", c.prompt },
    { "login_hint", c.login_hint },
  }
  local extra = {}
  for k, v in pairs(c.authorization_params or {}) do extra[#extra + 1] = { k, tostring(v) } end
  table.sort(extra, function(a, b) return a[1] < b[1] end)
  for _, p in ipairs(extra) do params[#params + 1] = p end
  local sep = c.authorization_endpoint:find("?", 1, true) and "&" or "?"
  return c.authorization_endpoint .. sep .. endpoint.form(params)
end

local function show(c, url, manual)
  if c.open_url then
    c.open_url(url)
  elseif c.browser_command then
    -- Detached like xdg-open: the command must not hold up the listener.
    os.execute(c.browser_command .. " " .. shell_quote(url) .. " >/dev/null 2>&1 &")
  end
  local text = manual
    and ("Open this URL in a browser, sign in, then paste the address the browser ends on:\n" .. url .. "\n")
    or ("Open this URL in a browser to sign in (waiting for the redirect):\n" .. url .. "\n")
  if c.on_prompt then
    c.on_prompt(text, url)
  elseif not c.open_url and not c.browser_command or manual then
    io.stderr:write(text)
    io.stderr:flush()
  end
end

local function read_pasted(c, state)
  local read_line = c.read_line or function() return io.read("*l") end
  local line = read_line()
  if type(line) ~= "string" then
    return errors.fail("oauth", "no redirected URL was pasted", { reason = "no_input" })
  end
  line = line:gsub("^%s+", ""):gsub("%s+$", "")
  local query = line:match("%?([^#]*)") or line:match("#(.*)") or line
  local params = endpoint.parse_query(query)
  return check_redirect(c, params, state)
end

-- oauth2.authorization_code(cfg) -> token | nil, err
function M.authorization_code(cfg)
  local c, err = discovery.resolve(cfg, { "authorization_endpoint", "token_endpoint" })
  if not c then return nil, err end
  local wait = tonumber(c.wait_timeout) or 300
  local deadline = sys.monotime() + wait
  local verifier = crypto.b64url_encode(crypto.random(32))
  local challenge = crypto.b64url_encode(crypto.sha256(verifier))
  local state = crypto.b64url_encode(crypto.random(16))
  local nonce = endpoint.has_scope(c.scope, "openid") and crypto.b64url_encode(crypto.random(16)) or nil

  local code, redirect_uri, perr
  if c.manual then
    redirect_uri = c.redirect_uri or "http://127.0.0.1/"
    show(c, authorization_url(c, redirect_uri, state, challenge, nonce), true)
    code, perr = read_pasted(c, state)
    if not code then return nil, perr end
  else
    local port, path, host = loopback_target(c)
    if not port then return nil, path end
    local conn = require "oauthmail.conn"
    local listener, lerr = conn.listen { host = "127.0.0.1", port = port }
    if not listener then return nil, lerr end
    redirect_uri = "http://" .. (host or "127.0.0.1") .. ":" .. listener:port() .. path
    endpoint.trace(c, { event = "listen", redirect_uri = redirect_uri })
    local ok, serr = pcall(show, c, authorization_url(c, redirect_uri, state, challenge, nonce), false)
    if not ok then listener:close() error(serr, 0) end
    local req, params = wait_redirect(c, listener, path, deadline, wait, state)
    listener:close()
    if not req then return nil, params end
    code, perr = check_redirect(c, params, state)
    if code then
      pcall(respond, req, 200, "OK", page("Signed in", "You can close this window and return to the application."))
    else
      pcall(respond, req, 400, "Bad Request", page("Sign-in failed", perr.message))
    end
    req:close()
    if not code then return nil, perr end
  end
  endpoint.trace(c, { event = "authorization_response", result = "code" })
  return endpoint.token_request(c, {
    { "grant_type", "authorization_code" },
    { "code", code },
    { "redirect_uri", redirect_uri },
    { "code_verifier", verifier },
  }, { grant = "authorization_code", single_use = true })
end

return M
