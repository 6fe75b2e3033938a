-- oauthmail.decoder — "why is this 535?": the cause and the fix for the SMTP
-- replies and Microsoft Entra (AADSTS) codes a sender meets, kept as data.
-- decoder.explain(err [, ctx]) fills err.hint (and err.cause, err.fix);
-- ctx = {tenant=, client_id=, login=} lets a hint name the exact URL to open.
local M = {}

-- SMTP replies, matched by reply code + enhanced code; `text` (a Lua pattern,
-- lower case) picks a more precise entry when the server's words tell more.
-- `retryable` overrides what the reply class suggests.
M.SMTP = {
  { code = 535, enhanced = "5.7.139",
    cause = "SMTP AUTH is switched off for the tenant or for this mailbox, or security defaults "
      .. "(or a Conditional Access policy) block SMTP client authentication.",
    fix = "An Exchange admin enables authenticated SMTP for the mailbox (Set-CASMailbox <mailbox> "
      .. "-SmtpClientAuthenticationDisabled $false) or the organization (Set-TransportConfig "
      .. "-SmtpClientAuthenticationDisabled $false); with security defaults on, SMTP AUTH stays blocked: "
      .. "turn them off in favour of Conditional Access, or send through Microsoft Graph instead." },
  { code = 535, enhanced = "5.7.3",
    cause = "The server did not accept the token for this mailbox: SMTP AUTH is disabled for the mailbox, "
      .. "the token lacks the SMTP permission (wrong scope or audience), the token belongs to a different "
      .. "user than the one in AUTH, or (app-only) the application was never granted access to the mailbox.",
    fix = "Check that the token's scope is https://outlook.office.com/SMTP.Send (delegated) or "
      .. "https://outlook.office365.com/.default (app-only) and that 'user' is the mailbox; for app-only "
      .. "access register the app's service principal in Exchange (New-ServicePrincipal) and grant it the "
      .. "mailbox (Add-MailboxPermission -AccessRights FullAccess); and enable SMTP AUTH for the mailbox." },
  { code = 535,
    cause = "The server refused the credentials (an invalid, expired or wrongly scoped token, or a user "
      .. "name that does not match the token).",
    fix = "Get a fresh token for the right scope and check that 'user' is the mailbox the token was issued for." },
  { code = 501, enhanced = "5.5.127",
    cause = "Exchange refused the token as about to expire ('Token will expire soon'): it refuses tokens in "
      .. "roughly their last 10 minutes, and a local clock that runs behind makes a token look fresher than it is.",
    fix = "The mailer invalidates the token, refreshes and authenticates once more by itself; if it persists, "
      .. "set the machine's clock right (timedatectl set-ntp true) and raise the profile's margin (the microsoft "
      .. "preset uses 600 seconds)." },
  { code = 550, enhanced = "5.7.60",
    cause = "The authenticated mailbox may not send as the From address (SendAs denied).",
    fix = "Send from the authenticated mailbox itself, or have an admin grant Send As on the other address "
      .. "(Add-RecipientPermission <from> -Trustee <mailbox> -AccessRights SendAs)." },
  { code = 550, enhanced = "5.7.30",
    cause = "Exchange Online no longer accepts basic authentication (a password, AUTH LOGIN or PLAIN) for "
      .. "client submission; only OAuth (XOAUTH2) is accepted.",
    fix = "Authenticate with a token: this library's microsoft preset does (flow client_credentials or a "
      .. "delegated flow with SMTP.Send); a tool that still sends a password (AUTH LOGIN) must move to "
      .. "'oauthmail token' (msmtp passwordeval with auth xoauth2) or to this library." },
  { enhanced = "5.2.252", text = "sendas",
    cause = "Exchange refused the submission because the mailbox may not send as the From address (SendAs "
      .. "denied).", retryable = false,
    fix = "Use the authenticated mailbox as From, or grant Send As (Add-RecipientPermission <from> -Trustee "
      .. "<mailbox> -AccessRights SendAs) and wait up to an hour for it to apply." },
  { enhanced = "5.2.252",
    cause = "Exchange blocked this mailbox from submitting messages: a Send As denial, or sending blocked "
      .. "for the mailbox (a quota reached, or the account restricted after outbound spam).", retryable = false,
    fix = "Read the reply's text: for Send As, use the mailbox as From or grant Send As; for a block, an admin "
      .. "checks the Restricted entities page (Microsoft Defender portal > Email & collaboration > Review > "
      .. "Restricted entities) and the mailbox's sending limits, then lowers the profile's limits." },
  { enhanced = "5.2.0", text = "sendasdenied",
    cause = "The authenticated mailbox may not send as the From address (STOREDRV SendAsDenied).",
    retryable = false,
    fix = "Send from the authenticated mailbox itself, or have an admin grant Send As (Add-RecipientPermission "
      .. "<from> -Trustee <mailbox> -AccessRights SendAs) and wait up to an hour for it to apply." },
  { code = 554, enhanced = "5.2.0", text = "submissionquotaexceeded",
    cause = "The mailbox reached Exchange Online's recipient rate limit (10,000 recipients in 24 hours; "
      .. "external recipients count against a lower limit as well).", retryable = false,
    fix = "Wait until the 24-hour window lets more through, spread the sending over more mailboxes (or use "
      .. "High Volume Email / Azure Communication Services for bulk), and set limits.recipients_per_day below "
      .. "the quota so the governor holds messages back before Exchange refuses them." },
  { code = 554, enhanced = "5.2.2",
    cause = "The sending mailbox is full: Exchange stores the sent message in Sent Items and cannot, so it "
      .. "refuses the submission (554 5.2.2 mailbox full).", retryable = false,
    fix = "Free space in the sending mailbox (Sent Items, Deleted Items) or raise its quota; "
      .. "Get-MailboxStatistics <mailbox> | fl TotalItemSize shows the size, Set-Mailbox <mailbox> "
      .. "-ProhibitSendQuota sets the limit." },
  { enhanced = "5.2.2",
    cause = "A mailbox is over its size quota.", retryable = false,
    fix = "Free space in the mailbox or raise its quota (Set-Mailbox <mailbox> -ProhibitSendQuota)." },
  { code = 430, enhanced = "4.2.0", text = "logonfailed",
    cause = "Exchange could not open the sending mailbox for this token (STOREDRV mailbox logon failure): with "
      .. "client_credentials the application's service principal is not registered in Exchange or has no "
      .. "permission on this mailbox; or an app-only token went to smtp-mail.outlook.com (consumer Outlook).",
    retryable = false,
    fix = "In Exchange Online PowerShell register the service principal (New-ServicePrincipal -AppId "
      .. "<client_id> -ObjectId <enterprise application object id>) and grant it the mailbox "
      .. "(Add-MailboxPermission -Identity <mailbox> -User <service principal id> -AccessRights FullAccess); "
      .. "send app-only through smtp.office365.com." },
  { code = 550, enhanced = "5.5.105",
    cause = "A High Volume Email account (smtp-hve.office365.com) sent to recipients it may not reach: HVE is "
      .. "meant for internal recipients, and external ones are refused or limited.", retryable = false,
    fix = "Send mail for external recipients through a regular mailbox (smtp.office365.com, or Graph) or "
      .. "Azure Communication Services; keep HVE for internal recipients (check the HVE account's settings in "
      .. "the Exchange admin center > Mail flow > High volume email)." },
  { code = 421, enhanced = "4.7.66",
    cause = "The server refuses TLS 1.0 and 1.1 connections.", retryable = false,
    fix = "Use TLS 1.2 or newer (the default here); check smtp.min_tls and any TLS-intercepting proxy." },
  { code = 432, enhanced = "4.3.2",
    cause = "Too many simultaneous connections to this mailbox (Exchange allows 3 per mailbox).",
    fix = "Send over fewer connections: the mailer lowers its concurrency and waits; set "
      .. "limits.connections lower if other programs use the same mailbox." },
  { code = 451, enhanced = "4.7.500",
    cause = "The server is busy or throttles this client.",
    fix = "Retry later with back-off (done automatically within policy.attempts and policy.max_time)." },
  { code = 421,
    cause = "The server closed the session (maintenance, an idle limit, or throttling).",
    fix = "The mailer reconnects and sends the message again; if it persists, lower the sending rate." },
  { code = 530, enhanced = "5.7.57",
    cause = "The server wants authentication before MAIL FROM.",
    fix = "Check that the profile authenticates (a token is configured) before sending." },
}

-- The status in an XOAUTH2 / OAUTHBEARER error challenge (RFC 7628 3.2.2).
M.CHALLENGE = {
  ["401"] = { cause = "The server rejected the bearer token: expired, revoked, issued for another audience "
      .. "or scope, or for a different user than the one named in AUTH.",
    fix = "Get a fresh token with the scope the challenge names and check 'user'." },
  ["400"] = { cause = "The server could not use the token request: a malformed XOAUTH2 string or a user "
      .. "name it does not know.",
    fix = "Check 'user' (the full mailbox address) and the token format." },
  ["403"] = { cause = "The token is valid but lacks the permission (scope) to send mail.",
    fix = "Request the scope the challenge names and have the permission consented." },
}

-- Microsoft Entra ID sign-in errors (AADSTS numbers).
M.AADSTS = {
  ["700082"] = { cause = "The refresh token expired because it was not used for too long.",
    fix = "Sign in again (mailer:login(), or later the oauthmail login --profile <profile> command); "
      .. "send at least once within the inactivity "
      .. "window to keep it alive." },
  ["50076"] = { cause = "Multi-factor authentication is required (a policy change or an unusual location).",
    fix = "Sign in interactively (device_code or authorization_code flow) so the user completes MFA; "
      .. "unattended senders should use client_credentials instead." },
  ["50079"] = { cause = "The user must register for multi-factor authentication.",
    fix = "Have the user sign in once in a browser and complete the MFA registration, then run login again." },
  ["65001"] = { cause = "Nobody consented to the permissions this application asks for.",
    fix = "An admin grants consent: open {consent_url} , or approve the API permissions in the app "
      .. "registration ('Grant admin consent')." },
  ["7000215"] = { cause = "The client secret is wrong; often the secret's ID was used instead of its value.",
    fix = "Copy the secret's Value (shown once, when it is created) from Certificates & secrets; make a new "
      .. "one if it is lost." },
  ["7000222"] = { cause = "The client secret has expired.",
    fix = "Create a new client secret in the app registration and update the profile (or its secret store)." },
  ["700016"] = { cause = "No application with this client_id exists in the tenant: a wrong client_id, the "
      .. "wrong tenant, or a multi-tenant app not yet consented there.",
    fix = "Check client_id and tenant (and the cloud); for a multi-tenant app have the tenant's admin consent "
      .. "first ({consent_url})." },
  ["90002"] = { cause = "The tenant does not exist in this cloud.",
    fix = "Check the tenant id or domain, and the profile's cloud (global, usgov, china)." },
  ["50126"] = { cause = "Wrong user name or password (password grant).",
    fix = "Check the credentials; better, move to a flow without passwords (device_code or client_credentials)." },
  ["53003"] = { cause = "A Conditional Access policy blocked the sign-in.",
    fix = "Ask the tenant's admin which policy applies (sign-in logs show it) and exclude or satisfy it "
      .. "(trusted location, compliant device, workload identity policy)." },
  ["70011"] = { cause = "The requested scope is invalid for this flow.",
    fix = "Delegated flows use 'https://outlook.office.com/SMTP.Send offline_access'; client_credentials uses "
      .. "'https://outlook.office365.com/.default'. Remove any other scope." },
  ["500011"] = { cause = "The resource the scope names is not present in the tenant (Exchange Online is "
      .. "missing or the scope's host is misspelled).",
    fix = "Check the scope host (outlook.office365.com, or the national cloud's host) and that the tenant "
      .. "has Exchange Online." },
  ["7000218"] = { cause = "The token request carried no client secret or assertion, but the app registration is "
      .. "a confidential client: public client flows (device code without a secret) are not allowed for it.",
    fix = "In the Entra admin center open App registrations > the app > Authentication > Advanced settings and "
      .. "set 'Allow public client flows' to Yes; or give the profile the app's client_secret or "
      .. "client_certificate." },
  ["700025"] = { cause = "The app registration is a public client, yet the request presented a client secret "
      .. "or assertion.",
    fix = "Remove client_secret / client_certificate from the profile for this public app (device code, browser "
      .. "sign-in), or set 'Allow public client flows' to No under Authentication and use the secret." },
  ["900144"] = { cause = "The token request lacked a parameter Entra requires (the message names it: scope, "
      .. "grant_type, client_id ...): an empty scope in the profile, or something between (a proxy) that "
      .. "rewrote or emptied the request body.",
    fix = "Check the profile's scope (the microsoft preset fills it) and that no proxy changes the request; "
      .. "the trace shows the form fields that were sent (secrets masked)." },
  ["90009"] = { cause = "The application asked for a token for itself: the scope names the app's own client "
      .. "id or Application ID URI instead of Exchange or Graph.",
    fix = "Use https://outlook.office365.com/.default (SMTP, app-only), https://outlook.office.com/SMTP.Send "
      .. "(delegated) or https://graph.microsoft.com/.default (Graph); remove scope from the profile to get the "
      .. "preset's." },
  ["70000"] = { cause = "The grant (refresh token or code) is not valid for the scopes requested: consent for a "
      .. "scope was removed or never given, or the grant was issued for other scopes.",
    fix = "Sign in again (mailer:login()) and consent; an admin can grant consent for SMTP.Send / Mail.Send "
      .. "under App registrations > API permissions ({consent_url})." },
  ["50034"] = { cause = "The user account does not exist in this tenant's directory: a typo in the user, the "
      .. "wrong tenant, or a personal Microsoft account signing in to a work tenant.",
    fix = "Check 'user' and 'tenant'; an account of another organisation needs that tenant (or 'organizations'), "
      .. "a personal outlook.com account needs tenant 'consumers' and smtp-mail.outlook.com "
      .. "(service = \"outlook\")." },
  ["700024"] = { cause = "The client assertion (certificate sign-in) is not within its valid time range: the "
      .. "machine's clock is off, or the assertion lifetime is wrong.",
    fix = "Set the clock right (timedatectl set-ntp true; compare with 'date -u'); keep oauth.assertion_lifetime "
      .. "short (the default 300 s)." },
  ["50173"] = { cause = "The grant was revoked: the user changed or reset the password, or an admin revoked "
      .. "the sessions (Revoke-MgUserSignInSession), so the refresh token is dead.",
    fix = "Sign in again (mailer:login(), or later the oauthmail login --profile <profile> command)." },
  ["700027"] = { cause = "The client assertion (certificate sign-in) failed validation: the certificate "
      .. "uploaded to the app does not match the key, it expired, or the assertion's claims are wrong.",
    fix = "Upload the certificate that belongs to client_certificate.key to the app registration and check "
      .. "its validity dates and the machine's clock." },
}

-- Microsoft Graph error codes (error.code of the JSON body), matched in
-- order; `text` (a Lua pattern, lower case) picks a more precise entry.
M.GRAPH = {
  { code = "ErrorAccessDenied", text = "accesspolicy",
    cause = "An application access policy (New-ApplicationAccessPolicy, RAOP) scopes this application away "
      .. "from the sending mailbox: the app may use Mail.Send only for the mailboxes in its policy group.",
    fix = "An Exchange admin adds the mailbox to the policy's group, or checks it with Test-ApplicationAccessPolicy "
      .. "-Identity <mailbox> -AppId <client_id>; new setups use RBAC for Applications (New-ManagementRoleAssignment "
      .. "-App <service principal> -Role \"Application Mail.Send\" -CustomResourceScope <scope>)." },
  { code = "ErrorAccessDenied", text = "odata is disabled",
    cause = "Exchange refuses this application access to the mailbox (an application access policy or RBAC "
      .. "for Applications scope leaves it out).",
    fix = "An Exchange admin checks Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <client_id> and adds "
      .. "the mailbox to the app's scope." },
  { code = "ErrorAccessDenied",
    cause = "The token has no right to send as this mailbox: the Mail.Send permission is missing or not "
      .. "consented (application permission for client_credentials, delegated for a signed-in user), or an "
      .. "application access policy leaves this mailbox out.",
    fix = "In the app registration add Microsoft Graph > Application permissions > Mail.Send (or the delegated "
      .. "Mail.Send for user sign-in) and grant admin consent ({consent_url}); if the tenant scopes the app, "
      .. "check Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <client_id>." },
  { code = "ErrorSendAsDenied",
    cause = "The mailbox may not send as the From address (no Send As or Send on Behalf right).",
    fix = "Send from the mailbox itself, or have an admin grant Send As (Add-RecipientPermission <from> "
      .. "-Trustee <mailbox> -AccessRights SendAs) and wait for it to apply (up to an hour)." },
  { code = "MailboxNotEnabledForRESTAPI",
    cause = "The mailbox is inactive, soft-deleted, on-premises (hybrid) or has no Exchange Online licence, so "
      .. "Graph cannot reach it.",
    fix = "Check that 'user' is an Exchange Online mailbox with a licence (Get-Mailbox <user> in Exchange Online "
      .. "PowerShell); for an on-premises mailbox send over SMTP to the on-premises server instead." },
  { code = "ErrorInvalidRecipients",
    cause = "Graph could not resolve a recipient (a malformed address), or the message names no recipient in "
      .. "its To/Cc/Bcc header.",
    fix = "Check every recipient address; the reply's text names the one Graph refused." },
  { code = "InvalidAuthenticationToken",
    cause = "Graph refused the access token: expired, issued for another resource (an SMTP token sent to "
      .. "Graph), or for another tenant.",
    fix = "Check graph.scope (https://graph.microsoft.com/.default for app-only, "
      .. "https://graph.microsoft.com/Mail.Send offline_access delegated) and the cloud." },
  { code = "ErrorMessageSizeExceeded",
    cause = "The message is larger than the mailbox's maximum send size.",
    fix = "Make it smaller, or have an admin raise MaxSendSize (Set-Mailbox <user> -MaxSendSize)." },
  { status = 413,
    cause = "Graph refused the request as too large (a sendMail request carries at most 4 MB).",
    fix = "Send large messages over SMTP (transport = {\"smtp\", \"graph\"} keeps SMTP first), or link "
      .. "large attachments instead of attaching them." },
  { status = 429,
    cause = "Graph throttles this mailbox or application (more than 4 concurrent requests per mailbox, or "
      .. "too many per minute).",
    fix = "The mailer waits as Retry-After says and tries again; lower graph.concurrency or the sending rate "
      .. "if it persists." },
}

local function fill(template, ctx)
  return (template:gsub("{(%w+_?%w*)}", function(k)
    local v = ctx and ctx[k]
    return v and tostring(v) or ("<" .. k .. ">")
  end))
end

local function consent_url(ctx)
  if not ctx or not ctx.client_id then return nil end
  local login = ctx.login or "https://login.microsoftonline.com"
  local tenant = ctx.tenant or "organizations"
  return login .. "/" .. tenant .. "/adminconsent?client_id=" .. ctx.client_id
end

-- decoder.lookup(err) -> entry {cause=, fix=, retryable=} | nil
function M.lookup(err)
  if type(err) ~= "table" then return nil end
  local pc = err.provider_code and tostring(err.provider_code):match("AADSTS(%d+)")
  if not pc and type(err.message) == "string" then pc = err.message:match("AADSTS(%d+)") end
  if pc and M.AADSTS[pc] then return M.AADSTS[pc], "AADSTS" .. pc end
  if err.reason == "graph" or err.graph_code then
    local gtext = ((err.text or err.message or "") .. ""):lower()
    for _, e in ipairs(M.GRAPH) do
      if (e.code == nil or e.code == err.graph_code) and (e.status == nil or e.status == tonumber(err.code))
        and (e.text == nil or gtext:find(e.text)) then
        return e
      end
    end
    return nil
  end
  local ch = err.challenge
  local code, enh = tonumber(err.code), err.enhanced
  local text = ((err.text or err.message or "") .. ""):lower()
  for _, e in ipairs(M.SMTP) do
    if (e.code == nil or e.code == code) and (e.enhanced == nil or e.enhanced == enh)
      and (e.text == nil or text:find(e.text)) and (e.code or e.enhanced) and (code or enh) then
      -- a challenge status says more than a bare 535
      if not (ch and ch.status and e.enhanced == nil and M.CHALLENGE[tostring(ch.status)]) then
        return e
      end
    end
  end
  if ch and ch.status and M.CHALLENGE[tostring(ch.status)] then return M.CHALLENGE[tostring(ch.status)] end
  return nil
end

-- decoder.explain(err [, ctx]) -> err, with hint/cause/fix set when the code is known.
function M.explain(err, ctx)
  local e = M.lookup(err)
  if not e then return err end
  local c = {}
  for k, v in pairs(ctx or {}) do c[k] = v end
  c.consent_url = c.consent_url or consent_url(ctx) or "https://login.microsoftonline.com/<tenant>/adminconsent?client_id=<client_id>"
  err.cause = e.cause
  err.fix = fill(e.fix, c)
  err.hint = err.cause .. " Fix: " .. err.fix
  if e.retryable ~= nil then err.retryable = e.retryable end
  return err
end

return M
