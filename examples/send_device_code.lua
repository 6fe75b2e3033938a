-- examples/send_device_code.lua — send from a person's mailbox (delegated).
-- The first run shows a code to enter at the Microsoft sign-in page; later
-- runs use the stored refresh token and need nobody.
--   FABRIKAM_CLIENT_ID=... FABRIKAM_STORE_PASSPHRASE=... lua examples/send_device_code.lua bob@example.org
local oauthmail = require "oauthmail"

local mailer, err = oauthmail.new(os.getenv("OAUTHMAIL_PROFILE") or "examples/profiles/fabrikam_device.lua")
if not mailer then
  io.stderr:write(tostring(err), "\n")
  os.exit(2)
end

local receipt
receipt, err = mailer:send {
  to = { arg[1] or "bob@example.org" }, subject = "Hello",
  text = "Sent with my own mailbox, signed in once with a device code.\n",
}
mailer:close()
if not receipt then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
print("sent " .. receipt.message_id)
