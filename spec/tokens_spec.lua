-- spec/tokens_spec.lua — the token manager. First against a scripted oauth2
-- module (every decision path, with a fake clock), then against real servers:
-- a counting token endpoint for the many-process and crash tests, and the
-- real oidc-provider for refresh-token rotation.
local errors = require "oauthmail.errors"
local store = require "oauthmail.store"
local tokens = require "oauthmail.tokens"
local h = require "spec.support.helpers"

local NOW = 1800000000

-- A scripted oauth2 module: counts calls, issues numbered tokens, rotates
-- refresh tokens, and can be told to fail or to yield mid-request.
local function fake_oauth2(clock, opts)
  opts = opts or {}
  local f = { refreshes = 0, runs = 0, seen_rt = {}, lifetime = opts.lifetime or 3600 }
  local function issue(kind)
    local n = f.refreshes + f.runs - 1
    local tok = {
      access_token = "AT-secret-" .. kind .. "-" .. n .. "-xyzzy",
      token_type = "Bearer",
      expires_at = clock.now + f.lifetime,
      scope = "mail.send",
    }
    if not f.no_rotation then tok.refresh_token = "RT-secret-" .. n .. "-plugh" end
    return tok
  end
  function f.interactive(grant) return grant == "authorization_code" or grant == "device_code" end
  function f.refresh(_, rt)
    f.refreshes = f.refreshes + 1
    f.seen_rt[#f.seen_rt + 1] = rt
    if f.yield then coroutine.yield("in-request") end
    if f.refresh_error then return nil, f.refresh_error end
    if f.raise then error("flow blew up") end
    return issue("refresh")
  end
  function f.run(cfg)
    f.runs = f.runs + 1
    f.last_grant = cfg.grant
    if f.yield then coroutine.yield("in-request") end
    if f.run_error then return nil, f.run_error end
    return issue("run")
  end
  return f
end

local function manager_for(flow, opts)
  opts = opts or {}
  local clock = { now = NOW }
  local fake = fake_oauth2(clock, opts)
  local trace = h.trace_collector()
  local st = opts.store or store.memory()
  local m = tokens.new {
    flow = flow, store = st, oauth2 = fake, clock = function() return clock.now end, trace = trace,
    interactive = opts.interactive, profile = opts.profile, margin = opts.margin, seed = opts.seed,
  }
  return m, fake, clock, st, trace
end

local CC = { grant = "client_credentials", token_endpoint = "https://idp.test/token", client_id = "app-1",
  client_secret = "client-secret-value-42", scope = "https://outlook.office365.com/.default" }
local AUTH = { grant = "authorization_code", provider = "microsoft", issuer = "https://login.test/tenant/v2.0",
  client_id = "app-2", user = "noreply@contoso.test", scope = "offline_access SMTP.Send" }

local function stored(st, m) return st:load(m.key) end

local function secrets(fake, extra)
  local list = { "client-secret-value-42" }
  for i = 0, fake.refreshes + fake.runs do
    for _, kind in ipairs { "refresh", "run" } do list[#list + 1] = "AT-secret-" .. kind .. "-" .. i .. "-xyzzy" end
    list[#list + 1] = "RT-secret-" .. i .. "-plugh"
  end
  for _, s in ipairs(extra or {}) do list[#list + 1] = s end
  return list
end

describe("tokens (scripted flows)", function()
  it("keys accounts by issuer, client, user and sorted scopes", function()
    assert.equals('["https://login.test/tenant/v2.0","app-2","noreply@contoso.test","SMTP.Send offline_access"]',
      tokens.account_key(AUTH))
    assert.equals(tokens.account_key { issuer = "i", client_id = "c", scope = { "b", "a" } },
      tokens.account_key { issuer = "i", client_id = "c", scope = "a b" })
    assert.not_equals(tokens.account_key { issuer = "i", client_id = "c" }, tokens.account_key { issuer = "i", client_id = "d" })
  end)

  it("runs a non-interactive flow when the store is empty, saves, then serves from memory", function()
    local m, fake, _, st, trace = manager_for(CC)
    local tok = assert(m:get())
    assert.equals("AT-secret-run-0-xyzzy", tok.access_token)
    assert.is_nil(tok.obtained_at)
    assert.equals(1, fake.runs)
    assert.equals("client_credentials", fake.last_grant)
    assert.equals("AT-secret-run-0-xyzzy", stored(st, m).access_token)
    assert.same(tok, m:get())
    assert.equals(1, fake.runs + fake.refreshes)
    h.assert_no_secrets(trace.text(), secrets(fake))
  end)

  it("uses a stored token that is valid beyond the margin without any request", function()
    local st = store.memory()
    local m0 = tokens.new { flow = CC, store = st, oauth2 = fake_oauth2({ now = NOW }) }
    st:save(m0.key, { access_token = "AT-stored-0001", refresh_token = "RT-stored-0001", expires_at = NOW + 301 })
    local m, fake = manager_for(CC, { store = st })
    assert.equals("AT-stored-0001", assert(m:get()).access_token)
    assert.equals(0, fake.runs + fake.refreshes)
  end)

  it("refreshes a token that expires within the margin and stores the rotated refresh token", function()
    local m, fake, clock, st, trace = manager_for(AUTH)
    st:save(m.key, { access_token = "AT-old-000001", refresh_token = "RT-old-000001", expires_at = NOW + 3600 })
    assert.equals("AT-old-000001", assert(m:get()).access_token)
    clock.now = NOW + 3600 - 599   -- Microsoft: 600 s margin
    local tok = assert(m:get())
    assert.equals("AT-secret-refresh-0-xyzzy", tok.access_token)
    assert.same({ "RT-old-000001" }, fake.seen_rt)
    local rec = stored(st, m)
    assert.equals("RT-secret-0-plugh", rec.refresh_token)
    assert.equals("AT-secret-refresh-0-xyzzy", rec.access_token)
    h.assert_no_secrets(trace.text(), secrets(fake, { "AT-old-000001", "RT-old-000001" }))
  end)

  it("uses 600 s as the default margin for Microsoft and 300 s otherwise", function()
    local ms = manager_for(AUTH)
    local other = manager_for(CC)
    assert.equals(600, ms.margin)
    assert.equals(300, other.margin)
    local custom = manager_for(CC, { margin = 42 })
    assert.equals(42, custom.margin)
  end)

  it("refreshes an invalidated token early, even though the clock says it is fine", function()
    local m, fake = manager_for(AUTH)
    local st = m.store
    st:save(m.key, { access_token = "AT-refused-0001", refresh_token = "RT-good-000001", expires_at = NOW + 3600 })
    local tok = assert(m:get())
    assert.is_true(m:invalidate(tok))
    local fresh = assert(m:get())
    assert.equals("AT-secret-refresh-0-xyzzy", fresh.access_token)
    assert.equals(1, fake.refreshes)
    assert.same(fresh, m:get())
    assert.has_error(function() m:invalidate(42) end)
  end)

  it("keeps the old refresh token when the server does not rotate it", function()
    local m, fake, clock = manager_for(AUTH)
    fake.no_rotation = true
    m.store:save(m.key, { access_token = "AT-a-000001", refresh_token = "RT-keep-000001", expires_at = NOW + 100 })
    clock.now = NOW
    assert(m:get())
    assert.equals("RT-keep-000001", m.store:load(m.key).refresh_token)
  end)

  it("serves a short-lived token until half its lifetime instead of refreshing on every call", function()
    local m, fake, clock = manager_for(CC, { lifetime = 120 })
    assert(m:get())
    clock.now = NOW + 50
    assert(m:get())
    assert.equals(1, fake.runs)
    clock.now = NOW + 61
    assert(m:get())
    assert.equals(1, fake.refreshes + fake.runs - 1)
  end)

  describe("interactive flows", function()
    it("never starts one unasked, and says exactly how to give consent", function()
      local m, fake = manager_for(AUTH, { profile = "contoso" })
      local tok, err = m:get()
      assert.is_nil(tok)
      assert.equals("oauth", err.kind)
      assert.equals("consent_required", err.reason)
      assert.matches('run "oauthmail login --profile contoso" or call manager:login()', err.message, 1, true)
      assert.matches('"authorization_code" flow needs a person', err.message, 1, true)
      assert.equals(0, fake.runs)
    end)

    it("names a placeholder profile when none is known", function()
      local m = manager_for(AUTH)
      local _, err = m:get()
      assert.matches('run "oauthmail login --profile <profile>"', err.message, 1, true)
    end)

    it("runs when interactive allows it, or through login()", function()
      local m, fake = manager_for(AUTH, { interactive = true })
      assert.equals("AT-secret-run-0-xyzzy", assert(m:get()).access_token)
      assert.equals(1, fake.runs)
      local m2, fake2 = manager_for(AUTH, { interactive = function(grant) return grant == "device_code" end })
      assert.is_nil(m2:get())
      assert.equals(0, fake2.runs)
      local tok = assert(m2:login())
      assert.equals(1, fake2.runs)
      assert.equals(tok.access_token, assert(m2:get()).access_token)
      assert.equals(tok.access_token, m2.store:load(m2.key).access_token)
    end)

    it("redeems a seed refresh token (the SMTP sign-in's) for another scope instead of asking for a sign-in", function()
      local m, fake, _, st, trace = manager_for(AUTH, { seed = function() return "RT-seed-from-smtp-01" end })
      local tok = assert(m:get())
      assert.equals("AT-secret-refresh-0-xyzzy", tok.access_token)
      assert.same({ "RT-seed-from-smtp-01" }, fake.seen_rt)
      assert.equals(0, fake.runs)
      assert.equals("RT-secret-0-plugh", st:load(m.key).refresh_token)   -- its own from now on
      assert.truthy(trace.text():find("event=seeded", 1, true))
      h.assert_no_secrets(trace.text(), { "RT-seed-from-smtp-01", "RT-secret-0-plugh" })
      -- no seed, or a seed with nothing to give: the sign-in is still asked for
      local m2 = manager_for(AUTH, { seed = function() return nil end })
      local none, err = m2:get()
      assert.is_nil(none)
      assert.equals("consent_required", err.reason)
    end)

    it("reports an expired refresh token (AADSTS700082) with the way back", function()
      local m, fake, _, st, trace = manager_for(AUTH, { profile = "contoso" })
      st:save(m.key, { access_token = "AT-dead-000001", refresh_token = "RT-dead-000001", expires_at = NOW - 10 })
      fake.refresh_error = errors.new("oauth", "the token endpoint refused the refresh token: invalid_grant "
        .. "(AADSTS700082: The refresh token has expired due to inactivity)",
        { oauth_error = "invalid_grant", provider_code = "AADSTS700082", retryable = false })
      local tok, err = m:get()
      assert.is_nil(tok)
      assert.equals("consent_required", err.reason)
      assert.equals("AADSTS700082", err.provider_code)
      assert.matches('run "oauthmail login --profile contoso"', err.message, 1, true)
      assert.equals(0, fake.runs)
      assert.equals("RT-dead-000001", st:load(m.key).refresh_token)   -- nothing lost
      h.assert_no_secrets(tostring(err) .. trace.text(), { "AT-dead-000001", "RT-dead-000001" })
    end)
  end)

  it("replaces a dead refresh token by re-running a flow that needs nobody", function()
    local m, fake, _, st = manager_for(CC)
    st:save(m.key, { access_token = "AT-x-000001", refresh_token = "RT-revoked-0001", expires_at = NOW - 1 })
    fake.refresh_error = errors.new("oauth", "invalid_grant", { oauth_error = "invalid_grant" })
    assert.equals("AT-secret-run-1-xyzzy", assert(m:get()).access_token)
    assert.equals(1, fake.refreshes)
    assert.equals(1, fake.runs)
  end)

  it("returns other refresh failures as they are and keeps the store", function()
    local m, fake, _, st = manager_for(AUTH)
    st:save(m.key, { access_token = "AT-x-000001", refresh_token = "RT-fine-000001", expires_at = NOW - 1 })
    fake.refresh_error = errors.new("network", "connection refused", { reason = "refused", retryable = true })
    local tok, err = m:get()
    assert.is_nil(tok)
    assert.equals("network", err.kind)
    assert.equals("RT-fine-000001", st:load(m.key).refresh_token)
    fake.refresh_error = nil
    assert(m:get())
  end)

  it("re-reads the store under the lock and uses a token another process saved meanwhile", function()
    local inner = store.memory()
    local m, fake = manager_for(AUTH, { store = {
      load = function(_, k) return inner:load(k) end,
      save = function(_, k, r) return inner:save(k, r) end,
      lock = function(_, k, t)
        -- while we waited for the lock, someone else refreshed and saved
        inner:save(k, { access_token = "AT-from-peer-01", refresh_token = "RT-from-peer-01", expires_at = NOW + 3600 })
        return inner:lock(k, t)
      end,
    } })
    inner:save(m.key, { access_token = "AT-stale-00001", refresh_token = "RT-stale-00001", expires_at = NOW + 5 })
    assert.equals("AT-from-peer-01", assert(m:get()).access_token)
    assert.equals(0, fake.refreshes)
  end)

  it("does not hand out a new token it could not save, and retries the save first", function()
    local inner = store.memory()
    local fail_saves = 1
    local m, fake = manager_for(AUTH, { store = {
      load = function(_, k) return inner:load(k) end,
      save = function(_, k, r)
        if fail_saves > 0 then
          fail_saves = fail_saves - 1
          return errors.fail("store", "disk full")
        end
        return inner:save(k, r)
      end,
      lock = function(_, k, t) return inner:lock(k, t) end,
    } })
    inner:save(m.key, { access_token = "AT-old-000001", refresh_token = "RT-old-000001", expires_at = NOW - 1 })
    local tok, err = m:get()
    assert.is_nil(tok)
    assert.equals("store", err.kind)
    assert.matches("obtained a new token but could not save it: disk full", err.message, 1, true)
    h.assert_no_secrets(tostring(err), secrets(fake))
    local again = assert(m:get())
    assert.equals("AT-secret-refresh-0-xyzzy", again.access_token)
    assert.equals(1, fake.refreshes)
    assert.equals("RT-secret-0-plugh", inner:load(m.key).refresh_token)
  end)

  it("reports a damaged token file instead of refreshing over it", function()
    local dir = h.tmpdir()
    local path = h.write_file(dir .. "/tokens.json", '{"format":"oauthmail-tokens","version":1,"accou', "600")
    local m, fake = manager_for(CC, { store = store.file { path = path } })
    local tok, err = m:get()
    assert.is_nil(tok)
    assert.equals("store", err.kind)
    assert.matches(path .. " is not valid JSON", err.message, 1, true)
    assert.equals(0, fake.runs)
    assert.equals('{"format":"oauthmail-tokens","version":1,"accou', h.read_file(path))
  end)

  it("names the token file when its folder is missing", function()
    local dir = h.tmpdir() .. "/gone"
    local m, fake = manager_for(CC, { store = store.file { path = dir .. "/tokens.json", create_dir = false } })
    local tok, err = m:get()
    assert.is_nil(tok)
    assert.matches("token file " .. dir .. "/tokens.json does not exist", err.message, 1, true)
    assert.equals(0, fake.runs)
  end)

  describe("single flight in one process", function()
    local function run_all(cos)
      -- a minimal round-robin scheduler: resumes everything until all are done
      local results, waits = {}, 0
      for _ = 1, 10000 do
        local alive = 0
        for i, co in ipairs(cos) do
          if coroutine.status(co) == "suspended" then
            local ok, a, b = coroutine.resume(co)
            assert(ok, a)
            if coroutine.status(co) == "dead" then results[i] = { a, b } else
              alive = alive + 1
              if a == tokens.WAIT then waits = waits + 1 end
            end
          end
        end
        if alive == 0 then break end
      end
      return results, waits
    end

    it("sends one request for 50 coroutines even when the request itself yields", function()
      local m, fake, clock, st = manager_for(AUTH)
      st:save(m.key, { access_token = "AT-expiring-01", refresh_token = "RT-current-001", expires_at = NOW + 3600 })
      clock.now = NOW + 3400
      fake.yield = true
      local cos = {}
      for i = 1, 50 do cos[i] = coroutine.create(function() return m:get() end) end
      local results, waits = run_all(cos)
      assert.equals(1, fake.refreshes)
      assert.is_true(waits >= 49)
      for i = 1, 50 do
        assert.truthy(results[i][1], tostring(results[i][2]))
        assert.equals("AT-secret-refresh-0-xyzzy", results[i][1].access_token)
      end
    end)

    it("tells a caller outside any coroutine that a refresh is in flight", function()
      local m, fake, clock, st = manager_for(AUTH)
      st:save(m.key, { access_token = "AT-expiring-01", refresh_token = "RT-current-001", expires_at = NOW + 10 })
      fake.yield = true
      local co = coroutine.create(function() return m:get() end)
      assert.equals("in-request", select(2, coroutine.resume(co)))
      local tok, err = m:get()
      assert.is_nil(tok)
      assert.equals("busy", err.reason)
      assert.matches("already in progress", err.message, 1, true)
      local _, t2 = coroutine.resume(co)
      assert.equals("AT-secret-refresh-0-xyzzy", t2.access_token)
      assert.equals(t2.access_token, assert(m:get()).access_token)
      assert.equals(1, fake.refreshes)
      clock.now = clock.now + 1
    end)

    it("recovers when a refresh raised half-way", function()
      local m, fake, _, st = manager_for(CC)
      st:save(m.key, { access_token = "AT-expiring-01", refresh_token = "RT-current-001", expires_at = NOW + 10 })
      fake.raise = true
      assert.has_error(function() m:get() end, nil)
      fake.raise = false
      -- the raise left the in-flight marker and the store's lock behind; both are cleared
      assert.equals("AT-secret-refresh-1-xyzzy", assert(m:get()).access_token)
    end)
  end)

  describe("review fixes", function()
    -- finding 2: a store that raises is a store error, never an exception out of get()
    it("turns a raising store into a store error naming the store", function()
      for _, method in ipairs { "load", "lock", "save" } do
        local inner = store.memory()
        local bad = {
          describe = function() return "vault store" end,
          load = function(_, k) return inner:load(k) end,
          save = function(_, k, r) return inner:save(k, r) end,
          lock = function(_, k, t) return inner:lock(k, t) end,
        }
        bad[method] = function() error("vault exploded in " .. method) end
        local m = manager_for(CC, { store = bad })
        local ok, tok, err = pcall(m.get, m)
        assert.is_true(ok, tostring(tok))
        assert.is_nil(tok)
        assert.equals("store", err.kind)
        assert.matches("vault store failed: .*vault exploded in " .. method, err.message)
        assert.is_nil(inner.held[m.key])  -- the lock was given back
      end
    end)

    it("returns a store error for a token file with a tampered scrypt cost", function()
      local cjson = require "cjson"
      local dir = h.tmpdir()
      local path = dir .. "/tokens.json"
      local enc = { passphrase = "pw-0123", scrypt = { N = 1024, r = 1, p = 1 } }
      local m, fake = manager_for(CC, { store = store.file { path = path, encryption = enc } })
      assert(m:get())
      local env = cjson.decode(h.read_file(path))
      env.encryption.N, env.encryption.r = 16777216, 64
      h.write_file(path, cjson.encode(env), "600")
      local m2 = manager_for(CC, { store = store.file { path = path, encryption = enc } })
      local ok, tok, err = pcall(m2.get, m2)
      assert.is_true(ok, tostring(tok))
      assert.is_nil(tok)
      assert.equals("corrupt", err.reason)
      assert.equals(1, fake.runs)
    end)

    -- finding 4: a raise must not leave the lock or the in-flight marker behind
    it("releases the lock and the in-flight marker when a refresh raises in a coroutine that lives on", function()
      local dir = h.tmpdir()
      local path = dir .. "/tokens.json"
      local m, fake, _, st = manager_for(CC, { store = store.file { path = path } })
      assert(st:save(m.key, { access_token = "AT-expiring-01", refresh_token = "RT-current-001", expires_at = NOW + 10 }))
      fake.raise = true
      local co = coroutine.create(function()
        local ok, msg = pcall(m.get, m)
        coroutine.yield(ok, msg)
        return "done"
      end)
      local resumed, ok, msg = coroutine.resume(co)
      assert.is_true(resumed)
      assert.is_false(ok)
      assert.matches("flow blew up", tostring(msg), 1, true)
      assert.equals("suspended", coroutine.status(co))
      -- another process can take the lock at once
      local lk, lerr = require("oauthmail.fs").lock(path .. ".lock", { timeout = 0.2 })
      assert.truthy(lk, tostring(lerr))
      lk:unlock()
      -- and the main thread is not told a refresh is in flight
      fake.raise = false
      local tok, err = m:get()
      assert.truthy(tok, tostring(err))
      assert.equals("AT-secret-refresh-1-xyzzy", tok.access_token)
    end)

    -- finding 6: record fields of the wrong type make the record unusable, not a raise
    it("treats a record with unusable fields as needing a refresh", function()
      for _, bad in ipairs {
        { access_token = "AT-bad-0001", expires_at = "soon" },
        { access_token = "AT-bad-0001", expires_at = 0 / 0 },
        { access_token = "AT-bad-0001", expires_at = math.huge },
        { access_token = "AT-bad-0001", expires_at = NOW + 3600, obtained_at = "yesterday" },
        { access_token = 42, expires_at = NOW + 3600 },
        { access_token = "AT-bad-0001", expires_at = { 1 } },
      } do
        bad.refresh_token = "RT-current-001"
        local inner = store.memory()
        local m, fake, _, _, trace = manager_for(CC, { store = {
          load = function() return bad end,
          save = function(_, k, r) return inner:save(k, r) end,
          lock = function(_, k, t) return inner:lock(k, t) end,
        } })
        local ok, tok, err = pcall(m.get, m)
        assert.is_true(ok, tostring(tok))
        assert.truthy(tok, tostring(err))
        assert.equals("AT-secret-refresh-0-xyzzy", tok.access_token)
        assert.equals("RT-current-001", fake.seen_rt[1])
        assert.matches("bad_record", trace.text(), 1, true)
        h.assert_no_secrets(trace.text(), secrets(fake, { "AT-bad-0001", "RT-current-001" }))
      end
    end)

    it("reads a command store record with JSON null fields without raising", function()
      local m, fake = manager_for(CC, { store = store.command {
        get = [[printf '%s' '{"access_token":"AT-null-exp","expires_at":null}']], put = "cat >/dev/null",
        lock_dir = h.tmpdir() } })
      local ok, tok = pcall(m.get, m)
      assert.is_true(ok, tostring(tok))
      assert.equals("AT-null-exp", tok.access_token)
      assert.equals(0, fake.runs)
    end)

    -- finding 8: an invalidated token that the server hands out again is accepted once
    it("accepts the same token again after one fetch following invalidate", function()
      local clock = { now = NOW }
      local calls = 0
      local m = tokens.new {
        flow = CC, clock = function() return clock.now end,
        oauth2 = {
          run = function() calls = calls + 1 return { access_token = "AT-same-secret", expires_at = clock.now + 3600 } end,
          refresh = function() error("no refresh expected") end,
        },
      }
      local t = assert(m:get())
      m:invalidate(t)
      for _ = 1, 5 do assert.equals("AT-same-secret", assert(m:get()).access_token) end
      assert.equals(2, calls)
      -- a second refusal is the caller's to judge: one more fetch, then accepted again
      m:invalidate(t)
      assert(m:get())
      assert(m:get())
      assert.equals(3, calls)
    end)

    it("forgets invalidated tokens once they have expired", function()
      local m, _, clock = manager_for(CC)
      m:invalidate { access_token = "AT-refused-0001", expires_at = NOW + 100 }
      m:invalidate "AT-refused-0002"
      assert.truthy(m.invalid["AT-refused-0001"])
      clock.now = NOW + 101
      m:invalidate "AT-refused-0003"
      assert.is_nil(m.invalid["AT-refused-0001"])
      assert.truthy(m.invalid["AT-refused-0002"])
      clock.now = NOW + 2 * 86400
      m:invalidate "AT-refused-0004"
      assert.is_nil(m.invalid["AT-refused-0002"])
      assert.is_nil(m.invalid["AT-refused-0003"])
    end)

    -- finding 11: a kept-back token must not overwrite a newer one
    it("drops a kept-back unsaved token when the store meanwhile holds a newer one", function()
      local inner = store.memory()
      local fail_saves = 1
      local m, fake, clock = manager_for(AUTH, { store = {
        load = function(_, k) return inner:load(k) end,
        save = function(_, k, r)
          if fail_saves > 0 then fail_saves = fail_saves - 1 return errors.fail("store", "disk full") end
          return inner:save(k, r)
        end,
        lock = function(_, k, t) return inner:lock(k, t) end,
      } })
      inner:save(m.key, { access_token = "AT-old-000001", refresh_token = "RT-old-000001", expires_at = NOW - 1,
        obtained_at = NOW - 3601 })
      assert.is_nil((m:get()))
      -- another process refreshes later and saves its (newer) token
      clock.now = NOW + 5
      local newer = { access_token = "AT-peer-newer-01", refresh_token = "RT-peer-newer-01",
        expires_at = NOW + 3605, obtained_at = NOW + 5 }
      inner:save(m.key, newer)
      assert.equals("AT-peer-newer-01", assert(m:get()).access_token)
      assert.same(newer, inner:load(m.key))
      assert.equals(1, fake.refreshes)
      assert.is_nil(m.unsaved)
    end)

    -- finding 12: a waiter gives up after lock_timeout on the manager's clock
    it("bounds a coroutine's wait for an abandoned refresh by lock_timeout", function()
      local m, fake, clock, st = manager_for(AUTH)
      st:save(m.key, { access_token = "AT-expiring-01", refresh_token = "RT-current-001", expires_at = NOW + 10 })
      fake.yield = true
      local holder = coroutine.create(function() return m:get() end)
      assert.equals("in-request", select(2, coroutine.resume(holder)))   -- then never resumed again
      local waiter = coroutine.create(function() return m:get() end)
      assert.equals(tokens.WAIT, select(2, coroutine.resume(waiter)))
      clock.now = clock.now + 29
      assert.equals(tokens.WAIT, select(2, coroutine.resume(waiter)))
      clock.now = clock.now + 2
      local resumed, tok, err
      for _ = 1, 3 do
        resumed, tok, err = coroutine.resume(waiter)
        if coroutine.status(waiter) == "dead" then break end
      end
      assert.is_true(resumed)
      assert.equals("dead", coroutine.status(waiter))
      assert.is_nil(tok)
      assert.equals("store", err.kind)
      assert.equals("timeout", err.reason)
      assert.matches("timed out after 30 s waiting for another coroutine's token refresh", err.message, 1, true)
      assert.equals(1, fake.refreshes)
    end)
  end)

  it("raises on bad options", function()
    assert.has_error(function() tokens.new() end)
    assert.has_error(function() tokens.new { flow = "x" } end)
    assert.has_error(function() tokens.new { flow = CC, margin = -1 } end)
    assert.has_error(function() tokens.new { flow = CC, interactive = "yes" } end)
    assert.has_error(function() tokens.new { flow = CC, oauth2 = {} } end)
    assert.has_error(function() tokens.new { flow = CC, store = { kind = "nope" } } end)
  end)
end)

-- ---------------------------------------------------------------------------
-- Against real servers.

local has_http = pcall(require, "oauthmail.http")
local HEX = string.rep("00112233445566778899aabbccddeeff", 2)

-- The counting token endpoint (spec/peers/token_counter.mjs) over HTTPS.
local function start_counter(opts)
  local certs = require "spec.support.certs"
  local cjson = require "cjson"
  local c = certs.get()
  local dir = h.tmpdir()
  local initial = "cnt-rt-initial-" .. tostring(os.time()) .. "-abcdef"
  h.write_file(dir .. "/counter.json", cjson.encode {
    cert = c.server.cert, key = c.server.key, delay_ms = opts and opts.delay_ms or 0, initial_refresh_token = initial,
  })
  local proc = h.spawn("node " .. h.quote(h.peers .. "/token_counter.mjs") .. " " .. h.quote(dir .. "/counter.json"),
    { cwd = h.peers, ready = "COUNTER READY (%d+)", timeout = 20 })
  local srv = { proc = proc, port = tonumber(proc.match[1]), ca = c.ca, initial = initial }
  srv.endpoint = "https://127.0.0.1:" .. srv.port .. "/token"
  function srv.stats()
    local conn = require "oauthmail.conn"
    local cn = assert(conn.connect { host = "127.0.0.1", port = srv.port, tls = "implicit", ca_file = srv.ca, timeout = 10 })
    assert(cn:send("GET /test/stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"))
    local chunks = {}
    for _ = 1, 100 do
      local s = cn:receive_some(65536)
      if not s then break end
      chunks[#chunks + 1] = s
    end
    cn:close()
    return cjson.decode(table.concat(chunks):match("\r\n\r\n(.*)$"))
  end
  return srv
end

-- A token file whose token is about to expire, sealed with the workers' key.
local function seed_store(srv, expires_in)
  local dir = h.tmpdir()
  local path = dir .. "/tokens.json"
  local st = store.file { path = path, encryption = { key_command = "echo " .. HEX } }
  local flow = { grant = "client_credentials", token_endpoint = srv.endpoint, client_id = "worker-client", scope = "mail.send" }
  assert(st:save(tokens.account_key(flow), {
    access_token = "cnt-at-seed-0123456789", token_type = "Bearer", refresh_token = srv.initial,
    expires_at = os.time() + (expires_in or 60), obtained_at = os.time() - 3000,
  }))
  return path, st, tokens.account_key(flow)
end

-- Start `count` workers at once (a start file releases them together) and
-- collect each one's output and exit status. Bounded by `timeout`.
local function run_workers(srv, path, count, env)
  local dir = h.tmpdir()
  local go = dir .. "/go"
  local vars = {
    OM_STORE = path, OM_WORKER_KEY = HEX, OM_ENDPOINT = srv.endpoint, OM_CA = srv.ca, OM_GO_FILE = go,
    OM_CLIENT = has_http and "oauth2" or "mini",
  }
  for k, v in pairs(env or {}) do vars[k] = v end
  local prefix = ""
  for k, v in pairs(vars) do prefix = prefix .. k .. "=" .. h.quote(v) .. " " end
  local script = {}
  for i = 1, count do
    script[#script + 1] = string.format("(env %s timeout -s KILL 60 %s %s >%s 2>&1; echo $? >%s) &", prefix,
      h.lua_bin, h.quote(h.root .. "/spec/support/token_worker.lua"), h.quote(dir .. "/out." .. i), h.quote(dir .. "/rc." .. i))
  end
  script[#script + 1] = "sleep 0.3; touch " .. h.quote(go) .. "; wait"
  h.exec(table.concat(script, "\n"))
  local results = {}
  for i = 1, count do
    results[i] = { out = h.read_file(dir .. "/out." .. i) or "", rc = tonumber(h.read_file(dir .. "/rc." .. i) or "") }
  end
  return results
end

describe("tokens against a counting token endpoint", function()
  local srv
  setup(function() srv = start_counter { delay_ms = 300 } end)
  teardown(function() if srv then srv.proc.stop() end end)

  it("8 processes needing a refresh at once send exactly one request and print the same token", function()
    local path, st, key = seed_store(srv)
    local before = srv.stats().token_requests
    local results = run_workers(srv, path, 8)
    assert.equals(before + 1, srv.stats().token_requests)
    local saved = st:load(key)
    assert.matches("^cnt%-at%-", saved.access_token)
    assert.not_equals(srv.initial, saved.refresh_token)
    for i, r in ipairs(results) do
      assert.equals(0, r.rc, "worker " .. i .. ": " .. r.out)
      assert.equals("TOKEN " .. saved.access_token .. "\n", r.out)
    end
  end)

  it("50 coroutines in one process send exactly one request and all get its token", function()
    local path, st, key = seed_store(srv)
    local before = srv.stats().token_requests
    local results = run_workers(srv, path, 1, { OM_COROUTINES = "50" })
    assert.equals(before + 1, srv.stats().token_requests)
    assert.equals(0, results[1].rc, results[1].out)
    local saved = st:load(key)
    local lines = {}
    for line in results[1].out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equals(50, #lines)
    for _, line in ipairs(lines) do assert.equals("TOKEN " .. saved.access_token, line) end
  end)

  describe("crash safety", function()
    for _, case in ipairs {
      { fault = "after_token", rc = 77 }, { fault = "before_save", rc = 77 },
      { fault = "during_save", rc = 86 }, { fault = "after_save", rc = 77 },
    } do
      it("a process killed " .. case.fault:gsub("_", " ") .. " leaves a store that opens and serves the next get", function()
        local path, st, key = seed_store(srv)
        local before = st:load(key)
        local s0 = srv.stats()
        local crashed = run_workers(srv, path, 1, { OAUTHMAIL_FAULT = case.fault })
        assert.equals(case.rc, crashed[1].rc, crashed[1].out)
        assert.not_matches("TOKEN", crashed[1].out)
        assert.equals(s0.token_requests + 1, srv.stats().token_requests)   -- the token response did arrive
        -- the file still opens and still holds a refresh token
        local rec, err = store.file { path = path, encryption = { key_command = "echo " .. HEX } }:load(key)
        assert.is_nil(err)
        assert.is_string(rec.refresh_token)
        if case.fault == "after_save" then
          assert.not_equals(before.access_token, rec.access_token)
        else
          assert.same(before, rec)
        end
        local after = run_workers(srv, path, 1)
        assert.equals(0, after[1].rc, after[1].out)
        local final = st:load(key)
        assert.equals("TOKEN " .. final.access_token .. "\n", after[1].out)
        local s2 = srv.stats()
        assert.equals(0, s2.rejected)
        -- after a completed save the next process needs no request at all
        assert.equals(s0.token_requests + (case.fault == "after_save" and 1 or 2), s2.token_requests)
      end)
    end
  end)
end)

describe("tokens against the real oidc-provider (refresh-token rotation)", function()
  local oidc = require "spec.support.oidc"
  local srv, path, offset, trace, manager, seen
  local function clock() return os.time() + offset end
  local function new_manager()
    local cfg = srv.cfg("device", {
      grant = "device_code", trace = trace,
      sleep = function() end,   -- the code is approved before the first poll
      on_device_code = function(info) assert.is_true(srv.device(info.user_code).approved) end,
    })
    return tokens.new {
      flow = cfg, profile = "oidc-test", clock = clock, trace = trace,
      store = store.file { path = path, encryption = { passphrase = "rotation test passphrase", scrypt = { N = 1024 } } },
    }
  end
  local function requests() return srv.stats().token_requests end
  local function remember(tok)
    for _, k in ipairs { "access_token", "refresh_token", "id_token" } do
      if tok[k] then seen[#seen + 1] = tok[k] end
    end
    return tok
  end
  local function stored_now() return remember(assert(manager.store:load(manager.key))) end

  setup(function()
    if not has_http then return end
    srv = oidc.start()
    path = h.tmpdir() .. "/state/tokens.json"
    offset, seen = 0, { srv.secrets.basic, srv.secrets.post, srv.secrets.web }
    trace = h.trace_collector()
    manager = new_manager()
  end)
  teardown(function() if srv then srv.stop() end end)

  local function it_real(name, fn)
    if has_http then it(name, fn) else pending(name .. " (needs oauthmail.http)") end
  end

  it_real("signs in once through the device flow and refuses to do it unasked", function()
    local tok, err = manager:get()
    assert.is_nil(tok)
    assert.matches('run "oauthmail login --profile oidc-test" or call manager:login()', err.message, 1, true)
    local n = requests()
    tok = remember(assert(manager:login()))
    assert.truthy(tok.refresh_token)
    assert.equals(tok.refresh_token, stored_now().refresh_token)
    assert.equals(n + 1, requests())   -- one successful poll
    assert.same(tok, assert(manager:get()))
    assert.same(tok, assert(new_manager():get()))   -- another process: from the file, no request
    assert.equals(n + 1, requests())
  end)

  it_real("refreshes a token that expires within the margin and stores the rotated refresh token", function()
    local old = stored_now()
    offset = old.expires_at - os.time() - 200   -- 200 s left, margin 300
    local n = requests()
    local tok = remember(assert(manager:get()))
    assert.equals(n + 1, requests())
    assert.not_equals(old.access_token, tok.access_token)
    local rec = stored_now()
    assert.equals(tok.access_token, rec.access_token)
    assert.not_equals(old.refresh_token, rec.refresh_token)
    -- served from memory now, and another process takes it from the file
    assert.equals(tok.access_token, assert(manager:get()).access_token)
    assert.equals(tok.access_token, assert(new_manager():get()).access_token)
    assert.equals(n + 1, requests())
  end)

  it_real("refreshes an invalidated token early, with the stored (rotated) refresh token", function()
    offset = 0
    local current = assert(manager:get())
    local before = stored_now()
    local n = requests()
    manager:invalidate(current)
    local tok = remember(assert(manager:get()))
    -- oidc-provider refuses a rotated-away refresh token, so this proves the
    -- stored one was the newest
    assert.equals(n + 1, requests())
    assert.not_equals(current.access_token, tok.access_token)
    assert.not_equals(before.refresh_token, stored_now().refresh_token)
  end)

  it_real("never shows a token, refresh token or secret in traces or errors", function()
    assert.is_true(#trace.events > 5)
    h.assert_no_secrets(trace.text(), seen)
    h.assert_no_secrets(h.read_file(path), seen)
  end)
end)
