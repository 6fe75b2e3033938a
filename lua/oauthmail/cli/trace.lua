-- oauthmail trace FILE — a JSON Lines trace (written by --trace) printed one
-- readable line per event, filtered by type, profile and time.
local common = require "oauthmail.cli.common"
local trace = require "oauthmail.trace"

local M = {}

M.OPTIONS = { type = { arg = true, multi = true }, kind = { arg = true, multi = true },
  since = { arg = true }, ["until"] = { arg = true }, json = {} }
M.HELP = [[
usage: oauthmail trace FILE [--type T]... [--profile NAME] [--since TIME] [--until TIME] [--json]
Prints the events of a JSON Lines trace readably (or, with --json, the matching lines as they are).
  --type T (or --kind T)  only events of this type: smtp, http, token, oauth2, mailer, policy, cli, doctor
  --profile NAME          only this profile's events
  --since, --until TIME   2026-03-01, 2026-03-01T12:00:00Z, or an age: 30s, 10m, 2h, 1d
FILE '-' reads stdin.
]]

local UNITS = { s = 1, m = 60, h = 3600, d = 86400 }
local function when(s)
  local n, u = s:match("^(%d+)([smhd])$")
  if n then return os.time() - tonumber(n) * UNITS[u] end
  return trace.parse_time(s)
end

function M.run(_, opts, pos)
  if #pos ~= 1 then
    io.stderr:write("oauthmail trace: give one trace file (or - for stdin)\n")
    return common.EX.USAGE
  end
  local f = { profile = opts.profile }
  local types = {}
  for _, l in ipairs { opts.type or {}, opts.kind or {} } do
    for _, t in ipairs(l) do
      for one in t:gmatch("[^,]+") do types[one] = true f.types = types end
    end
  end
  for _, k in ipairs { "since", "until" } do
    if opts[k] then
      f[k] = when(opts[k])
      if not f[k] then
        io.stderr:write("oauthmail trace: --", k, " wants a date, a time or an age (10m), got '", opts[k], "'\n")
        return common.EX.USAGE
      end
    end
  end
  local keep = trace.filter(f)
  local input, err
  if pos[1] == "-" then input = io.stdin else input, err = io.open(pos[1], "rb") end
  if not input then
    io.stderr:write("oauthmail trace: ", tostring(err), "\n")
    return common.EX.NOINPUT
  end
  local bad = 0
  for line in input:lines() do
    if line:match("%S") then
      local rec = trace.decode(line)
      if not rec then
        bad = bad + 1
      elseif keep(rec) then
        io.stdout:write(opts.json and line or trace.format(rec), "\n")
      end
    end
  end
  if input ~= io.stdin then input:close() end
  if bad > 0 then io.stderr:write("oauthmail trace: ", bad, " line(s) were not JSON and were skipped\n") end
  return 0
end

return M
