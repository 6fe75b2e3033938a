-- oauthmail.store.memory — tokens kept in this Lua state only: for tests, short
-- scripts and hosts that persist tokens some other way. Records are copied in
-- and out so a caller cannot change a stored token by mutating a table.
local errors = require "oauthmail.errors"

local M = {}
M.__index = M

local function copy(t)
  if type(t) ~= "table" then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = copy(v) end
  return c
end

function M.new(opts)
  if opts ~= nil and type(opts) ~= "table" then error("store.memory: options must be a table", 2) end
  if opts then require("oauthmail.store").check_options("store.memory", opts, { kind = "string" }, 2) end
  return setmetatable({ kind = "memory", accounts = {}, held = {} }, M)
end

function M:load(key)
  return copy(self.accounts[key])
end

function M:save(key, record)
  self.accounts[key] = copy(record)
  return true
end

-- One Lua state has one thread of control, so the lock cannot be waited for:
-- a second holder means the caller forgot to release, which is reported.
function M:lock(key)
  if self.held[key] then
    return errors.fail("store", "memory store: the lock for this account is already held in this process",
      { reason = "busy" })
  end
  self.held[key] = true
  local released = false
  return function()
    if not released then released = true self.held[key] = nil end
    return true
  end
end

function M.describe() return "memory store" end

return M
