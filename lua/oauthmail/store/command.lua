-- oauthmail.store.command — tokens kept by an external secret manager, reached
-- through two shell commands: `get` prints the account's record (JSON) or
-- nothing, `put` reads the record on stdin. The account is named to both in
-- the environment; the lock is a local flock, because secret managers rarely
-- offer one.
local sys = require "oauthmail.sys"
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local store_mod = require "oauthmail.store"
local shell = require "oauthmail.store.shell"

local M = {}
M.__index = M

local function fail(message, reason)
  return errors.fail("store", message, { reason = reason })
end

local FIELDS = {
  kind = "string", get = "string", put = "string", lock_dir = "string", lock_timeout = "number", timeout = "number",
}

function M.new(opts)
  if type(opts) ~= "table" then error("store.command: options must be a table", 2) end
  require("oauthmail.store").check_options("store.command", opts, FIELDS, 2)
  for _, k in ipairs { "get", "put" } do
    if type(opts[k]) ~= "string" or opts[k] == "" then
      error("store.command: '" .. k .. "' must be a shell command (string)", 2)
    end
  end
  if opts.timeout ~= nil and not shell.good_timeout(opts.timeout) then
    error("store.command: 'timeout' must be a number of seconds greater than 0 and at most 86400", 2)
  end
  return setmetatable({
    kind = "command",
    timeout = opts.timeout or shell.DEFAULT_TIMEOUT,
    get_cmd = opts.get,
    put_cmd = opts.put,
    lock_dir = opts.lock_dir,   -- nil: a private per-user folder, chosen at lock time
    lock_timeout = opts.lock_timeout or 30,
  }, M)
end

function M:describe() return "command store (" .. self.get_cmd .. ")" end

-- A short name safe in file names and secret-manager paths.
function M.key_id(key)
  return crypto.hex(crypto.sha256(key)):sub(1, 32)
end

local function env_for(key)
  return { OAUTHMAIL_STORE_KEY = key, OAUTHMAIL_STORE_KEY_ID = M.key_id(key) }
end

local function hint(reason)
  return reason == "timeout" and " (the store's 'timeout' option)" or ""
end

function M:load(key)
  local out, rc, reason = shell.capture(self.get_cmd, env_for(key), self.timeout)
  if not out then return fail("command store: get command: " .. rc .. hint(reason), reason or "command") end
  if rc ~= 0 then return fail("command store: get command exited with status " .. rc, "command") end
  if out:match("^%s*$") then return nil end
  local record = cjson.decode(out)
  if type(record) ~= "table" then
    return fail("command store: get command printed something that is not a JSON token record", "corrupt")
  end
  return store_mod.without_nulls(record)
end

function M:save(key, record)
  local rc, why, reason = shell.feed(self.put_cmd, record and cjson.encode(record) or "", env_for(key), self.timeout)
  if not rc then return fail("command store: put command: " .. why .. hint(reason), reason or "command") end
  if rc ~= 0 then return fail("command store: put command exited with status " .. rc, "command") end
  return true
end

-- Never a shared folder such as /tmp, where another local user could create
-- the lock file first: $XDG_RUNTIME_DIR/oauthmail or ~/.cache/oauthmail/locks,
-- created 0700. Whatever the folder, it must be ours and closed to others.
function M:lock_folder()
  local dir = self.lock_dir
  if not dir then
    local run, home = os.getenv("XDG_RUNTIME_DIR"), os.getenv("HOME")
    if run and run ~= "" then dir = run .. "/oauthmail"
    elseif home and home ~= "" then dir = home .. "/.cache/oauthmail/locks"
    else return fail("command store: neither XDG_RUNTIME_DIR nor HOME is set; give lock_dir", "config") end
    local ok, err = sys.fs.mkdir_private(dir)
    if not ok then return fail("command store: lock folder: " .. err.message, err.reason) end
  end
  local st, err = sys.fs.stat(dir)
  if not st then return fail("command store: lock folder: " .. err.message, err.reason) end
  if st.type ~= "directory" then return fail("command store: lock folder " .. dir .. " is not a folder", "permissions") end
  if st.uid ~= sys.fs.uid() then
    return fail(string.format("command store: lock folder %s belongs to another user (uid %d)", dir, st.uid), "permissions")
  end
  if store_mod.writable_by_others(st.mode) then
    return fail(string.format("command store: lock folder %s is writable by others (mode %04o); run chmod 700 %s",
      dir, st.mode, dir), "permissions")
  end
  return dir
end

function M:lock(key, timeout)
  local dir, derr = self:lock_folder()
  if not dir then return nil, derr end
  local path = dir .. "/oauthmail-" .. M.key_id(key) .. ".lock"
  local lk, err = require("oauthmail.fs").lock(path, { timeout = timeout or self.lock_timeout })
  if not lk then return nil, err end
  return function() return lk:unlock() end
end

return M
