-- oauthmail.sandbox.idp — a Microsoft-Entra-shaped token service for the
-- sandbox, over plain HTTP on 127.0.0.1 (oauthmail allows http:// only for
-- loopback): discovery, client credentials (secret), authorization code with
-- PKCE and a redirect that approves at once, device code approved after a
-- delay, refresh with rotation, revocation. Access tokens are JWTs (HS256
-- with a key made at start) carrying aud, scp or roles, tid, upn, exp, as
-- Entra's do; the SMTP side looks them up in this process's memory.
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local url = require "oauthmail.url"
local serve = require "oauthmail.sandbox.serve"
local shell = require "oauthmail.store.shell"

local M = {}

local APP_AUD = "https://outlook.office365.com"
local USER_AUD = "https://outlook.office.com"

local function rand(n) return crypto.b64url_encode(crypto.random(n or 24)) end

local Idp = {}
Idp.__index = Idp

-- idp.new{issuer=, clients={[id]={secret=}}, tenant=, default_user=, clock=,
--   token_lifetime=3600, device_delay=1, stats=}
function M.new(o)
  local self = setmetatable({
    issuer = o.issuer, clients = o.clients, tenant = o.tenant or "sandbox.test",
    default_user = o.default_user, clock = o.clock or os.time,
    token_lifetime = o.token_lifetime or 3600, device_delay = o.device_delay or 1,
    key = crypto.random(32), access = {}, refresh = {}, codes = {}, devices = {},
    stats = o.stats or {}, faults = o.faults, dir = o.dir or "/tmp",
  }, Idp)
  self.stats.token_requests = 0
  return self
end

-- A signed access token for a user (delegated) or the app; remembered.
function Idp:issue(client_id, user, scope)
  local now = self.clock()
  local claims = { iss = self.issuer, tid = self.tenant, appid = client_id, iat = now,
    exp = now + self.token_lifetime, ver = "2.0" }
  local want = tostring(scope or "")
  if want:find("https://mail.google.com/", 1, true) then
    claims.aud, claims.scope, claims.email = "https://mail.google.com/", "https://mail.google.com/", user
  elseif user then
    claims.aud = USER_AUD
    claims.upn, claims.preferred_username = user, user
    claims.scp = want:find("SMTP.Send", 1, true) and "SMTP.Send" or "openid"
  else
    claims.aud = want:find(APP_AUD, 1, true) and APP_AUD or "api://sandbox"
    claims.roles = { "SMTP.SendAsApp" }
    claims.oid = "app-" .. client_id
  end
  local header = crypto.b64url_encode(cjson.encode { alg = "HS256", typ = "JWT", kid = "sandbox" })
  local body = crypto.b64url_encode((cjson.encode(claims):gsub("\\/", "/")))
  local token = header .. "." .. body .. "." .. crypto.b64url_encode(crypto.hmac_sha256(self.key, header .. "." .. body))
  self.access[token] = claims
  return token, claims
end

-- The claims of a token this service issued and nobody revoked, or nil.
function Idp:lookup(token)
  return self.access[token]
end

local function answer(status, doc, headers)
  return { status = status, body = (cjson.encode(doc):gsub("\\/", "/")), type = "application/json", headers = headers }
end

local function oauth_error(code, text, status)
  return answer(status or 400, { error = code, error_description = text })
end

function Idp:discovery()
  local i = self.issuer
  return answer(200, { issuer = i, token_endpoint = i .. "/token", authorization_endpoint = i .. "/authorize",
    device_authorization_endpoint = i .. "/devicecode", revocation_endpoint = i .. "/revoke",
    grant_types_supported = { "client_credentials", "authorization_code", "refresh_token",
      "urn:ietf:params:oauth:grant-type:device_code" },
    code_challenge_methods_supported = { "S256" } })
end

local ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

local sh = shell.quote

-- Check a private_key_jwt client assertion (RFC 7523) against the client's
-- registered certificate: claims here, the RS256/PS256 signature with the
-- openssl command (the core signs but has no verify). -> client_id | nil, why
function Idp:check_assertion(jws)
  local h64, p64, s64 = (jws or ""):match("^([%w_%-]+)%.([%w_%-]+)%.([%w_%-]+)$")
  if not h64 then return nil, "the client assertion is not a JWS" end
  local header = cjson.decode(crypto.b64url_decode(h64) or "")
  local claims = cjson.decode(crypto.b64url_decode(p64) or "")
  if type(header) ~= "table" or type(claims) ~= "table" then return nil, "the client assertion is malformed" end
  local c = self.clients[claims.iss or ""]
  if not c or not c.pubkey then return nil, "no certificate is registered for " .. tostring(claims.iss) end
  if claims.sub ~= claims.iss then return nil, "iss and sub differ" end
  if claims.aud ~= self.issuer .. "/token" then return nil, "aud is not the token endpoint" end
  if type(claims.exp) ~= "number" or claims.exp < self.clock() then return nil, "the assertion has expired" end
  local opts
  if header.alg == "RS256" then opts = ""
  elseif header.alg == "PS256" then opts = " -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32"
  else return nil, "alg " .. tostring(header.alg) .. " is not supported here (RS256, PS256)" end
  local base = self.dir .. "/assertion-" .. crypto.hex(crypto.random(6))
  local f1, f2 = io.open(base .. ".data", "wb"), io.open(base .. ".sig", "wb")
  f1:write(h64 .. "." .. p64) f1:close()
  f2:write(crypto.b64url_decode(s64) or "") f2:close()
  -- a child process waited on through the loop: other connections go on meanwhile
  local _, rc = shell.capture("openssl dgst -sha256" .. opts .. " -verify " .. sh(c.pubkey) .. " -signature "
    .. sh(base .. ".sig") .. " " .. sh(base .. ".data") .. " >/dev/null 2>&1", nil, 30)
  os.remove(base .. ".data")
  os.remove(base .. ".sig")
  if rc ~= 0 then return nil, "the signature does not verify with the registered certificate" end
  return claims.iss
end

-- The client of a request: Basic credentials or client_id (+ client_secret) in the form.
function Idp:client(req, form)
  if form.client_assertion_type == ASSERTION then
    local id, why = self:check_assertion(form.client_assertion)
    if not id then return nil, oauth_error("invalid_client", "AADSTS700027: Client assertion failed signature "
      .. "validation: " .. why, 401) end
    return id, nil, self.clients[id], true
  end
  local id, secret = form.client_id, form.client_secret
  local basic = req.headers["authorization"]
  if basic and basic:match("^[Bb]asic ") then
    local dec = crypto.b64decode(basic:match("^%S+%s+(%S+)") or "") or ""
    local u, p = dec:match("^([^:]*):(.*)$")
    if u then id, secret = url.decode(u), url.decode(p) end
  end
  local c = id and self.clients[id]
  if not c then return nil, oauth_error("invalid_client", "AADSTS700016: application '" .. tostring(id)
    .. "' was not found in the directory", 401) end
  if c.secret and secret ~= c.secret then
    if secret == nil then return id, nil, c end
    return nil, oauth_error("invalid_client", "AADSTS7000215: Invalid client secret provided.", 401)
  end
  return id, nil, c
end

function Idp:tokens_for(client_id, user, scope, with_refresh)
  local at, claims = self:issue(client_id, user, scope)
  local doc = { access_token = at, token_type = "Bearer", expires_in = self.token_lifetime, scope = scope }
  if with_refresh then
    local rt = "sbrt-" .. rand(32)
    self.refresh[rt] = { client_id = client_id, user = user, scope = scope }
    doc.refresh_token = rt
  end
  return answer(200, doc), claims
end

function Idp:token(req)
  self.stats.token_requests = self.stats.token_requests + 1
  local f = self.faults and self.faults:take("token")
  if f then return oauth_error(f.error or "temporarily_unavailable", f.text or "fault switch", f.code or 503) end
  local form = url.parse_query(req.body or "")
  local client_id, err, client, by_cert = self:client(req, form)
  if not client_id then return err end
  local grant = form.grant_type
  if grant == "client_credentials" then
    if not by_cert and (client.secret == nil or form.client_secret == nil and not req.headers["authorization"]) then
      return oauth_error("invalid_client", "AADSTS7000216: client_assertion or client_secret is required", 401)
    end
    return (self:tokens_for(client_id, nil, form.scope, false))
  elseif grant == "authorization_code" then
    local c = self.codes[form.code or ""]
    self.codes[form.code or ""] = nil
    if not c or c.client_id ~= client_id or c.redirect_uri ~= form.redirect_uri then
      return oauth_error("invalid_grant", "AADSTS70000: the code is invalid or was already used")
    end
    local want = crypto.b64url_encode(crypto.sha256(form.code_verifier or ""))
    if want ~= c.challenge then return oauth_error("invalid_grant", "AADSTS50148: the code_verifier does not match") end
    return (self:tokens_for(client_id, c.user, c.scope, true))
  elseif grant == "urn:ietf:params:oauth:grant-type:device_code" then
    local d = self.devices[form.device_code or ""]
    if not d then return oauth_error("expired_token", "AADSTS70020: the device code expired") end
    if self.clock() < d.approve_at then return oauth_error("authorization_pending", "AADSTS70016: pending") end
    self.devices[form.device_code] = nil
    return (self:tokens_for(client_id, d.user, d.scope, true))
  elseif grant == "refresh_token" then
    local r = self.refresh[form.refresh_token or ""]
    if not r or r.client_id ~= client_id then
      return oauth_error("invalid_grant", "AADSTS700082: the refresh token has expired or was revoked")
    end
    self.refresh[form.refresh_token] = nil   -- rotation: the old one is spent
    return (self:tokens_for(client_id, r.user, form.scope or r.scope, true))
  end
  return oauth_error("unsupported_grant_type", "AADSTS70003: unsupported grant " .. tostring(grant))
end

-- The authorization page approves at once: a redirect with the code.
function Idp:authorize(req)
  local q = url.parse_query(req.query or "")
  local c = self.clients[q.client_id or ""]
  if not c then return { status = 400, body = "unknown client", type = "text/plain" } end
  local uri = q.redirect_uri or ""
  if not uri:match("^http://127%.0%.0%.1[:/]") and not uri:match("^http://localhost[:/]") then
    return { status = 400, body = "the redirect_uri must be a loopback address", type = "text/plain" }
  end
  if q.code_challenge_method ~= "S256" or not q.code_challenge then
    return { status = 400, body = "PKCE (S256) is required", type = "text/plain" }
  end
  local code = "sbcode-" .. rand(24)
  self.codes[code] = { client_id = q.client_id, redirect_uri = uri, challenge = q.code_challenge,
    scope = q.scope, user = q.login_hint or self.default_user }
  local sep = uri:find("?", 1, true) and "&" or "?"
  local loc = uri .. sep .. url.form { { "code", code }, { "state", q.state } }
  return { status = 302, body = "", type = "text/plain", headers = { Location = loc } }
end

function Idp:devicecode(req)
  local form = url.parse_query(req.body or "")
  local c = self.clients[form.client_id or ""]
  if not c then return oauth_error("invalid_client", "AADSTS700016: unknown application", 401) end
  local dc = "sbdev-" .. rand(24)
  local user_code = string.upper(crypto.hex(crypto.random(4)))
  self.devices[dc] = { user = form.login_hint or self.default_user, scope = form.scope,
    approve_at = self.clock() + self.device_delay }
  return answer(200, { device_code = dc, user_code = user_code, verification_uri = self.issuer .. "/device",
    expires_in = 900, interval = 1,
    message = "To sign in, open " .. self.issuer .. "/device and enter the code " .. user_code
      .. " (the sandbox approves it by itself in " .. self.device_delay .. " s)." })
end

function Idp:revoke(req)
  local form = url.parse_query(req.body or "")
  local client_id, err = self:client(req, form)
  if not client_id then return err end
  local t = form.token or ""
  self.refresh[t] = nil
  self.access[t] = nil
  return { status = 200, body = "", type = "text/plain" }
end

function Idp:route(req)
  local p = req.path
  if req.method == "GET" and p == "/.well-known/openid-configuration" then return self:discovery() end
  if req.method == "POST" and p == "/token" then return self:token(req) end
  if req.method == "GET" and p == "/authorize" then return self:authorize(req) end
  if req.method == "POST" and p == "/devicecode" then return self:devicecode(req) end
  if req.method == "POST" and p == "/revoke" then return self:revoke(req) end
  if req.method == "GET" and p == "/device" then
    return { status = 200, body = "The sandbox approves device codes by itself.", type = "text/plain" }
  end
  return { status = 404, body = "not found", type = "text/plain" }
end

-- ------------------------------------------------------------ HTTP/1.1 (one request per connection)

local MAX_BODY = 1024 * 1024

function M.read_request(r)
  local line = r.line(8192)
  if not line then return nil end
  local method, target = line:match("^(%u+) (%S+) HTTP/1%.[01]$")
  if not method then return nil end
  local headers = {}
  for _ = 1, 100 do
    local hl = r.line(8192)
    if not hl then return nil end
    if hl == "" then break end
    local k, v = hl:match("^([^:]+):%s*(.-)%s*$")
    if k then headers[k:lower()] = v end
  end
  local n = tonumber(headers["content-length"] or "0") or 0
  if n > MAX_BODY then return nil end
  local body = n > 0 and r.bytes(n) or ""
  local path, query = target:match("^([^?]*)%??(.*)$")
  return { method = method, path = path, query = query, headers = headers, body = body }
end

local REASON = { [200] = "OK", [302] = "Found", [400] = "Bad Request", [401] = "Unauthorized", [404] = "Not Found",
  [503] = "Service Unavailable" }

function M.respond(c, res)
  local head = { string.format("HTTP/1.1 %d %s", res.status, REASON[res.status] or "Status"),
    "Content-Type: " .. (res.type or "text/plain"), "Content-Length: " .. #res.body, "Connection: close",
    "Cache-Control: no-store" }
  for k, v in pairs(res.headers or {}) do head[#head + 1] = k .. ": " .. v end
  serve.send(c, table.concat(head, "\r\n") .. "\r\n\r\n" .. res.body)
end

-- A connection handler (sandbox.serve): one request, one answer, close;
-- then the answer's after(), if it has one (POST /stop stops once answered).
function M.http_handler(route)
  return function(c)
    local r = serve.reader(c, 30)
    local req = M.read_request(r)
    local res = req and route(req)
    if res then M.respond(c, res) end
    c:close()
    if res and res.after then res.after() end
  end
end

M.Idp = Idp
return M
