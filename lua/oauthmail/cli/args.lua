-- oauthmail.cli.args — long options for the oauthmail subcommands:
-- `--name value`, `--name=value`, flags, repeatable options, `--` ending the
-- options. Each command declares its options as data; an unknown option is a
-- usage error with the closest known name.
local closest = require("oauthmail.names").closest

local M = {}

-- Options every command takes.
M.COMMON = {
  profile = { arg = true }, trace = { arg = true }, quiet = {}, help = {},
}

-- args.parse(argv, spec) -> opts, positional | nil, message
-- spec: name -> {arg=true (takes a value), multi=true (repeatable, a list)}
function M.parse(argv, spec)
  local opts, pos = {}, {}
  local known = {}
  for k, v in pairs(M.COMMON) do known[k] = v end
  for k, v in pairs(spec or {}) do known[k] = v end
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do pos[#pos + 1] = argv[j] end
      break
    end
    local name, value = a:match("^%-%-([%w%-]+)=(.*)$")
    if not name then name = a:match("^%-%-([%w%-]+)$") end
    if name then
      local key = name:gsub("%-", "_")
      local o = known[key]
      if not o then
        local near = closest(key, known)
        return nil, "unknown option --" .. name .. (near and (" (did you mean --" .. near:gsub("_", "-") .. "?)") or "")
      end
      if o.arg then
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then return nil, "option --" .. name .. " needs a value" end
        end
        if o.multi then
          opts[key] = opts[key] or {}
          table.insert(opts[key], value)
        else
          opts[key] = value
        end
      else
        if value ~= nil then return nil, "option --" .. name .. " takes no value" end
        opts[key] = true
      end
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, "unknown option " .. a
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

return M
