-- oauthmail sandbox — run the Lua sandbox (oauthmail.sandbox): a token
-- service and an Exchange-shaped SMTP server on 127.0.0.1, until stopped.
-- Writes ready profiles into its folder and prints where everything is.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { dir = { arg = true }, port = { arg = true }, idp_port = { arg = true }, control_port = { arg = true },
  fault = { arg = true, multi = true }, token_lifetime = { arg = true }, device_delay = { arg = true },
  quota = { arg = true }, no_tls = {}, user = { arg = true } }
M.HELP = [[
usage: oauthmail sandbox [--dir DIR] [--port N] [--idp-port N] [--control-port N] [--fault SPEC]...
                         [--token-lifetime S] [--device-delay S] [--quota N] [--user ADDR] [--no-tls]
A Microsoft-shaped token service and an Exchange-shaped SMTP server on 127.0.0.1, in Lua.
Writes DIR/sandbox.lua (client credentials with a secret), DIR/sandbox-cert.lua (with a certificate)
and DIR/sandbox-device.lua (device code), then serves
until killed (or POST /stop on the control port). Delivered mail: DIR/maildir/new/*.eml.
  --fault STAGE:CODE:ENHANCED[:TEXT][*TIMES]   e.g. auth:535:5.7.139, connect:421:4.7.66, mail:451:4.7.500*3
     stages: connect auth mail rcpt data token
  --token-lifetime S  access token lifetime (under 600 s the server answers 501 5.5.127)
  --quota N           recipients the mailbox may send to before 554 5.2.0
Mailboxes: the --user one (default noreply@contoso.test), disabled@contoso.test (535 5.7.139),
sender@gmail.test (Google's 334 error challenge for any token).
]]

local function num(v, name)
  if v == nil then return nil end
  local n = tonumber(v)
  if not n or n < 0 then error({ usage = "--" .. name .. " wants a number" }) end
  return n
end

function M.run(ctx, opts)
  local sandbox = require "oauthmail.sandbox"
  local ok, perr = pcall(function()
    opts.port_n, opts.idp_n, opts.control_n = num(opts.port, "port"), num(opts.idp_port, "idp-port"),
      num(opts.control_port, "control-port")
    opts.lifetime_n, opts.delay_n, opts.quota_n = num(opts.token_lifetime, "token-lifetime"),
      num(opts.device_delay, "device-delay"), num(opts.quota, "quota")
  end)
  if not ok then
    io.stderr:write("oauthmail sandbox: ", type(perr) == "table" and perr.usage or tostring(perr), "\n")
    return common.EX.USAGE
  end
  local faults = {}
  for _, s in ipairs(opts.fault or {}) do
    local f = sandbox.parse_fault(s)
    if not f then io.stderr:write("oauthmail sandbox: cannot read --fault ", s, "\n") return common.EX.USAGE end
    faults[#faults + 1] = f
  end
  local dir = opts.dir or (common.state_dir() .. "/sandbox")
  local sb, err = sandbox.new { dir = dir, port = opts.port_n, idp_port = opts.idp_n, control_port = opts.control_n,
    tls = not opts.no_tls, faults = faults, token_lifetime = opts.lifetime_n, device_delay = opts.delay_n,
    quota = opts.quota_n, user = opts.user }
  if not sb then common.report(err) return common.exit_code(err) end
  local app, dev, cert = sb:write_profiles()
  io.stdout:write(string.format("SANDBOX READY smtp=%d idp=%d control=%d\n", sb.smtp_l:port(), sb.idp_l:port(),
    sb.control_l:port()))
  io.stdout:write("  token service  ", sb.issuer, "\n")
  io.stdout:write("  SMTP           127.0.0.1:", sb.smtp_l:port(), sb.tls and " (STARTTLS, CA " .. sb.tls.cert .. ")"
    or " (no TLS: the openssl command was not found)", "\n")
  io.stdout:write("  control        http://127.0.0.1:", sb.control_l:port(), " (POST /faults, DELETE /faults, GET /stats, POST /stop)\n")
  io.stdout:write("  maildir        ", dir, "/maildir/new\n")
  io.stdout:write("  profiles       ", app, "  (client credentials, secret)\n                 ", dev, "  (device code)\n")
  if cert then io.stdout:write("                 ", cert, "  (client credentials, certificate)\n") end
  io.stdout:write("try: oauthmail send --profile ", app, " --to someone@example.org --subject hi --text hello\n")
  io.stdout:flush()
  ctx:event { type = "cli", event = "sandbox", smtp_port = sb.smtp_l:port() }
  sb:run()
  sb:close()
  return 0
end

return M
