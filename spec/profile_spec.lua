-- spec/profile_spec.lua — profile validation (every error names the field and
-- what was expected), provider presets and how a profile overrides them.
local oauthmail = require "oauthmail"
local profile = require "oauthmail.profile"
local h = require "spec.support.helpers"

local MS = {
  provider = "microsoft", tenant = "contoso.onmicrosoft.com", flow = "client_credentials",
  client_id = "11111111-2222-3333-4444-555555555555", client_secret = "very-secret-value-123",
  user = "noreply@contoso.com",
}

local function with(base, extra)
  local t = {}
  for k, v in pairs(base) do t[k] = v end
  for k, v in pairs(extra or {}) do
    if v == "nil" then t[k] = nil else t[k] = v end
  end
  return t
end

local function refused(p)
  local m, err = oauthmail.new(p)
  assert.is_nil(m)
  assert.equals("config", err.kind)
  return err
end

describe("profile validation", function()
  it("names an unknown key and suggests the closest known one", function()
    local err = refused(with(MS, { smpt = { host = "x" } }))
    assert.equals("smpt: unknown field (did you mean 'smtp'?)", err.message)
    assert.equals("smpt", err.field)
    err = refused(with(MS, { smtp = { prot = 587 } }))
    assert.equals("smtp.prot: unknown field (did you mean 'smtp.port'?)", err.message)
    err = refused(with(MS, { clientid = "x" }))
    assert.truthy(err.message:find("did you mean 'client_id'", 1, true), err.message)
    err = refused(with(MS, { zzzzzzzzzzzzzz = 1 }))
    assert.equals("zzzzzzzzzzzzzz: unknown field", err.message)
  end)

  it("names a field of the wrong type with what was expected", function()
    local err = refused(with(MS, { smtp = { port = "abc" } }))
    assert.equals("smtp.port: expected a port number (1-65535), got 'abc'", err.message)
    err = refused(with(MS, { margin = true }))
    assert.equals("margin: expected a finite number of seconds >= 0, got boolean true", err.message)
    err = refused(with(MS, { smtp = { tls = "ssl" } }))
    assert.equals('smtp.tls: expected one of "starttls", "implicit", "none", got \'ssl\'', err.message)
    err = refused(with(MS, { limits = { messages_per_minute = "30" } }))
    assert.equals("limits.messages_per_minute: expected a positive whole number or false, got '30'", err.message)
    err = refused(with(MS, { on_token = "print" }))
    assert.equals("on_token: expected a function, got 'print'", err.message)
  end)

  it("checks the range of every number, naming the field", function()
    local cases = {
      { { policy = { attempts = 0 / 0 } }, "policy.attempts: expected a positive whole number, got nan" },
      { { policy = { attempts = 0 } }, "policy.attempts: expected a positive whole number, got number 0" },
      { { policy = { attempts = 2.5 } }, "policy.attempts: expected a positive whole number, got number 2.5" },
      { { policy = { max_messages_per_session = -1 } },
        "policy.max_messages_per_session: expected a positive whole number, got number -1" },
      { { policy = { jitter = 1.5 } }, "policy.jitter: expected a number from 0 to 1, got number 1.5" },
      { { policy = { max_time = math.huge } }, "policy.max_time: expected a finite number of seconds >= 0, got number "
        .. tostring(math.huge) },
      { { policy = { backoff_base = -1 } }, "policy.backoff_base: expected a finite number of seconds >= 0, got number -1" },
      { { limits = { messages_per_minute = 0 } },
        "limits.messages_per_minute: expected a positive whole number or false, got number 0" },
      { { limits = { messages_per_minute = 2.5 } },
        "limits.messages_per_minute: expected a positive whole number or false, got number 2.5" },
      { { limits = { recipients_per_message = -1 } },
        "limits.recipients_per_message: expected a positive whole number or false, got number -1" },
      { { limits = { connections = 0 / 0 } }, "limits.connections: expected a positive whole number or false, got nan" },
      { { limits = { max_wait = -5 } }, "limits.max_wait: expected a finite number of seconds >= 0, got number -5" },
      { { margin = -1 }, "margin: expected a finite number of seconds >= 0, got number -1" },
      { { smtp = { port = 70000 } }, "smtp.port: expected a port number (1-65535), got number 70000" },
      { { smtp = { timeout = 0 } }, "smtp.timeout: expected a finite number of seconds > 0, got number 0" },
      { { oauth = { timeout = -1 } }, "oauth.timeout: expected a finite number of seconds > 0, got number -1" },
    }
    for _, c in ipairs(cases) do
      local err = refused(with(MS, c[1]))
      assert.equals(c[2], err.message)
      assert.equals("profile", err.reason)
    end
    -- the documented ways to turn a limit off, and edge values, still pass
    assert(oauthmail.new(with(MS, { limits = { messages_per_minute = false, connections = false },
      policy = { attempts = 1, jitter = 0, max_time = 0 }, margin = 0 })))
  end)

  it("names the option the token manager refuses (a value from tokens.check, no error text parsed)", function()
    local tokens = require "oauthmail.tokens"
    assert.same({ "margin", "must be a non-negative number of seconds" }, { tokens.check { flow = {}, margin = -1 } })
    assert.same({ "interactive", "must be a boolean or a function" }, { tokens.check { flow = {}, interactive = "yes" } })
    assert.is_nil(tokens.check { flow = {}, margin = 5 })
    local real = tokens.check
    tokens.check = function() return "margin", "must be a non-negative number of seconds" end
    local ok, err = pcall(refused, MS)
    tokens.check = real
    assert(ok, err)
    assert.equals("margin", err.field)
    assert.equals("margin: must be a non-negative number of seconds", err.message)
    err = refused(with(MS, { store = { kind = "nope" } }))
    assert.equals("store", err.field)
    assert.truthy(err.message:find("^store: oauthmail.store: unknown kind 'nope'"), err.message)
  end)

  it("refuses a bad provider and a flow the provider does not offer", function()
    local err = refused(with(MS, { provider = "yahoo" }))
    assert.equals('provider: expected one of "microsoft", "google", "generic", got \'yahoo\'', err.message)
    err = refused(with(MS, { flow = "jwt_bearer" }))
    assert.truthy(err.message:find('^flow: "jwt_bearer" is not available with provider "microsoft"'), err.message)
  end)

  it("requires client_id, a secret or certificate, and the mailbox", function()
    local err = refused(with(MS, { client_id = "nil" }))
    assert.equals("client_id: required for the client_credentials flow (the application (client) id)", err.message)
    err = refused(with(MS, { client_secret = "nil" }))
    assert.equals("client_secret: client_credentials needs client_secret or client_certificate", err.message)
    err = refused(with(MS, { user = "nil" }))
    assert.truthy(err.message:find("^user: required"), err.message)
    h.assert_no_secrets(tostring(err), { MS.client_secret })
  end)

  it("refuses common/organizations tenants with client_credentials, allows them for delegated flows", function()
    for _, t in ipairs { "common", "organizations", "Common" } do
      local err = refused(with(MS, { tenant = t }))
      assert.truthy(err.message:find("^tenant: \"" .. t .. "\" cannot be used with client_credentials"), err.message)
    end
    local err = refused(with(MS, { tenant = "nil" }))
    assert.truthy(err.message:find("^tenant: required for the client_credentials flow"), err.message)
    local s = assert(profile.read(with(MS, { tenant = "common", flow = "device_code", client_secret = "nil" })))
    assert.equals("https://login.microsoftonline.com/common/oauth2/v2.0/devicecode", s.oauth.device_authorization_endpoint)
    s = assert(profile.read(with(MS, { tenant = "nil", flow = "device_code", client_secret = "nil" })))
    assert.equals("organizations", s.oauth.tenant)
  end)

  it("refuses a generic profile without an issuer or an SMTP host", function()
    local err = refused { provider = "generic", client_id = "x", client_secret = "y", user = "a@b.c",
      smtp = { host = "mail.example.org" } }
    assert.truthy(err.message:find("^issuer: "), err.message)
    err = refused { provider = "generic", issuer = "https://idp.example.org", client_id = "x", client_secret = "y",
      user = "a@b.c" }
    assert.truthy(err.message:find("^smtp.host: required"), err.message)
  end)

  it("reports a profile file that is missing, broken or returns no table", function()
    local dir = h.tmpdir()
    local _, err = oauthmail.new(dir .. "/missing.lua")
    assert.equals("config", err.kind)
    assert.truthy(err.message:find("cannot load profile", 1, true))
    h.write_file(dir .. "/bad.lua", "return {")
    _, err = oauthmail.new(dir .. "/bad.lua")
    assert.equals("config", err.kind)
    h.write_file(dir .. "/num.lua", "return 42")
    _, err = oauthmail.new(dir .. "/num.lua")
    assert.truthy(err.message:find("must return a table, returned number", 1, true))
    h.write_file(dir .. "/typo.lua", "return { provider = 'microsoft', tenantt = 'x' }")
    _, err = oauthmail.new(dir .. "/typo.lua")
    assert.equals("tenantt: unknown field (did you mean 'tenant'?)", err.message)
  end)

  it("raises for a profile that is neither a table nor a path", function()
    assert.has_error(function() oauthmail.new(42) end)
    assert.has_error(function() oauthmail.new() end)
  end)

  it("lets select_flow choose the flow, and checks its answer", function()
    local s = assert(profile.read(with(MS, { flow = "nil", select_flow = function(ctx)
      assert.equals("microsoft", ctx.provider)
      assert.is_true(ctx.has_secret)
      return "client_credentials"
    end })))
    assert.equals("client_credentials", s.flow)
    local err = refused(with(MS, { flow = "nil", select_flow = function() return "magic" end }))
    assert.truthy(err.message:find("select_flow returned an unknown flow", 1, true), err.message)
  end)
end)

describe("provider presets", function()
  it("microsoft: global cloud, app-only scope, STARTTLS 587, XOAUTH2 with the automatic two-step, margin 600, limits", function()
    local s = assert(profile.read(MS))
    assert.equals("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token", s.oauth.token_endpoint)
    assert.equals("https://outlook.office365.com/.default", s.oauth.scope)
    -- two_step unset: automatic (two-step once the AUTH line would pass 1,000 bytes)
    assert.same({ host = "smtp.office365.com", port = 587, tls = "starttls", mechanism = "xoauth2" }, s.smtp)
    assert.equals(600, s.margin)
    assert.equals(30, s.limits.messages_per_minute)
    assert.equals(10000, s.limits.recipients_per_day)
    assert.equals(3, s.limits.connections)
  end)

  it("microsoft: delegated scope and the national clouds", function()
    local d = with(MS, { flow = "device_code", client_secret = "nil" })
    local s = assert(profile.read(d))
    assert.equals("https://outlook.office.com/SMTP.Send offline_access", s.oauth.scope)
    assert.equals("noreply@contoso.com", s.oauth.login_hint)
    s = assert(profile.read(with(MS, { cloud = "usgov" })))
    assert.equals("smtp.office365.us", s.smtp.host)
    assert.truthy(s.oauth.token_endpoint:find("^https://login.microsoftonline.us/"))
    assert.equals("https://outlook.office365.us/.default", s.oauth.scope)
    s = assert(profile.read(with(MS, { cloud = "china" })))
    assert.equals("smtp.partner.outlook.cn", s.smtp.host)
    assert.truthy(s.oauth.token_endpoint:find("^https://login.partner.microsoftonline.cn/"))
    local err = refused(with(MS, { cloud = "mars" }))
    assert.truthy(err.message:find("^cloud: expected one of"), err.message)
  end)

  it("google: scope, smtp.gmail.com, jwt_bearer with the user as subject, Workspace limits", function()
    local s = assert(profile.read { provider = "google", service_account_file = "/etc/sa.json", user = "bot@example.com" })
    assert.equals("jwt_bearer", s.flow)
    assert.equals("bot@example.com", s.oauth.subject)
    assert.equals("https://mail.google.com/", s.oauth.scope)
    assert.equals("smtp.gmail.com", s.smtp.host)
    assert.equals(587, s.smtp.port)
    assert.equals(2000, s.limits.messages_per_day)
    assert.equals(10000, s.limits.recipients_per_day)
    assert.equals(100, s.limits.recipients_per_message)
    s = assert(profile.read { provider = "google", client_id = "c", user = "u@example.com", smtp = { port = 465 } })
    assert.equals("authorization_code", s.flow)
    assert.equals("implicit", s.smtp.tls)
    assert.same({ access_type = "offline", prompt = "consent" }, s.oauth.authorization_params)
  end)

  it("every preset value can be overridden, and false switches a limit off", function()
    local s = assert(profile.read(with(MS, {
      smtp = { host = "smtp-alt.example.org", port = 2525, two_step = false },
      scope = "custom/.default", margin = 900,
      limits = { messages_per_minute = false, connections = 1 },
      token_endpoint = "https://idp.example.org/token",
    })))
    assert.equals("smtp-alt.example.org", s.smtp.host)
    assert.equals(2525, s.smtp.port)
    assert.is_false(s.smtp.two_step)
    assert.equals("starttls", s.smtp.tls)
    assert.equals("custom/.default", s.oauth.scope)
    assert.equals(900, s.margin)
    assert.is_nil(s.limits.messages_per_minute)
    assert.equals(1, s.limits.connections)
    assert.equals(10000, s.limits.recipients_per_day)
    assert.equals("https://idp.example.org/token", s.oauth.token_endpoint)
  end)

  it("generic: explicit endpoints, any SMTP host", function()
    local s = assert(profile.read { provider = "generic", endpoints = { token = "https://idp/token",
      device_authorization = "https://idp/device" }, client_id = "c", user = "u@x.org", flow = "device_code",
      smtp = { host = "mail.x.org", port = 465, tls = "implicit" } })
    assert.equals("https://idp/token", s.oauth.token_endpoint)
    assert.equals("https://idp/device", s.oauth.device_authorization_endpoint)
    assert.equals(300, s.margin)
    assert.same({ on_limit = "wait", max_wait = 120 }, s.limits)
  end)

  it("keeps profiles independent: resolving one never changes another", function()
    local a = with(MS, {})
    local b = with(MS, { tenant = "fabrikam.onmicrosoft.com", smtp = { port = 25 } })
    local sa, sb = assert(profile.read(a)), assert(profile.read(b))
    assert.equals(587, sa.smtp.port)
    assert.equals(25, sb.smtp.port)
    assert.is_nil(a.smtp)
    assert.truthy(sb.oauth.token_endpoint:find("fabrikam", 1, true))
    assert.falsy(sa.oauth.token_endpoint:find("fabrikam", 1, true))
    assert.equals(587, assert(profile.read(a)).smtp.port)
  end)
end)

describe("example profiles", function()
  it("all have the right shape (no typo, right types)", function()
    local ok, out = h.exec("ls " .. h.quote(h.root .. "/examples/profiles") .. "/*.lua")
    assert(ok, out)
    local n = 0
    for path in out:gmatch("[^\n]+") do
      local t = assert(profile.load(path))
      assert(profile.validate(t))
      n = n + 1
    end
    assert.is_true(n >= 4)
  end)
end)
