-- examples/profiles/contoso_failover.lua — app-only sending that tries SMTP
-- AUTH first and falls back to Microsoft Graph sendMail when the tenant has
-- SMTP AUTH switched off (535 5.7.139), refuses basic auth (5.7.30), or the
-- SMTP host cannot be reached. The app registration needs both application
-- permissions with admin consent: Office 365 Exchange Online SMTP.SendAsApp
-- and Microsoft Graph Mail.Send (docs/graph.md).
return {
  provider = "microsoft",
  tenant = os.getenv "CONTOSO_TENANT" or "contoso.onmicrosoft.com",
  client_id = os.getenv "CONTOSO_CLIENT_ID",
  client_secret = os.getenv "CONTOSO_SECRET",
  user = "noreply@contoso.com",
  transport = { "smtp", "graph" },
  -- the default; listed to show what moves a message on to Graph
  failover_on = { "5.7.139", "5.7.30", "refused", "timeout" },
  store = { kind = "file", path = "~/.local/state/oauthmail/contoso.json" },
}
