-- spec/mailer_spec.lua — oauthmail.new(profile) / mailer:send against real
-- peers on loopback: tokens from the real oidc-provider, mail through the
-- sandbox (a real smtp-server with fault switches) and through the plain
-- smtp-server peer. Deliveries are counted at the server.
local oauthmail = require "oauthmail"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local smtp_peers = require "spec.support.smtp_peers"

local USER = "noreply@contoso.test"

local function raw(subject, id)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: " .. subject .. "\r\nMessage-ID: <" .. id
    .. "@contoso.test>\r\n\r\nHello from the mailer spec.\r\n"
end

describe("mailer against the oidc-provider and the sandbox", function()
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

  -- A generic-provider profile: client credentials at the oidc-provider, SMTP at the sandbox.
  local function profile(extra)
    local p = {
      name = "spec", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(),
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  -- tokens handed out during a test, caught through on_token for the leak checks
  local function catcher()
    local seen = {}
    return seen, function(tok) seen[#seen + 1] = tok.access_token end
  end

  local function secrets(seen)
    local l = { srv.secrets.post }
    for _, t in ipairs(seen) do l[#l + 1] = t end
    return l
  end

  local function delivered_ids()
    local ids = {}
    for _, m in ipairs(sb.messages()) do ids[#ids + 1] = m.message_id or "?" end
    return ids
  end

  local function count(id)
    local n = 0
    for _, v in ipairs(delivered_ids()) do if v == id then n = n + 1 end end
    return n
  end

  it("sends with a real token and returns a receipt", function()
    local trace = h.trace_collector()
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { trace = trace, on_token = on_token }))
    local r, err = mailer:send { raw = raw("first", "m1"), to = { "ops@example.org" } }
    assert.is_nil(err)
    assert.equals("<m1@contoso.test>", r.message_id)
    assert.same({ "ops@example.org" }, r.accepted)
    assert.same({}, r.rejected)
    assert.equals(1, r.attempts)
    assert.equals("smtp", r.transport)
    assert.equals(250, r.reply.code)
    assert.equals("2.0.0", r.reply.enhanced)
    mailer:close()
    assert.equals(1, count("<m1@contoso.test>"))
    local m = sb.messages()[#sb.messages()]
    assert.equals(USER, m.user)
    assert.truthy(m.token:match("^jwt%-"))
    assert.equals(1, #seen)
    local text = trace.text()
    assert.truthy(text:find("AUTH XOAUTH2", 1, true), text)
    h.assert_no_secrets(text, secrets(seen))
    assert.has_error(function() mailer:send { raw = "x", to = "a@b.c" } end)
  end)
end)
