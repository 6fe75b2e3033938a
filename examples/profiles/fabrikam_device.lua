-- Fabrikam: a person's mailbox (delegated), signed in once with the device
-- code flow on any machine with a browser; the refresh token is kept in an
-- encrypted file and renewed without anyone from then on.
return {
  provider = "microsoft",
  tenant = "organizations",          -- any work account: valid for delegated flows only
  flow = "device_code",
  client_id = os.getenv("FABRIKAM_CLIENT_ID") or "00000000-0000-0000-0000-000000000000",
  user = "alice@fabrikam.com",
  interactive = true,                -- allow the sign-in when no usable token exists
  store = {
    kind = "file", path = "~/.local/state/oauthmail/fabrikam.json",
    encryption = { passphrase_env = "FABRIKAM_STORE_PASSPHRASE" },
  },
}
