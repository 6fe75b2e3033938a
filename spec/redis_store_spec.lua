-- spec/redis_store_spec.lua — the custom-store example (examples/redis_store.lua)
-- against a real redis-server on loopback: the store contract, sealing, the
-- lease lock, and the token manager on top of it. The example runs over
-- oauthmail.redis, so it needs only redis-server, on every Lua version.
local h = require "spec.support.helpers"
local rsupport = require "spec.support.redis"

local has_redis = rsupport.available()

local function it_redis(name, fn)
  if has_redis then it(name, fn) else pending(name .. " (needs redis-server)") end
end

describe("examples/redis_store.lua", function()
  local server, port, redis_store, tokens

  setup(function()
    if not has_redis then return end
    redis_store = require "examples.redis_store"
    tokens = require "oauthmail.tokens"
    server = rsupport.start()
    port = server.port
  end)
  teardown(function() if server then server.stop() end end)

  local SEAL = string.rep("s", 32)
  local KEY = '["https://issuer.test","client","user@example.org","mail.send"]'
  local REC = { access_token = "AT-redis-secret-123456", refresh_token = "RT-redis-secret-123456",
    token_type = "Bearer", expires_at = 1900000000 }

  it_redis("loads, saves and forgets records, sealed so Redis never holds a token in clear", function()
    local s = redis_store.new { port = port, seal_key = SEAL, prefix = "t1:" }
    assert.is_nil(s:load(KEY))
    assert.is_true(s:save(KEY, REC))
    assert.same(REC, s:load(KEY))
    local raw = require("oauthmail.redis").new { port = port }
    local keys = raw:call("KEYS", "t1:*")
    assert.equals(1, #keys)
    assert.not_matches("user@example.org", keys[1], 1, true)
    h.assert_no_secrets(raw:call("GET", keys[1]), { REC.access_token, REC.refresh_token })
    local wrong = redis_store.new { port = port, seal_key = string.rep("w", 32), prefix = "t1:" }
    local got, err = wrong:load(KEY)
    assert.is_nil(got)
    assert.equals("decrypt", err.reason)
    assert.is_true(s:save(KEY, nil))
    assert.is_nil(s:load(KEY))
  end)

  it_redis("locks with a lease that others wait for, and releases only its own", function()
    local a, b = redis_store.new { port = port, prefix = "t2:" }, redis_store.new { port = port, prefix = "t2:" }
    local release = assert(a:lock(KEY, 1))
    local t0 = h.now()
    local none, err = b:lock(KEY, 0.3)
    assert.is_nil(none)
    assert.equals("timeout", err.reason)
    assert.is_true(h.now() - t0 < 5)
    assert.is_true(release())
    local rb = assert(b:lock(KEY, 1))
    assert.is_true(release())   -- a's lease is gone; b's stays
    local again = b:lock(KEY, 0.1)
    assert.is_nil(again)
    rb()
  end)

  it_redis("serves the token manager: one flow run, shared with a second manager", function()
    local runs = 0
    local fake = {
      interactive = function() return false end,
      refresh = function() error("no refresh expected") end,
      run = function()
        runs = runs + 1
        return { access_token = "AT-run-secret-" .. runs .. "-abcdef", token_type = "Bearer", expires_at = os.time() + 3600 }
      end,
    }
    local flow = { grant = "client_credentials", token_endpoint = "https://idp.test/token", client_id = "c" }
    local m1 = tokens.new { flow = flow, oauth2 = fake, store = redis_store.new { port = port, seal_key = SEAL, prefix = "t3:" } }
    local m2 = tokens.new { flow = flow, oauth2 = fake, store = redis_store.new { port = port, seal_key = SEAL, prefix = "t3:" } }
    local t1 = assert(m1:get())
    assert.equals(t1.access_token, assert(m2:get()).access_token)
    assert.equals(1, runs)
  end)

  it_redis("reports an unreachable Redis as a store error", function()
    local s = redis_store.new { port = h.free_port(), timeout = 1 }
    local got, err = s:load(KEY)
    assert.is_nil(got)
    assert.equals("store", err.kind)
    assert.matches("cannot connect", err.message, 1, true)
  end)
end)
