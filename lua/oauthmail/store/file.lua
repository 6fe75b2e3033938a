-- oauthmail.store.file — many accounts' tokens in one file: a versioned JSON
-- envelope, optionally sealed with AES-256-GCM, replaced atomically, guarded
-- by flock on a sidecar file. A file it cannot read with certainty (damaged,
-- wrongly keyed, too open, from a newer version) is an error and is never
-- rewritten: every save re-reads the file and gives up if that read fails.
local cjson = require("cjson.safe").new()
local errors = require "oauthmail.errors"
local store_mod = require "oauthmail.store"
-- crypto (and with it OpenSSL) and keysource load only for an encrypted
-- file: a plain token file is read without them (a cached `oauthmail token`)
local function crypto() return require "oauthmail.crypto" end
local function keysource() return require "oauthmail.store.keysource" end

local fs = require "oauthmail.fs"  -- core.fs plus the waiting lock

local M = {}
M.__index = M

M.FORMAT = "oauthmail-tokens"
M.VERSION = 1
M.CIPHER = "aes-256-gcm"
local MAX_FILE = 4 * 1024 * 1024

-- TEST HOOK (spec/support/token_worker.lua only): "during_save" makes the
-- next write end the process half-way through the temp file. nil in production.
M._test_fault = nil

local function fail(message, reason, extra)
  local f = extra or {}
  f.reason = reason
  return errors.fail("store", message, f)
end

local function dirname(path)
  local d = path:match("^(.*)/[^/]*$")
  if d == nil then return "." end
  if d == "" then return "/" end
  return d
end

local function octal(mode) return string.format("%04o", mode) end

local function group_other(mode) return mode % 64 end
local writable_by_others = store_mod.writable_by_others

local FIELDS = { kind = "string", path = "string", encryption = "table", lock_timeout = "number", create_dir = "boolean" }

function M.new(opts)
  if type(opts) ~= "table" then error("store.file: options must be a table", 2) end
  require("oauthmail.store").check_options("store.file", opts, FIELDS, 2)
  if type(opts.path) ~= "string" or opts.path == "" then error("store.file: 'path' must be a non-empty string", 2) end
  if opts.encryption ~= nil then keysource().check(opts.encryption) end
  local path = opts.path
  local home = os.getenv("HOME")
  if path:sub(1, 2) == "~/" and home then path = home .. path:sub(2) end
  return setmetatable({
    kind = "file",
    path = path,
    dir = dirname(path),
    lock_path = path .. ".lock",
    encryption = opts.encryption,
    lock_timeout = opts.lock_timeout or 30,
    create_dir = opts.create_dir ~= false,
    keys = {},   -- derived keys by salt, so scrypt runs once per process and salt
  }, M)
end

function M:describe() return "token file " .. self.path end

local function sticky(mode) return math.floor(mode / 512) % 2 == 1 end

-- The folders above the token file's own, up to $HOME (included) or /, as
-- ssh checks them: owned by us or root, and nobody else may rename entries in
-- them, unless the sticky bit stops that (as on /tmp).
function M:check_parents()
  local home = (os.getenv("HOME") or ""):gsub("/+$", "")
  local dir = self.dir
  while dir ~= "/" and dir ~= "." and dir ~= home do
    dir = dirname(dir)
    local st, err = fs.stat(dir)
    if not st then return fail("folder " .. dir .. " above token file " .. self.path .. ": " .. err.message, err.reason) end
    if st.uid ~= 0 and st.uid ~= fs.uid() then
      return fail(string.format("folder %s above token file %s belongs to another user (uid %d)",
        dir, self.path, st.uid), "permissions")
    end
    if writable_by_others(st.mode) and not sticky(st.mode) then
      return fail(string.format("folder %s above token file %s is writable by others (mode %s); run chmod go-w %s",
        dir, self.path, octal(st.mode), dir), "permissions")
    end
  end
  return true
end

-- The token file itself, from stat or from the descriptor read_file used.
function M:check_file(st)
  if st.type ~= nil and st.type ~= "file" then
    return fail("token file " .. self.path .. " is not a regular file", "permissions")
  end
  if st.uid ~= fs.uid() then
    return fail("token file " .. self.path .. " belongs to another user (uid " .. st.uid .. ")", "permissions")
  end
  if group_other(st.mode) ~= 0 then
    return fail(string.format("token file %s is accessible by others (mode %s); run chmod 600 %s",
      self.path, octal(st.mode), self.path), "permissions")
  end
  return true
end

-- Like ssh: a token file that others can read, or a folder others can write
-- into or that belongs to someone else, is refused rather than trusted.
function M:check_permissions(st)
  local dst, derr = fs.stat(self.dir)
  if not dst then return fail("folder of token file " .. self.path .. ": " .. derr.message, derr.reason) end
  if dst.uid ~= fs.uid() then
    return fail(string.format("folder %s of token file %s belongs to another user (uid %d)",
      self.dir, self.path, dst.uid), "permissions")
  end
  if writable_by_others(dst.mode) then
    return fail(string.format("folder %s of token file %s is writable by others (mode %s); run chmod 700 %s",
      self.dir, self.path, octal(dst.mode), self.dir), "permissions")
  end
  local pok, perr = self:check_parents()
  if not pok then return nil, perr end
  if st then
    return self:check_file(st)
  end
  return true
end

-- The header is authenticated too, so a changed salt or cost is a failed
-- decryption rather than a silently different key. Numbers are formatted as
-- integers: JSON may hand 1024 back as 1024.0 on Lua 5.3+.
local function aad(enc)
  local function int(v) return v and string.format("%d", v) or "" end
  return table.concat({ M.FORMAT, int(M.VERSION), enc.cipher, enc.kdf, enc.salt or "",
    int(enc.N), int(enc.r), int(enc.p) }, "/")
end

-- The 32-byte key for a given envelope's parameters (or for a new file).
function M:key_for(enc)
  local cache_id = enc.kdf .. ":" .. (enc.salt or "")
  if self.keys[cache_id] then return self.keys[cache_id] end
  local want = keysource().kdf(self.encryption)
  if enc.kdf ~= want then
    return fail(string.format("token file %s is encrypted with %s, but the store is configured with %s",
      self.path, enc.kdf == "scrypt" and "a passphrase" or "a key",
      want == "scrypt" and "a passphrase" or "a key"), "key")
  end
  local material, err = keysource().material(self.encryption)
  if not material then
    err.message = err.message .. " (for token file " .. self.path .. ")"
    return nil, err
  end
  local key = material
  if enc.kdf == "scrypt" then
    local salt = crypto().b64decode(enc.salt or "")
    if not salt or #salt < 16 then return fail("token file " .. self.path .. " has a damaged scrypt salt", "corrupt") end
    local kerr
    key, kerr = crypto().scrypt(material, salt, { N = enc.N, r = enc.r, p = enc.p, len = 32 })
    if not key then return fail("token file " .. self.path .. ": " .. kerr.message, "key") end
  end
  self.keys[cache_id] = key
  return key
end

-- read() -> accounts, envelope | {} when there is no file yet | nil, err
function M:read()
  -- read_file refuses a symbolic link or a non-file and reports the fstat of
  -- the descriptor it read, so the permission check concerns exactly these
  -- bytes (no window between a stat by path and the open)
  local text, st = fs.read_file(self.path, MAX_FILE)
  if not text then
    if st.reason == "missing" then return {}, nil end
    return fail("token file " .. self.path .. ": " .. st.message, st.reason)
  end
  local ok, perr = self:check_permissions(st)
  if not ok then return nil, perr end
  local env = cjson.decode(text)
  local function corrupt(what)
    return fail("token file " .. self.path .. " " .. what .. "; it was left as it is", "corrupt")
  end
  if type(env) ~= "table" then return corrupt("is not valid JSON (truncated or damaged?)") end
  if env.format ~= M.FORMAT then return corrupt("is not an oauthmail token file") end
  if type(env.version) ~= "number" then return corrupt("has no format version") end
  -- a whole number of sane size before any %d (1.5 and 1e300 made format raise)
  if env.version ~= math.floor(env.version) or env.version < 1 or env.version > 1000000 then
    return corrupt("has an invalid format version " .. string.format("%.17g", env.version))
  end
  if env.version > M.VERSION then
    return fail(string.format("token file %s has format version %d, newer than this oauthmail understands (%d); "
      .. "upgrade oauthmail or point the store at another file", self.path, env.version, M.VERSION), "version")
  end
  if env.version ~= M.VERSION then return corrupt("has an unknown format version " .. tostring(env.version)) end
  local accounts
  if env.encryption ~= nil then
    local enc = env.encryption
    if type(enc) ~= "table" or enc.cipher ~= M.CIPHER or type(env.data) ~= "string" then
      return corrupt("has a damaged encryption header")
    end
    -- checked before any key derivation: a tampered cost must be refused,
    -- not run (scrypt with a huge N would take minutes and gigabytes)
    if enc.kdf == "scrypt" then
      if type(enc.salt) ~= "string" or keysource().scrypt_problem(enc.N, enc.r, enc.p) then
        return corrupt("has a damaged encryption header")
      end
    elseif enc.kdf ~= "none" or enc.salt ~= nil or enc.N ~= nil or enc.r ~= nil or enc.p ~= nil then
      return corrupt("has a damaged encryption header")
    end
    if not self.encryption then
      return fail("token file " .. self.path .. " is encrypted, but the store has no encryption key configured", "key")
    end
    local key, kerr = self:key_for(enc)
    if not key then return nil, kerr end
    local blob = crypto().b64decode(env.data)
    if not blob then return corrupt("has damaged encrypted data") end
    local plain = crypto().aead_open(key, blob, aad(enc))
    if not plain then
      return fail("cannot decrypt token file " .. self.path .. ": wrong key, or the file was modified; "
        .. "it was left as it is", "decrypt")
    end
    local inner = cjson.decode(plain)
    if type(inner) ~= "table" or type(inner.accounts) ~= "table" then return corrupt("has damaged encrypted content") end
    accounts = inner.accounts
  else
    if type(env.accounts) ~= "table" then return corrupt("has no accounts table") end
    accounts = env.accounts
  end
  for k, v in pairs(accounts) do
    if type(k) ~= "string" or type(v) ~= "table" then return corrupt("has a damaged account entry") end
    store_mod.without_nulls(v)
  end
  return accounts, env
end

function M:write(accounts, old_env)
  local env = { format = M.FORMAT, version = M.VERSION }
  if self.encryption then
    local enc
    local kdf = keysource().kdf(self.encryption)
    local old = old_env and old_env.encryption
    if old and old.kdf == kdf then
      enc = { cipher = M.CIPHER, kdf = kdf, salt = old.salt, N = old.N, r = old.r, p = old.p }
    elseif kdf == "scrypt" then
      local tune = self.encryption.scrypt or keysource().DEFAULT_SCRYPT
      enc = { cipher = M.CIPHER, kdf = kdf, salt = crypto().b64encode(crypto().random(16)),
        N = tune.N or keysource().DEFAULT_SCRYPT.N, r = tune.r or keysource().DEFAULT_SCRYPT.r,
        p = tune.p or keysource().DEFAULT_SCRYPT.p }
    else
      enc = { cipher = M.CIPHER, kdf = "none" }
    end
    local key, err = self:key_for(enc)
    if not key then return nil, err end
    env.encryption = enc
    env.data = crypto().b64encode(crypto().aead_seal(key, cjson.encode({ accounts = accounts }), aad(enc)))
  else
    env.accounts = accounts
  end
  local ok, werr = fs.atomic_write(self.path, cjson.encode(env), 384, M._test_fault)
  if not ok then return fail("token file " .. self.path .. ": " .. werr.message, werr.reason) end
  return true
end

function M:ensure_dir()
  local st = fs.stat(self.dir)
  if st then return true end
  if not self.create_dir then
    return fail("folder " .. self.dir .. " of token file " .. self.path
      .. " does not exist; create it (mode 0700) or set create_dir = true", "missing")
  end
  local ok, err = fs.mkdir_private(self.dir)
  if not ok then return fail("token file " .. self.path .. ": " .. err.message, err.reason) end
  return true
end

function M:load(key)
  local accounts, err = self:read()
  if not accounts then return nil, err end
  return accounts[key]
end

-- Read-modify-write of the whole file; the caller holds the lock. A nil
-- record removes the account.
function M:save(key, record)
  local ok, derr = self:ensure_dir()
  if not ok then return nil, derr end
  local accounts, env = self:read()
  if not accounts then return nil, env end
  accounts[key] = record
  return self:write(accounts, env)
end

function M:lock(_, timeout)
  local ok, derr = self:ensure_dir()
  if not ok then return nil, derr end
  local pok, perr = self:check_permissions(nil)
  if not pok then return nil, perr end
  local lk, err = fs.lock(self.lock_path, { timeout = timeout or self.lock_timeout })
  if not lk then
    if err.reason == "timeout" then
      err.message = err.message .. " (another process is refreshing the token in " .. self.path .. ")"
    end
    return nil, err
  end
  return function() return lk:unlock() end
end

-- accounts() -> list of account keys (for `oauthmail logout` and diagnostics)
function M:list()
  local accounts, err = self:read()
  if not accounts then return nil, err end
  local keys = {}
  for k in pairs(accounts) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

return M
