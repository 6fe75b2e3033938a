-- oauthmail.store — where tokens live between runs. Built-in stores: memory,
-- file (optionally encrypted), command (external secret managers) and redis
-- (shared by processes and machines, optionally encrypted). Any
-- table with load, save and lock methods is a store too (docs/tokens.md).
local M = {}

local KINDS = {
  memory = "oauthmail.store.memory",
  file = "oauthmail.store.file",
  command = "oauthmail.store.command",
  redis = "oauthmail.store.redis",
}

local function is_store(v)
  return type(v) == "table" and type(v.load) == "function" and type(v.save) == "function"
    and type(v.lock) == "function"
end
M.is_store = is_store

local closest = require("oauthmail.names").closest

-- check_options(where, opts, fields, level): every key of opts must be in
-- fields (name -> Lua type name); a misspelt option is an error, because
-- ignoring it can mean tokens written in clear text ("encrypton").
function M.check_options(where, opts, fields, level)
  level = (level or 1) + 1
  for k, v in pairs(opts) do
    if type(k) ~= "string" or fields[k] == nil then
      local near = type(k) == "string" and closest(k, fields)
      error(string.format("%s: unknown option '%s'%s", where, tostring(k),
        near and (" (did you mean '" .. near .. "'?)") or ""), level)
    end
    if type(v) ~= fields[k] then
      error(string.format("%s: '%s' must be a %s", where, k, fields[k]), level)
    end
  end
end

-- store.without_nulls(t) -> t: a JSON null is an absent field, not a
-- userdata the rest of the library would trip over.
function M.without_nulls(t)
  local null = require("cjson").null
  for k, v in pairs(t) do
    if v == null then t[k] = nil end
  end
  return t
end

-- store.writable_by_others(mode) -> true when group or other may write.
function M.writable_by_others(mode)
  local group, other = math.floor(mode / 8) % 8, mode % 8
  return math.floor(group / 2) % 2 == 1 or math.floor(other / 2) % 2 == 1
end

function M.memory(opts) return require(KINDS.memory).new(opts) end
function M.file(opts) return require(KINDS.file).new(opts) end
function M.command(opts) return require(KINDS.command).new(opts) end
function M.redis(opts) return require(KINDS.redis).new(opts) end

-- store.new(spec) -> store: spec is nil (memory), a store object, or a table
-- {kind = "memory"|"file"|"command"|"redis", ...options of that kind}.
function M.new(spec)
  if spec == nil then return M.memory() end
  if is_store(spec) then return spec end
  if type(spec) ~= "table" then error("oauthmail.store: expected a store or a table with 'kind', got " .. type(spec), 2) end
  local mod = KINDS[spec.kind]
  if not mod then
    error("oauthmail.store: unknown kind '" .. tostring(spec.kind)
      .. "' (memory, file, command, redis, or a table with load, save and lock methods)", 2)
  end
  local opts = {}
  for k, v in pairs(spec) do if k ~= "kind" then opts[k] = v end end
  local ok, st = pcall(require(mod).new, opts)
  if not ok then error((tostring(st):gsub("^[^:]*:%d+: ", "")), 2) end
  return st
end

return M
