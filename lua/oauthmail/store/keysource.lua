-- oauthmail.store.keysource — where the key that encrypts a token file comes
-- from: an environment variable, a key file, a command (pass, secret-tool...),
-- or a passphrase stretched with scrypt. Errors name the source, never the key.
local sys = require "oauthmail.sys"
-- crypto (and with it OpenSSL) loads only when a key is used.
local function crypto() return require "oauthmail.crypto" end
local errors = require "oauthmail.errors"
local shell = require "oauthmail.store.shell"

local M = {}

local KEY_SOURCES = { key_env = true, key_file = true, key_command = true }
local PASS_SOURCES = { passphrase = true, passphrase_env = true, passphrase_command = true }
M.DEFAULT_SCRYPT = { N = 32768, r = 8, p = 1 }

local function fail(message, reason)
  return errors.fail("store", message, { reason = reason or "key" })
end

local function hint(reason)
  return reason == "timeout" and " (the encryption option 'command_timeout')" or ""
end

local function unhex(s)
  return (s:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

-- A 256-bit key written as 64 hex digits or base64; a key file may also hold raw bytes.
local function parse_key(text, what, raw_ok)
  if raw_ok and #text == 32 then return text end
  local t = text:gsub("^%s+", ""):gsub("%s+$", "")
  if #t == 64 and t:match("^%x+$") then return unhex(t) end
  local raw = crypto().b64decode(t)
  if raw and #raw == 32 then return raw end
  return fail(what .. " does not hold a 256-bit key (expected 64 hex digits or base64 of 32 bytes)")
end

local function first_line(s) return (s:match("^([^\r\n]*)")) end

-- The scrypt costs oauthmail writes and accepts back from a file: a
-- tampered header must not make scrypt spend seconds or gigabytes before
-- the AEAD tag refuses it. The ceiling is 4 times the default's work
-- (N * r * p) and memory (128 * N * r bytes: 128 MiB, about a second);
-- the old one (N = 2^20, r = 8, p = 4) cost 10 s and 1.1 GB per process.
M.SCRYPT_MAX = { N = 131072, r = 16, p = 2, memory = 128 * 1024 * 1024, work = 4 * 32768 * 8 }

local function integer_in(v, lo, hi)
  return type(v) == "number" and v == math.floor(v) and v >= lo and v <= hi
end

-- scrypt_problem(N, r, p) -> nil when the costs are acceptable, else why not
function M.scrypt_problem(N, r, p)
  local max = M.SCRYPT_MAX
  if not integer_in(N, 2, max.N) then return "'N' must be a power of two from 2 to " .. max.N end
  local n = N
  while n > 1 do
    if n % 2 ~= 0 then return "'N' must be a power of two from 2 to " .. max.N end
    n = n / 2
  end
  if not integer_in(r, 1, max.r) then return "'r' must be an integer from 1 to " .. max.r end
  if not integer_in(p, 1, max.p) then return "'p' must be an integer from 1 to " .. max.p end
  if 128 * N * r > max.memory then return "N * r needs more than 128 MiB of memory" end
  if N * r * p > max.work then return "N * r * p is over 4 times the default cost (" .. max.work .. ")" end
  return nil
end

local ENCRYPTION_FIELDS = {
  key_env = "string", key_file = "string", key_command = "string",
  passphrase = "string", passphrase_env = "string", passphrase_command = "string", scrypt = "table",
  command_timeout = "number",
}

-- check(spec) raises on a malformed configuration, so mistakes show at setup.
function M.check(spec)
  if type(spec) ~= "table" then error("store encryption: expected a table of options", 3) end
  local check_options = require("oauthmail.store").check_options
  check_options("store encryption", spec, ENCRYPTION_FIELDS, 3)
  local n = 0
  for k, v in pairs(spec) do
    if KEY_SOURCES[k] or PASS_SOURCES[k] then
      if v == "" then error("store encryption: '" .. k .. "' must be a non-empty string", 3) end
      n = n + 1
    end
  end
  if n ~= 1 then
    error("store encryption: give exactly one of key_env, key_file, key_command, passphrase, "
      .. "passphrase_env, passphrase_command", 3)
  end
  if spec.command_timeout ~= nil then
    if not (spec.key_command or spec.passphrase_command) then
      error("store encryption: 'command_timeout' applies to key_command and passphrase_command only", 3)
    end
    if not shell.good_timeout(spec.command_timeout) then
      error("store encryption: 'command_timeout' must be a number of seconds greater than 0 and at most 86400", 3)
    end
  end
  if spec.scrypt then
    check_options("store encryption: scrypt", spec.scrypt, { N = "number", r = "number", p = "number" }, 3)
    local d = M.DEFAULT_SCRYPT
    local why = M.scrypt_problem(spec.scrypt.N or d.N, spec.scrypt.r or d.r, spec.scrypt.p or d.p)
    if why then error("store encryption: scrypt " .. why, 3) end
  end
end

-- kind(spec) -> "none" when a key is given directly, "scrypt" for passphrases
function M.kdf(spec)
  for k in pairs(spec) do if PASS_SOURCES[k] then return "scrypt" end end
  return "none"
end

-- Secret material from the configured source: the key itself, or a passphrase.
function M.material(spec)
  if spec.key_env then
    local v = os.getenv(spec.key_env)
    if not v or v == "" then return fail("environment variable " .. spec.key_env .. " (the token file key) is not set") end
    return parse_key(v, "environment variable " .. spec.key_env, false)
  elseif spec.key_file then
    -- a key file may be a link (e.g. into /run/secrets); the mode checked is
    -- the one of the descriptor that was read
    local data, st = sys.fs.read_file(spec.key_file, 4096, { follow = true })
    if not data then return fail("key file: " .. st.message) end
    if st.mode % 64 ~= 0 then
      return fail(string.format("key file %s is accessible by others (mode %04o); run chmod 600 %s",
        spec.key_file, st.mode, spec.key_file), "permissions")
    end
    return parse_key(data, "key file " .. spec.key_file, true)
  elseif spec.key_command then
    local out, rc, reason = shell.capture(spec.key_command, nil, spec.command_timeout)
    if not out then return fail("key command failed: " .. rc .. hint(reason)) end
    if rc ~= 0 then return fail("key command exited with status " .. rc) end
    return parse_key(out, "the output of the key command", false)
  elseif spec.passphrase then
    return spec.passphrase
  elseif spec.passphrase_env then
    local v = os.getenv(spec.passphrase_env)
    if not v or v == "" then return fail("environment variable " .. spec.passphrase_env .. " (the token file passphrase) is not set") end
    return v
  else
    local out, rc, reason = shell.capture(spec.passphrase_command, nil, spec.command_timeout)
    if not out then return fail("passphrase command failed: " .. rc .. hint(reason)) end
    if rc ~= 0 then return fail("passphrase command exited with status " .. rc) end
    local line = first_line(out)
    if line == "" then return fail("passphrase command printed an empty first line") end
    return line
  end
end

return M
