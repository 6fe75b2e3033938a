-- oauthmail.errors — the one error value every expected failure returns.
-- C functions create it with the same metatable (core.error_metatable), so an
-- error from the core and one made in Lua print and compare alike.
local core = require "oauthmail.core"

local M = {}

local mt = core.error_metatable
M.metatable = mt

local KINDS = {
  config = true, network = true, tls = true, oauth = true, auth = true,
  smtp = true, http = true, policy = true, store = true,
}
M.KINDS = KINDS

mt.__index = nil
mt.__tostring = function(e)
  local parts = { (e.kind or "unknown") .. " error: " .. tostring(e.message or "(no message)") }
  if e.code then parts[#parts + 1] = " [" .. tostring(e.code) .. (e.enhanced and (" " .. e.enhanced) or "") .. "]" end
  if e.provider_code then parts[#parts + 1] = " (" .. e.provider_code .. ")" end
  if e.hint then parts[#parts + 1] = "\n  hint: " .. e.hint end
  return table.concat(parts)
end

-- errors.new(kind, message [, fields]) -> error value
function M.new(kind, message, fields)
  if not KINDS[kind] then error("oauthmail.errors.new: unknown kind '" .. tostring(kind) .. "'", 2) end
  local e = {}
  if fields then for k, v in pairs(fields) do e[k] = v end end
  e.kind, e.message = kind, message
  return setmetatable(e, mt)
end

-- errors.fail(...) -> nil, error value: for `return errors.fail(...)`.
function M.fail(kind, message, fields)
  return nil, M.new(kind, message, fields)
end

function M.is(v)
  return type(v) == "table" and getmetatable(v) == mt
end

return M
