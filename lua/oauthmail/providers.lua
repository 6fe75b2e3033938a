-- oauthmail.providers — what a provider implies, as data: endpoints, scopes,
-- SMTP host and mode, refresh margin and sending limits. A preset fills only
-- what the profile left out (docs/profiles.md lists every value).
local M = {}

M.CLOUDS = {
  -- Entra ID authority, SMTP AUTH endpoint, the resource for app-only tokens,
  -- the resource for delegated (user) tokens, the Microsoft Graph host
  global = { login = "https://login.microsoftonline.com", smtp = "smtp.office365.com",
    app_resource = "https://outlook.office365.com", user_resource = "https://outlook.office.com",
    graph = "https://graph.microsoft.com" },
  usgov = { login = "https://login.microsoftonline.us", smtp = "smtp.office365.us",
    app_resource = "https://outlook.office365.us", user_resource = "https://outlook.office365.us",
    graph = "https://graph.microsoft.us" },
  china = { login = "https://login.partner.microsoftonline.cn", smtp = "smtp.partner.outlook.cn",
    app_resource = "https://partner.outlook.cn", user_resource = "https://partner.outlook.cn",
    graph = "https://microsoftgraph.chinacloudapi.cn" },
}

-- Microsoft's submission services (profile.service): Exchange Online's SMTP
-- AUTH endpoint, High Volume Email, consumer Outlook.com. A host per cloud
-- for exchange; the other two exist in the global cloud only.
M.SERVICES = {
  exchange = {},
  hve = { smtp = "smtp-hve.office365.com" },
  outlook = { smtp = "smtp-mail.outlook.com", tenant = "consumers", delegated_only = true },
}

-- Tenant names that stand for "whoever signs in": only a person can pick the tenant.
M.MULTI_TENANT = { common = true, organizations = true, consumers = true }

local DELEGATED = { authorization_code = true, device_code = true, refresh_token = true, password = true }
M.DELEGATED = DELEGATED

M.presets = {}

M.presets.microsoft = {
  flows = { client_credentials = true, authorization_code = true, device_code = true,
    refresh_token = true, password = true },
  margin = 600,  -- Exchange refuses tokens close to expiry (501 5.5.127)
  -- two_step is left automatic everywhere: the XOAUTH2 response goes after an
  -- empty 334 when the AUTH line would pass 1,000 bytes (Entra's tokens do)
  smtp = { port = 587, tls = "starttls", mechanism = "xoauth2" },
  limits = { messages_per_minute = 30, recipients_per_day = 10000, connections = 3,
    recipients_per_message = 500 },
  resolve = function(p)
    local cloud = M.CLOUDS[p.cloud or "global"]
    local service = M.SERVICES[p.service or "exchange"]
    local flow = p.flow
    local tenant = p.tenant or service.tenant or (DELEGATED[flow] and "organizations" or nil)
    local out = { tenant = tenant, login = cloud.login, smtp_host = service.smtp or cloud.smtp }
    if tenant then
      local base = cloud.login .. "/" .. tenant .. "/oauth2/v2.0"
      out.token_endpoint = base .. "/token"
      out.authorization_endpoint = base .. "/authorize"
      out.device_authorization_endpoint = base .. "/devicecode"
    end
    out.graph_endpoint = cloud.graph
    if flow == "client_credentials" then
      out.scope = cloud.app_resource .. "/.default"
      -- the Mail.Send application permission, granted with admin consent
      out.graph_scope = cloud.graph .. "/.default"
    else
      out.scope = cloud.user_resource .. "/SMTP.Send offline_access"
      out.graph_scope = cloud.graph .. "/Mail.Send offline_access"
    end
    return out
  end,
}

M.presets.google = {
  flows = { authorization_code = true, device_code = true, refresh_token = true, jwt_bearer = true },
  margin = 300,
  smtp = { port = 587, tls = "starttls", mechanism = "xoauth2" },
  -- Workspace, per user, over a rolling 24 hours (SMTP: 100 recipients per message)
  limits = { messages_per_day = 2000, recipients_per_day = 10000, recipients_per_message = 100 },
  resolve = function(p)
    local out = {
      token_endpoint = "https://oauth2.googleapis.com/token",
      authorization_endpoint = "https://accounts.google.com/o/oauth2/v2/auth",
      device_authorization_endpoint = "https://oauth2.googleapis.com/device/code",
      revocation_endpoint = "https://oauth2.googleapis.com/revoke",
      scope = "https://mail.google.com/",
      smtp_host = "smtp.gmail.com",
    }
    -- Google returns a refresh token only when asked for offline access with consent
    if p.flow == "authorization_code" then
      out.authorization_params = { access_type = "offline", prompt = "consent" }
    end
    return out
  end,
}

M.presets.generic = {
  flows = { client_credentials = true, authorization_code = true, device_code = true,
    refresh_token = true, jwt_bearer = true, password = true },
  margin = 300,
  smtp = { port = 587, tls = "starttls", mechanism = "xoauth2" },
  limits = {},
  resolve = function(p)
    local ep = p.endpoints or {}
    return {
      token_endpoint = ep.token, authorization_endpoint = ep.authorization,
      device_authorization_endpoint = ep.device_authorization, revocation_endpoint = ep.revocation,
    }
  end,
}

function M.get(name)
  return M.presets[name]
end

return M
