-- examples/redis_store.lua — a custom token store on Redis, for many hosts
-- sharing one mailbox, written over oauthmail.redis (the project's own client:
-- every Lua version, TLS, the one waiter). oauthmail ships a complete one
-- (store = { kind = "redis", url = ... }, docs/redis.md); this example shows
-- the whole store contract in a page:
--
--   store:load(key)          -> record | nil (no record) | nil, err
--   store:save(key, record)  -> true | nil, err      (record nil: forget the account)
--   store:lock(key, timeout) -> release function | nil, err
--
-- Records are sealed with AES-256-GCM when a 32-byte `seal_key` is given, so
-- whoever can read Redis cannot read the tokens. The lock is a Redis lease
-- (SET NX PX): it expires on its own if its holder dies, so `lease` must be
-- longer than a token request can take.
--
--   local redis_store = dofile "examples/redis_store.lua"
--   local tokens = require "oauthmail.tokens"
--   local m = tokens.new { flow = cfg, store = redis_store.new { host = "127.0.0.1", port = 6379,
--                                                               seal_key = key32 } }
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local redis = require "oauthmail.redis"
local wait = require "oauthmail.wait"

local M = {}
M.__index = M

function M.new(opts)
  opts = opts or {}
  if opts.seal_key ~= nil and (type(opts.seal_key) ~= "string" or #opts.seal_key ~= 32) then
    error("redis_store: seal_key must be 32 bytes", 2)
  end
  return setmetatable({
    client = redis.new { host = opts.host or "127.0.0.1", port = opts.port or 6379, timeout = opts.timeout or 5 },
    prefix = opts.prefix or "oauthmail:", seal_key = opts.seal_key, lease = opts.lease or 60,
  }, M)
end

-- client:call returns values; the store contract wants store errors.
function M:call(...)
  local v, err = self.client:call(...)
  if err then return errors.fail("store", "redis store: " .. err.message, { reason = err.reason }) end
  return true, v
end

-- Redis keys carry a digest of the account key, never the token.
function M:name(kind, key)
  return self.prefix .. kind .. ":" .. crypto.hex(crypto.sha256(key)):sub(1, 40)
end

local function aad(name) return "oauthmail-redis-store/1/" .. name end

function M:load(key)
  local name = self:name("token", key)
  local ok, value = self:call("GET", name)
  if not ok then return nil, value end
  if value == nil then return nil end
  if self.seal_key then
    local blob = crypto.b64decode(value)
    value = blob and crypto.aead_open(self.seal_key, blob, aad(name))
    if not value then return errors.fail("store", "redis store: the record for this account does not decrypt "
      .. "(wrong seal_key or modified)", { reason = "decrypt" }) end
  end
  local record = cjson.decode(value)
  if type(record) ~= "table" then return errors.fail("store", "redis store: damaged record", { reason = "corrupt" }) end
  return record
end

function M:save(key, record)
  local name = self:name("token", key)
  if record == nil then
    local ok, err = self:call("DEL", name)
    if not ok then return nil, err end
    return true
  end
  local value = cjson.encode(record)
  if self.seal_key then value = crypto.b64encode(crypto.aead_seal(self.seal_key, value, aad(name))) end
  local ok, err = self:call("SET", name, value)
  if not ok then return nil, err end
  return true
end

local RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

function M:lock(key, timeout)
  local name = self:name("lock", key)
  local me = crypto.hex(crypto.random(16))   -- release only our own lease
  local deadline = wait.now() + (timeout or 30)
  local pause = 0.01
  while true do
    local ok, got = self:call("SET", name, me, "NX", "PX", math.floor(self.lease * 1000))
    if not ok then return nil, got end
    if got then
      return function()
        local rok, rerr = self:call("EVAL", RELEASE, 1, name, me)
        if not rok then return nil, rerr end
        return true
      end
    end
    if wait.now() >= deadline then
      return errors.fail("store", string.format("redis store: timed out after %g s waiting for the lock of this account",
        timeout or 30), { reason = "timeout" })
    end
    wait.sleep(pause)
    if pause < 0.1 then pause = pause * 2 end
  end
end

return M
