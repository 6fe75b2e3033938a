-- oauthmail profiles — what the search path holds: each NAME.lua found, where,
-- whether it loads, and its provider, flow and mailbox. A profile hidden by
-- one of the same name earlier on the path is marked.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { json = {} }
M.HELP = [[
usage: oauthmail profiles [--json]
Lists the profiles found on the search path, in order:
  $OAUTHMAIL_PROFILE_PATH (folders separated by ':'),
  $XDG_CONFIG_HOME/oauthmail/profiles (default ~/.config/oauthmail/profiles),
  /etc/oauthmail/profiles
]]

function M.run(_, opts)
  local profile_mod = require "oauthmail.profile"
  local list = common.list_profiles()
  local rows = {}
  for _, e in ipairs(list) do
    local row = { name = e.name, path = e.path, shadowed_by = e.shadowed_by }
    local p, err = profile_mod.load(e.path)
    local s
    if p then s, err = profile_mod.read(p) end
    if s then
      row.provider, row.flow, row.user = s.provider, s.flow, s.user
      row.store = type(p.store) == "table" and p.store.kind or (p.store == nil and "file (default)" or "custom")
      row.ok = true
    else
      row.ok = false
      row.error = err and err.message or "cannot load"
    end
    rows[#rows + 1] = row
  end
  if opts.json then
    local cjson = require "cjson"
    local doc = { search_path = common.search_path(), state_dir = common.state_dir(), profiles = rows }
    if #rows == 0 then doc.profiles = cjson.empty_array end
    io.stdout:write((cjson.encode(doc):gsub("\\/", "/")), "\n")
    return 0
  end
  io.stdout:write("search path:\n")
  for _, d in ipairs(common.search_path()) do io.stdout:write("  ", d, "\n") end
  if #rows == 0 then
    io.stdout:write("no profiles found\n")
    return 0
  end
  io.stdout:write("profiles:\n")
  for _, r in ipairs(rows) do
    local what
    if r.ok then
      what = string.format("%s, %s, %s", r.provider, r.flow, r.user)
    else
      what = "INVALID: " .. r.error
    end
    io.stdout:write(string.format("  %-16s %s\n    %s%s\n", r.name, what, r.path,
      r.shadowed_by and ("  (hidden by " .. r.shadowed_by .. ")") or ""))
  end
  return 0
end

return M
