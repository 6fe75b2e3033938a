-- oauthmail.store.redis — tokens in Redis, shared by every process and
-- machine that sends as the same mailboxes. One Redis key per account, named
-- by a digest of the account key (never the user or a token); the record is
-- sealed with AES-256-GCM when an encryption key is configured (the same key
-- sources as the file store: oauthmail.store.keysource), and the sealing is
-- bound to the Redis key, so records cannot be swapped between accounts.
--
-- The lock is a lease: SET NX PX with a random owner value, released only by
-- its owner (a script compares and deletes), gone on its own if the holder
-- dies. While a process holds the lease its save is conditional on still
-- holding it, so a holder that outlived its lease cannot overwrite the token
-- the next holder saved (the token manager keeps the record and retries).
-- See docs/redis.md.
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local keysource = require "oauthmail.store.keysource"
local redis = require "oauthmail.redis"
local wait = require "oauthmail.wait"

local M = {}
M.__index = M

M.FORMAT = "oauthmail-redis-token"
M.VERSION = 1
M.CIPHER = "aes-256-gcm"
local MAX_RECORD = 1024 * 1024

local FIELDS = {
  kind = "string", url = "string", prefix = "string", encryption = "table", lock_timeout = "number",
  lease = "number", timeout = "number", ca_file = "string", ca_path = "string", verify = "boolean",
  servername = "string", client_cert = "string", client_key = "string", username = "string",
  password = "string", password_env = "string", client = "table",
}

-- store.redis.new{url=, prefix="oauthmail:", encryption={...}, lease=60, lock_timeout=30,
--   timeout=5, password_env=, ca_file=, ...} -> store
function M.new(opts)
  if type(opts) ~= "table" then error("store.redis: options must be a table", 2) end
  require("oauthmail.store").check_options("store.redis", opts, FIELDS, 2)
  if opts.encryption ~= nil then keysource.check(opts.encryption) end
  local ropts = redis.client_options("store.redis", opts)
  if not opts.client and not opts.url then error("store.redis: 'url' is required (redis:// or rediss://)", 2) end
  local ok, client = true, opts.client
  if not client then ok, client = pcall(redis.new, ropts) end
  if not ok then error("store.redis: " .. tostring(client):gsub("^redis%.new: ", ""), 2) end
  local lease = opts.lease or 60
  if lease <= 0 or lease > 86400 then error("store.redis: 'lease' must be from 0 to 86400 seconds", 2) end
  return setmetatable({
    kind = "redis",
    client = client,
    prefix = opts.prefix or "oauthmail:",
    encryption = opts.encryption,
    lease = lease,
    lock_timeout = opts.lock_timeout or 30,
    keys = {},    -- derived keys by salt
    held = {},    -- account key -> our lease's owner value
  }, M)
end

function M:describe() return "redis store " .. self.client:describe() end

local function fail(self, message, reason)
  return errors.fail("store", self:describe() .. ": " .. message, { reason = reason })
end

-- A client error (network, tls, auth, a server error) as a store error with
-- the same reason; the message already names the server, never a password.
local function lift(_, err)
  local e = errors.new("store", "redis store: " .. tostring(err.message),
    { reason = err.reason or err.kind, redis_error = err.redis_error })
  if err.kind == "auth" then e.hint = "check the user name and password of the Redis URL (or password_env)" end
  return nil, e
end

function M:name(kind, key)
  return self.prefix .. kind .. ":" .. crypto.hex(crypto.sha256(key)):sub(1, 40)
end

local function aad(enc, name)
  local function int(v) return v and string.format("%d", v) or "" end
  return table.concat({ M.FORMAT, int(M.VERSION), enc.cipher, enc.kdf, enc.salt or "",
    int(enc.N), int(enc.r), int(enc.p), name }, "/")
end

function M:key_for(enc)
  local cache_id = enc.kdf .. ":" .. (enc.salt or "")
  if self.keys[cache_id] then return self.keys[cache_id] end
  local want = keysource.kdf(self.encryption)
  if enc.kdf ~= want then
    return fail(self, string.format("a record is sealed with %s, but the store is configured with %s",
      enc.kdf == "scrypt" and "a passphrase" or "a key", want == "scrypt" and "a passphrase" or "a key"), "key")
  end
  local material, err = keysource.material(self.encryption)
  if not material then
    err.message = err.message .. " (for " .. self:describe() .. ")"
    return nil, err
  end
  local key = material
  if enc.kdf == "scrypt" then
    local salt = crypto.b64decode(enc.salt or "")
    if not salt or #salt < 16 then return fail(self, "a record has a damaged scrypt salt", "corrupt") end
    local kerr
    key, kerr = crypto.scrypt(material, salt, { N = enc.N, r = enc.r, p = enc.p, len = 32 })
    if not key then return fail(self, kerr.message, "key") end
  end
  self.keys[cache_id] = key
  return key
end

-- The envelope written for a record: sealed when encryption is configured.
function M:seal(record, name)
  local env = { format = M.FORMAT, version = M.VERSION }
  if not self.encryption then
    env.record = record
    return cjson.encode(env)
  end
  local kdf = keysource.kdf(self.encryption)
  env.cipher, env.kdf = M.CIPHER, kdf
  if kdf == "scrypt" then
    if not self.salt then self.salt = crypto.b64encode(crypto.random(16)) end
    local tune = self.encryption.scrypt or keysource.DEFAULT_SCRYPT
    env.salt = self.salt
    env.N = tune.N or keysource.DEFAULT_SCRYPT.N
    env.r = tune.r or keysource.DEFAULT_SCRYPT.r
    env.p = tune.p or keysource.DEFAULT_SCRYPT.p
  end
  local key, err = self:key_for(env)
  if not key then return nil, err end
  env.data = crypto.b64encode(crypto.aead_seal(key, cjson.encode(record), aad(env, name)))
  return cjson.encode(env)
end

function M:unseal(text, name)
  if #text > MAX_RECORD then return fail(self, "the record of this account is larger than 1 MiB", "corrupt") end
  local env = cjson.decode(text)
  if type(env) ~= "table" or env.format ~= M.FORMAT then
    return fail(self, "the record of this account is not an oauthmail token record", "corrupt")
  end
  if env.version ~= M.VERSION then
    return fail(self, "the record of this account has format version " .. tostring(env.version)
      .. "; this oauthmail reads version " .. M.VERSION, "version")
  end
  local record
  if env.data ~= nil then
    if not self.encryption then
      return fail(self, "the record of this account is encrypted, but the store has no encryption key configured",
        "key")
    end
    if env.cipher ~= M.CIPHER or (env.kdf ~= "none" and env.kdf ~= "scrypt") or type(env.data) ~= "string" then
      return fail(self, "the record of this account has an unknown cipher or key derivation", "corrupt")
    end
    if env.kdf == "scrypt" and (type(env.salt) ~= "string" or keysource.scrypt_problem(env.N, env.r, env.p)) then
      return fail(self, "the record of this account has damaged or excessive scrypt parameters", "corrupt")
    end
    local key, kerr = self:key_for(env)
    if not key then return nil, kerr end
    local blob = crypto.b64decode(env.data)
    local plain = blob and crypto.aead_open(key, blob, aad(env, name))
    if not plain then
      return fail(self, "the record of this account does not decrypt: wrong key, or it was modified "
        .. "(or copied from another account)", "decrypt")
    end
    record = cjson.decode(plain)
  else
    if self.encryption then
      return fail(self, "the record of this account is in clear text, but the store is configured with "
        .. "encryption; delete it (oauthmail logout) and sign in again", "plain")
    end
    record = env.record
  end
  if type(record) ~= "table" then return fail(self, "the record of this account is damaged", "corrupt") end
  return record
end

-- store:load(key) -> record | nil | nil, err
function M:load(key)
  local name = self:name("token", key)
  local text, err = self.client:call("GET", name)
  if err then return lift(self, err) end
  if text == nil then return nil end
  if type(text) ~= "string" then return fail(self, "GET returned no string", "corrupt") end
  return self:unseal(text, name)
end

-- Written only while our lease (if we hold one) is still ours.
local SAVE = [[
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1]]

-- store:save(key, record) -> true | nil, err (record nil: forget the account)
function M:save(key, record)
  local name = self:name("token", key)
  local value = ""
  if record ~= nil then
    local err
    value, err = self:seal(record, name)
    if not value then return nil, err end
  end
  local owner = self.held[key] or ""
  local r, err = self.client:eval(SAVE, { name, self:name("lock", key) }, { owner, value })
  if err then return lift(self, err) end
  if r == 0 then
    return fail(self, string.format("the lease on this account's lock (%g s) ran out before the save; "
      .. "another process may hold it now", self.lease), "lease")
  end
  return true
end

local RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

-- store:lock(key, timeout) -> release() | nil, err: a lease of self.lease
-- seconds, waited for (through the waiter) up to timeout seconds.
function M:lock(key, timeout)
  timeout = timeout or self.lock_timeout
  local name = self:name("lock", key)
  local me = crypto.hex(crypto.random(16))
  local deadline = wait.now() + timeout
  local pause = 0.005
  while true do
    local got, err = self.client:call("SET", name, me, "NX", "PX", math.floor(self.lease * 1000))
    if err then return lift(self, err) end
    if got then break end
    local left = deadline - wait.now()
    if left <= 0 then
      return fail(self, string.format("timed out after %g s waiting for the lock of this account "
        .. "(another process is refreshing, or died holding it: the lease ends within %g s)", timeout, self.lease),
        "timeout")
    end
    wait.sleep(math.min(pause, left))
    if pause < 0.1 then pause = pause * 2 end
  end
  self.held[key] = me
  local released = false
  return function()
    if released then return true end
    released = true
    if self.held[key] == me then self.held[key] = nil end
    local _, err = self.client:eval(RELEASE, { name }, { me })
    if err then return lift(self, err) end
    return true
  end
end

-- store:list() is not offered: account keys are stored only as digests.

function M:close() self.client:close() end

return M
