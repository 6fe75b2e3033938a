-- oauthmail.errors — the one error value every expected failure returns.
-- C functions create it with the same metatable (oauthmail.sys's
-- error_metatable, whose __tostring lives in csrc/om.c), so an error from the
-- C modules and one made in Lua print and compare alike. Loading this module changes nothing in it.
local sys = require "oauthmail.sys"

local M = {}

local mt = sys.error_metatable
M.metatable = mt

local KINDS = {
  config = true, network = true, tls = true, oauth = true, auth = true,
  smtp = true, http = true, policy = true, store = true,
}
M.KINDS = KINDS

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

local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local unpack = table.unpack or unpack

-- errors.pcall(f, ...): pcall that a coroutine-aware flow, store or waiter may
-- yield across. 5.2+ and LuaJIT have one; on PUC 5.1 the call runs in a
-- coroutine of its own whose yields are passed up to our resumer and whose
-- resume values are passed back.
M.pcall = pcall
if _VERSION == "Lua 5.1" and not rawget(_G, "jit") then
  M.pcall = function(f, ...)
    local co = coroutine.create(f)
    local res = pack(coroutine.resume(co, ...))
    while true do
      if not res[1] then return false, res[2] end
      if coroutine.status(co) == "dead" then return unpack(res, 1, res.n) end
      if not coroutine.running() then return false, "attempt to yield from outside a coroutine" end
      res = pack(coroutine.resume(co, coroutine.yield(unpack(res, 2, res.n))))
    end
  end
end

return M
