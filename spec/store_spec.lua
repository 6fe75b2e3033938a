-- spec/store_spec.lua — the token stores: memory, file (plain and encrypted,
-- every key source), command; and every kind of bad file, each of which must
-- give a clear error naming the file and leave the file exactly as it was.
local core = require "oauthmail.core"
local cjson = require "cjson"
local crypto = require "oauthmail.crypto"
local store = require "oauthmail.store"
local h = require "spec.support.helpers"

local fs = core.fs
local KEY = '["https://issuer.test","client-1","user@example.org","mail.send"]'
local KEY2 = '["https://issuer.test","client-1","other@example.org","mail.send"]'
local FAST = { N = 1024, r = 8, p = 1 }   -- scrypt cost kept low so the suite stays quick

local function record(tag)
  return {
    access_token = "at-secret-" .. tag .. "-0123456789",
    refresh_token = "rt-secret-" .. tag .. "-0123456789",
    token_type = "Bearer", expires_at = 1900000000, scope = "mail.send",
  }
end

local function secrets_of(...)
  local list = {}
  for _, r in ipairs { ... } do
    list[#list + 1] = r.access_token
    list[#list + 1] = r.refresh_token
  end
  return list
end

local HEXKEY = string.rep("0123456789abcdef", 4)
local OTHER_HEXKEY = string.rep("fedcba9876543210", 4)

-- setenv for child processes only; this process reads keys via key_command
-- or key_file where it needs a specific value.
local function file_key(dir, text, mode)
  return h.write_file(dir .. "/store.key", text, mode or "600")
end

describe("store.memory", function()
  it("round-trips records by copy", function()
    local s = store.new()
    assert.is_nil(s:load(KEY))
    local r = record("m")
    assert.is_true(s:save(KEY, r))
    r.access_token = "changed"
    local got = s:load(KEY)
    assert.equals("at-secret-m-0123456789", got.access_token)
    got.access_token = "changed again"
    assert.equals("at-secret-m-0123456789", s:load(KEY).access_token)
    assert.is_nil(s:load(KEY2))
  end)

  it("reports a lock taken twice in one process", function()
    local s = store.memory()
    local release = assert(s:lock(KEY, 1))
    local again, err = s:lock(KEY, 1)
    assert.is_nil(again)
    assert.equals("busy", err.reason)
    assert.truthy(s:lock(KEY2, 1))
    release()
    release()
    assert.truthy(s:lock(KEY, 1))
  end)
end)

describe("store.new", function()
  it("builds stores from specs and accepts custom ones", function()
    assert.equals("memory", store.new { kind = "memory" }.kind)
    assert.equals("file", store.new { kind = "file", path = "/tmp/x/t.json" }.kind)
    assert.equals("command", store.new { kind = "command", get = "true", put = "true" }.kind)
    local custom = { load = function() end, save = function() end, lock = function() end }
    assert.equals(custom, store.new(custom))
  end)

  it("raises on configuration mistakes", function()
    assert.has_error(function() store.new { kind = "redis" } end)
    assert.has_error(function() store.new "file" end)
    assert.has_error(function() store.file {} end)
    assert.has_error(function() store.file { path = "/tmp/t.json", encryption = {} } end)
    assert.has_error(function() store.file { path = "/tmp/t.json", encryption = { key_env = "A", key_file = "/k" } } end)
    assert.has_error(function() store.file { path = "/tmp/t.json", encryption = { keyenv = "A" } } end)
    assert.has_error(function() store.command { get = "true" } end)
  end)

  -- review finding 3: a misspelt option must not silently drop encryption
  it("refuses unknown options of every kind, naming the closest known one", function()
    local function raises(spec, pattern)
      local ok, msg = pcall(store.new, spec)
      assert.is_false(ok)
      assert.matches(pattern, tostring(msg), 1, true)
    end
    raises({ kind = "file", path = "/tmp/x/t.json", encrypton = { key_env = "K" } },
      "store.file: unknown option 'encrypton' (did you mean 'encryption'?)")
    raises({ kind = "file", path = "/tmp/x/t.json", lock_timout = 3 }, "did you mean 'lock_timeout'?")
    raises({ kind = "file", path = "/tmp/x/t.json", create_dir = "no" }, "store.file: 'create_dir' must be a boolean")
    raises({ kind = "file", path = "/tmp/x/t.json", encryption = { key_evn = "K" } },
      "store encryption: unknown option 'key_evn' (did you mean 'key_env'?)")
    raises({ kind = "file", path = "/tmp/x/t.json", encryption = { passphrase = "p", scrypt = { n = 1024 } } },
      "did you mean 'N'?")
    raises({ kind = "file", path = "/tmp/x/t.json", encryption = { passphrase = "p", scrypt = { N = 2 ^ 24 } } },
      "store encryption: scrypt 'N' must be a power of two from 2 to 131072")
    raises({ kind = "command", get = "true", put = "true", lockdir = "/run" },
      "store.command: unknown option 'lockdir' (did you mean 'lock_dir'?)")
    raises({ kind = "command", get = "true", put = "true", lock_timeout = "5" }, "'lock_timeout' must be a number")
    raises({ kind = "command", get = "true", put = "true", timeout = "5" }, "'timeout' must be a number")
    for _, bad in ipairs { 0, -1, 0 / 0, 1 / 0, 86401 } do
      raises({ kind = "command", get = "true", put = "true", timeout = bad },
        "store.command: 'timeout' must be a number of seconds greater than 0 and at most 86400")
      raises({ kind = "file", path = "/tmp/x/t.json", encryption = { key_command = "true", command_timeout = bad } },
        "store encryption: 'command_timeout' must be a number of seconds greater than 0 and at most 86400")
    end
    raises({ kind = "file", path = "/tmp/x/t.json", encryption = { key_env = "K", command_timeout = 5 } },
      "store encryption: 'command_timeout' applies to key_command and passphrase_command only")
    raises({ kind = "memory", path = "/tmp/x" }, "store.memory: unknown option 'path'")
    assert.has_error(function() store.file { path = "/tmp/x/t.json", encrypton = {} } end)
  end)

  it("makes a misspelt store option a config error of oauthmail.new", function()
    local oauthmail = require "oauthmail"
    local dir = h.tmpdir()
    local m, err = oauthmail.new {
      provider = "microsoft", tenant = "contoso.onmicrosoft.com", client_id = "c", client_secret = "s",
      user = "u@contoso.com",
      store = { kind = "file", path = dir .. "/t.json", encrypton = { key_env = "K" } },
    }
    assert.is_nil(m)
    assert.equals("config", err.kind)
    assert.matches("unknown option 'encrypton' (did you mean 'encryption'?)", err.message, 1, true)
    assert.is_nil(fs.stat(dir .. "/t.json"))
  end)
end)

describe("store.file", function()
  it("keeps many accounts in one versioned JSON file, 0600 in a new 0700 folder", function()
    local dir = h.tmpdir() .. "/state/oauthmail"
    local path = dir .. "/tokens.json"
    local s = store.file { path = path }
    assert.is_nil(s:load(KEY))  -- no folder, no file: simply no token yet
    local release = assert(s:lock(KEY, 1))
    assert.is_true(s:save(KEY, record("a")))
    assert.is_true(s:save(KEY2, record("b")))
    release()
    assert.equals(tonumber("700", 8), fs.stat(dir).mode)
    assert.equals(tonumber("600", 8), fs.stat(path).mode)
    local env = cjson.decode(h.read_file(path))
    assert.equals("oauthmail-tokens", env.format)
    assert.equals(1, env.version)
    assert.equals("rt-secret-a-0123456789", env.accounts[KEY].refresh_token)
    local again = store.file { path = path }
    assert.same(record("a"), again:load(KEY))
    assert.same(record("b"), again:load(KEY2))
    assert.same({ KEY2, KEY }, again:list())  -- sorted
    assert.is_true(again:save(KEY2, nil))
    assert.is_nil(again:load(KEY2))
    assert.same(record("a"), again:load(KEY))
  end)

  it("locks through a sidecar file, with a deadline", function()
    local path = h.tmpdir() .. "/tokens.json"
    local s1, s2 = store.file { path = path }, store.file { path = path }
    local release = assert(s1:lock(KEY, 1))
    local r2, err = s2:lock(KEY, 0.2)
    assert.is_nil(r2)
    assert.equals("timeout", err.reason)
    assert.matches("timed out after 0.2 s waiting for lock on " .. path .. ".lock", err.message, 1, true)
    release()
    assert.truthy(s2:lock(KEY, 0.2))
  end)

  describe("encrypted at rest", function()
    local function roundtrip(enc, env)
      local dir = h.tmpdir()
      local path = dir .. "/tokens.json"
      local s = store.file { path = path, encryption = enc(dir) }
      local r = record("enc")
      assert.is_true(s:save(KEY, r))
      local text = h.read_file(path)
      h.assert_no_secrets(text, secrets_of(r))
      local envelope = cjson.decode(text)
      assert.equals("aes-256-gcm", envelope.encryption.cipher)
      assert.is_nil(envelope.accounts)
      assert.same(r, store.file { path = path, encryption = enc(dir) }:load(KEY))
      if env then assert.equals(env, envelope.encryption.kdf) end
      return path, envelope
    end

    it("takes the key from a key file (hex, base64 or raw bytes)", function()
      roundtrip(function(dir) return { key_file = file_key(dir, HEXKEY .. "\n") } end, "none")
      roundtrip(function(dir) return { key_file = file_key(dir, crypto.b64encode(string.rep("k", 32))) } end)
      roundtrip(function(dir) return { key_file = file_key(dir, string.rep("\1", 32)) } end)
    end)

    it("takes the key from a command's output", function()
      roundtrip(function() return { key_command = "echo " .. HEXKEY } end, "none")
    end)

    it("stops a key or passphrase command that overruns command_timeout", function()
      for _, source in ipairs { "key_command", "passphrase_command" } do
        local path = h.tmpdir() .. "/tokens.json"
        local st = store.file { path = path, encryption = { [source] = "echo " .. HEXKEY .. "; sleep 30",
          command_timeout = 0.2, scrypt = FAST } }
        local ok, err = st:save(KEY, record("k"))
        assert.is_nil(ok)
        assert.equals("key", err.reason)
        assert.equals((source == "key_command" and "key" or "passphrase") .. " command failed: it did not finish "
          .. "within 0.2 s and was stopped (the encryption option 'command_timeout') (for token file " .. path .. ")",
          err.message)
        h.assert_no_secrets(tostring(err), { HEXKEY })
        assert.is_nil(h.read_file(path))
      end
    end)

    it("takes the key from an environment variable", function()
      local var = "HOME"  -- any set variable: here one that is not a key, to see the refusal
      local path = h.tmpdir() .. "/t.json"
      local ok, err = store.file { path = path, encryption = { key_env = var } }:save(KEY, record("x"))
      assert.is_nil(ok)
      assert.matches("environment variable HOME does not hold a 256-bit key", err.message, 1, true)
      ok, err = store.file { path = path, encryption = { key_env = "OAUTHMAIL_SPEC_UNSET_VAR" } }:save(KEY, record("x"))
      assert.is_nil(ok)
      assert.matches("OAUTHMAIL_SPEC_UNSET_VAR", err.message, 1, true)
      assert.matches("is not set", err.message, 1, true)
      -- and a child process with the variable set reads its own file back
      local script = h.tmpdir() .. "/env.lua"
      h.write_file(script, [[
        local s = require("oauthmail.store").file { path = arg[1], encryption = { key_env = "OM_SPEC_KEY" } }
        assert(s:save("k", { access_token = "child-token-123456" }))
        io.write(assert(require("oauthmail.store").file { path = arg[1], encryption = { key_env = "OM_SPEC_KEY" } }:load("k")).access_token)
      ]])
      local okc, out = h.exec("OM_SPEC_KEY=" .. HEXKEY .. " " .. h.lua_bin .. " " .. h.quote(script) .. " " .. h.quote(path))
      assert.is_true(okc, out)
      assert.equals("child-token-123456", out)
      h.assert_no_secrets(h.read_file(path), { "child-token-123456" })
    end)

    it("derives the key from a passphrase with scrypt", function()
      local _, envelope = roundtrip(function() return { passphrase = "correct horse battery", scrypt = FAST } end, "scrypt")
      assert.equals(1024, envelope.encryption.N)
      assert.truthy(crypto.b64decode(envelope.encryption.salt))
      roundtrip(function() return { passphrase_command = "printf 'from-pass-manager\\nurl: x\\n'", scrypt = FAST } end)
    end)
  end)

  describe("refuses bad files with a clear error and leaves them as they are", function()
    -- Each case: make a bad file, then check that load and save both fail
    -- naming the file, that the bytes did not change, and that no secret leaks.
    local function refused(path, s, pattern, reason)
      local before = h.read_file(path)
      local got, err = s:load(KEY)
      assert.is_nil(got)
      assert.equals("store", err.kind)
      if reason then assert.equals(reason, err.reason) end
      assert.matches(path, err.message, 1, true)
      assert.matches(pattern, err.message, 1, true)
      local ok, serr = s:save(KEY, record("new"))
      assert.is_nil(ok)
      assert.equals(err.message, serr.message)
      assert.equals(before, h.read_file(path))
      h.assert_no_secrets(tostring(err), secrets_of(record("old"), record("new")))
      h.assert_no_secrets(tostring(err), { HEXKEY, OTHER_HEXKEY })
      return err
    end

    local function encrypted_store(dir, hex)
      return store.file { path = dir .. "/tokens.json", encryption = { key_command = "echo " .. (hex or HEXKEY) } }
    end

    it("truncated JSON", function()
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      local text = h.read_file(s.path)
      h.write_file(s.path, text:sub(1, #text - 20), "600")
      refused(s.path, s, "is not valid JSON", "corrupt")
    end)

    it("a wrong key", function()
      local dir = h.tmpdir()
      assert(encrypted_store(dir):save(KEY, record("old")))
      refused(dir .. "/tokens.json", encrypted_store(dir, OTHER_HEXKEY), "wrong key, or the file was modified", "decrypt")
    end)

    it("a wrong passphrase", function()
      local dir = h.tmpdir()
      local path = dir .. "/tokens.json"
      assert(store.file { path = path, encryption = { passphrase = "right passphrase", scrypt = FAST } }:save(KEY, record("old")))
      refused(path, store.file { path = path, encryption = { passphrase = "wrong passphrase" } }, "wrong key", "decrypt")
    end)

    it("a passphrase where the file was sealed with a key", function()
      local dir = h.tmpdir()
      assert(encrypted_store(dir):save(KEY, record("old")))
      refused(dir .. "/tokens.json", store.file { path = dir .. "/tokens.json", encryption = { passphrase = "pw" } },
        "is encrypted with a key, but the store is configured with a passphrase", "key")
    end)

    it("an encrypted file opened without a key", function()
      local dir = h.tmpdir()
      assert(encrypted_store(dir):save(KEY, record("old")))
      refused(dir .. "/tokens.json", store.file { path = dir .. "/tokens.json" }, "no encryption key configured", "key")
    end)

    it("one flipped ciphertext byte", function()
      local dir = h.tmpdir()
      local s = encrypted_store(dir)
      assert(s:save(KEY, record("old")))
      local env = cjson.decode(h.read_file(s.path))
      local blob = crypto.b64decode(env.data)
      local i = 20
      blob = blob:sub(1, i - 1) .. string.char((blob:byte(i) + 1) % 256) .. blob:sub(i + 1)
      env.data = crypto.b64encode(blob)
      h.write_file(s.path, cjson.encode(env), "600")
      refused(s.path, encrypted_store(dir), "wrong key, or the file was modified", "decrypt")
    end)

    it("a modified encryption header", function()
      local dir = h.tmpdir()
      local path = dir .. "/tokens.json"
      local enc = { passphrase = "pw-0123", scrypt = FAST }
      assert(store.file { path = path, encryption = enc }:save(KEY, record("old")))
      local env = cjson.decode(h.read_file(path))
      env.encryption.p = 2
      h.write_file(path, cjson.encode(env), "600")
      refused(path, store.file { path = path, encryption = enc }, "wrong key, or the file was modified", "decrypt")
    end)

    it("a token file readable by others", function()
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      h.exec("chmod 644 " .. h.quote(s.path))
      refused(s.path, s, "is accessible by others (mode 0644); run chmod 600 " .. s.path, "permissions")
      assert.equals(tonumber("644", 8), fs.stat(s.path).mode)
    end)

    it("a folder writable by others", function()
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      h.exec("chmod 777 " .. h.quote(dir))
      refused(s.path, s, "is writable by others (mode 0777); run chmod 700 " .. dir, "permissions")
      local lk, err = s:lock(KEY, 0.1)
      assert.is_nil(lk)
      assert.matches("writable by others", err.message, 1, true)
    end)

    it("a key file readable by others", function()
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json", encryption = { key_file = file_key(dir, HEXKEY) } }
      assert(s:save(KEY, record("old")))
      h.exec("chmod 640 " .. h.quote(dir .. "/store.key"))
      local s2 = store.file { path = dir .. "/tokens.json", encryption = { key_file = dir .. "/store.key" } }
      local err = refused(s.path, s2, "key file " .. dir .. "/store.key is accessible by others (mode 0640)", "permissions")
      assert.matches("(for token file " .. s.path .. ")", err.message, 1, true)
    end)

    it("a file from a future format version", function()
      local dir = h.tmpdir()
      local path = h.write_file(dir .. "/tokens.json",
        cjson.encode { format = "oauthmail-tokens", version = 2, accounts = {}, shards = { "x" } }, "600")
      refused(path, store.file { path = path }, "has format version 2, newer than this oauthmail understands (1)", "version")
    end)

    -- issue 12 defect 8: a version that is not a small whole number
    for _, v in ipairs { "1.5", "1e300", "-1", "0.5" } do
      it("a format version of " .. v, function()
        local dir = h.tmpdir()
        local path = h.write_file(dir .. "/tokens.json", '{"format":"oauthmail-tokens","version":' .. v .. ',"accounts":{}}', "600")
        local s = store.file { path = path }
        local ok, got, err = pcall(s.load, s, KEY)
        assert.is_true(ok, tostring(got))
        assert.is_nil(got)
        assert.equals("store", err.kind)
        refused(path, s, "has an invalid format version", "corrupt")
      end)
    end

    it("a file that is not a token file", function()
      local dir = h.tmpdir()
      local path = h.write_file(dir .. "/tokens.json", '{"hello": "world"}', "600")
      refused(path, store.file { path = path }, "is not an oauthmail token file", "corrupt")
    end)

    -- review finding 2: a damaged header must be refused before scrypt runs,
    -- never raise and never spend minutes or gigabytes on a tampered cost
    for _, case in ipairs {
      { "N with a fraction", { N = 1024.5 } },
      { "N as a string", { N = "big" } },
      { "a cost far beyond what oauthmail writes", { N = 16777216, r = 64 } },
      -- issue 12 defect 11: the old ceiling cost 10 s and 1.1 GB per process
      { "the old ceiling N = 2^20, r = 8, p = 4", { N = 1048576, r = 8, p = 4 } },
      { "N = 2^18 (8 times what oauthmail writes)", { N = 262144 } },
      { "p = 4 at the written N", { p = 4 } },
      { "r of zero", { r = 0 } },
      { "p too large", { p = 1000 } },
      { "N not a power of two", { N = 1000 } },
      { "a salt that is not a string", { salt = 12345 } },
      { "a missing salt", { salt = cjson.null } },
    } do
      it("a damaged encryption header: " .. case[1], function()
        local dir = h.tmpdir()
        local path = dir .. "/tokens.json"
        local enc = { passphrase = "pw-0123", scrypt = FAST }
        assert(store.file { path = path, encryption = enc }:save(KEY, record("old")))
        local env = cjson.decode(h.read_file(path))
        for k, v in pairs(case[2]) do env.encryption[k] = v end
        h.write_file(path, cjson.encode(env), "600")
        local s = store.file { path = path, encryption = enc }
        local ok, got, err = pcall(s.load, s, KEY)
        assert.is_true(ok, tostring(got))
        assert.is_nil(got)
        assert.equals("corrupt", err.reason)
        refused(path, s, "has a damaged encryption header", "corrupt")
      end)
    end

    it("a damaged header of a file sealed with a key (no scrypt fields allowed)", function()
      local dir = h.tmpdir()
      local s = encrypted_store(dir)
      assert(s:save(KEY, record("old")))
      local env = cjson.decode(h.read_file(s.path))
      env.encryption.N = 1024.5
      h.write_file(s.path, cjson.encode(env), "600")
      local ok = pcall(s.load, s, KEY)
      assert.is_true(ok)
      refused(s.path, encrypted_store(dir), "has a damaged encryption header", "corrupt")
    end)

    it("a parent folder writable by others (checked up to $HOME or /, as ssh does)", function()
      local top = h.tmpdir()
      local open_dir = top .. "/shared"
      local dir = open_dir .. "/mine"
      assert(fs.mkdir_private(dir))
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      h.exec("chmod 777 " .. h.quote(open_dir))
      refused(s.path, s, "folder " .. open_dir .. " above token file " .. s.path
        .. " is writable by others (mode 0777)", "permissions")
      -- a sticky world-writable parent (like /tmp) cannot be used to swap our folder
      h.exec("chmod 1777 " .. h.quote(open_dir))
      assert.same(record("old"), s:load(KEY))
    end)

    it("a token file that is a symbolic link (checked on the descriptor read, no stat-then-open window)", function()
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      h.exec("mv " .. h.quote(s.path) .. " " .. h.quote(dir .. "/real.json") .. " && ln -s real.json "
        .. h.quote(s.path))
      refused(s.path, s, "is a symbolic link", "link")
    end)

    it("a folder or file that belongs to another user", function()
      if fs.uid() ~= 0 then pending("needs root to give a folder to another user") return end
      local dir = h.tmpdir()
      local s = store.file { path = dir .. "/tokens.json" }
      assert(s:save(KEY, record("old")))
      h.exec("chown 65534 " .. h.quote(dir))
      refused(s.path, s, "folder " .. dir .. " of token file " .. s.path .. " belongs to another user (uid 65534)",
        "permissions")
      local lk, err = s:lock(KEY, 0.1)
      assert.is_nil(lk)
      assert.equals("permissions", err.reason)
      h.exec("chown 0 " .. h.quote(dir) .. " && chown 65534 " .. h.quote(s.path))
      refused(s.path, s, "token file " .. s.path .. " belongs to another user (uid 65534)", "permissions")
    end)

    it("a missing folder when creating folders is off", function()
      local dir = h.tmpdir() .. "/not-there"
      local s = store.file { path = dir .. "/tokens.json", create_dir = false }
      local ok, err = s:save(KEY, record("new"))
      assert.is_nil(ok)
      assert.matches("folder " .. dir .. " of token file " .. dir .. "/tokens.json does not exist", err.message, 1, true)
      local lk, lerr = s:lock(KEY, 0.1)
      assert.is_nil(lk)
      assert.equals(err.message, lerr.message)
      assert.is_nil(fs.stat(dir))
    end)
  end)
end)

describe("store.command", function()
  -- A toy secret manager: one file per account, named by the key id.
  local function manager(dir)
    return store.command {
      get = "cat " .. h.quote(dir) .. "/$OAUTHMAIL_STORE_KEY_ID 2>/dev/null || true",
      put = "cat > " .. h.quote(dir) .. "/$OAUTHMAIL_STORE_KEY_ID",
      lock_dir = dir,
    }
  end

  it("gets and puts records through the commands", function()
    local dir = h.tmpdir()
    local s = manager(dir)
    assert.is_nil(s:load(KEY))
    assert.is_true(s:save(KEY, record("c")))
    assert.same(record("c"), s:load(KEY))
    assert.is_nil(s:load(KEY2))
    assert.truthy(h.read_file(dir .. "/" .. s.key_id(KEY)))
    local release = assert(s:lock(KEY, 1))
    local l2, err = manager(dir):lock(KEY, 0.1)
    assert.is_nil(l2)
    assert.equals("timeout", err.reason)
    release()
  end)

  -- review finding 6: JSON null in a record is an absent field, not a userdata
  it("reads JSON null fields as absent", function()
    local s = store.command { get = [[printf '%s' '{"access_token":"x-at","expires_at":null,"scope":null}']],
      put = "cat >/dev/null", lock_dir = h.tmpdir() }
    local got = assert(s:load(KEY))
    assert.same({ access_token = "x-at" }, got)
    local dir = h.tmpdir()
    local path = h.write_file(dir .. "/tokens.json", cjson.encode {
      format = "oauthmail-tokens", version = 1,
      accounts = { [KEY] = { access_token = "f-at", expires_at = cjson.null } } }, "600")
    assert.same({ access_token = "f-at" }, store.file { path = path }:load(KEY))
  end)

  -- review finding 10: no predictable shared lock path
  it("refuses a lock folder that others can write or that belongs to another user", function()
    local dir = h.tmpdir()
    h.exec("chmod 777 " .. h.quote(dir))
    local s = manager(dir)
    local lk, err = s:lock(KEY, 0.1)
    assert.is_nil(lk)
    assert.equals("store", err.kind)
    assert.equals("permissions", err.reason)
    assert.matches("lock folder " .. dir .. " is writable by others (mode 0777); run chmod 700 " .. dir,
      err.message, 1, true)
    h.exec("chmod 1777 " .. h.quote(dir))
    assert.is_nil((manager(dir):lock(KEY, 0.1)))
    if fs.uid() == 0 then
      local other = h.tmpdir()
      h.exec("chown 65534 " .. h.quote(other))
      lk, err = manager(other):lock(KEY, 0.1)
      assert.is_nil(lk)
      assert.matches("lock folder " .. other .. " belongs to another user (uid 65534)", err.message, 1, true)
    end
  end)

  it("keeps its locks in a private per-user folder by default", function()
    local function lock_in_child(env)
      local code = [[
        local s = require("oauthmail.store").command { get = "true", put = "cat >/dev/null" }
        local release, err = s:lock("acct", 1)
        if not release then print("ERR " .. tostring(err)) os.exit(1) end
        release()
        print("OK " .. s.key_id("acct"))]]
      local ok, out = h.exec(env .. " " .. h.lua_bin .. " -e " .. h.quote(code))
      assert(ok, out)
      return out:match("OK (%x+)")
    end
    local home = h.tmpdir()
    local id = lock_in_child("env -u XDG_RUNTIME_DIR HOME=" .. h.quote(home))
    local locks = home .. "/.cache/oauthmail/locks"
    assert.equals(tonumber("700", 8), fs.stat(locks).mode)
    assert.equals("file", fs.stat(locks .. "/oauthmail-" .. id .. ".lock").type)
    local run = h.tmpdir()
    lock_in_child("env XDG_RUNTIME_DIR=" .. h.quote(run) .. " HOME=" .. h.quote(home))
    assert.equals(tonumber("700", 8), fs.stat(run .. "/oauthmail").mode)
    assert.equals("file", fs.stat(run .. "/oauthmail/oauthmail-" .. id .. ".lock").type)
  end)

  -- Commands run as children waited on through oauthmail.wait (the ticker
  -- scenarios are in spec/loop_spec.lua and the adapters' specs); each has
  -- a deadline, after which it is stopped with everything it started.
  it("stops a command that overruns its timeout, with what it started, and says which option", function()
    local r = record("t")
    local dir = h.tmpdir()
    local pidfile = dir .. "/sleeper.pid"
    -- the command prints a secret, starts a pipeline, then hangs
    local hung = store.command { get = "echo " .. r.access_token .. "; (sleep 30 | cat) & echo $! > "
      .. h.quote(pidfile) .. "; wait", put = "sleep 30", timeout = 0.3, lock_dir = dir }
    local t0 = h.now()
    local got, err = hung:load(KEY)
    assert.is_nil(got)
    assert.equals("timeout", err.reason)
    assert.equals("command store: get command: it did not finish within 0.3 s and was stopped "
      .. "(the store's 'timeout' option)", err.message)
    local ok, perr = hung:save(KEY, r)
    assert.is_nil(ok)
    assert.equals("command store: put command: it did not finish within 0.3 s and was stopped "
      .. "(the store's 'timeout' option)", perr.message)
    assert.truthy(h.now() - t0 < 10)
    h.assert_no_secrets(tostring(err) .. tostring(perr), secrets_of(r))
    -- with no controlling terminal (a service, CI) the command leads a process
    -- group of its own, and the whole group is stopped
    local tty = io.open("/dev/tty")
    if tty then
      tty:close()
    else
      -- its parent killed, the pipeline is init's to reap: a zombie counts as gone
      local pid = assert(tonumber(h.read_file(pidfile):match("%d+")))
      local function running()
        local stat = h.read_file("/proc/" .. pid .. "/stat")
        local state = stat and stat:match("^%d+ %b() (%a)")
        return state ~= nil and state ~= "Z" and state ~= "X"
      end
      local gone = false
      for _ = 1, 300 do
        if not running() then gone = true break end
        h.sleep(0.01)
      end
      assert.is_true(gone, "the command's background pipeline is still running")
    end
  end)

  it("kills and reaps a command whose process object is collected while it runs", function()
    local sys = require "oauthmail.sys"
    local pidfile = h.tmpdir() .. "/sh.pid"
    local p = assert(sys.proc.spawn("echo $$ > " .. h.quote(pidfile) .. "; sleep 30", {}, "r"))
    local pid
    for _ = 1, 500 do
      pid = tonumber((h.read_file(pidfile) or ""):match("%d+"))
      if pid then break end
      h.sleep(0.01)
    end
    assert.truthy(pid, "the command did not start")
    assert.is_false(p:exit())
    p = nil   -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    -- kill -0 succeeds on a zombie too: failing means killed and reaped
    assert.is_false((h.exec("kill -0 " .. pid)))
    assert.has_error(function() sys.proc.spawn("true", {}, "x") end)
    assert.has_error(function() sys.proc.spawn("true", { "NOEQUALS" }, "r") end)
    assert.has_error(function() sys.proc.spawn("true", { "=x" }, "r") end)
    local w = assert(sys.proc.spawn("cat >/dev/null", {}, "w"))
    assert.has_error(function() w:read() end)
    w:close_pipe()
  end)

  it("reports the exit of a command killed by a signal as the shell does", function()
    local s = store.command { get = "kill -9 $$", put = "kill -15 $$", lock_dir = h.tmpdir() }
    local _, err = s:load(KEY)
    assert.equals("command store: get command exited with status 137", err.message)
    local _, perr = s:save(KEY, record("s"))
    assert.equals("command store: put command exited with status 143", perr.message)
  end)

  -- nginx's workers reap every child in their SIGCHLD handler (waitpid(-1)),
  -- so waitpid on ours fails; a process that ignores SIGCHLD has its
  -- children reaped for it the same way. The exit status must still be
  -- the command's (here the ignoring is inherited from perl through exec).
  it("knows a command's exit status when the host reaps children itself", function()
    local code = [[
      local shell = require "oauthmail.store.shell"
      print("CAPTURE", shell.capture("echo out; exit 3"))
      print("FEED", shell.feed("cat >/dev/null; exit 4", "input"))
      print("OK", shell.capture("true"))]]
    local ok, out = h.exec("perl -e '$SIG{CHLD} = \"IGNORE\"; exec @ARGV' " .. h.lua_bin .. " -e " .. h.quote(code))
    assert.is_true(ok, out)
    assert.matches("CAPTURE\tout\n\t3", out)
    assert.matches("FEED\t4", out)
    assert.matches("OK\t\t0", out)
  end)

  -- A command that exits without reading its input closed the pipe: writing
  -- on through io.popen raised SIGPIPE, which ended a host that had not
  -- ignored it (a plain lua process, here a child so the suite survives).
  it("survives a put command that exits without reading a large record", function()
    local code = [[
      local shell = require "oauthmail.store.shell"
      print("RC", shell.feed("exit 5", string.rep("x", 4 * 1024 * 1024)))]]
    local ok, out, rc = h.exec(h.lua_bin .. " -e " .. h.quote(code))
    assert.is_true(ok, "the Lua process ended with status " .. tostring(rc) .. ": " .. out)
    assert.matches("RC\t5", out)
  end)

  it("passes the account in the environment and reads long output whole", function()
    local s = store.command {
      get = [[printf '{"access_token":"%s","scope":"%s"}' "$OAUTHMAIL_STORE_KEY_ID" "$(printf '%0300000d' 0 | tr 0 a)"]],
      put = "true", lock_dir = h.tmpdir(),
    }
    local got = assert(s:load(KEY))
    assert.equals(s.key_id(KEY), got.access_token)
    assert.equals(string.rep("a", 300000), got.scope)
    local big = store.command { get = "head -c 2000000 /dev/zero", put = "true", lock_dir = h.tmpdir() }
    local _, err = big:load(KEY)
    assert.equals("command store: get command: the command printed more than 1048576 bytes", err.message)
  end)

  it("reports failing commands and bad output without showing the output", function()
    local r = record("c")
    local failing = store.command { get = "echo " .. r.access_token .. "; exit 3", put = "cat >/dev/null; exit 4" }
    local got, err = failing:load(KEY)
    assert.is_nil(got)
    assert.equals("command store: get command exited with status 3", err.message)
    local ok, perr = failing:save(KEY, r)
    assert.is_nil(ok)
    assert.equals("command store: put command exited with status 4", perr.message)
    local garbage = store.command { get = "echo not-json-" .. r.refresh_token, put = "true" }
    got, err = garbage:load(KEY)
    assert.is_nil(got)
    assert.equals("corrupt", err.reason)
    h.assert_no_secrets(tostring(err) .. tostring(perr), secrets_of(r))
  end)
end)
