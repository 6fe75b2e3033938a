-- oauthmail.oauth2 — every OAuth2 flow a mail sender needs, each returning
-- the same token table {access_token, token_type, expires_at, refresh_token?,
-- scope?, id_token?} or nil, err. The non-interactive grants live here; the
-- browser flow (authorization code + PKCE + loopback) and the device flow have
-- their own files. See docs/oauth2.md.
local errors = require "oauthmail.errors"
local crypto = require "oauthmail.crypto"
local endpoint = require "oauthmail.oauth2.endpoint"
local discovery = require "oauthmail.oauth2.discovery"

local M = {}

M.discover = discovery.discover

local function check_cfg(cfg, fname, need_client)
  if type(cfg) ~= "table" then error("oauth2." .. fname .. ": expected a config table", 3) end
  if need_client ~= false and type(cfg.client_id) ~= "string" then
    error("oauth2." .. fname .. ": client_id must be a string", 3)
  end
  for _, k in ipairs { "client_secret", "token_endpoint", "authorization_endpoint", "issuer", "ca_file" } do
    if cfg[k] ~= nil and type(cfg[k]) ~= "string" then error("oauth2." .. fname .. ": " .. k .. " must be a string", 3) end
  end
  if cfg.scope ~= nil and type(cfg.scope) ~= "string" and type(cfg.scope) ~= "table" then
    error("oauth2." .. fname .. ": scope must be a string or a list of strings", 3)
  end
  if cfg.trace ~= nil and not require("oauthmail.options").callable(cfg.trace) then
    error("oauth2." .. fname .. ": trace must be a function", 3)
  end
end

-- oauth2.client_credentials(cfg) -> token | nil, err
function M.client_credentials(cfg)
  check_cfg(cfg, "client_credentials")
  local c, err = discovery.resolve(cfg, "token_endpoint")
  if not c then return nil, err end
  return endpoint.token_request(c, {
    { "grant_type", "client_credentials" },
    { "scope", endpoint.scope_string(c.scope) },
  }, { grant = "client_credentials" })
end

-- oauth2.refresh(cfg, refresh_token) -> token | nil, err
-- A rotated refresh token is kept; when the answer carries none, the old one is.
function M.refresh(cfg, refresh_token)
  check_cfg(cfg, "refresh")
  if type(refresh_token) ~= "string" or refresh_token == "" then
    error("oauth2.refresh: refresh_token must be a non-empty string", 2)
  end
  local c, err = discovery.resolve(cfg, "token_endpoint")
  if not c then return nil, err end
  local tok, terr = endpoint.token_request(c, {
    { "grant_type", "refresh_token" },
    { "refresh_token", refresh_token },
    -- Sent every time: Microsoft's v2 endpoint otherwise narrows the token to a default audience.
    { "scope", endpoint.scope_string(c.scope) },
  }, { grant = "refresh_token", what = "refresh" })
  if not tok then return nil, terr end
  if not tok.refresh_token then tok.refresh_token = refresh_token end
  return tok
end

-- oauth2.password(cfg) -> token | nil, err   (legacy; refused unless allow_password_grant)
function M.password(cfg)
  check_cfg(cfg, "password")
  if cfg.allow_password_grant ~= true then
    return errors.fail("config", "the resource owner password grant is disabled",
      { reason = "password_grant", hint = "it is a legacy flow that bypasses MFA and conditional access; "
        .. "prefer authorization_code or device_code, or set allow_password_grant = true if you must" })
  end
  if type(cfg.username) ~= "string" or type(cfg.password) ~= "string" then
    return errors.fail("config", "the password grant needs username and password")
  end
  local c, err = discovery.resolve(cfg, "token_endpoint")
  if not c then return nil, err end
  return endpoint.token_request(c, {
    { "grant_type", "password" },
    { "username", c.username },
    { "password", c.password },
    { "scope", endpoint.scope_string(c.scope) },
  }, { grant = "password" })
end

-- oauth2.jwt_bearer(cfg) -> token | nil, err
-- RFC 7523 section 2.1 with a Google service-account key file.
function M.jwt_bearer(cfg)
  check_cfg(cfg, "jwt_bearer", false)
  if type(cfg.service_account_file) ~= "string" then
    return errors.fail("config", "jwt_bearer needs service_account_file (a service-account JSON key file)")
  end
  local f, ferr = io.open(cfg.service_account_file, "rb")
  if not f then return errors.fail("config", "cannot read the service-account file: " .. tostring(ferr), { reason = "file" }) end
  local text = f:read("*a")
  f:close()
  local sa = endpoint.json_decode(text)
  if type(sa) ~= "table" or type(sa.client_email) ~= "string" or type(sa.private_key) ~= "string" then
    return errors.fail("config", "the service-account file " .. cfg.service_account_file
      .. " is not a JSON key with client_email and private_key", { reason = "malformed" })
  end
  local token_uri = cfg.token_endpoint or sa.token_uri
  if type(token_uri) ~= "string" then
    return errors.fail("config", "no token_endpoint configured and none (token_uri) in the service-account file")
  end
  local now = os.time()
  local lifetime = math.min(tonumber(cfg.assertion_lifetime) or 3600, 3600)
  local assertion, serr = crypto.jws_sign {
    alg = "RS256", key = sa.private_key,
    header = { kid = type(sa.private_key_id) == "string" and sa.private_key_id or nil },
    payload = {
      iss = sa.client_email, scope = endpoint.scope_string(cfg.scope), aud = token_uri,
      iat = now, exp = now + lifetime, sub = cfg.subject,
    },
  }
  if not assertion then
    return errors.fail("config", "cannot sign the assertion with the service-account key: "
      .. tostring(serr and serr.message), { reason = "sign" })
  end
  local c = {}
  for k, v in pairs(cfg) do c[k] = v end
  c.token_endpoint = token_uri
  return endpoint.token_request(c, {
    { "grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer" },
    { "assertion", assertion },
  }, { grant = "jwt_bearer", client_auth = false })
end

-- oauth2.revoke(cfg, token [, token_type_hint]) -> true | nil, err   (RFC 7009)
function M.revoke(cfg, token, token_type_hint)
  check_cfg(cfg, "revoke")
  if type(token) ~= "string" or token == "" then error("oauth2.revoke: token must be a non-empty string", 2) end
  if token_type_hint ~= nil and token_type_hint ~= "refresh_token" and token_type_hint ~= "access_token" then
    error("oauth2.revoke: token_type_hint must be 'refresh_token' or 'access_token'", 2)
  end
  -- The token endpoint too, when discovery can give it: a client assertion is addressed to it.
  local c, err = discovery.resolve(cfg, "revocation_endpoint",
    endpoint.client_auth_method(cfg) == "private_key_jwt" and { "token_endpoint" } or nil)
  if not c then return nil, err end
  local doc, cerr = endpoint.call(c, c.revocation_endpoint, {
    { "token", token }, { "token_type_hint", token_type_hint },
  }, { what = "revocation", ignore_body = true })  -- RFC 7009 2.2: the client ignores the body of a 2xx
  if not doc then return nil, cerr end
  return true
end

local browser = require "oauthmail.oauth2.browser"
local device = require "oauthmail.oauth2.device"

function M.authorization_code(cfg)
  check_cfg(cfg, "authorization_code")
  return browser.authorization_code(cfg)
end

function M.device_code(cfg)
  check_cfg(cfg, "device_code")
  return device.device_code(cfg)
end

local GRANTS = {
  client_credentials = M.client_credentials,
  authorization_code = M.authorization_code,
  device_code = M.device_code,
  jwt_bearer = M.jwt_bearer,
  password = M.password,
  refresh_token = function(cfg)
    if type(cfg.refresh_token) ~= "string" then
      return errors.fail("config", "grant refresh_token needs cfg.refresh_token")
    end
    return M.refresh(cfg, cfg.refresh_token)
  end,
}

local INTERACTIVE = { authorization_code = true, device_code = true }

-- oauth2.run(cfg) -> token | nil, err: dispatch on cfg.grant.
function M.run(cfg)
  if type(cfg) ~= "table" then error("oauth2.run: expected a config table", 2) end
  local f = GRANTS[cfg.grant]
  if not f then
    return errors.fail("config", "unknown grant '" .. tostring(cfg.grant) .. "' (client_credentials, "
      .. "authorization_code, device_code, jwt_bearer, password, refresh_token)")
  end
  return f(cfg)
end

-- oauth2.interactive(grant) -> true when the grant needs a person (browser or device code).
function M.interactive(grant)
  return INTERACTIVE[grant] == true
end

return M
