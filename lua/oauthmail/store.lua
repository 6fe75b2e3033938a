-- oauthmail.store — where tokens live between runs. Built-in stores: memory,
-- file (optionally encrypted) and command (external secret managers). Any
-- table with load, save and lock methods is a store too (docs/tokens.md).
local M = {}

local KINDS = {
  memory = "oauthmail.store.memory",
  file = "oauthmail.store.file",
  command = "oauthmail.store.command",
}

local function is_store(v)
  return type(v) == "table" and type(v.load) == "function" and type(v.save) == "function"
    and type(v.lock) == "function"
end
M.is_store = is_store

function M.memory(opts) return require(KINDS.memory).new(opts) end
function M.file(opts) return require(KINDS.file).new(opts) end
function M.command(opts) return require(KINDS.command).new(opts) end

-- store.new(spec) -> store: spec is nil (memory), a store object, or a table
-- {kind = "memory"|"file"|"command", ...options of that kind}.
function M.new(spec)
  if spec == nil then return M.memory() end
  if is_store(spec) then return spec end
  if type(spec) ~= "table" then error("oauthmail.store: expected a store or a table with 'kind', got " .. type(spec), 2) end
  local mod = KINDS[spec.kind]
  if not mod then
    error("oauthmail.store: unknown kind '" .. tostring(spec.kind)
      .. "' (memory, file, command, or a table with load, save and lock methods)", 2)
  end
  local opts = {}
  for k, v in pairs(spec) do if k ~= "kind" then opts[k] = v end end
  return require(mod).new(opts)
end

return M
