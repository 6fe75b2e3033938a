-- oauthmail.oauth2.discovery — OpenID Connect discovery: fetch an issuer's
-- /.well-known/openid-configuration once per process, check that the document
-- speaks for the issuer we asked about, and fill a flow config's endpoints.
local errors = require "oauthmail.errors"
local endpoint = require "oauthmail.oauth2.endpoint"

local M = {}

local cache = {}

local function strip_slash(s) return (s:gsub("/+$", "")) end

-- discover(issuer, {ca_file=, timeout=, verify=, trace=, refresh=false}) -> metadata | nil, err
function M.discover(issuer, opts)
  if type(issuer) ~= "string" or not issuer:match("^https?://") then
    error("oauth2.discover: issuer must be an http(s) URL string", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("oauth2.discover: opts must be a table", 2) end
  local base = strip_slash(issuer)
  -- A document fetched without verification, or trusting another CA, must
  -- not be handed to a caller that verifies against its own trust.
  local key = base .. "\0" .. (opts.verify == false and "noverify" or "verify") .. "\0" .. tostring(opts.ca_file or "")
  if cache[key] and not opts.refresh then return cache[key] end
  local url = base .. "/.well-known/openid-configuration"
  local http = require "oauthmail.http"
  local resp, err = http.request {
    method = "GET", url = url, headers = { ["Accept"] = "application/json" },
    timeout = opts.timeout or 30, ca_file = opts.ca_file, verify = opts.verify, proxy = opts.proxy,
    follow_redirects = false, max_body = 1024 * 1024, trace = endpoint.trace_fn(opts),
  }
  if not resp then return nil, err end
  if resp.status ~= 200 then
    return errors.fail("http", "discovery at " .. url .. " answered HTTP " .. tostring(resp.status),
      { status = resp.status, code = resp.status, retryable = resp.status == 429 or resp.status >= 500 })
  end
  local doc = endpoint.json_decode(resp.body or "")
  if type(doc) ~= "table" then
    return errors.fail("http", "discovery at " .. url .. " did not return a JSON object: " .. endpoint.redact_body(resp.body),
      { reason = "malformed" })
  end
  -- OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer we asked for,
  -- otherwise a look-alike could hand us someone else's endpoints.
  if type(doc.issuer) ~= "string" or strip_slash(doc.issuer) ~= base then
    return errors.fail("oauth", "discovery document names issuer '" .. tostring(doc.issuer)
      .. "', expected '" .. issuer .. "'", { reason = "issuer_mismatch" })
  end
  cache[key] = doc
  return doc
end

function M.clear_cache() cache = {} end

local FIELDS = {
  "token_endpoint", "authorization_endpoint", "device_authorization_endpoint", "revocation_endpoint",
}

-- Return a copy of cfg with endpoints filled from discovery when cfg.issuer is
-- set and an endpoint the caller needs is missing. `needed`: the endpoint (or
-- list of endpoints) the flow cannot do without; `wanted`: endpoints it uses
-- when known (fetched from the issuer if it is set, never an error).
function M.resolve(cfg, needed, wanted)
  if type(needed) == "string" then needed = { needed } end
  local missing, want = nil, false
  for _, f in ipairs(needed) do
    if not cfg[f] then missing = missing or f end
  end
  for _, f in ipairs(wanted or {}) do
    if not cfg[f] then want = true end
  end
  if not missing and not (want and cfg.issuer) then return cfg end
  if not cfg.issuer then
    return errors.fail("config", "no " .. missing .. " configured (set it, or set issuer= to use discovery)")
  end
  local doc, err = M.discover(cfg.issuer, { ca_file = cfg.ca_file, timeout = cfg.timeout, verify = cfg.verify,
    trace = cfg.trace, proxy = cfg.proxy })
  if not doc then
    if not missing then return cfg end
    return nil, err
  end
  local out = {}
  for k, v in pairs(cfg) do out[k] = v end
  for _, f in ipairs(FIELDS) do
    if out[f] == nil and type(doc[f]) == "string" then out[f] = doc[f] end
  end
  for _, f in ipairs(needed) do
    if not out[f] then
      return errors.fail("config", "the issuer " .. cfg.issuer .. " does not publish a " .. f)
    end
  end
  return out
end

return M
