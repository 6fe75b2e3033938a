-- spec/store_redis_spec.lua — oauthmail.store.redis against a real
-- redis-server on loopback: sealed records bound to their account, the lease
-- lock and its owner-only release, saves refused once the lease is lost, the
-- failure paths (wrong password, Redis down, Redis restarted), and 8
-- processes x 50 tasks sharing one token from the real oidc-provider.
local h = require "spec.support.helpers"
local rsupport = require "spec.support.redis"
local oidc = require "spec.support.oidc"

local it_redis = rsupport.available() and it or pending

local HEX = string.rep("5a", 32)
local KEY = '["https://issuer.test","client","user@example.org","mail.send"]'
local OTHER = '["https://issuer.test","client","other@example.org","mail.send"]'
local REC = { access_token = "AT-redis-store-secret-0001", refresh_token = "RT-redis-store-secret-0001",
  token_type = "Bearer", expires_at = 1900000000 }

describe("oauthmail.store.redis", function()
  local store, redis, srv, acl

  setup(function()
    store = require "oauthmail.store"
    redis = require "oauthmail.redis"
    if not rsupport.available() then return end
    srv = rsupport.start()
    acl = rsupport.start { user = "tokens", password = "Store-redis-pw-9" }
  end)
  teardown(function()
    for _, s in ipairs { srv, acl } do if s then s.stop() end end
  end)


  local function keyfile(hex)
    local path = h.tmpdir() .. "/store.key"
    h.write_file(path, hex, "600")
    return path
  end

  it("is made from a store spec, with misspelt options refused", function()
    local s = store.new { kind = "redis", url = "redis://127.0.0.1:1", prefix = "p:" }
    assert.equals("redis", s.kind)
    assert.has_error(function() store.new { kind = "redis", url = "redis://h", encrypton = {} } end,
      "store.redis: unknown option 'encrypton' (did you mean 'encryption'?)")
    assert.has_error(function() store.new { kind = "redis" } end, "store.redis: 'url' is required (redis:// or rediss://)")
    assert.has_error(function() store.new { kind = "redis", url = "redis://h", lease = 0 } end)
    assert.has_error(function() store.new { kind = "redis", url = "redis://h", password_env = "OM_NOT_SET_ANYWHERE" } end,
      "store.redis: environment variable OM_NOT_SET_ANYWHERE (the Redis password) is not set")
  end)

  it_redis("seals records bound to their account: Redis never holds a token, a user or a copied record", function()
    local s = store.new { kind = "redis", url = srv.url, prefix = "seal:", encryption = { key_file = keyfile(HEX) } }
    assert.is_nil(s:load(KEY))
    assert.is_true(s:save(KEY, REC))
    assert.same(REC, s:load(KEY))
    local raw = redis.new { url = srv.url }
    local keys = raw:call("KEYS", "seal:*")
    assert.equals(1, #keys)
    assert.matches("^seal:token:%x+$", keys[1])
    local value = raw:call("GET", keys[1])
    h.assert_no_secrets(value .. keys[1], { REC.access_token, REC.refresh_token, "user@example.org" })
    -- a record copied to another account's key does not open there
    raw:call("SET", s:name("token", OTHER), value)
    local got, err = s:load(OTHER)
    assert.is_nil(got)
    assert.equals("decrypt", err.reason)
    assert.equals("store", err.kind)
    -- the wrong key
    local wrong = store.new { kind = "redis", url = srv.url, prefix = "seal:",
      encryption = { key_file = keyfile(string.rep("77", 32)) } }
    got, err = wrong:load(KEY)
    assert.is_nil(got)
    assert.equals("decrypt", err.reason)
    -- a store without a key sees a sealed record and says so
    local nokey = store.new { kind = "redis", url = srv.url, prefix = "seal:" }
    got, err = nokey:load(KEY)
    assert.is_nil(got)
    assert.equals("key", err.reason)
    -- a record in clear text is refused by a store that encrypts
    assert.is_true(nokey:save(OTHER, REC))
    got, err = s:load(OTHER)
    assert.is_nil(got)
    assert.equals("plain", err.reason)
    -- damaged
    raw:call("SET", s:name("token", KEY), "{not json")
    got, err = s:load(KEY)
    assert.is_nil(got)
    assert.equals("corrupt", err.reason)
    assert.is_true(s:save(KEY, nil))
    assert.is_nil(s:load(KEY))
    h.assert_no_secrets(tostring(err), { HEX })
  end)

  it_redis("seals with a passphrase through scrypt, read back by another process's store", function()
    local enc = { passphrase = "correct horse battery", scrypt = { N = 1024, r = 8, p = 1 } }
    local a = store.new { kind = "redis", url = srv.url, prefix = "pp:", encryption = enc }
    assert.is_true(a:save(KEY, REC))
    local b = store.new { kind = "redis", url = srv.url, prefix = "pp:", encryption = enc }
    assert.same(REC, b:load(KEY))
    local c = store.new { kind = "redis", url = srv.url, prefix = "pp:", encryption = { key_file = keyfile(HEX) } }
    local got, err = c:load(KEY)
    assert.is_nil(got)
    assert.matches("sealed with a passphrase, but the store is configured with a key", err.message)
  end)

  it_redis("locks with a lease: others wait and time out, only the owner releases, a dead holder's lease ends", function()
    local a = store.new { kind = "redis", url = srv.url, prefix = "lk:", lease = 0.6 }
    local b = store.new { kind = "redis", url = srv.url, prefix = "lk:", lease = 0.6 }
    local release = assert(a:lock(KEY, 1))
    local t0 = h.now()
    local none, err = b:lock(KEY, 0.2)
    assert.is_nil(none)
    assert.equals("timeout", err.reason)
    assert.matches("timed out after 0.2 s waiting for the lock", err.message)
    assert.is_true(h.now() - t0 < 2)
    -- a's lease runs out (as if a died): b gets in within the lease
    local rb = assert(b:lock(KEY, 3))
    assert.is_true(h.now() - t0 < 3)
    -- a's late save is refused: the lease is no longer a's
    local ok, serr = a:save(KEY, REC)
    assert.is_nil(ok)
    assert.equals("lease", serr.reason)
    assert.is_nil(b:load(KEY))
    -- a's release does not free b's lease
    assert.is_true(release())
    local again = a:lock(KEY, 0.1)
    assert.is_nil(again)
    assert.is_true(b:save(KEY, REC))
    rb()
    assert(a:lock(KEY, 0.5))()
  end)

  it_redis("a wrong password, Redis down, and Redis restarted are clear store errors; nothing is lost", function()
    local bad = store.new { kind = "redis", url = "redis://tokens:Not-the-pw-1@127.0.0.1:" .. acl.port }
    local got, err = bad:load(KEY)
    assert.is_nil(got)
    assert.equals("store", err.kind)
    assert.equals("auth", err.reason)
    assert.matches("authentication as tokens refused", err.message)
    assert.matches("check the user name and password", err.hint)
    h.assert_no_secrets(tostring(err), { "Not-the-pw-1", "Store-redis-pw-9" })

    local down = store.new { kind = "redis", url = "redis://127.0.0.1:" .. h.free_port(), timeout = 1 }
    got, err = down:load(KEY)
    assert.is_nil(got)
    assert.equals("store", err.kind)
    assert.matches("redis store: cannot connect to redis 127.0.0.1:%d+", err.message)

    -- a token manager over a Redis that restarts: the get while it is down is
    -- a store error, the token saved before is there afterwards (AOF, fsync always)
    local persist = rsupport.start { persist = true }
    local tokens = require "oauthmail.tokens"
    local runs = 0
    local fake = {
      interactive = function() return false end,
      refresh = function() error("no refresh expected") end,
      run = function()
        runs = runs + 1
        return { access_token = "AT-restart-secret-" .. runs .. "-xyz", token_type = "Bearer", expires_at = os.time() + 3600 }
      end,
    }
    local flow = { grant = "client_credentials", token_endpoint = "https://idp.test/token", client_id = "c" }
    local spec = { kind = "redis", url = persist.url, prefix = "rs:", timeout = 1, encryption = { key_file = keyfile(HEX) } }
    local m1 = tokens.new { flow = flow, oauth2 = fake, store = spec }
    local t1 = assert(m1:get())
    persist.stop()
    local m2 = tokens.new { flow = flow, oauth2 = fake, store = spec }
    got, err = m2:get()
    assert.is_nil(got)
    assert.equals("store", err.kind)
    assert.matches("redis", err.message)
    h.assert_no_secrets(tostring(err), { t1.access_token })
    persist.start()
    local t2 = assert(m2:get())
    assert.equals(t1.access_token, t2.access_token)
    assert.equals(1, runs)
    persist.stop()
  end)

  it_redis("speaks TLS to Redis (rediss://) with the server verified", function()
    local t = rsupport.start { tls = true, user = "tokens", password = "Tls-store-pw-3" }
    local s = store.new { kind = "redis", url = t.url, ca_file = t.certs.ca, prefix = "tls:",
      encryption = { key_file = keyfile(HEX) } }
    assert.is_true(s:save(KEY, REC))
    assert.same(REC, s:load(KEY))
    local unverified = store.new { kind = "redis", url = t.url, prefix = "tls:" }
    local got, err = unverified:load(KEY)
    assert.is_nil(got)
    assert.equals("store", err.kind)
    assert.equals("verify", err.reason)
    t.stop()
  end)

  it_redis("8 processes x 50 tasks needing a token at once: one request at the real oidc-provider", function()
    local idp = oidc.start()
    assert.equals(200, (idp.request("POST", "/test/slow", { path = "/token", ms = 800 })))
    local dir = h.tmpdir()
    local go = dir .. "/go"
    local vars = { OM_REDIS_URL = srv.url, OM_PREFIX = "fleet:", OM_KEY = HEX, OM_ISSUER = idp.issuer,
      OM_CA = idp.ca, OM_SECRET = idp.secrets.post, OM_GO_FILE = go, OM_TASKS = "50" }
    local prefix = ""
    for k, v in pairs(vars) do prefix = prefix .. k .. "=" .. h.quote(v) .. " " end
    local before = idp.stats().token_requests
    local script = {}
    for i = 1, 8 do
      script[#script + 1] = string.format("(env %s timeout -s KILL 120 %s %s >%s 2>&1; echo $? >%s) &", prefix,
        h.lua_bin, h.quote(h.root .. "/spec/support/redis_token_worker.lua"), h.quote(dir .. "/out." .. i),
        h.quote(dir .. "/rc." .. i))
    end
    script[#script + 1] = "sleep 0.5; touch " .. h.quote(go) .. "; wait"
    h.exec(table.concat(script, "\n"))
    assert.equals(before + 1, idp.stats().token_requests, h.read_file(dir .. "/out.1"))
    local seen = {}
    for i = 1, 8 do
      local out = h.read_file(dir .. "/out." .. i) or ""
      assert.equals("0", (h.read_file(dir .. "/rc." .. i) or ""):match("%d+"), "worker " .. i .. ": " .. out)
      local n = 0
      for tok in out:gmatch("TOKEN (%S+)") do seen[tok] = true n = n + 1 end
      assert.equals(50, n, out)
    end
    local count = 0
    for _ in pairs(seen) do count = count + 1 end
    assert.equals(1, count)   -- 400 callers, one token
    idp.request("POST", "/test/slow", { path = "/token", ms = 0 })
    idp.stop()
  end)
end)
