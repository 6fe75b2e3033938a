-- oauthmail.store.command — tokens kept by an external secret manager, reached
-- through two shell commands: `get` prints the account's record (JSON) or
-- nothing, `put` reads the record on stdin. The account is named to both in
-- the environment; the lock is a local flock, because secret managers rarely
-- offer one.
local core = require "oauthmail.core"
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local shell = require "oauthmail.store.shell"

local M = {}
M.__index = M

local function fail(message, reason)
  return errors.fail("store", message, { reason = reason })
end

function M.new(opts)
  if type(opts) ~= "table" then error("store.command: options must be a table", 2) end
  for _, k in ipairs { "get", "put" } do
    if type(opts[k]) ~= "string" or opts[k] == "" then
      error("store.command: '" .. k .. "' must be a shell command (string)", 2)
    end
  end
  if opts.lock_dir ~= nil and type(opts.lock_dir) ~= "string" then error("store.command: 'lock_dir' must be a string", 2) end
  return setmetatable({
    kind = "command",
    get_cmd = opts.get,
    put_cmd = opts.put,
    lock_dir = opts.lock_dir or os.getenv("XDG_RUNTIME_DIR") or "/tmp",
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

function M:load(key)
  local out, rc = shell.capture(self.get_cmd, env_for(key))
  if not out then return fail("command store: get command: " .. rc, "command") end
  if rc ~= 0 then return fail("command store: get command exited with status " .. rc, "command") end
  if out:match("^%s*$") then return nil end
  local record = cjson.decode(out)
  if type(record) ~= "table" then
    return fail("command store: get command printed something that is not a JSON token record", "corrupt")
  end
  return record
end

function M:save(key, record)
  local rc, why = shell.feed(self.put_cmd, record and cjson.encode(record) or "", env_for(key))
  if not rc then return fail("command store: put command: " .. why, "command") end
  if rc ~= 0 then return fail("command store: put command exited with status " .. rc, "command") end
  return true
end

function M:lock(key, timeout)
  local path = self.lock_dir .. "/oauthmail-" .. M.key_id(key) .. ".lock"
  local lk, err = core.fs.lock(path, { timeout = timeout or self.lock_timeout })
  if not lk then return nil, err end
  return function() return lk:unlock() end
end

return M
