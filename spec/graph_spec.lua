-- spec/graph_spec.lua — the Microsoft Graph transport (oauthmail.transport.graph)
-- and failover between SMTP and Graph, against real peers on loopback: tokens
-- from the real oidc-provider (a Graph-audience JWT through resource=), the
-- Graph peer (spec/peers/graph.mjs: checks the token by JWKS, audience and
-- scope, takes only text/plain base64 MIME) and the sandbox SMTP server.
-- Deliveries are counted at both servers.
local oauthmail = require "oauthmail"
local message = require "oauthmail.message"
local profile_mod = require "oauthmail.profile"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local graph = require "spec.support.graph"

local USER = "noreply@contoso.test"

local function raw(subject, id, extra)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\n" .. (extra or "") .. "Subject: " .. subject
    .. "\r\nMessage-ID: <" .. id .. "@contoso.test>\r\n\r\nHello from the graph spec.\r\n"
end

describe("graph transport and failover against the oidc-provider, the Graph peer and the sandbox", function()
  local srv, gp, sb

  setup(function()
    srv = oidc.start()
    gp = graph.start { issuer = srv.issuer, user = USER }
    sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  end)

  teardown(function()
    if sb then sb.stop() end
    if gp then gp.stop() end
    if srv then srv.stop() end
  end)

  before_each(function()
    gp.clear()
    sb.clear()
  end)

  local function profile(extra)
    local p = {
      name = "graph-spec", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), transport = "graph",
      graph = { endpoint = gp.url, scope = graph.SCOPE, token_params = { resource = graph.AUDIENCE } },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  local function catcher()
    local seen = {}
    return seen, function(tok) seen[#seen + 1] = tok.access_token end
  end

  local function fake_sleep()
    local slept = {}
    return slept, function(sec) slept[#slept + 1] = sec end
  end

  local function count_sb(id)
    local n = 0
    for _, m in ipairs(sb.messages()) do if m.message_id == id then n = n + 1 end end
    return n
  end

  local function count_gp(id)
    local n = 0
    for _, m in ipairs(gp.messages()) do if m.message_id == id then n = n + 1 end end
    return n
  end

  it("delivers through Graph with a Graph-audience token: 202 is 'accepted', the receipt names graph", function()
    local trace = h.trace_collector()
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { trace = trace, on_token = on_token }))
    local r, err = mailer:send { raw = raw("via graph", "g1"), to = { "ops@example.org" } }
    assert.is_nil(err)
    assert.equals("graph", r.transport)
    assert.equals("accepted", r.state)
    assert.equals(202, r.reply.code)
    assert.truthy(r.reply.request_id and r.reply.request_id:match("^%x+%-"), r.reply.request_id)
    assert.same({ "ops@example.org" }, r.accepted)
    assert.equals(1, r.attempts)
    mailer:close()
    local msgs = gp.messages()
    assert.equals(1, #msgs)
    -- the message as the mailer reads raw text (message.from_raw adds the Date it lacked)
    assert.truthy(msgs[1].data:find("\r\nDate: ", 1, true))
    assert.equals(raw("via graph", "g1"), (msgs[1].data:gsub("Date: [^\r\n]*\r\n", "", 1)))
    assert.equals(graph.AUDIENCE, msgs[1].aud)
    assert.equals(1, #seen)
    local text = trace.text()
    -- the token's claims, never the token
    assert.truthy(text:find("claim_aud=" .. graph.AUDIENCE, 1, true), text)
    assert.truthy(text:find("claim_scp=Mail.Send", 1, true), text)
    assert.truthy(text:find("Authorization: Bearer <redacted>", 1, true), text)
    assert.truthy(text:find("POST /v1.0/users/noreply%40contoso.test/sendMail", 1, true), text)
    -- the message is content: its size is traced, not its bytes
    assert.truthy(text:find("bytes of request body, not traced]", 1, true), text)
    assert.is_nil(text:find(require("oauthmail.crypto").b64encode(raw("via graph", "g1")):sub(1, 40), 1, true))
    h.assert_no_secrets(text, { srv.secrets.post, seen[1] })
  end)

  it("is refused by Graph with a token for another audience (the SMTP one), after one refresh", function()
    local before = srv.stats().token_requests
    local mailer = assert(oauthmail.new(profile { graph = { endpoint = gp.url, scope = "mail.send" } }))
    local r, err = mailer:send { raw = raw("wrong audience", "gaud"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals(401, err.code)
    assert.equals("InvalidAuthenticationToken", err.graph_code)
    assert.truthy(err.text:find("Invalid audience", 1, true), err.text)
    assert.equals(2, srv.stats().token_requests - before)
    mailer:close()
    local st = gp.stats()
    assert.equals(2, st.unauthorized)
    assert.equals(0, st.accepted)
  end)

  it("counts Graph sends against the mailbox's limits (the governor applies to every transport)", function()
    local mailer = assert(oauthmail.new(profile { limits = { messages_per_minute = 2, on_limit = "fail" } }))
    assert(mailer:send { raw = raw("one", "glim1"), to = "ops@example.org" })
    assert(mailer:send { raw = raw("two", "glim2"), to = "ops@example.org" })
    local r, err = mailer:send { raw = raw("three", "glim3"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("policy", err.kind)
    assert.equals("messages_per_minute", err.limit)
    mailer:close()
    assert.equals(2, gp.stats().accepted)
  end)

  it("sends Graph exactly the bytes SMTP sends, with a Bcc field only for envelope-only recipients", function()
    local m = assert(message.compose { from = USER, to = "ops@example.org", subject = "same bytes",
      text = "Grüße, ünïcode body\n" .. string.rep("a line of text\n", 50),
      attachments = { { name = "r.bin", content_type = "application/octet-stream", data = string.rep("\0\1\255", 100) } } })
    local smtp_mailer = assert(oauthmail.new(profile { transport = "smtp" }))
    assert(smtp_mailer:send(m))
    smtp_mailer:close()
    local graph_mailer = assert(oauthmail.new(profile()))
    assert(graph_mailer:send(m))
    local smtp_bytes = sb.messages()[#sb.messages()].data
    local graph_bytes = gp.messages()[1].data
    assert.equals(#smtp_bytes, #graph_bytes)
    assert.equals(smtp_bytes, graph_bytes)
    -- a Bcc recipient is in the envelope only; Graph takes recipients from the header
    local mb = assert(message.compose { from = USER, to = "ops@example.org", bcc = "audit@example.org",
      subject = "with bcc", text = "hidden copy" })
    local r = assert(graph_mailer:send(mb))
    graph_mailer:close()
    assert.same({ "ops@example.org", "audit@example.org" }, r.accepted)
    local got = gp.messages()[2]
    assert.same({ "audit@example.org" }, got.bcc)
    assert.equals("Bcc: audit@example.org\r\n" .. mb:tostring(), got.data)
    assert.is_nil(mb:tostring():find("audit@", 1, true))
  end)

  it("refuses a raw message whose header names someone outside its recipients, before sending", function()
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = raw("header cc", "g-cc", "Cc: boss@example.org\r\n"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("config", err.kind)
    assert.truthy(err.message:find("boss@example.org", 1, true), err.message)
    mailer:close()
    assert.equals(0, gp.stats().requests)
  end)

  it("waits as Retry-After says on 429, then delivers once", function()
    gp.faults { { status = 429, code = "ApplicationThrottled",
      message = "Application is over its MailboxConcurrency limit.", retry_after = 3 } }
    local slept, sleep = fake_sleep()
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(profile { trace = trace, policy = { sleep = sleep } }))
    local r, err = mailer:send { raw = raw("throttled", "g429"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    assert.same({ 3 }, slept)
    mailer:close()
    local st = gp.stats()
    assert.equals(2, st.requests)
    assert.equals(1, st.accepted)
    assert.equals(1, count_gp("g429@contoso.test"))
    assert.truthy(trace.text():find("graph_code=ApplicationThrottled", 1, true))
  end)

  it("retries 503 and 504 with back-off and gives up with Graph's error after the attempts", function()
    gp.faults { { status = 503, code = "ServiceNotAvailable", message = "Service Unavailable" },
      { status = 504, code = "UnknownError", message = "Gateway Timeout" } }
    local slept, sleep = fake_sleep()
    local mailer = assert(oauthmail.new(profile { policy = { sleep = sleep, random = function() return 0 end } }))
    local r, err = mailer:send { raw = raw("busy", "g503"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(3, r.attempts)
    assert.same({ 1, 2 }, slept)
    gp.faults { { status = 503, code = "ServiceNotAvailable", message = "Service Unavailable", times = 9 } }
    r, err = mailer:send { raw = raw("busy", "g503b"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("http", err.kind)
    assert.equals(503, err.code)
    assert.equals("ServiceNotAvailable", err.graph_code)
    assert.equals(5, err.attempts)
    mailer:close()
    assert.equals(0, count_gp("g503b@contoso.test"))
  end)

  it("refreshes once on 401 and sends once more; a second 401 is final", function()
    gp.faults { { status = 401 } }
    local before = srv.stats().token_requests
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { on_token = on_token }))
    local r, err = mailer:send { raw = raw("401", "g401"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(1, r.attempts)
    assert.equals(2, srv.stats().token_requests - before)
    assert.equals(2, #seen)
    assert.are_not.equal(seen[1], seen[2])
    assert.equals(1, count_gp("g401@contoso.test"))
    gp.faults { { status = 401, times = 2 } }
    before = srv.stats().token_requests
    r, err = mailer:send { raw = raw("401 twice", "g401b"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("http", err.kind)
    assert.equals(401, err.code)
    assert.equals("InvalidAuthenticationToken", err.graph_code)
    assert.truthy(err.hint:find("graph.scope", 1, true), err.hint)
    assert.equals(1, srv.stats().token_requests - before)   -- one refresh, not a loop
    mailer:close()
  end)

  -- Graph's own words for each refusal, and what the decoder makes of them
  local REFUSALS = {
    { status = 403, code = "ErrorAccessDenied", message = "Access is denied. Check credentials and try again.",
      fix = "Application permissions > Mail.Send" },
    { status = 403, code = "ErrorAccessDenied",
      message = "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
      fix = "Test-ApplicationAccessPolicy" },
    { status = 403, code = "ErrorSendAsDenied",
      message = "The user account which was used to submit this request does not have the right to send mail on "
        .. "behalf of the specified sending account., Cannot submit message.",
      fix = "Add-RecipientPermission" },
    { status = 404, code = "MailboxNotEnabledForRESTAPI",
      message = "The mailbox is either inactive, soft-deleted, or is hosted on-premise.", fix = "Get-Mailbox" },
    { status = 400, code = "ErrorInvalidRecipients",
      message = "At least one recipient isn't valid., Recipient '\"bad\"' isn't resolved. All recipients must be "
        .. "resolved before a message can be submitted.", fix = "names the one Graph refused" },
    { status = 413, code = "RequestEntityTooLarge", message = "The request body is too large.",
      fix = "Send large messages over SMTP" },
  }
  for _, f in ipairs(REFUSALS) do
    it("does not retry " .. f.status .. " " .. f.code .. " and explains it (" .. f.message:sub(1, 30) .. "...)", function()
      gp.faults { { status = f.status, code = f.code, message = f.message } }
      local mailer = assert(oauthmail.new(profile()))
      local r, err = mailer:send { raw = raw("refused", "gref"), to = "ops@example.org" }
      assert.is_nil(r)
      assert.equals("http", err.kind)
      assert.equals(f.status, err.code)
      assert.equals(f.code, err.graph_code)
      assert.equals(f.message, err.text)
      assert.truthy(err.request_id and err.request_id:match("^%x+%-%x+"), tostring(err.request_id))
      assert.truthy(err.date and err.date:match("^%d%d%d%d%-%d%d%-%d%dT"), tostring(err.date))
      assert.truthy(err.hint and err.hint:find(f.fix, 1, true), err.hint)
      assert.equals(1, err.attempts)
      assert.is_false(err.retryable)
      mailer:close()
      assert.equals(1, gp.stats().requests)
      assert.equals(0, count_gp("gref@contoso.test"))
    end)
  end

  it("refuses a message over the request limit before sending, naming the limit and SMTP", function()
    local mailer = assert(oauthmail.new(profile { graph = { endpoint = gp.url, scope = graph.SCOPE,
      token_params = { resource = graph.AUDIENCE }, max_request = 2000 } }))
    local big = raw("big", "gbig") .. string.rep(string.rep("x", 78) .. "\r\n", 20)
    local r, err = mailer:send { raw = big, to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("policy", err.kind)
    assert.equals("too_large", err.reason)
    assert.truthy(err.message:find("at most 2000 bytes", 1, true), err.message)
    assert.truthy(err.message:find("SMTP", 1, true), err.message)
    mailer:close()
    assert.equals(0, gp.stats().requests)
    -- the default is Graph's 4 MB
    assert.equals(4 * 1024 * 1024, require("oauthmail.transport.graph").MAX_REQUEST)
  end)

  it("sends a message too large for Graph over SMTP when failover_on lists too_large", function()
    local mailer = assert(oauthmail.new(profile { transport = { "graph", "smtp" }, failover_on = { "too_large" },
      graph = { endpoint = gp.url, scope = graph.SCOPE, token_params = { resource = graph.AUDIENCE }, max_request = 2000 } }))
    local big = raw("big", "gbig2") .. string.rep(string.rep("x", 78) .. "\r\n", 20)
    local r, err = mailer:send { raw = big, to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals("smtp", r.transport)
    assert.equals("too_large", r.failed_over[1].matched)
    mailer:close()
    assert.equals(0, gp.stats().requests)
    assert.equals(1, count_sb("gbig2@contoso.test"))
  end)

  it("never sends again a request that may have reached Graph (connection dropped before the answer)", function()
    gp.faults { { action = "drop" } }
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = raw("dropped", "gdrop"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.is_true(err.maybe_sent)
    assert.is_false(err.retryable)
    assert.truthy(err.hint:find("Sent Items", 1, true), err.hint)
    mailer:close()
    assert.equals(1, gp.stats().requests)
  end)

  it("fails over to Graph after 535 5.7.139 and delivers once, through Graph", function()
    sb.faults { { stage = "auth", code = 535, enhanced = "5.7.139",
      text = "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.", times = 2 } }
    local trace = h.trace_collector()
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" }, trace = trace, on_token = on_token }))
    local r, err = mailer:send { raw = raw("failover", "gfo"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals("graph", r.transport)
    assert.equals("5.7.139", r.failed_over[1].matched)
    assert.equals("smtp", r.failed_over[1].transport)
    mailer:close()
    assert.equals(0, count_sb("gfo@contoso.test"))
    assert.equals(1, count_gp("gfo@contoso.test"))
    assert.equals(1, gp.stats().requests)
    local text = trace.text()
    assert.truthy(text:find("event=failover", 1, true), text)
    assert.truthy(text:find("matched=5.7.139", 1, true), text)
    local secrets = { srv.secrets.post }
    for _, t in ipairs(seen) do secrets[#secrets + 1] = t end
    h.assert_no_secrets(text, secrets)
  end)

  it("fails over when the SMTP host refuses the connection", function()
    local mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" },
      smtp = sb.smtp { port = h.free_port() } }))
    local r, err = mailer:send { raw = raw("refused", "gconn"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals("graph", r.transport)
    assert.equals("refused", r.failed_over[1].matched)
    mailer:close()
    assert.equals(1, count_gp("gconn@contoso.test"))
  end)

  it("fails over from Graph to SMTP when Graph refuses the connection and failover_on says refused", function()
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(profile { transport = { "graph", "smtp" }, failover_on = { "refused" },
      trace = trace, graph = { endpoint = "https://127.0.0.1:" .. h.free_port(), scope = graph.SCOPE,
        token_params = { resource = graph.AUDIENCE } } }))
    local r, err = mailer:send { raw = raw("graph down", "gdown"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals("smtp", r.transport)
    assert.equals("graph", r.failed_over[1].transport)
    assert.equals("refused", r.failed_over[1].matched)
    mailer:close()
    assert.equals(1, count_sb("gdown@contoso.test"))
    assert.truthy(trace.text():find("event=failover from=graph matched=refused profile=graph-spec to=smtp", 1, true), trace.text())
  end)

  it("does not fail over when the SMTP data went out and no reply came (counted at both servers)", function()
    sb.faults { { stage = "data", action = "stall" } }
    local trace = h.trace_collector()
    -- even with every network failure listed: the data went out, so no failover
    local mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" }, trace = trace,
      failover_on = { "5.7.139", "timeout", "network" }, smtp = sb.smtp { timeout = 1, data_timeout = 1 },
      policy = { attempts = 1 } }))
    local r, err = mailer:send { raw = raw("maybe taken", "gstall"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.truthy(err.failover:find("may have accepted", 1, true), err.failover)
    mailer:close()
    assert.equals(0, gp.stats().requests)
    assert.equals(0, count_gp("gstall@contoso.test"))
    local used = sb.stats().faults_used
    assert.equals("data:stall", used[#used])
    assert.truthy(trace.text():find("event=no_failover", 1, true), trace.text())
  end)

  it("does not fail over when an earlier attempt lost the connection during the data (5.7.139 on the next)", function()
    sb.faults { { stage = "data", action = "drop" },
      { stage = "auth", skip = 1, code = 535, enhanced = "5.7.139", text = "Authentication unsuccessful, "
        .. "SmtpClientAuthentication is disabled for the Tenant.", times = 2 } }
    local mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" } }))
    local body = raw("drop then 139", "gdrop139") .. string.rep("line of body text\r\n", 5000)
    local r, err = mailer:send { raw = body, to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("5.7.139", err.enhanced)
    assert.equals(2, err.attempts)
    assert.truthy(err.failover:find("may have accepted", 1, true), err.failover)
    mailer:close()
    assert.equals(0, gp.stats().requests)
    assert.equals(0, count_sb("gdrop139@contoso.test"))
  end)

  it("does not fail over on an error that failover_on does not list (550 5.7.60 SendAs)", function()
    sb.faults { { stage = "mail", code = 550, enhanced = "5.7.60", text = "Client does not have permissions to send as this sender" } }
    local mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" } }))
    local r, err = mailer:send { raw = raw("sendas", "g760"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals(550, err.code)
    assert.truthy(err.failover:find("failover_on", 1, true), err.failover)
    mailer:close()
    assert.equals(0, gp.stats().requests)
    -- the same refusal listed in failover_on goes to Graph: the server answered, nothing was accepted
    sb.faults { { stage = "mail", code = 550, enhanced = "5.7.60", text = "Client does not have permissions to send as this sender" } }
    mailer = assert(oauthmail.new(profile { transport = { "smtp", "graph" }, failover_on = { "5.7.60" } }))
    r, err = mailer:send { raw = raw("sendas", "g760b"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals("graph", r.transport)
    mailer:close()
    assert.equals(0, count_sb("g760b@contoso.test"))
    assert.equals(1, count_gp("g760b@contoso.test"))
  end)

  it("sends a list with send_many over Graph, one request per message", function()
    gp.faults { { status = 429, code = "ApplicationThrottled", message = "Application is over its MailboxConcurrency limit.",
      retry_after = 0 } }
    local mailer = assert(oauthmail.new(profile()))
    local list = {}
    for i = 1, 5 do list[i] = { raw = raw("many " .. i, "gmany" .. i), to = "ops@example.org" } end
    local results = mailer:send_many(list)
    mailer:close()
    for i = 1, 5 do
      assert.equals("graph", results[i].transport, tostring(results[i]))
      assert.equals(1, count_gp("gmany" .. i .. "@contoso.test"))
    end
    assert.equals(6, gp.stats().requests)   -- the throttled one went again
  end)

  it("keeps Graph's concurrent requests per mailbox at 4 (or graph.concurrency) when many coroutines send", function()
    gp.slow(300)
    finally(function() gp.slow(0) end)
    local function burst(n, graph_opts)
      gp.clear()
      local g = { endpoint = gp.url, scope = graph.SCOPE, token_params = { resource = graph.AUDIENCE } }
      for k, v in pairs(graph_opts or {}) do g[k] = v end
      local mailer = assert(oauthmail.new(profile { graph = g }))
      local done = 0
      oauthmail.run(function()
        for i = 1, n do
          oauthmail.spawn(function()
            assert(mailer:send { raw = raw("c" .. i, "gc" .. i), to = "ops@example.org" })
            done = done + 1
          end)
        end
      end)
      mailer:close()
      assert.equals(n, done)
      local st = gp.stats()
      assert.equals(n, st.accepted)
      return st.max_concurrent
    end
    assert.equals(4, burst(10))
    assert.equals(2, burst(6, { concurrency = 2 }))
  end)
end)

describe("graph profile settings", function()
  local function read(p)
    local base = { provider = "microsoft", tenant = "contoso.onmicrosoft.com", client_id = "id",
      client_secret = "s", user = "noreply@contoso.com" }
    for k, v in pairs(p) do base[k] = v end
    return profile_mod.read(base)
  end

  it("takes Graph's host and scope from the preset and the cloud", function()
    local s = assert(read { transport = "graph" })
    assert.equals("https://graph.microsoft.com", s.graph.endpoint)
    assert.equals("https://graph.microsoft.com/.default", s.graph_oauth.scope)
    assert.equals("https://outlook.office365.com/.default", s.oauth.scope)
    assert.equals(4, s.graph.concurrency)
    s = assert(read { transport = { "smtp", "graph" }, cloud = "usgov" })
    assert.equals("https://graph.microsoft.us", s.graph.endpoint)
    assert.equals("https://graph.microsoft.us/.default", s.graph_oauth.scope)
    s = assert(read { transport = "graph", cloud = "china" })
    assert.equals("https://microsoftgraph.chinacloudapi.cn", s.graph.endpoint)
    s = assert(profile_mod.read { provider = "microsoft", client_id = "id", user = "noreply@contoso.com",
      transport = "graph", flow = "device_code" })
    assert.equals("https://graph.microsoft.com/Mail.Send offline_access", s.graph_oauth.scope)
    assert.same({ "5.7.139", "5.7.30", "refused", "timeout" }, s.failover_on)
  end)

  it("refuses transports it does not know, failover_on without a list, and graph with google", function()
    local _, err = read { transport = "fax" }
    assert.equals("transport", err.field or err.message:match("^(%w+)"))
    assert.truthy(err.message:find("\"graph\"", 1, true), err.message)
    _, err = read { transport = { "smtp", "smtp" } }
    assert.truthy(err.message:find("twice", 1, true), err.message)
    _, err = read { failover_on = { "5.7.139" } }
    assert.truthy(err.message:find("list of transports", 1, true), err.message)
    _, err = read { transport = { "smtp", "graph" }, failover_on = { 535 } }
    assert.truthy(err.message:find("failover_on", 1, true), err.message)
    _, err = profile_mod.read { provider = "google", client_id = "x", user = "a@gmail.com", transport = "graph" }
    assert.truthy(err.message:find("Microsoft Graph", 1, true), err.message)
    _, err = profile_mod.read { provider = "generic", token_endpoint = "https://idp.example/token",
      client_id = "x", client_secret = "y", user = "a@example.org", transport = "graph" }
    assert.truthy(err.message:find("graph.endpoint", 1, true), err.message)
  end)
end)
