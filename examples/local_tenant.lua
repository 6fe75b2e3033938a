-- examples/local_tenant.lua — for the loop examples: the profile in
-- OAUTHMAIL_PROFILE if set, otherwise a local tenant on loopback (the real
-- oidc-provider and the sandbox SMTP server, started from spec/support as
-- `make demo` does). Returns profile, stop().
local M = {}

function M.profile(extra)
  local path = os.getenv("OAUTHMAIL_PROFILE")
  if path then
    local p = assert(dofile(path))
    for k, v in pairs(extra or {}) do p[k] = v end
    return p, function() end
  end
  local oidc = require "spec.support.oidc"
  local sandbox = require "spec.support.sandbox"
  local srv = oidc.start()
  local sb = sandbox.start { user = "noreply@contoso.test", jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  local p = {
    name = "local-tenant", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
    ca_file = srv.ca, flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
    client_auth = "client_secret_post", scope = "mail.send", user = "noreply@contoso.test",
    smtp = { host = "127.0.0.1", port = sb.port, tls = "starttls", ca_file = sb.ca, timeout = 10 },
    limits = { connections = 3 },
  }
  for k, v in pairs(extra or {}) do p[k] = v end
  return p, function() sb.stop() srv.stop() end
end

return M
