-- spec/providers_spec.lua — getting Microsoft's and Google's details right
-- (oauthmail.providers, with the profile rules and decoder entries they
-- bring): long tokens through every preset against Dovecot, 501 5.5.127
-- re-authenticates, each decoder entry met with the servers' own reply text
-- (the sandbox for SMTP, the real oidc-provider for Entra's AADSTS answers),
-- service choices, Google's device flow refused, extra token parameters.
local oauthmail = require "oauthmail"
local profile = require "oauthmail.profile"
local providers = require "oauthmail.providers"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local smtp_peers = require "spec.support.smtp_peers"

local USER = "noreply@contoso.test"

local function raw(subject, id)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: " .. subject .. "\r\nMessage-ID: <" .. id
    .. "@contoso.test>\r\n\r\nHello from the providers spec.\r\n"
end

describe("provider presets (settings only)", function()
  local MS = { provider = "microsoft", tenant = "contoso.onmicrosoft.com", client_id = "id", client_secret = "s",
    user = "noreply@contoso.com" }
  local function with(base, over)
    local t = {}
    for k, v in pairs(base) do t[k] = v end
    for k, v in pairs(over or {}) do t[k] = v end
    return t
  end

  it("leaves the two-step form automatic in every preset; two_step only forces", function()
    for name, preset in pairs(providers.presets) do
      assert.is_nil(preset.smtp.two_step, name)
    end
    local s = assert(profile.read { provider = "google", client_id = "c", user = "u@example.com" })
    assert.is_nil(s.smtp.two_step)
    s = assert(profile.read(with(MS, { smtp = { two_step = false } })))
    assert.is_false(s.smtp.two_step)
  end)

  it("offers High Volume Email and consumer Outlook as service choices", function()
    local s = assert(profile.read(with(MS, { service = "hve" })))
    assert.equals("smtp-hve.office365.com", s.smtp.host)
    assert.equals(587, s.smtp.port)
    assert.equals("starttls", s.smtp.tls)
    s = assert(profile.read { provider = "microsoft", service = "outlook", client_id = "id", user = "me@outlook.com",
      flow = "device_code" })
    assert.equals("smtp-mail.outlook.com", s.smtp.host)
    assert.equals("consumers", s.oauth.tenant)
    assert.truthy(s.oauth.token_endpoint:find("/consumers/oauth2/v2.0/token", 1, true))
    assert.equals("https://outlook.office.com/SMTP.Send offline_access", s.oauth.scope)
    s = assert(profile.read(MS))
    assert.equals("smtp.office365.com", s.smtp.host)
    local _, err = profile.read(with(MS, { service = "outlook" }))
    assert.truthy(err.message:find("no application-only access to consumer mailboxes", 1, true), err.message)
    _, err = profile.read(with(MS, { service = "hve", cloud = "usgov" }))
    assert.truthy(err.message:find("global cloud only", 1, true), err.message)
    _, err = profile.read { provider = "google", client_id = "c", user = "u@example.com", service = "hve" }
    assert.truthy(err.message:find("only applies to provider", 1, true), err.message)
  end)

  it("refuses Google's device flow with the https://mail.google.com/ scope, naming the alternatives", function()
    local _, err = profile.read { provider = "google", client_id = "c", user = "u@gmail.com", flow = "device_code" }
    assert.equals("config", err.kind)
    assert.truthy(err.message:find("^flow: "), err.message)
    assert.truthy(err.message:find("https://mail.google.com/", 1, true), err.message)
    assert.truthy(err.message:find("authorization_code", 1, true), err.message)
    assert.truthy(err.message:find("domain-wide delegation", 1, true), err.message)
    _, err = profile.read { provider = "google", client_id = "c", user = "u@gmail.com", flow = "device_code",
      scope = { "openid", "https://mail.google.com/" } }
    assert.truthy(err and err.message:find("device flow", 1, true))
    -- another scope is the profile's business
    assert(profile.read { provider = "google", client_id = "c", user = "u@gmail.com", flow = "device_code",
      scope = "email" })
  end)

  it("passes token_params through and refuses values that are not strings", function()
    local s = assert(profile.read(with(MS, { token_params = { resource = "https://x.example", audience = "api" } })))
    assert.same({ resource = "https://x.example", audience = "api" }, s.oauth.token_params)
    local _, err = profile.read(with(MS, { token_params = { resource = { "a" } } }))
    assert.truthy(err.message:find("^token_params: "), err.message)
  end)
end)

describe("providers against the oidc-provider and the sandbox", function()
  local srv, sb

  setup(function()
    srv = oidc.start()
    sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  end)

  teardown(function()
    if sb then sb.stop() end
    if srv then srv.stop() end
  end)

  before_each(function() sb.clear() end)

  -- the microsoft preset, its token endpoint and scope pointed at the local provider
  local function ms_profile(extra)
    local p = {
      name = "providers-spec", provider = "microsoft", tenant = "contoso.test", flow = "client_credentials",
      client_id = "cc-post", client_secret = srv.secrets.post, client_auth = "client_secret_post",
      token_endpoint = srv.token_endpoint, scope = "mail.send", ca_file = srv.ca, user = USER, smtp = sb.smtp(),
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  local function count(id)
    local n = 0
    for _, m in ipairs(sb.messages()) do if m.message_id == id then n = n + 1 end end
    return n
  end

  it("meets 501 5.5.127 at AUTH with a fresh token and a second AUTH (microsoft preset)", function()
    sb.faults { { stage = "auth", code = 501, enhanced = "5.5.127",
      text = "Invalid XOAUTH2 auth data - Token will expire soon" } }
    local before = srv.stats().token_requests
    local trace = h.trace_collector()
    local seen = {}
    local mailer = assert(oauthmail.new(ms_profile { trace = trace,
      on_token = function(t) seen[#seen + 1] = t.access_token end }))
    local r, err = mailer:send { raw = raw("5.5.127", "p127"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(1, r.attempts)
    mailer:close()
    assert.equals(2, srv.stats().token_requests - before)
    assert.equals(2, #seen)
    assert.are_not.equal(seen[1], seen[2])
    assert.equals(1, count("p127@contoso.test"))
    local text = trace.text()
    assert.truthy(text:find("code=501 enhanced=5.5.127 event=reauth", 1, true), text)
    h.assert_no_secrets(text, { srv.secrets.post, seen[1], seen[2] })
  end)

  it("stops after one refresh when 501 5.5.127 comes back, with the clock in the hint", function()
    sb.faults { { stage = "auth", code = 501, enhanced = "5.5.127",
      text = "Invalid XOAUTH2 auth data - Token will expire soon", times = 2 } }
    local before = srv.stats().token_requests
    local mailer = assert(oauthmail.new(ms_profile()))
    local r, err = mailer:send { raw = raw("5.5.127 twice", "p127b"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals(501, err.code)
    assert.truthy(err.hint:find("timedatectl", 1, true), err.hint)
    assert.equals(2, srv.stats().token_requests - before)
    mailer:close()
  end)

  -- the servers' own words (Exchange Online's replies) and what the decoder must say about them
  local SMTP_REPLIES = {
    { stage = "auth", code = 550, enhanced = "5.7.30",
      text = "Basic authentication is not supported for Client Submission.", hint = "only OAuth" },
    { stage = "data", code = 550, enhanced = "5.2.252",
      text = "SendAsDenied; noreply@contoso.test not allowed to send as boss@contoso.test; "
        .. "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied", hint = "Add-RecipientPermission" },
    { stage = "data", code = 550, enhanced = "5.2.252",
      text = "Sending blocked; STOREDRV.Submission.Exception:SubmissionBlockedException", hint = "Restricted entities" },
    { stage = "data", code = 554, enhanced = "5.2.0",
      text = "STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a "
        .. "permanent exception with message [BeginDiagnosticData]Message submission quota exceeded.[EndDiagnosticData]",
      hint = "10,000 recipients" },
    { stage = "data", code = 554, enhanced = "5.2.0",
      text = "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process "
        .. "message due to a permanent exception with message Cannot submit message.", hint = "Add-RecipientPermission" },
    { stage = "data", code = 554, enhanced = "5.2.2",
      text = "mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionQuotaExceeded; "
        .. "Failed to process message due to a permanent exception", hint = "Sent Items" },
    { stage = "data", code = 430, enhanced = "4.2.0",
      text = "STOREDRV; mailbox logon failure; STOREDRV.Submission.Exception:ConnectionFailedTransientException."
        .. "MapiExceptionLogonFailed; Failed to process message due to a transient exception with message "
        .. "[BeginDiagnosticData]Cannot open mailbox.", hint = "New-ServicePrincipal" },
    { stage = "rcpt", code = 550, enhanced = "5.5.105",
      text = "High Volume Email: external recipients are not supported for this account", hint = "internal recipients" },
  }
  for _, f in ipairs(SMTP_REPLIES) do
    it("explains " .. f.code .. " " .. f.enhanced .. " (" .. f.text:sub(1, 40) .. "...) and does not retry it", function()
      sb.faults { { stage = f.stage, code = f.code, enhanced = f.enhanced, text = f.text, times = 3 } }
      local slept = {}
      local mailer = assert(oauthmail.new(ms_profile { policy = { sleep = function(s) slept[#slept + 1] = s end } }))
      local r, err = mailer:send { raw = raw("refused", "pref"), to = "ops@example.org" }
      assert.is_nil(r)
      assert.equals(f.code, err.code)
      assert.equals(f.enhanced, err.enhanced)
      assert.truthy(err.hint and err.hint:find(f.hint, 1, true), tostring(err.hint))
      assert.is_false(err.retryable)
      assert.equals(1, err.attempts)
      assert.same({}, slept)
      mailer:close()
      assert.equals(0, count("pref@contoso.test"))
    end)
  end

  -- Entra's answers: status, error, and the AADSTS description as Entra words it
  local AADSTS = {
    { 401, "invalid_client", "AADSTS7000218: The request body must contain the following parameter: "
      .. "'client_assertion' or 'client_secret'.", "Allow public client flows" },
    { 400, "invalid_client", "AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' "
      .. "should be presented.", "Remove client_secret" },
    { 400, "invalid_request", "AADSTS900144: The request body must contain the following parameter: 'scope'.",
      "scope" },
    { 400, "invalid_request", "AADSTS90009: Application is requesting a token for itself. This scenario is "
      .. "supported only if resource is specified using the GUID based App Identifier.", "outlook.office365.com/.default" },
    { 400, "invalid_grant", "AADSTS70000: The request was denied because one or more scopes requested are "
      .. "unauthorized or expired. The user must first sign in and grant the client application access to the "
      .. "requested scope.", "mailer:login()" },
    { 400, "invalid_grant", "AADSTS50034: The user account noreply@contoso.test does not exist in the contoso.test "
      .. "directory. To sign into this application, the account must be added to the directory.", "consumers" },
    { 401, "invalid_client", "AADSTS700024: Client assertion is not within its valid time range.", "timedatectl" },
    { 400, "invalid_grant", "AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth "
      .. "token is needed. The user might have changed or reset their password.", "Sign in again" },
  }
  for _, a in ipairs(AADSTS) do
    local code = a[3]:match("^(AADSTS%d+)")
    it("returns " .. code .. " from the token endpoint with its cause and fix", function()
      srv.inject("/token", { { status = a[1], body = { error = a[2], error_description = a[3],
        error_codes = { tonumber(code:match("%d+")) } } } }, true)
      local mailer = assert(oauthmail.new(ms_profile()))
      local r, err = mailer:send { raw = raw("aadsts", "paad"), to = "ops@example.org" }
      assert.is_nil(r)
      assert.equals("oauth", err.kind)
      assert.equals(a[2], err.oauth_error)
      assert.equals(code, err.provider_code)
      assert.truthy(err.cause and err.fix, tostring(err))
      assert.truthy(err.hint:find(a[4], 1, true), err.hint)
      mailer:close()
      h.assert_no_secrets(tostring(err), { srv.secrets.post })
    end)
  end

  it("signs in with a per-machine TLS client certificate (RFC 8705 tls_client_auth) and sends", function()
    local trace = h.trace_collector()
    local seen = {}
    local mailer = assert(oauthmail.new {
      name = "mtls", provider = "generic", token_endpoint = srv.token_endpoint, flow = "client_credentials",
      client_id = "cc-mtls", client_auth = "tls_client_auth", scope = "mail.send", ca_file = srv.ca, user = USER,
      client_certificate = { cert = srv.keys.mtls_ca.cert, key = srv.keys.mtls_ca.key },
      smtp = sb.smtp(), trace = trace, on_token = function(t) seen[#seen + 1] = t.access_token end,
    })
    local r, err = mailer:send { raw = raw("mtls", "pmtls"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(250, r.reply.code)
    mailer:close()
    assert.equals(1, count("pmtls@contoso.test"))
    local text = trace.text()
    assert.truthy(text:find("claim_aud=urn:oauthmail:test:mail", 1, true), text)
    h.assert_no_secrets(text, { seen[1] })
    -- the same client with the certificate of another machine (not issued by the CA) is refused
    mailer = assert(oauthmail.new {
      name = "mtls", provider = "generic", token_endpoint = srv.token_endpoint, flow = "client_credentials",
      client_id = "cc-mtls", client_auth = "tls_client_auth", scope = "mail.send", ca_file = srv.ca, user = USER,
      client_certificate = { cert = srv.keys.mtls_self.cert, key = srv.keys.mtls_self.key }, smtp = sb.smtp(),
    })
    r, err = mailer:send { raw = raw("mtls", "pmtls2"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("invalid_client", err.oauth_error)
    mailer:close()
  end)

  it("sends token_params (audience, any extra field) in the token request, never over the flow's own", function()
    srv.inject("/token", { { status = 200, body = { access_token = "canned-access-token-0001", token_type = "Bearer",
      expires_in = 3600 } } }, true)
    local before = #srv.stats().injected_requests
    local m = assert(oauthmail.new(ms_profile { token_params = { audience = "api://mail", acr_values = "machine",
      grant_type = "password" } }))
    local tok = assert(m:login())
    assert.equals("canned-access-token-0001", tok.access_token)
    m:close()
    local reqs = srv.stats().injected_requests
    assert.equals(before + 1, #reqs)
    local form = require("oauthmail.oauth2.endpoint").parse_query(reqs[#reqs].body)
    assert.equals("api://mail", form.audience)
    assert.equals("machine", form.acr_values)
    assert.equals("client_credentials", form.grant_type)   -- the flow's field wins
  end)

  it("adds token_params (resource) to the token request: the token's audience follows", function()
    local seen = {}
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(ms_profile {
      -- the sandbox takes any token the provider signed; the audience is what the resource asks for
      token_params = { resource = "https://graph.oauthmail.test" }, scope = "Mail.Send", trace = trace,
      on_token = function(t) seen[#seen + 1] = t.access_token end }))
    assert(mailer:send { raw = raw("resource", "pres"), to = "ops@example.org" })
    mailer:close()
    local claims = oauthmail.token_claims(seen[1])
    assert.equals("https://graph.oauthmail.test", claims.claim_aud)
    assert.equals("Mail.Send", claims.claim_scp)
    local text = trace.text()
    assert.truthy(text:find("resource=https%3A%2F%2Fgraph.oauthmail.test", 1, true), text)
    assert.truthy(text:find("claim_aud=https://graph.oauthmail.test", 1, true), text)
    h.assert_no_secrets(text, { srv.secrets.post, seen[1] })
  end)
end)

describe("long tokens through every preset against Dovecot submission", function()
  local dove
  -- Entra's access tokens are about 2.2 KB: an XOAUTH2 initial response is then a 3 KB AUTH line
  local LONG = "eyJ0eXAiOiJKV1QiLCJub25jZSI6" .. string.rep("Ab3_-x9Q", 272)

  setup(function()
    if smtp_peers.have_dovecot() then dove = smtp_peers.dovecot { token = LONG, user = USER } end
  end)
  teardown(function()
    if dove then dove.stop() end
  end)

  local provisioned = {
    load = function() return { access_token = LONG, token_type = "Bearer", expires_at = os.time() + 3600 } end,
    save = function() return true end,
    lock = function() return function() return true end end,
  }

  local function mailer_for(p, smtp, trace)
    local t = {
      name = "long", client_id = "c", user = USER, store = provisioned, trace = trace,
      smtp = { host = "localhost", port = dove.port, ca_file = dove.ca, tls = "starttls" },
    }
    for k, v in pairs(p) do t[k] = v end
    for k, v in pairs(smtp or {}) do t.smtp[k] = v end
    return assert(oauthmail.new(t))
  end

  local PRESETS = {
    google = { provider = "google", flow = "authorization_code" },
    generic = { provider = "generic", token_endpoint = "https://idp.example/token", flow = "client_credentials",
      client_secret = "unused" },
    microsoft = { provider = "microsoft", tenant = "contoso.test", client_secret = "unused" },
  }

  it("is installed (apt-get install dovecot-core dovecot-submissiond)", function()
    assert.truthy(dove, "dovecot is not installed")
  end)

  for name, p in pairs(PRESETS) do
    for _, mech in ipairs { "xoauth2", "oauthbearer" } do
      for _, tls in ipairs { "starttls", "implicit" } do
        it(name .. ": " .. mech .. " over " .. tls .. " with a " .. #LONG .. "-byte token", function()
          local trace = h.trace_collector()
          local m = mailer_for(p, { mechanism = mech, tls = tls, port = tls == "implicit" and dove.tls_port or dove.port },
            trace)
          local r, err = m:send { raw = raw("long " .. name, "long-" .. name), to = "bob@example.org" }
          assert.is_nil(err)
          assert.equals(250, r.reply.code)
          m:close()
          local text = trace.text()
          -- the automatic form: the mechanism alone on the AUTH line, the response after the 334
          assert.truthy(text:find("two-step AUTH (an initial response would make a ", 1, true), text)
          assert.truthy(text:find("text=AUTH " .. mech:upper() .. "\n", 1, true), text)
          h.assert_no_secrets(text, { LONG })
        end)
      end
    end
  end

  it("gets 500 5.5.2 Line too long when the initial response is forced (two_step = false)", function()
    local m = mailer_for(PRESETS.generic, { two_step = false })
    local r, err = m:send { raw = raw("forced", "long-forced"), to = "bob@example.org" }
    assert.is_nil(r)
    assert.equals(500, err.code)
    assert.truthy(tostring(err):lower():find("too long", 1, true), tostring(err))
    m:close()
  end)
end)
