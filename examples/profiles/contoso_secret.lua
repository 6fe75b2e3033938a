-- Contoso: an unattended sender (app-only, client credentials) with a client
-- secret taken from the environment, never written in the profile.
-- Exchange side: the app's service principal is registered in Exchange and
-- granted the mailbox (see docs/profiles.md, "Microsoft 365 checklist").
return {
  provider = "microsoft",
  tenant = "contoso.onmicrosoft.com",
  flow = "client_credentials",
  client_id = os.getenv("CONTOSO_CLIENT_ID") or "00000000-0000-0000-0000-000000000000",
  client_secret = os.getenv("CONTOSO_SECRET"),
  user = "noreply@contoso.com",
  store = { kind = "file", path = "~/.local/state/oauthmail/contoso.json" },
  trace = os.getenv("OAUTHMAIL_TRACE"),   -- a file for the redacted transcript, if set
}
