-- oauthmail.crypto — the crypto primitives (from the C core) plus what is
-- composed from them in Lua: compact JWS signing, unverified JWT decoding,
-- certificate thumbprints in the x5t forms, scrypt with named options.
local core = require "oauthmail.core"
local cjson = require "cjson"
local errors = require "oauthmail.errors"

local C = core.crypto
local M = {}

M.random = C.random
M.sha256 = C.sha256
M.sha1 = C.sha1
M.hmac_sha256 = C.hmac_sha256
M.hex = C.hex
M.b64encode = C.b64encode
M.b64decode = C.b64decode
M.b64url_encode = C.b64url_encode
M.b64url_decode = C.b64url_decode
M.sign = C.sign
M.aead_seal = C.aead_seal
M.aead_open = C.aead_open
-- Test-only (fixed nonce for known-answer vectors); never use it for data.
M._gcm_seal_with_nonce = C._gcm_seal_with_nonce

M.ALGS = { RS256 = true, PS256 = true, ES256 = true }

-- crypto.thumbprint(cert_pem [, "sha1"|"sha256"]) -> raw digest of the DER certificate
function M.thumbprint(cert_pem, alg)
  if type(cert_pem) ~= "string" then error("crypto.thumbprint: cert_pem must be a string", 2) end
  return C.thumbprint(cert_pem, alg or "sha256")
end

local function b64url_thumbprint(cert_pem, alg)
  local d, err = C.thumbprint(cert_pem, alg)
  if not d then return nil, err end
  return C.b64url_encode(d)
end

-- The JWS header parameters "x5t" and "x5t#S256" (RFC 7515 4.1.7/4.1.8).
function M.x5t(cert_pem) return b64url_thumbprint(cert_pem, "sha1") end
function M.x5t_s256(cert_pem) return b64url_thumbprint(cert_pem, "sha256") end

-- JSON object with sorted keys, so the same header and claims always give
-- the same bytes (stable signatures in tests, readable traces).
local function encode_object(t, first)
  local keys, parts = {}, {}
  for k in pairs(t) do
    if type(k) ~= "string" then error("crypto.jws_sign: JSON object keys must be strings", 3) end
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    local fa, fb = first and first[a], first and first[b]
    if fa or fb then return (fa or 99) < (fb or 99) end
    return a < b
  end)
  for _, k in ipairs(keys) do
    parts[#parts + 1] = cjson.encode(k) .. ":" .. cjson.encode(t[k])
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local HEADER_ORDER = { alg = 1, typ = 2, kid = 3, x5t = 4, ["x5t#S256"] = 5 }

-- crypto.jws_sign{alg=, key=PEM text, passphrase=, header={...}, payload=table|string}
--   -> compact JWS | nil, err
function M.jws_sign(opts)
  if type(opts) ~= "table" then error("crypto.jws_sign: expected an options table", 2) end
  local alg = opts.alg
  if not M.ALGS[alg] then error("crypto.jws_sign: alg must be RS256, PS256 or ES256", 2) end
  if type(opts.key) ~= "string" then error("crypto.jws_sign: key must be PEM text (a string)", 2) end
  if opts.passphrase ~= nil and type(opts.passphrase) ~= "string" then
    error("crypto.jws_sign: passphrase must be a string", 2)
  end
  if opts.header ~= nil and type(opts.header) ~= "table" then error("crypto.jws_sign: header must be a table", 2) end
  local payload = opts.payload
  if type(payload) == "table" then
    payload = encode_object(payload)
  elseif type(payload) ~= "string" then
    error("crypto.jws_sign: payload must be a table or a string", 2)
  end
  local header = { alg = alg, typ = "JWT" }
  for k, v in pairs(opts.header or {}) do
    if k == "alg" and v ~= alg then error("crypto.jws_sign: header.alg differs from alg", 2) end
    header[k] = v
  end
  local input = C.b64url_encode(encode_object(header, HEADER_ORDER)) .. "." .. C.b64url_encode(payload)
  local sig, err = C.sign(alg, opts.key, input, opts.passphrase)
  if not sig then return nil, err end
  return input .. "." .. C.b64url_encode(sig)
end

-- JSON numbers that are not finite: lua-cjson reads NaN and Infinity (and
-- 1e999 overflows to it), which no claim may be.
local function has_non_finite(v, depth)
  if type(v) == "number" then return v ~= v or v == math.huge or v == -math.huge end
  if type(v) ~= "table" or depth > 1000 then return false end
  for _, x in pairs(v) do
    if has_non_finite(x, depth + 1) then return true end
  end
  return false
end

local function decode_part(part, what)
  local raw, err = C.b64url_decode(part)
  if not raw then
    return nil, errors.new("oauth", "not a JWT: the " .. what .. " is not base64url (" .. err.message .. ")",
      { reason = "decode" })
  end
  -- cjson gives a table for an array too: only text that opens with '{' is
  -- an object (RFC 7519 7.2)
  local ok, v = pcall(cjson.decode, raw)
  if not ok or type(v) ~= "table" or not raw:find("^[ \t\r\n]*{") then
    return nil, errors.new("oauth", "not a JWT: the " .. what .. " is not a JSON object", { reason = "decode" })
  end
  if has_non_finite(v, 0) then
    return nil, errors.new("oauth", "not a JWT: the " .. what .. " holds a number that is not finite (NaN or Infinity)",
      { reason = "decode" })
  end
  return v
end

-- crypto.jwt_decode(token) -> header, claims | nil, err
-- Does NOT verify the signature: for showing claims (tenant, audience, scopes,
-- expiry) in diagnostics only. Errors never include the token.
function M.jwt_decode(token)
  if type(token) ~= "string" then error("crypto.jwt_decode: token must be a string", 2) end
  local parts = {}
  for p in (token .. "."):gmatch("([^.]*)%.") do parts[#parts + 1] = p end
  if #parts == 5 then
    return errors.fail("oauth", "the token is encrypted (JWE): its claims cannot be read", { reason = "decode" })
  end
  if #parts ~= 3 then
    return errors.fail("oauth", "not a JWT: expected 3 dot-separated parts, found " .. #parts
      .. " (the token may be opaque)", { reason = "decode" })
  end
  local header, err = decode_part(parts[1], "header")
  if not header then return nil, err end
  local claims, cerr = decode_part(parts[2], "payload")
  if not claims then return nil, cerr end
  return header, claims
end

-- crypto.scrypt(passphrase, salt [, {N=32768, r=8, p=1, len=32}]) -> key
function M.scrypt(passphrase, salt, opts)
  if type(passphrase) ~= "string" then error("crypto.scrypt: passphrase must be a string", 2) end
  if type(salt) ~= "string" then error("crypto.scrypt: salt must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("crypto.scrypt: options must be a table", 2) end
  opts = opts or {}
  return C.scrypt(passphrase, salt, opts.N or 32768, opts.r or 8, opts.p or 1, opts.len or 32)
end

return M
