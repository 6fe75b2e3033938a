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
    .. "@contoso.test>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n\r\nHello from the mailer spec.\r\n"
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
    assert.equals("m1@contoso.test", r.message_id)
    assert.same({ "ops@example.org" }, r.accepted)
    assert.same({}, r.rejected)
    assert.equals(1, r.attempts)
    assert.equals("smtp", r.transport)
    assert.equals(250, r.reply.code)
    assert.equals("2.0.0", r.reply.enhanced)
    mailer:close()
    assert.equals(1, count("m1@contoso.test"))
    local m = sb.messages()[#sb.messages()]
    assert.equals(USER, m.user)
    assert.truthy(m.token:match("^jwt%-"))
    assert.equals(1, #seen)
    local text = trace.text()
    assert.truthy(text:find("AUTH XOAUTH2", 1, true), text)
    h.assert_no_secrets(text, secrets(seen))
    assert.has_error(function() mailer:send { raw = "x", to = "a@b.c" } end)
  end)

  -- sleeps recorded instead of slept, so back-off costs no time
  local function fake_sleep()
    local slept = {}
    return slept, function(sec) slept[#slept + 1] = sec end
  end

  it("refreshes the token once and re-authenticates after a 535", function()
    sb.faults { { stage = "auth", code = 535, enhanced = "5.7.3", text = "Authentication unsuccessful [sandbox]" } }
    local before = srv.stats().token_requests
    local trace = h.trace_collector()
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { trace = trace, on_token = on_token }))
    local r, err = mailer:send { raw = raw("after 535", "m535"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(1, r.attempts)
    mailer:close()
    assert.equals(2, srv.stats().token_requests - before)
    assert.equals(2, #seen)
    assert.are_not.equal(seen[1], seen[2])
    assert.equals(1, count("m535@contoso.test"))
    local text = trace.text()
    assert.truthy(text:find("event=reauth", 1, true), text)
    h.assert_no_secrets(text, secrets(seen))
  end)

  it("returns the 535 with its hint when the refreshed token is refused too", function()
    sb.faults { { stage = "auth", code = 535, enhanced = "5.7.3", text = "Authentication unsuccessful", times = 2 } }
    local before = srv.stats().token_requests
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = raw("refused", "mfail"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("auth", err.kind)
    assert.equals(535, err.code)
    assert.equals("5.7.3", err.enhanced)
    assert.truthy(err.hint:find("SMTP AUTH", 1, true), err.hint)
    assert.truthy(tostring(err):find("hint:", 1, true))
    assert.equals(1, err.attempts)
    assert.equals(2, srv.stats().token_requests - before)   -- one refresh, not a loop
    mailer:close()
    assert.equals(0, count("mfail@contoso.test"))
  end)

  it("explains 535 5.7.139 (SMTP AUTH disabled) and a 334 error challenge", function()
    sb.faults { { stage = "auth", code = 535, enhanced = "5.7.139",
      text = "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant", times = 2 } }
    local mailer = assert(oauthmail.new(profile()))
    local _, err = mailer:send { raw = raw("x", "m139"), to = "ops@example.org" }
    assert.equals("5.7.139", err.enhanced)
    assert.truthy(err.hint:find("SmtpClientAuthenticationDisabled", 1, true), err.hint)
    mailer:close()
    local challenge = { status = "401", schemes = "bearer", scope = "https://outlook.office.com/SMTP.Send" }
    sb.faults { { stage = "auth", challenge = challenge }, { stage = "auth", challenge = challenge } }
    mailer = assert(oauthmail.new(profile()))
    _, err = mailer:send { raw = raw("x", "m334"), to = "ops@example.org" }
    assert.equals("auth", err.kind)
    assert.equals("401", err.challenge.status)
    assert.truthy(err.hint:find("bearer token", 1, true), err.hint)
    mailer:close()
  end)

  it("reconnects and sends again after a 421 to MAIL FROM", function()
    sb.faults { { stage = "mail", code = 421, enhanced = "4.3.2", text = "Service not available, closing transmission channel" } }
    local conns = sb.stats().connections
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = raw("421", "m421"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    mailer:close()
    assert.equals(2, sb.stats().connections - conns)
    assert.equals(1, count("m421@contoso.test"))
  end)

  it("sends the whole message again when the connection drops during DATA", function()
    sb.faults { { stage = "data", action = "drop" } }
    local mailer = assert(oauthmail.new(profile()))
    local body = raw("dropped", "mdrop") .. string.rep("line of body text\r\n", 5000)
    local r, err = mailer:send { raw = body, to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    mailer:close()
    assert.equals(1, count("mdrop@contoso.test"))
    local m = sb.messages()[#sb.messages()]
    assert.equals(#body, m.size)
  end)

  it("sends again when data_timeout runs out before the final reply to the data", function()
    sb.faults { { stage = "data", action = "stall" } }
    local mailer = assert(oauthmail.new(profile { smtp = sb.smtp { timeout = 1, data_timeout = 1 } }))
    local t0 = h.now()
    local r, err = mailer:send { raw = raw("stall", "mstall"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    assert.is_true(h.now() - t0 < 20)
    mailer:close()
    assert.equals(1, count("mstall@contoso.test"))
  end)

  it("never sends twice once the 2xx was seen, even if the connection drops right after", function()
    sb.faults { { stage = "data", action = "drop_after_ok" } }
    local mailer = assert(oauthmail.new(profile()))
    local r1, err1 = mailer:send { raw = raw("ok then drop", "mok1"), to = "ops@example.org" }
    assert.is_nil(err1)
    assert.equals(1, r1.attempts)
    local r2, err2 = mailer:send { raw = raw("next", "mok2"), to = "ops@example.org" }
    assert.is_nil(err2)
    assert.is_true(r2.attempts <= 2)
    mailer:close()
    assert.equals(1, count("mok1@contoso.test"))
    assert.equals(1, count("mok2@contoso.test"))
  end)

  -- issue 12 (one raw-message path): raw text goes through message.from_raw,
  -- so a Bcc header never reaches the recipients, and the envelope comes
  -- from the headers when the call names no recipients
  it("sends raw text the way message.from_raw reads it: Bcc removed, envelope from the headers", function()
    local text = "From: " .. USER .. "\r\nTo: ops@example.org\r\nBcc: hidden@example.org\r\n" ..
      "Subject: raw bcc\r\nMessage-ID: <mraw@contoso.test>\r\n\r\nHello.\r\n"
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = text }
    assert.is_nil(err)
    assert.equals("mraw@contoso.test", r.message_id)
    assert.same({ "ops@example.org", "hidden@example.org" }, r.accepted)
    mailer:close()
    assert.equals(1, count("mraw@contoso.test"))
    local got
    for _, m in ipairs(sb.messages()) do if m.message_id == "mraw@contoso.test" then got = m end end
    assert.is_nil(got.data:find("hidden@example.org", 1, true))
    assert.is_nil(got.data:lower():find("\nbcc:", 1, true))
    assert.truthy(got.data:find("\r\nDate: ", 1, true))
    -- recipients named in the call win over the headers; a raw message with a bad address is refused
    local mailer2 = assert(oauthmail.new(profile()))
    local r2 = assert(mailer2:send { raw = text:gsub("mraw@", "mraw2@"), to = "only@example.org" })
    assert.same({ "only@example.org" }, r2.accepted)
    local r3, err3 = mailer2:send { raw = "From: " .. USER .. "\r\nTo: bob\r\n\r\nx\r\n" }
    assert.is_nil(r3)
    assert.equals("config", err3.kind)
    mailer2:close()
  end)

  it("reports a refused recipient and delivers to the others", function()
    sb.faults { { stage = "rcpt", address = "gone@example.org", code = 550, enhanced = "5.1.1",
      text = "RESOLVER.ADR.RecipNotFound; not found" } }
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send { raw = raw("three", "mrcpt"), to = { "a@example.org", "gone@example.org" },
      cc = "c@example.org" }
    assert.is_nil(err)
    assert.same({ "a@example.org", "c@example.org" }, r.accepted)
    assert.equals(1, #r.rejected)
    assert.equals("gone@example.org", r.rejected[1].address)
    assert.equals(550, r.rejected[1].code)
    assert.equals("5.1.1", r.rejected[1].enhanced)
    mailer:close()
    local m = sb.messages()[#sb.messages()]
    assert.equals("mrcpt@contoso.test", m.message_id)
    assert.same({ "a@example.org", "c@example.org" }, m.to)
  end)

  it("lowers concurrency and waits on 432 4.3.2, then delivers", function()
    local busy = { stage = "mail", code = 432, enhanced = "4.3.2", text = "STOREDRV.ClientSubmit; sender thread limit exceeded" }
    sb.faults { busy, busy }
    local slept, sleep = fake_sleep()
    local mailer = assert(oauthmail.new(profile {
      limits = { connections = 3 }, policy = { sleep = sleep, random = function() return 0 end },
    }))
    assert.equals(3, mailer:stats().connections)
    local r, err = mailer:send { raw = raw("busy", "m432"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(3, r.attempts)
    assert.same({ 1, 2 }, slept)        -- exponential back-off, jitter pinned to 0
    assert.equals(1, mailer:stats().connections)
    mailer:close()
    assert.equals(1, count("m432@contoso.test"))
  end)

  it("backs off on 451 4.7.500 within the attempt limit and gives up with a hint", function()
    local busy = { stage = "mail", code = 451, enhanced = "4.7.500", text = "Server busy. Please try again later", times = 3 }
    sb.faults { busy }
    local slept, sleep = fake_sleep()
    local mailer = assert(oauthmail.new(profile {
      policy = { sleep = sleep, attempts = 3, random = function() return 1 end },
    }))
    local r, err = mailer:send { raw = raw("busy", "m451"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals(451, err.code)
    assert.equals(3, err.attempts)
    assert.is_true(err.retryable)
    assert.truthy(err.hint:find("busy", 1, true), err.hint)
    assert.same({ 0.5, 1 }, slept)      -- 1 and 2 seconds, halved by full jitter
    mailer:close()
    assert.equals(0, count("m451@contoso.test"))
  end)

  it("does not retry a 5xx (550 5.7.60 SendAs denied)", function()
    sb.faults { { stage = "mail", code = 550, enhanced = "5.7.60",
      text = "SMTP; Client does not have permissions to send as this sender" } }
    local slept, sleep = fake_sleep()
    local mailer = assert(oauthmail.new(profile { policy = { sleep = sleep } }))
    local r, err = mailer:send { raw = raw("sendas", "m560"), to = "ops@example.org", from = "ceo@contoso.test" }
    assert.is_nil(r)
    assert.equals("smtp", err.kind)
    assert.equals(1, err.attempts)
    assert.is_false(err.retryable)
    assert.truthy(err.hint:find("Send As", 1, true), err.hint)
    assert.same({}, slept)
    -- the session survives a refused transaction
    local r2 = assert(mailer:send { raw = raw("after", "m560b"), to = "ops@example.org" })
    assert.equals(1, r2.attempts)
    mailer:close()
  end)

  it("opens a new session with a fresh token when the token runs out mid-batch", function()
    local one, two = "sbx-token-one-7f3a9c2e51", "sbx-token-two-0b8d4e6a93"
    sb.tokens { one, two }
    srv.inject("/token", {
      { body = { access_token = one, token_type = "Bearer", expires_in = 3600 } },
      { body = { access_token = two, token_type = "Bearer", expires_in = 7200 } },
    }, true)
    local offset = 0
    local clock = function() return os.time() + offset end
    local trace = h.trace_collector()
    local conns = sb.stats().connections
    local mailer = assert(oauthmail.new(profile { margin = 600, trace = trace, policy = { clock = clock } }))
    local ids = { "mexp1", "mexp2", "mexp3" }
    local receipts = {}
    for i, id in ipairs(ids) do
      receipts[i] = assert(mailer:send { raw = raw("batch " .. i, id), to = "ops@example.org" })
      if i == 1 then offset = 3100 end  -- token one now has 500 s left: under the margin
    end
    mailer:close()
    for i, id in ipairs(ids) do
      assert.equals(1, count(id .. "@contoso.test"))
      assert.equals(1, receipts[i].attempts)
    end
    assert.equals(2, sb.stats().connections - conns)
    local labels = {}
    for _, m in ipairs(sb.messages()) do
      if m.message_id and m.message_id:match("^mexp") then labels[#labels + 1] = m.token end
    end
    assert.same({ "list-1", "list-2", "list-2" }, labels)
    h.assert_no_secrets(trace.text(), { one, two, srv.secrets.post })
  end)

  it("holds the 31st message of a minute (30/minute) until the window passes", function()
    local now = os.time()
    local slept = {}
    local mailer = assert(oauthmail.new(profile {
      limits = { messages_per_minute = 30 },
      policy = { clock = function() return now end, sleep = function(s) slept[#slept + 1] = s now = now + s end },
    }))
    local before = #sb.messages()
    for i = 1, 31 do
      assert(mailer:send { raw = raw("rate " .. i, "mrate" .. i), to = "ops@example.org" })
      if i < 31 then now = now + 1 end
    end
    mailer:close()
    assert.equals(31, #sb.messages() - before)
    assert.equals(1, #slept)
    assert.is_true(slept[1] > 29 and slept[1] <= 31, tostring(slept[1]))
  end)

  it("fails the 31st message with kind policy when the profile says fail", function()
    local now = os.time()
    local mailer = assert(oauthmail.new(profile {
      limits = { messages_per_minute = 30, on_limit = "fail" },
      policy = { clock = function() return now end, sleep = function() error("must not sleep") end },
    }))
    local before = #sb.messages()
    for i = 1, 30 do assert(mailer:send { raw = raw("f " .. i, "mfail" .. i), to = "ops@example.org" }) end
    local r, err = mailer:send { raw = raw("f 31", "mfail31"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("policy", err.kind)
    assert.equals("messages_per_minute", err.limit)
    assert.is_true(err.retry_after > 0)
    mailer:close()
    assert.equals(30, #sb.messages() - before)
  end)

  it("send_many keeps the minute's limit inside one call: the 4th of 3/minute fails, nothing beyond goes", function()
    local now = os.time()
    local mailer = assert(oauthmail.new(profile {
      limits = { messages_per_minute = 3, on_limit = "fail" },
      policy = { clock = function() return now end, sleep = function() error("must not sleep") end },
    }))
    local before = #sb.messages()
    local list = {}
    for i = 1, 5 do list[i] = { raw = raw("many " .. i, "mmany" .. i), to = "ops@example.org" } end
    local results = mailer:send_many(list, { batch = 50 })
    mailer:close()
    for i = 1, 3 do
      assert.is_truthy(results[i].reply, tostring(results[i].message))
      assert.equals(1, count("mmany" .. i .. "@contoso.test"))
    end
    for i = 4, 5 do
      assert.equals("policy", results[i].kind)
      assert.equals("messages_per_minute", results[i].limit)
      assert.equals(0, count("mmany" .. i .. "@contoso.test"))
    end
    assert.equals(3, #sb.messages() - before)
  end)

  it("send_many reads one repeated text for each entry: its own Message-ID, Bcc out, envelope from the call", function()
    local text = "From: " .. USER .. "\r\nTo: undisclosed-recipients:;\r\nBcc: hidden@example.org\r\n"
      .. "Subject: same text\r\n\r\nOne text, three envelopes.\r\n"
    local mailer = assert(oauthmail.new(profile()))
    local before = #sb.messages()
    local rcpts = { "a@example.org", "b@example.org", "c@example.org" }
    local list = {}
    for i, a in ipairs(rcpts) do list[i] = { raw = text, to = a } end
    local results = mailer:send_many(list)
    mailer:close()
    local ids = {}
    for i, a in ipairs(rcpts) do
      assert.is_truthy(results[i].reply, tostring(results[i].message))
      assert.same({ a }, results[i].accepted)
      assert.same({}, results[i].rejected)
      assert.equals(250, results[i].reply.code)
      assert.is_nil(results[i].reply.accepted)   -- the reply is the reply: code, enhanced, text
      assert.is_nil(ids[results[i].message_id])
      ids[results[i].message_id] = true
      assert.equals(1, count(results[i].message_id))
    end
    local got = sb.messages()
    assert.equals(3, #got - before)
    for k = before + 1, #got do
      assert.falsy(got[k].data:find("hidden@example.org", 1, true))
      assert.truthy(got[k].data:find("\r\nDate: ", 1, true))
    end
  end)

  it("send_many returns a file that changed after composing as that message's error, and sends the rest", function()
    local path = h.tmpdir() .. "/report.txt"
    h.write_file(path, string.rep("r", 1000))
    local message = require "oauthmail.message"
    local changed = assert(message.compose { from = USER, to = "ops@example.org", subject = "changed",
      text = "see the file", attachments = { { path = path } } })
    h.write_file(path, string.rep("r", 400))
    local mailer = assert(oauthmail.new(profile()))
    local before = #sb.messages()
    local results = mailer:send_many {
      { raw = raw("before", "mchg1"), to = "ops@example.org" }, changed,
      { raw = raw("after", "mchg2"), to = "ops@example.org" },
    }
    mailer:close()
    assert.equals("config", results[2].kind)
    assert.equals("reader", results[2].reason)
    assert.truthy(results[2].message:find("changed after the message was made", 1, true))
    assert.equals(1, count("mchg1@contoso.test"))
    assert.equals(1, count("mchg2@contoso.test"))
    assert.equals(0, count(changed.message_id))
    assert.equals(2, #sb.messages() - before)
  end)

  it("send_many takes an object shaped like a message (envelope and reader), read in chunks to the end", function()
    local text = raw("shaped", "mshaped")
    local obj = {
      envelope = { from = USER, to = { "ops@example.org" } }, message_id = "mshaped@contoso.test",
      reader = function()
        local pos = 1
        return function()
          if pos > #text then return nil end
          local c = text:sub(pos, pos + 9)
          pos = pos + 10
          return c
        end
      end,
    }
    local mailer = assert(oauthmail.new(profile()))
    local results = mailer:send_many { obj, { raw = raw("plain", "mshaped2"), to = "ops@example.org" } }
    mailer:close()
    assert.is_truthy(results[1].reply, tostring(results[1].message))
    assert.equals("mshaped@contoso.test", results[1].message_id)
    assert.equals(1, count("mshaped@contoso.test"))
    assert.equals(1, count("mshaped2@contoso.test"))
    local got
    for _, m in ipairs(sb.messages()) do if m.message_id == "mshaped@contoso.test" then got = m end end
    assert.truthy(got.data:find("Subject: shaped\r\n", 1, true))
  end)

  it("send_many raises for a message of the wrong shape before anything goes out", function()
    local mailer = assert(oauthmail.new(profile()))
    local before = #sb.messages()
    assert.has_error(function()
      mailer:send_many { { raw = raw("first", "mshape1"), to = "ops@example.org" }, 42 }
    end, "mailer:send: expected a message table")
    assert.has_error(function()
      mailer:send_many { { raw = raw("first", "mshape1"), to = "ops@example.org" }, { raw = {} } }
    end, "mailer:send: 'raw' must be the message text (a string)")
    mailer:close()
    assert.equals(0, #sb.messages() - before)
  end)

  it("runs two mailers side by side with different profiles", function()
    local other_user = "alerts@fabrikam.test"
    local sb2 = sandbox.start { user = other_user, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
    local ok, e = pcall(function()
      local a = assert(oauthmail.new(profile { name = "contoso" }))
      local b = assert(oauthmail.new(profile {
        name = "fabrikam", user = other_user, client_id = "cc-basic", client_secret = srv.secrets.basic,
        client_auth = "client_secret_basic", smtp = sb2.smtp(),
      }))
      local before = #sb.messages()
      for i = 1, 2 do
        assert(a:send { raw = raw("a" .. i, "side-a" .. i), to = "ops@example.org" })
        assert(b:send { raw = raw("b" .. i, "side-b" .. i), to = "ops@example.org" })
      end
      a:close()
      b:close()
      local ma, mb = sb.messages(), sb2.messages()
      assert.equals(2, #ma - before)
      assert.equals(2, #mb)
      assert.equals(USER, ma[#ma].user)
      assert.equals(other_user, mb[#mb].user)
      assert.truthy(mb[1].message_id:match("^side%-b"))
      assert.are_not.equal(ma[#ma].token, mb[#mb].token)
    end)
    sb2.stop()
    assert(ok, e)
  end)

  it("composes a message table with oauthmail.message and re-reads it from the start after a drop", function()
    sb.faults { { stage = "data", action = "drop" } }
    local mailer = assert(oauthmail.new(profile()))
    local r, err = mailer:send {
      to = { "ops@example.org" }, bcc = "audit@example.org", subject = "Nightly report",
      text = string.rep("All systems nominal.\n", 4000),
    }
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    assert.same({ "ops@example.org", "audit@example.org" }, r.accepted)
    mailer:close()
    assert.is_string(r.message_id)
    assert.equals(1, count(r.message_id))
    local m = sb.messages()[#sb.messages()]
    assert.equals(USER, m.from)        -- the profile's user is the default sender
    assert.truthy(m.data:find("Subject: Nightly report", 1, true))
    assert.falsy(m.data:find("audit@example.org", 1, true))   -- Bcc stays out of the headers
  end)

  it("declares a composed message's exact size, and no 8BITMIME for an encoded one", function()
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(profile { trace = trace }))
    local tbl = { to = "ops@example.org", subject = "Grüße", text = "Grüße aus Köln\n" }
    local r = assert(mailer:send(tbl))
    mailer:close()
    local text = trace.text()
    local size = text:match("MAIL FROM:<[^>]*> ([^\n]*)")
    assert.truthy(size, text)
    local declared = tonumber(size:match("SIZE=(%d+)"))
    assert.truthy(declared, size)
    local m = sb.messages()[#sb.messages()]
    assert.equals(1, count(r.message_id))
    -- the sandbox's copy is the data as received: the same byte count as declared
    assert.equals(declared, #m.data)
    assert.falsy(size:find("BODY=8BITMIME", 1, true), size)  -- the composer encoded the UTF-8
  end)

  it("returns token endpoint refusals with the AADSTS code and its hint", function()
    srv.inject("/token", { { status = 401, body = { error = "invalid_client",
      error_description = "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        .. "request is the client secret value, not the client secret ID.", error_codes = { 7000215 } } } }, true)
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(profile { trace = trace }))
    local r, err = mailer:send { raw = raw("x", "maad"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("oauth", err.kind)
    assert.equals("invalid_client", err.oauth_error)
    assert.equals("AADSTS7000215", err.provider_code)
    assert.truthy(err.hint:find("Value", 1, true), err.hint)
    assert.equals(1, err.attempts)
    mailer:close()
    h.assert_no_secrets(tostring(err) .. "\n" .. trace.text(), { srv.secrets.post })
  end)

  it("reuses one session up to max_messages_per_session, and none with reuse = false", function()
    local conns = sb.stats().connections
    local log = h.tmpdir() .. "/trace.log"
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { policy = { max_messages_per_session = 2 }, trace = log,
      on_token = on_token }))
    for i = 1, 3 do assert(mailer:send { raw = raw("reuse", "mreuse" .. i), to = "ops@example.org" }) end
    mailer:close()
    assert.equals(2, sb.stats().connections - conns)
    local text = assert(h.read_file(log))
    local _, auths = text:gsub("smtp > AUTH XOAUTH2 <user=noreply@contoso.test auth=Bearer <redacted>>", "")
    assert.equals(2, auths)
    assert.truthy(text:find("mailer sent ", 1, true))
    h.assert_no_secrets(text, secrets(seen))
    conns = sb.stats().connections
    mailer = assert(oauthmail.new(profile { policy = { reuse = false } }))
    for i = 1, 3 do assert(mailer:send { raw = raw("noreuse", "mnoreuse" .. i), to = "ops@example.org" }) end
    mailer:close()
    assert.equals(3, sb.stats().connections - conns)
  end)

  it("returns the receipt, not an exception, when the trace raises after delivery (no double send)", function()
    local events = {}
    local function trace(ev)
      events[#events + 1] = ev.event
      if ev.event == "sent" then error("trace sink is full") end
    end
    local mailer = assert(oauthmail.new(profile { trace = trace }))
    -- a caller that retries on exceptions: it must not get one
    local r, err
    for _ = 1, 3 do
      local ok, a, b = pcall(mailer.send, mailer, { raw = raw("trace raises", "mtraceraise"), to = "ops@example.org" })
      if ok then r, err = a, b break end
    end
    assert.is_nil(err)
    assert.equals(250, r.reply.code)
    assert.equals("mtraceraise@contoso.test", r.message_id)
    assert.truthy(r.trace_error:find("trace sink is full", 1, true), r.trace_error)
    -- a trace that raises on every event: the next send still works and delivers once
    local mailer2 = assert(oauthmail.new(profile { trace = function() error("always") end }))
    local r2 = assert(mailer2:send { raw = raw("trace always raises", "mtracealways"), to = "ops@example.org" })
    assert.truthy(r2.trace_error:find("always", 1, true))
    -- the next send of the first mailer starts clean
    r = assert(mailer:send { raw = raw("trace ok", "mtraceok"), to = "ops@example.org", }) -- raises on sent again
    assert.truthy(r.trace_error)
    mailer:close()
    mailer2:close()
    assert.equals(1, count("mtraceraise@contoso.test"))
    assert.equals(1, count("mtracealways@contoso.test"))
    assert.equals(1, count("mtraceok@contoso.test"))
  end)

  it("gives up, with a trace event, when hooks.classify returns an unknown action", function()
    sb.faults { { stage = "mail", code = 451, enhanced = "4.7.500", text = "Server busy", times = 1 } }
    local trace = h.trace_collector()
    local slept, sleep = fake_sleep()
    local mailer = assert(oauthmail.new(profile {
      trace = trace, policy = { sleep = sleep, attempts = 3 },
      classify = function() return "retyr" end,
    }))
    local r, err = mailer:send { raw = raw("typo", "mclassify"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals(451, err.code)
    assert.equals(1, err.attempts)
    assert.same({}, slept)
    local text = trace.text()
    assert.truthy(text:find("event=classify_invalid", 1, true), text)
    assert.truthy(text:find("returned=retyr", 1, true), text)
    -- a known action from the hook is still obeyed
    sb.faults { { stage = "mail", code = 550, enhanced = "5.7.1", text = "Denied", times = 1 } }
    mailer.hooks.classify = function() return "retry" end
    r = assert(mailer:send { raw = raw("retry", "mclassify2"), to = "ops@example.org" })
    assert.equals(2, r.attempts)
    mailer:close()
    assert.equals(0, count("mclassify@contoso.test"))
    assert.equals(1, count("mclassify2@contoso.test"))
  end)

  it("creates a trace file 0600 whatever the umask, and writes no secret to it", function()
    local fs = require("oauthmail.core").fs
    local path = h.tmpdir() .. "/trace.log"
    local seen, on_token = catcher()
    local mailer = assert(oauthmail.new(profile { trace = path, on_token = on_token }))
    assert(mailer:send { raw = raw("file trace", "mfiletrace"), to = "ops@example.org" })
    mailer:close()
    assert.equals(384, fs.stat(path).mode)   -- 0600
    local text = h.read_file(path)
    assert.truthy(text:find("AUTH XOAUTH2", 1, true), text)
    h.assert_no_secrets(text, secrets(seen))
  end)

  it("refuses through before_send and lets the hook rewrite the message", function()
    local mailer = assert(oauthmail.new(profile {
      before_send = function(msg)
        if msg.to == "blocked@example.org" then return false, "recipient on the block list" end
        msg.to = { msg.to, "audit@contoso.test" }
      end,
    }))
    local r, err = mailer:send { raw = raw("x", "mblock"), to = "blocked@example.org" }
    assert.is_nil(r)
    assert.equals("policy", err.kind)
    assert.truthy(err.message:find("block list", 1, true))
    r = assert(mailer:send { raw = raw("x", "mhook"), to = "ops@example.org" })
    assert.same({ "ops@example.org", "audit@contoso.test" }, r.accepted)
    mailer:close()
  end)

  it("loads a profile from a file and reports network failures as values", function()
    local dir = h.tmpdir()
    local path = dir .. "/tenant.lua"
    h.write_file(path, string.format([[
      return { provider = "generic", token_endpoint = %q, client_id = "cc-post", client_secret = %q,
        client_auth = "client_secret_post", scope = "mail.send", ca_file = %q, user = %q,
        smtp = { host = "127.0.0.1", port = %d, ca_file = %q, timeout = 5 },
        policy = { attempts = 2, sleep = function() end } }
    ]], srv.token_endpoint, srv.secrets.post, srv.ca, USER, h.free_port(), sb.ca))
    local mailer = assert(oauthmail.new(path))
    assert.equals("tenant", mailer.name)
    local r, err = mailer:send { raw = raw("x", "mnet"), to = "ops@example.org" }
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.equals(2, err.attempts)
    mailer:close()
  end)
end)

describe("mailer against the smtp-server peer", function()
  it("sends with a pre-provisioned real token from the oidc-provider", function()
    local srv = oidc.start()
    local peer
    local ok, e = pcall(function()
      local oauth2 = require "oauthmail.oauth2"
      local tok = assert(oauth2.client_credentials(srv.cfg("cc-post")))
      peer = smtp_peers.node_smtp { token = tok.access_token, user = USER, auth = { "XOAUTH2" } }
      -- a store that hands out the token provisioned elsewhere (e.g. a secret manager)
      local provisioned = {
        load = function() return tok end, save = function() return true end,
        lock = function() return function() return true end end,
      }
      local trace = h.trace_collector()
      local mailer = assert(oauthmail.new {
        provider = "generic", token_endpoint = srv.token_endpoint, flow = "client_credentials",
        client_id = "cc-post", client_secret = srv.secrets.post, ca_file = srv.ca, user = USER,
        store = provisioned, trace = trace,
        smtp = { host = "127.0.0.1", port = peer.port, ca_file = peer.ca },
      })
      local r = assert(mailer:send { raw = raw("peer", "mpeer"), to = { "x@example.org", "y@example.org" } })
      assert.equals(250, r.reply.code)
      assert.same({ "x@example.org", "y@example.org" }, r.accepted)
      mailer:close()
      local msgs = peer.messages()
      assert.equals(1, #msgs)
      assert.equals(USER, msgs[1].user)
      assert.truthy(msgs[1].data:find("Message-ID: <mpeer@contoso.test>", 1, true))
      h.assert_no_secrets(trace.text(), { tok.access_token, srv.secrets.post })
    end)
    if peer then peer.stop() end
    srv.stop()
    assert(ok, e)
  end)
end)

-- Issue 12, defect 2: nothing may raise between taking a governor slot and
-- giving it back; bad bytes in the user or in a token are clear errors.
describe("mailer with hostile input around the governor", function()
  local stub, peer
  local policy = require "oauthmail.policy"

  setup(function()
    stub = oidc.start_fault()
    peer = smtp_peers.node_smtp { token = "the-good-token-0123456789", user = USER, auth = { "XOAUTH2" } }
  end)

  teardown(function()
    if peer then peer.stop() end
    if stub then stub.stop() end
  end)

  before_each(function() stub.reset() end)

  local function profile(extra)
    local p = {
      provider = "generic", token_endpoint = stub.url .. "/token", flow = "client_credentials",
      client_id = "cc", client_secret = "hostile-secret-42", ca_file = stub.ca, user = USER,
      smtp = { host = "127.0.0.1", port = peer.port, ca_file = peer.ca, timeout = 5 },
      policy = { attempts = 1, sleep = function() end },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  for name, user in pairs { CR = "a\rb@example.org", LF = "a\nb@example.org", NUL = "a\0b@example.org",
    SOH = "a\1b@example.org", DEL = "a\127b@example.org" } do
    it("refuses a user with " .. name .. " at new, naming the field", function()
      local m, err = oauthmail.new(profile { user = user })
      assert.is_nil(m)
      assert.equals("config", err.kind)
      assert.equals("user", err.field)
      assert.truthy(err.message:find("control", 1, true))
    end)
  end

  local bad_tokens = {
    ["CR LF"] = "abc\r\nQUIT\r\n", NUL = "abc\0def", SOH = "abc\1def", space = "abc def",
    ["70,000 bytes"] = string.rep("A", 70000),
  }
  for name, token in pairs(bad_tokens) do
    it("refuses an access_token with " .. name .. " from the token endpoint, and frees the slot", function()
      stub.queue("/token", { { json = { access_token = token, token_type = "Bearer", expires_in = 3600 } },
        { json = { access_token = token, token_type = "Bearer", expires_in = 3600 } } })
      local gov = policy.governor({ connections = 1, max_wait = 0 }, { sleep = function() end })
      local trace = h.trace_collector()
      local m = assert(oauthmail.new(profile { policy = { attempts = 1, governor = gov, sleep = function() end },
        trace = trace }))
      local ok, r, err = pcall(m.send, m, { raw = raw("x", "mbad"), to = "ops@example.org" })
      assert.is_true(ok, r)                 -- a value, never a raise
      assert.is_nil(r)
      assert.equals("oauth", err.kind)
      assert.equals("malformed", err.reason)
      assert.truthy(err.message:find("access_token", 1, true))
      assert.equals(0, gov.open)            -- the slot is free again
      m:close()
      assert.equals(0, #peer.messages())
      if #token < 1000 then h.assert_no_secrets(trace.text() .. tostring(err), { token, "hostile-secret-42" }) end
    end)
  end

  it("refuses a stored access_token with control bytes instead of raising, and frees the slot", function()
    stub.queue("/token", { { json = { access_token = "abc\1def", expires_in = 3600 } } })
    local gov = policy.governor({ connections = 1, max_wait = 0 }, { sleep = function() end })
    local store = {
      load = function() return { access_token = "stored\r\nRSET", expires_at = os.time() + 3600 } end,
      save = function() return true end, lock = function() return function() return true end end,
    }
    local m = assert(oauthmail.new(profile { store = store,
      policy = { attempts = 1, governor = gov, sleep = function() end } }))
    local ok, r, err = pcall(m.send, m, { raw = raw("x", "mbad2"), to = "ops@example.org" })
    assert.is_true(ok, r)
    assert.is_nil(r)
    assert.equals("oauth", err.kind)
    assert.equals(0, gov.open)
    m:close()
  end)

  it("gives the slot back even when something below raises", function()
    local gov = policy.governor({ connections = 1, max_wait = 0 }, { sleep = function() end })
    local store = {
      load = function() return { access_token = "the-good-token-0123456789", expires_at = os.time() + 3600 } end,
      save = function() return true end, lock = function() return function() return true end end,
    }
    local m = assert(oauthmail.new(profile { store = store,
      policy = { attempts = 1, governor = gov, sleep = function() end } }))
    local smtp = require "oauthmail.smtp"
    local real = smtp.Session.auth
    smtp.Session.auth = function() error("boom in auth") end
    local ok, e = pcall(m.send, m, { raw = raw("x", "mraise"), to = "ops@example.org" })
    smtp.Session.auth = real
    assert.is_false(ok)
    assert.truthy(tostring(e):find("boom in auth", 1, true))
    assert.equals(0, gov.open)
    -- the mailer and the governor are still good for the next message
    local r, err = m:send { raw = raw("y", "mafter"), to = "ops@example.org" }
    assert.is_nil(err)
    assert.equals(250, r.reply.code)
    assert.equals(1, gov.open)
    m:close()
    assert.equals(0, gov.open)
  end)
end)

describe("oauthmail.format_event", function()
  it("writes one line per event whatever bytes a server put in it (defect 4)", function()
    for _, ev in ipairs {
      { proto = "smtp", dir = "S", text = "535 no\r\n2026-01-01T00:00:00Z smtp < 235 2.7.0 forged" },
      { type = "mailer", event = "attempt_failed", text = "a\nb", reason = "x\0\27y" },
    } do
      local line = oauthmail.format_event(ev)
      assert.is_nil(line:find("[%c]"), line)
    end
    assert.truthy(oauthmail.format_event { proto = "smtp", dir = "S", text = "a\r\nb" }:find("a\\r\\nb", 1, true))
  end)
end)
