-- examples/send_client_secret.lua — send one message as an application
-- (client credentials with a secret).
--   CONTOSO_CLIENT_ID=... CONTOSO_SECRET=... lua examples/send_client_secret.lua ops@example.org
-- A different profile: OAUTHMAIL_PROFILE=path/to/profile.lua (examples/profiles/contoso_failover.lua
-- sends over SMTP and fails over to Microsoft Graph).
local oauthmail = require "oauthmail"

local to = arg[1] or "ops@example.org"
local mailer, err = oauthmail.new(os.getenv("OAUTHMAIL_PROFILE") or "examples/profiles/contoso_secret.lua")
if not mailer then
  io.stderr:write(tostring(err), "\n")
  os.exit(2)
end

local receipt
receipt, err = mailer:send {
  to = { to }, subject = "Nightly report",
  text = "The nightly job finished at " .. os.date("!%H:%M UTC") .. ".\n",
}
mailer:close()
if not receipt then
  -- kind, codes and the decoder's cause and fix ("why is this 535?")
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
print(string.format("sent %s to %s via %s (attempts: %d)", receipt.message_id, table.concat(receipt.accepted, ", "),
  receipt.transport, receipt.attempts))
for _, r in ipairs(receipt.rejected) do
  print(string.format("refused: %s %d %s %s", r.address, r.code, r.enhanced or "", r.hint or r.text or ""))
end
