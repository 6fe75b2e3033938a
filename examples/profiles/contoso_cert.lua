-- Contoso with a certificate instead of a secret (private_key_jwt): the
-- certificate is uploaded to the app registration, the key stays here.
return {
  provider = "microsoft",
  tenant = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",    -- the tenant id works as well as a domain
  flow = "client_credentials",
  client_id = os.getenv("CONTOSO_CLIENT_ID") or "00000000-0000-0000-0000-000000000000",
  client_certificate = {
    cert = os.getenv("CONTOSO_CERT") or "/etc/oauthmail/contoso.crt",
    key = os.getenv("CONTOSO_KEY") or "/etc/oauthmail/contoso.key",
  },
  user = "reports@contoso.com",
  store = { kind = "file", path = "~/.local/state/oauthmail/contoso-cert.json" },
}
