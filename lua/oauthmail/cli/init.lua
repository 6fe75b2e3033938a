-- oauthmail.cli — the `oauthmail` command: parse the subcommand and its
-- options, run it, turn its result into an exit code (sysexits.h). Each
-- subcommand lives in its own file under oauthmail/cli/. See docs/cli.md.
local args = require "oauthmail.cli.args"
local common = require "oauthmail.cli.common"

local M = {}

M.COMMANDS = {
  profiles = "list the profiles on the search path",
  login = "sign in with the profile's interactive flow and store the tokens",
  token = "print a valid access token (for msmtp passwordeval and the like)",
  send = "compose a message from arguments and send it",
  sendmail = "sendmail-compatible: read a message on stdin and send it",
  doctor = "check a profile step by step and say where it breaks",
  logout = "revoke the refresh token and delete the stored tokens",
  trace = "print a JSON Lines trace file readably",
  sandbox = "run the local token service and Exchange-shaped SMTP server (Lua)",
  queue = "list, run, flush or drop the outbox (a spool directory or a Redis stream)",
  worker = "send what an outbox holds, with the profile's mailer",
}
local ORDER = { "profiles", "login", "token", "send", "sendmail", "doctor", "logout", "trace", "queue", "worker",
  "sandbox" }

local function usage(out)
  local lines = { "usage: oauthmail COMMAND [--profile NAME] [options]", "", "commands:" }
  for _, c in ipairs(ORDER) do lines[#lines + 1] = string.format("  %-9s %s", c, M.COMMANDS[c]) end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "common options: --profile NAME (or OAUTHMAIL_PROFILE), --trace FILE (JSON Lines), --quiet"
  lines[#lines + 1] = "'oauthmail COMMAND --help' for a command's options; docs/cli.md for everything"
  out:write(table.concat(lines, "\n"), "\n")
end

-- cli.main(argv) -> exit code. argv: the arguments after the program name.
function M.main(argv)
  local cmd = argv[1]
  if cmd == nil or cmd == "--help" or cmd == "-h" or cmd == "help" then
    usage(cmd == nil and io.stderr or io.stdout)
    return cmd == nil and common.EX.USAGE or 0
  end
  if cmd == "--version" or cmd == "version" then
    io.stdout:write(require "oauthmail.version", "\n")
    return 0
  end
  if not M.COMMANDS[cmd] then
    local near = require("oauthmail.names").closest(cmd, M.COMMANDS)
    io.stderr:write("oauthmail: unknown command '", cmd, "'", near and (" (did you mean '" .. near .. "'?)") or "", "\n")
    usage(io.stderr)
    return common.EX.USAGE
  end
  local mod = require("oauthmail.cli." .. cmd)
  local rest = {}
  for i = 2, #argv do rest[i - 1] = argv[i] end
  local opts, pos
  if mod.parse then
    opts, pos = mod.parse(rest)
  else
    opts, pos = args.parse(rest, mod.OPTIONS)
  end
  if not opts then
    io.stderr:write("oauthmail ", cmd, ": ", pos, "\n")
    return common.EX.USAGE
  end
  if opts.help then
    io.stdout:write(mod.HELP or ("oauthmail " .. cmd .. "\n"))
    return 0
  end
  local ctx = common.context(opts, cmd)
  local ok, code = pcall(mod.run, ctx, opts, pos)
  ctx:status_done()
  ctx:close()
  if not ok then
    io.stderr:write("oauthmail ", cmd, ": internal error: ", tostring(code), "\n")
    return common.EX.SOFTWARE
  end
  return code or 0
end

return M
