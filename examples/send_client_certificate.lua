-- examples/send_client_certificate.lua — the same as send_client_secret.lua
-- with a certificate (private_key_jwt) and a file attachment.
--   CONTOSO_CLIENT_ID=... CONTOSO_CERT=app.crt CONTOSO_KEY=app.key \
--     lua examples/send_client_certificate.lua ops@example.org report.pdf
local oauthmail = require "oauthmail"

local to, attachment = arg[1] or "ops@example.org", arg[2]
local mailer = assert(oauthmail.new(os.getenv("OAUTHMAIL_PROFILE") or "examples/profiles/contoso_cert.lua"))

local receipt, err = mailer:send {
  to = { to }, subject = "Monthly figures",
  text = "The figures are attached.\n",
  attachments = attachment and { { path = attachment } } or nil,
}
mailer:close()
if not receipt then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
print("sent " .. receipt.message_id)
