-- oauthmail.smtp: the session over a scripted fake transport (exact bytes,
-- exact grouping of writes), then against real servers on loopback.
local smtp = require "oauthmail.smtp"
local h = require "spec.support.helpers"
local peers = require "spec.support.smtp_peers"

local TOKEN = "ya29.A0ARrdaM-fake-but-secret-token_xyz0123456789"
local USER = "alice@example.org"

local core = require "oauthmail.core"
local errors = require "oauthmail.errors"

local function b64(s) return h.secret_forms(s)[2] end
local function xoauth2(user, token) return b64("user=" .. user .. "\1auth=Bearer " .. token .. "\1\1") end

local GREET = { "S", "220 mx.test ESMTP\r\n" }
local EHLO = { "C", "EHLO localhost\r\n" }
local CAPS_FULL = { "S", "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 100000\r\n" ..
  "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH XOAUTH2 OAUTHBEARER PLAIN LOGIN\r\n" }
local CAPS_PLAIN = { "S", "250-mx.test\r\n250 AUTH XOAUTH2 PLAIN LOGIN\r\n" }

-- A server written as a function: each command line the client writes goes
-- to on_line(line, state), whose return value is what the server says (a
-- BDAT's reply comes once its payload has arrived). For servers with a
-- state of their own (a transaction left open) and for endless ones.
local function server(on_line)
  local t = { inbuf = "220 fake ESMTP\r\n", lines = {}, pending = "", bdat = 0, after_bdat = "" }
  function t.send(_, data)
    t.pending = t.pending .. data
    while true do
      if t.bdat > 0 then
        local take = math.min(t.bdat, #t.pending)
        t.pending, t.bdat = t.pending:sub(take + 1), t.bdat - take
        if t.bdat > 0 then break end
        t.inbuf = t.inbuf .. t.after_bdat
      end
      local line, rest = t.pending:match("^(.-)\r\n(.*)$")
      if not line then break end
      t.pending = rest
      t.lines[#t.lines + 1] = line
      local r = on_line(line, t) or ""
      local n = tonumber(line:match("^BDAT (%d+)") or "0")
      if n > 0 then t.bdat, t.after_bdat = n, r else t.inbuf = t.inbuf .. r end
    end
    return true
  end
  function t.receive_some()
    if #t.inbuf == 0 then return nil, errors.new("network", "the fake server has nothing to say", { reason = "timeout" }) end
    local d = t.inbuf
    t.inbuf = ""
    return d
  end
  function t.starttls() return true end
  function t.close() t.closed = true end
  return t
end

-- a session over a fake transport, already past the greeting
local function fake_session(script, extra)
  local full = { GREET, EHLO }
  for _, s in ipairs(script) do full[#full + 1] = s end
  local t = peers.fake(full)
  local o = { transport = t, tls = "none", allow_plaintext_auth = true }
  for k, v in pairs(extra or {}) do o[k] = v end
  local s, err = smtp.open(o)
  return s, t, err
end

describe("smtp session (fake transport)", function()
  describe("opening", function()
    it("upgrades with STARTTLS and forgets what it learned in the clear", function()
      local t = peers.fake {
        GREET, EHLO,
        { "S", "250-mx.test\r\n250-AUTH PLAIN\r\n250-SIZE 10\r\n250 STARTTLS\r\n" },
        { "C", "STARTTLS\r\n" }, { "S", "220 2.0.0 ready\r\n" }, { "TLS" },
        EHLO, { "S", "250-mx.test\r\n250-PIPELINING\r\n250 AUTH XOAUTH2\r\n" },
      }
      local s = assert(smtp.open { transport = t, tls = "starttls", host = "mx.test" })
      assert.is_true(t.tls)
      assert.same({ PIPELINING = true, AUTH = { XOAUTH2 = true } }, s.capabilities)
      assert.is_true(t.done())
    end)

    it("refuses to go on when STARTTLS is not offered, and sends nothing more", function()
      local t = peers.fake { GREET, EHLO, CAPS_PLAIN }
      local s, err = smtp.open { transport = t, tls = "starttls" }
      assert.is_nil(s)
      assert.equal("tls", err.kind)
      assert.equal("starttls_not_offered", err.reason)
      assert.is_false(err.retryable)
      assert.is_true(t.closed)
      assert.equal("EHLO localhost\r\n", t.transcript())
    end)

    it("refuses to go on when STARTTLS is refused", function()
      local t = peers.fake {
        GREET, EHLO, { "S", "250-mx.test\r\n250 STARTTLS\r\n" },
        { "C", "STARTTLS\r\n" }, { "S", "454 4.7.0 TLS not available due to temporary reason\r\n" },
      }
      local s, err = smtp.open { transport = t, tls = "starttls" }
      assert.is_nil(s)
      assert.equal("tls", err.kind)
      assert.equal(454, err.code)
      assert.equal("4.7.0", err.enhanced)
      assert.is_true(t.closed)
    end)

    it("refuses plain-text bytes that came along with the STARTTLS reply", function()
      local t = peers.fake {
        GREET, EHLO, { "S", "250-mx.test\r\n250 STARTTLS\r\n" },
        { "C", "STARTTLS\r\n" }, { "S", "220 go\r\n250-evil\r\n250 AUTH PLAIN\r\n" },
      }
      local s, err = smtp.open { transport = t, tls = "starttls" }
      assert.is_nil(s)
      assert.equal("injection", err.reason)
    end)

    it("falls back to HELO for a server without ESMTP", function()
      local s, t = fake_session {
        { "S", "502 5.5.1 command not implemented\r\n" },
        { "C", "HELO localhost\r\n" }, { "S", "250 mx.test\r\n" },
      }
      assert.truthy(s)
      assert.same({}, s.capabilities)
      assert.is_true(t.done())
    end)

    it("reports a greeting that refuses the session", function()
      local t = peers.fake { { "S", "554 5.7.1 go away\r\n" }, { "C", "QUIT\r\n" } }
      local s, err = smtp.open { transport = t, tls = "none" }
      assert.is_nil(s)
      assert.equal("smtp", err.kind)
      assert.equal(554, err.code)
      assert.is_false(err.retryable)
    end)

    it("raises for bad option types", function()
      assert.has_error(function() smtp.open { host = 1 } end)
      assert.has_error(function() smtp.open { host = "x", tls = "maybe" } end)
      assert.has_error(function() smtp.open { host = "x", port = "25" } end)
    end)
  end)

  describe("auth", function()
    it("sends XOAUTH2 as an initial response and traces it redacted", function()
      local trace = h.trace_collector()
      local s, t = fake_session({
        CAPS_FULL,
        { "C", "AUTH XOAUTH2 " .. xoauth2(USER, TOKEN) .. "\r\n" }, { "S", "235 2.7.0 Accepted\r\n" },
      }, { trace = trace })
      assert.is_true(s:auth { mechanism = "xoauth2", user = USER, token = TOKEN })
      assert.is_true(t.done())
      local text = trace.text()
      assert.truthy(text:find("auth=Bearer <redacted>", 1, true), text)
      assert.truthy(text:find(USER, 1, true))
      h.assert_no_secrets(text, { TOKEN, "user=" .. USER .. "\1auth=Bearer " .. TOKEN .. "\1\1" })
    end)

    it("sends XOAUTH2 in two steps when asked", function()
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "AUTH XOAUTH2\r\n" }, { "S", "334 \r\n" },
        { "C", xoauth2(USER, TOKEN) .. "\r\n" }, { "S", "235 2.7.0 Authentication successful\r\n" },
      }
      assert.is_true(s:auth { user = USER, token = TOKEN, two_step = true })
      assert.is_true(t.done())
    end)

    it("goes two-step by itself for a long token (a 1 KB AUTH line limit)", function()
      local long = ("eyJ0eXAiOiJKV1Qi" .. string.rep("x", 60)):rep(30)
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "AUTH XOAUTH2\r\n" }, { "S", "334 \r\n" },
        { "C", xoauth2(USER, long) .. "\r\n" }, { "S", "235 2.7.0 ok\r\n" },
      }
      assert.is_true(s:auth { user = USER, token = long })
      assert.is_true(t.done())
    end)

    it("returns the decoded error challenge with the final reply", function()
      local trace = h.trace_collector()
      local json = '{"status":"401","schemes":"Bearer","scope":"https://outlook.office365.com/.default"}'
      local s, t = fake_session({
        CAPS_FULL,
        { "C", "AUTH OAUTHBEARER " .. b64("n,a=" .. USER .. ",\1host=mx.test\1port=587\1auth=Bearer " .. TOKEN .. "\1\1") .. "\r\n" },
        { "S", "334 " .. b64(json) .. "\r\n" },
        { "C", "AQ==\r\n" },
        { "S", "535 5.7.3 Authentication unsuccessful\r\n" },
      }, { trace = trace, host = "mx.test", port = 587, tls = "implicit" })
      local ok, err = s:auth { mechanism = "oauthbearer", user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.equal("auth", err.kind)
      assert.equal(535, err.code)
      assert.equal("5.7.3", err.enhanced)
      assert.equal("Authentication unsuccessful", err.text)
      assert.same({ status = "401", schemes = "Bearer", scope = "https://outlook.office365.com/.default", json = json },
        err.challenge)
      assert.is_false(err.retryable)
      assert.is_true(t.done())
      local text = trace.text()
      assert.truthy(text:find("error challenge: " .. json, 1, true), text)
      h.assert_no_secrets(text, { TOKEN })
      h.assert_no_secrets(tostring(err), { TOKEN })
    end)

    it("refuses to authenticate without TLS unless allowed, before sending anything", function()
      local s, t = fake_session({ CAPS_FULL }, { allow_plaintext_auth = false })
      local ok, err = s:auth { user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.equal("config", err.kind)
      assert.equal("plaintext_auth", err.reason)
      assert.equal("EHLO localhost\r\n", t.transcript())
    end)

    it("says which mechanisms the server offers when the asked one is missing", function()
      local s = fake_session { { "S", "250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n" } }
      local ok, err = s:auth { mechanism = "oauthbearer", user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.equal("auth", err.kind)
      assert.truthy(err.message:find("LOGIN PLAIN", 1, true))
    end)

    it("does LOGIN and PLAIN only when asked", function()
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "AUTH LOGIN\r\n" }, { "S", "334 VXNlcm5hbWU6\r\n" },
        { "C", b64(USER) .. "\r\n" }, { "S", "334 UGFzc3dvcmQ6\r\n" },
        { "C", b64("correct horse") .. "\r\n" }, { "S", "235 ok\r\n" },
      }
      assert.is_true(s:auth { mechanism = "login", user = USER, password = "correct horse" })
      assert.is_true(t.done())
      assert.has_error(function() s:auth { mechanism = "plain", user = USER, token = TOKEN } end)
    end)

    it("stops a server that answers every line with 334, and abandons the session", function()
      for _, o in ipairs {
        { user = USER, token = TOKEN },
        { user = USER, token = TOKEN, two_step = true },
        { mechanism = "oauthbearer", user = USER, token = TOKEN },
        { mechanism = "plain", user = USER, password = "correct horse" },
        { mechanism = "login", user = USER, password = "correct horse" },
      } do
        local answered = 0
        local t = server(function(line)
          if line:match("^EHLO") then return "250-fake\r\n250 AUTH XOAUTH2 OAUTHBEARER PLAIN LOGIN\r\n" end
          answered = answered + 1
          -- a client that never stops would spin here for ever: give up loudly
          if answered > 50 then error("the client is still answering 334s", 0) end
          return "334 \r\n"
        end)
        local s = assert(smtp.open { transport = t, tls = "none", allow_plaintext_auth = true })
        local ok, err = s:auth(o)
        assert.is_nil(ok)
        assert.equal("smtp", err.kind)
        assert.equal("malformed", err.reason)
        assert.equal(err, s.broken)
        assert.is_true(t.closed)
        -- EHLO, AUTH, at most two answers or one answer and one cancel
        assert.truthy(#t.lines <= 4, #t.lines .. " lines written")
      end
    end)

    -- Issue 12, defects 3 and 4: the decoded challenge quoting the token, and
    -- CR/LF inside it that once forged a "235" line in the trace file.
    it("masks a token the error challenge quotes, and escapes its line breaks", function()
      local trace = h.trace_collector()
      local json = '{"status":"401","scope":"x","echo":"' .. TOKEN .. '","access_token":"other-secret-value-77",' ..
        '"note":"a\r\n2026-01-01T00:00:00Z smtp < 235 2.7.0 forged"}'
      local s, t = fake_session({
        CAPS_FULL,
        { "C", "AUTH OAUTHBEARER " .. b64("n,a=" .. USER .. ",\1host=mx.test\1port=587\1auth=Bearer " .. TOKEN .. "\1\1") .. "\r\n" },
        { "S", "334 " .. b64(json) .. "\r\n" },
        { "C", "AQ==\r\n" },
        { "S", "535 5.7.3 Authentication unsuccessful\r\n" },
      }, { trace = trace, host = "mx.test", port = 587, tls = "implicit" })
      local ok, err = s:auth { mechanism = "oauthbearer", user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.is_true(t.done())
      assert.equal("401", err.challenge.status)
      local all = trace.text() .. tostring(err) .. err.challenge.json
      h.assert_no_secrets(all, { TOKEN, "other-secret-value-77", b64(json) })
      for _, ev in ipairs(trace.events) do
        assert.is_nil(tostring(ev.text):find("[\r\n]"), ev.text)
      end
      assert.is_nil(err.challenge.json:find("[\r\n]"))
      assert.truthy(trace.text():find("\\r\\n2026-01-01T00:00:00Z smtp < 235", 1, true), trace.text())
    end)

    it("escapes control bytes in any server line it traces", function()
      local trace = h.trace_collector()
      local s = fake_session({
        { "S", "250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n" },
        { "C", "NOOP\r\n" }, { "S", "250 ok\0\27[31m red\r\n" },
      }, { trace = trace })
      assert.is_true(s:noop())
      local text = trace.text()
      assert.truthy(text:find("250 ok\\x00\\x1B[31m red", 1, true), text)
    end)

    it("redacts a server's echo of the AUTH line from the trace and the error", function()
      local dotted = "ab.cd.ef.gh.ij.kl.mn.op.qr.st.uv.wx"
      for _, case in ipairs {
        { token = TOKEN, two_step = false },
        { token = TOKEN, two_step = true },
        { token = dotted, two_step = false },
      } do
        local trace = h.trace_collector()
        local t = server(function(line)
          if line:match("^EHLO") then return "250-fake\r\n250 AUTH XOAUTH2\r\n" end
          if line == "AUTH XOAUTH2" then return "334 \r\n" end
          -- sendmail-style: the refused command (or a decoded token) quoted back
          return '500-5.5.1 Command unrecognized: "' .. line .. '"\r\n' ..
            "500 5.5.1 token " .. case.token .. " not understood\r\n"
        end)
        local s = assert(smtp.open { transport = t, tls = "none", allow_plaintext_auth = true, trace = trace })
        local ok, err = s:auth { user = USER, token = case.token, two_step = case.two_step }
        assert.is_nil(ok)
        assert.equal(500, err.code)
        assert.truthy(err.text:find("<redacted>", 1, true), err.text)
        local raw = "user=" .. USER .. "\1auth=Bearer " .. case.token .. "\1\1"
        h.assert_no_secrets(trace.text(), { case.token, raw })
        h.assert_no_secrets(tostring(err), { case.token, raw })
        h.assert_no_secrets(err.text, { case.token, raw })
        assert.truthy(trace.text():find("Command unrecognized", 1, true))
      end
    end)

    it("lets allow_plaintext_auth send credentials in clear only to a loopback host", function()
      for _, host in ipairs { "mx.example.org", "127.0.0.1.example.org", "10.0.0.1", "::2", "localhost.evil" } do
        local s, t = fake_session({ CAPS_FULL }, { host = host })
        local ok, err = s:auth { user = USER, token = TOKEN }
        assert.is_nil(ok)
        assert.equal("config", err.kind)
        assert.equal("plaintext_auth", err.reason)
        assert.truthy(err.message:find(host, 1, true), err.message)
        assert.truthy(err.message:find("loopback", 1, true), err.message)
        assert.equal("EHLO localhost\r\n", t.transcript())
      end
      for _, host in ipairs { "localhost", "LocalHost", "127.0.0.1", "127.3.2.1", "::1", "[::1]" } do
        local s, t = fake_session({
          CAPS_FULL,
          { "C", "AUTH XOAUTH2 " .. xoauth2(USER, TOKEN) .. "\r\n" }, { "S", "235 2.7.0 Accepted\r\n" },
        }, { host = host })
        assert.is_true(s:auth { user = USER, token = TOKEN })
        assert.is_true(t.done())
      end
    end)

    it("reads openid-configuration from the error challenge", function()
      local json = '{"status":"invalid_token","scope":"https://mail.google.com/",' ..
        '"openid-configuration":"https://accounts.google.com/.well-known/openid-configuration"}'
      local s = fake_session({
        CAPS_FULL,
        { "C", "AUTH XOAUTH2 " .. xoauth2(USER, TOKEN) .. "\r\n" }, { "S", "334 " .. b64(json) .. "\r\n" },
        { "C", "\r\n" }, { "S", "535 5.7.8 Username and Password not accepted\r\n" },
      })
      local ok, err = s:auth { user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.equal("https://accounts.google.com/.well-known/openid-configuration", err.challenge["openid-configuration"])
      assert.equal("invalid_token", err.challenge.status)
    end)

    it("keeps an error challenge that is not base64 as opaque text", function()
      local s = fake_session({
        CAPS_FULL,
        { "C", "AUTH XOAUTH2 " .. xoauth2(USER, TOKEN) .. "\r\n" }, { "S", "334 QQ==QQ==\r\n" },
        { "C", "\r\n" }, { "S", "535 5.7.8 no\r\n" },
      })
      local ok, err = s:auth { user = USER, token = TOKEN }
      assert.is_nil(ok)
      assert.equal(535, err.code)
      assert.same({ text = "QQ==QQ==" }, err.challenge)
    end)
  end)

  describe("send", function()
    it("pipelines the envelope in one write and the body with its terminator in one more", function()
      local s, t = fake_session {
        CAPS_PLAIN and { "S", "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n" },
        { "S", "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n" },
        { "C", "Subject: hi\r\n\r\n..dot\r\n.\r\n" },
        { "S", "250 2.0.0 queued as 1234\r\n" },
      }
      local before = #t.writes
      local r = assert(s:send { from = "a@example.org", to = { "b@example.org", "nobody@example.org" },
        data = "Subject: hi\n\n.dot" })
      assert.equal(2, #t.writes - before)
      assert.equal(250, r.code)
      assert.equal("2.0.0", r.enhanced)
      assert.equal("queued as 1234", r.text)
      assert.same({ "b@example.org" }, r.accepted)
      assert.equal(550, r.rejected["nobody@example.org"].code)
      assert.equal("5.1.1", r.rejected["nobody@example.org"].enhanced)
      assert.is_true(t.done())
    end)

    it("waits for each reply when the server does not pipeline", function()
      local s, t = fake_session {
        { "S", "250 mx.test\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "RCPT TO:<b@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "DATA\r\n" }, { "S", "354 go\r\n" },
        { "C", "hello\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "hello" })
      assert.is_true(t.done())
    end)

    it("makes every recipient refused an error with the rejected map, and stays usable", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n450 4.2.1 mailbox busy\r\n554 5.5.1 no valid recipients\r\n" },
        { "C", "RSET\r\n" }, { "S", "250 flushed\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "C", "x\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      local r, err = s:send { from = "a@example.org", to = { "x@example.org" }, data = "x" }
      assert.is_nil(r)
      assert.equal("smtp", err.kind)
      assert.equal(450, err.code)
      assert.is_true(err.retryable)
      assert.equal(450, err.rejected["x@example.org"].code)
      assert.truthy(s:send { from = "a@example.org", to = { "y@example.org" }, data = "x" })
      assert.is_true(t.done())
    end)

    it("sends an empty message to a server that said 354 with no recipient", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n" },
        { "C", ".\r\n" }, { "S", "554 5.5.1 no recipients\r\n" },
        { "C", "RSET\r\n" }, { "S", "250 flushed\r\n" },
      }
      local r, err = s:send { from = "a@example.org", to = { "x@example.org" }, data = "secret body" }
      assert.is_nil(r)
      assert.equal(550, err.code)
      assert.is_true(t.done())
    end)

    it("refuses CRLF and unbalanced <> in addresses before anything is sent", function()
      local s, t = fake_session { { "S", "250-mx.test\r\n250 PIPELINING\r\n" } }
      local n = #t.writes
      for _, bad in ipairs {
        { from = "a@example.org\r\nRCPT TO:<evil@example.org>", to = "b@example.org" },
        { from = "a@example.org", to = { "b@example.org", "c@example.org>\r\nDATA" } },
        { from = "a@example.org", to = { "<b@example.org" } },
        { from = "jürgen@example.org", to = "b@example.org" },
      } do
        bad.data = "x"
        local r, err = s:send(bad)
        assert.is_nil(r)
        assert.equal("config", err.kind)
      end
      assert.equal(n, #t.writes)
    end)

    it("declares SIZE and BODY=8BITMIME and refuses a message over the limit", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 20\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=6 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "C", "h\195\169llo\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "h\195\169llo" })
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = string.rep("x", 21) }
      assert.is_nil(r)
      assert.equal("too_large", err.reason)
      assert.is_true(t.done())
    end)

    it("uses BDAT when asked and offered: envelope and chunk in one write", function()
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "MAIL FROM:<a@example.org> SIZE=5\r\nRCPT TO:<b@example.org>\r\nBDAT 8 LAST\r\nhi\r\nyo\r\n" },
        { "S", "250 ok\r\n250 ok\r\n250 2.0.0 sent\r\n" },
      }
      local n = #t.writes
      local r = assert(s:send { from = "a@example.org", to = "b@example.org", data = "hi\nyo", chunking = true })
      assert.equal("2.0.0", r.enhanced)
      assert.equal(1, #t.writes - n)
      assert.is_true(t.done())
    end)

    it("streams a reader function and a file, the terminator with the last chunk", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "C", "line1\r" }, { "C", "\n..line2\r\n" }, { "C", "..x\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "C", "from a file\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      local chunks = { "line1\r", "\n.line2\n", ".x" }
      local i = 0
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org",
        data = function() i = i + 1 return chunks[i] end })
      local path = h.tmpdir() .. "/msg.eml"
      h.write_file(path, "from a file\n")
      local f = assert(io.open(path, "rb"))
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = f })
      f:close()
      assert.is_true(t.done())
    end)

    it("drops the connection when the reader fails, so no truncated message is delivered", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "C", "part one\r\n" },
      }
      local calls = 0
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = function()
        calls = calls + 1
        if calls == 1 then return "part one\n" end
        return nil, "disk on fire"
      end }
      assert.is_nil(r)
      assert.equal("reader", err.reason)
      assert.truthy(err.message:find("disk on fire", 1, true))
      assert.is_true(t.closed)
      local r2, err2 = s:send { from = "a@example.org", to = "b@example.org", data = "x" }
      assert.is_nil(r2)
      assert.equal(err, err2)
    end)

    it("starts the next message's filter afresh after a refused BDAT chunk and RSET", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 CHUNKING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "RCPT TO:<b@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "BDAT 3\r\nabc" }, { "S", "552 5.3.4 too much\r\n" },
        { "C", "RSET\r\n" }, { "S", "250 flushed\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "RCPT TO:<b@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "DATA\r\n" }, { "S", "354 go\r\n" },
        { "C", "..x\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      local chunks = { "abc", "def" }
      local i = 0
      local r, err = s:send { from = "a@example.org", to = "b@example.org", chunking = true,
        data = function() i = i + 1 return chunks[i] end }
      assert.is_nil(r)
      assert.equal(552, err.code)
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = ".x\r\n" })
      assert.is_true(t.done())
    end)

    it("looks at a string for 8-bit bytes only when eight_bit is not given", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=8 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "h\195\169llo\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=7\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "plain\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=8\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "h\195\169llo\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=7 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "plain\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      -- not given: the string is looked at, wherever its 8-bit byte is
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "h\195\169llo\r\n" })
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "plain\r\n" })
      -- given: the caller's word (the mailer has looked already)
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "h\195\169llo\r\n",
        eight_bit = false })
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = "plain\r\n", eight_bit = true })
      assert.is_true(t.done())
    end)

    it("takes size= and eight_bit= for a streamed message", function()
      local function reader(text)
        local done = false
        return function() if done then return nil end done = true return text end
      end
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=6\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "plain\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org> SIZE=7 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "h\195\169llo\r\n.\r\n" }, { "S", "250 sent\r\n" },
        { "C", "MAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "x\r\n.\r\n" }, { "S", "250 sent\r\n" },
      }
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = reader("plain\r\n"),
        size = 6, eight_bit = false })
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = reader("h\195\169llo\r\n"),
        size = 7, eight_bit = true })
      -- nil keeps the old rule: a stream may hold anything
      assert.truthy(s:send { from = "a@example.org", to = "b@example.org", data = reader("x\r\n") })
      local n = #t.writes
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = reader("x"), size = 101 }
      assert.is_nil(r)
      assert.equal("too_large", err.reason)
      assert.equal(n, #t.writes)
      assert.has_error(function() s:send { from = "a@example.org", to = "b@example.org", data = "x", size = "6" } end)
      assert.has_error(function() s:send { from = "a@example.org", to = "b@example.org", data = "x", size = -1 } end)
      assert.is_true(t.done())
    end)

    it("says what the reader's error value says, once", function()
      local s = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" },
      }
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = function()
        return nil, errors.new("config", "attachment report.pdf: No such file", { reason = "reader" })
      end }
      assert.is_nil(r)
      assert.equal("reader", err.reason)
      assert.equal("reading the message failed: attachment report.pdf: No such file", err.message)
      assert.equal("config error: reading the message failed: attachment report.pdf: No such file", tostring(err))
    end)

    it("bounds a whole reply by one deadline, however slowly its bytes come", function()
      local reply = "250 " .. string.rep("x", 200) .. "\r\n"
      local t = { out = { "220 fake\r\n" }, calls = 0, deadlines = {} }
      function t.send(_, d)
        if d:match("^EHLO") then
          -- in two pieces, well in time
          t.out[#t.out + 1] = "250 fa"
          t.out[#t.out + 1] = "ke\r\n"
        elseif d:match("^NOOP") then
          t.dribble = reply
        end
        return true
      end
      -- the transport gets the reply's deadline with every read
      function t.receive_some(_, _, deadline)
        if #t.out > 0 then return table.remove(t.out, 1) end
        if not t.dribble then return nil, errors.new("network", "timed out", { reason = "timeout" }) end
        t.deadlines[#t.deadlines + 1] = deadline
        -- one byte every 0.2 s: each wait is short, the reply is endless
        t.calls = t.calls + 1
        if t.calls > 40 then return nil, errors.new("network", "the fake server gave up", { reason = "closed" }) end
        local left = deadline - core.monotime()
        if left < 0.2 then
          core.sleep(math.max(left, 0))
          return nil, errors.new("network", "timed out", { reason = "timeout" })
        end
        core.sleep(0.2)
        local b = t.dribble:sub(1, 1)
        t.dribble = t.dribble:sub(2)
        return b
      end
      function t.close() t.closed = true end
      local s = assert(smtp.open { transport = t, tls = "none", timeout = 1 })
      local t0 = core.monotime()
      local ok, err = s:noop()
      local took = core.monotime() - t0
      assert.is_nil(ok)
      assert.equal("network", err.kind)
      assert.equal("timeout", err.reason)
      assert.is_true(err.retryable)
      assert.truthy(took < 5, "took " .. took .. " s")
      assert.truthy(t.calls <= 7, t.calls .. " reads")
      -- one deadline for the whole reply, about the session's timeout away
      assert.truthy(#t.deadlines >= 2)
      for _, d in ipairs(t.deadlines) do assert.equal(t.deadlines[1], d) end
      assert.truthy(t.deadlines[1] - t0 <= 1.01)
    end)

    -- A server that answers every command at once but takes `delay` s over
    -- the reply to the end of the data (scanning, relaying).
    local function slow_final_transport(delay)
      local t = { out = { "220 fake\r\n" } }
      function t.send(_, d)
        for line in d:gmatch("[^\r\n]+") do
          if line:match("^EHLO") then t.out[#t.out + 1] = "250 fake\r\n"
          elseif line:match("^MAIL") or line:match("^RCPT") or line:match("^RSET") then t.out[#t.out + 1] = "250 ok\r\n"
          elseif line:match("^DATA") then t.out[#t.out + 1] = "354 go on\r\n"
          elseif line:match("^QUIT") then t.out[#t.out + 1] = "221 bye\r\n"
          end
        end
        if d:find("\r\n%.\r\n$") then t.final_at = core.monotime() + delay end
        return true
      end
      function t.receive_some(_, _, deadline)
        if #t.out > 0 then return table.remove(t.out, 1) end
        if not t.final_at then return nil, errors.new("network", "nothing to say", { reason = "closed" }) end
        if t.final_at > deadline then
          core.sleep(math.max(deadline - core.monotime(), 0))
          return nil, errors.new("network", "timed out", { reason = "timeout" })
        end
        core.sleep(math.max(t.final_at - core.monotime(), 0))
        t.final_at = nil
        return "250 2.0.0 queued as 42\r\n"
      end
      function t.close() t.closed = true end
      return t
    end

    it("waits data_timeout (default 10 minutes, RFC 5321) for the reply to the end of the data, not timeout", function()
      local s = assert(smtp.open { transport = slow_final_transport(1.2), tls = "none", timeout = 0.4 })
      assert.equal(600, s.data_timeout)
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "Subject: x\r\n\r\nbody\r\n" }
      assert.is_nil(err)
      assert.equal(250, r.code)
      -- the envelope's replies still get the session's timeout: a silent server there fails in 0.4 s
      local t = slow_final_transport(0)
      local s2 = assert(smtp.open { transport = t, tls = "none", timeout = 0.4 })
      t.send = function() return true end
      local t0 = core.monotime()
      local ok, nerr = s2:noop()
      assert.is_nil(ok)
      assert.equal("closed", nerr.reason)
      assert.truthy(core.monotime() - t0 < 1)
      -- data_timeout is never shorter than timeout unless given
      assert.equal(900, assert(smtp.open { transport = slow_final_transport(0), tls = "none", timeout = 900 }).data_timeout)
      assert.has_error(function() smtp.open { transport = slow_final_transport(0), tls = "none", data_timeout = 0 } end)
    end)

    it("a data_timeout that runs out says the message may have been accepted (retryable, after_data)", function()
      local s = assert(smtp.open { transport = slow_final_transport(5), tls = "none", timeout = 0.3, data_timeout = 0.6 })
      local t0 = core.monotime()
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "Subject: x\r\n\r\nbody\r\n" }
      local took = core.monotime() - t0
      assert.is_nil(r)
      assert.equal("network", err.kind)
      assert.equal("timeout", err.reason)
      assert.is_true(err.after_data)
      assert.is_true(err.retryable)
      assert.matches("no reply to the end of the message within 0.6 s %(data_timeout%)", err.message)
      assert.matches("may deliver it twice", err.message)
      assert.truthy(took >= 0.55 and took < 2, "took " .. took)
    end)

    it("writes through a connection that is full by waiting for it, and the host's loop ticks meanwhile", function()
      -- a real socket whose server stops reading for 0.5 s: the 8 MB body
      -- cannot all go at once, so the engine's write returns "w" and the
      -- session waits through oauthmail.wait (a task of the built-in loop)
      local oauthmail = require "oauthmail"
      local conn = require "oauthmail.conn"
      local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
      local body = string.rep(string.rep("z", 998) .. "\r\n", 8 * 1024)
      local got, ticks, receipt, serr = 0, 0, nil, nil
      local done = false
      oauthmail.run(function()
        oauthmail.spawn(function()
          local c = assert(l:accept(10))
          c:settimeout(10)
          c:send("220 slow ESMTP\r\n")
          while true do
            local line = assert(c:receive_line())
            if line:match("^EHLO") then c:send("250-slow\r\n250 PIPELINING\r\n")
            elseif line:match("^MAIL") or line:match("^RCPT") then c:send("250 ok\r\n")
            elseif line == "DATA" then
              c:send("354 go\r\n")
              require("oauthmail.wait").sleep(0.5)   -- the client's writes fill the socket meanwhile
              local tail = ""
              while not tail:find("\r\n%.\r\n$") do
                local d = assert(c:receive_some(65536))
                got = got + #d
                tail = (tail .. d):sub(-5)
              end
              c:send("250 2.0.0 took it\r\n")
            elseif line == "QUIT" then c:send("221 bye\r\n") break end
          end
          c:close()
        end)
        oauthmail.spawn(function()
          while not done do
            ticks = ticks + 1
            require("oauthmail.wait").sleep(0.02)
          end
        end)
        local s = assert(smtp.open { host = "127.0.0.1", port = l:port(), tls = "none", timeout = 10 })
        receipt, serr = s:send { from = "a@example.org", to = "b@example.org", data = body }
        s:close()
        done = true
      end)
      l:close()
      assert.is_nil(serr)
      assert.equal(250, receipt.code)
      assert.equal(#body + 3, got)           -- the body and ".\r\n"
      assert.truthy(ticks >= 10, "the loop ticked " .. ticks .. " times")
    end)

    it("states the session's timeout when a dribbling server runs it out (not what was left of it)", function()
      -- a real socket: the greeting's first line comes at once, then one byte
      -- every 0.3 s and never the end of the reply
      local script = h.tmpdir() .. "/dribble.lua"
      h.write_file(script, [[
        local conn = require "oauthmail.conn"
        local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
        io.stdout:write("PORT ", l:port(), "\n") io.stdout:flush()
        local c = assert(l:accept(20))
        c:send("220-hello\r\n")
        for _ = 1, 40 do
          require("oauthmail.core").sleep(0.3)
          if not c:send("x") then break end
        end
      ]])
      local proc = h.spawn(h.lua_bin .. " " .. script, { ready = "PORT (%d+)" })
      local t0 = core.monotime()
      local s, err = smtp.open { host = "127.0.0.1", port = tonumber(proc.match[1]), tls = "none", timeout = 1 }
      local took = core.monotime() - t0
      assert.is_nil(s)
      assert.equal("timeout", err.reason)
      assert.matches("after 1 s", err.message)
      assert.is_nil(err.message:find("after 0%."), err.message)
      assert.truthy(took >= 0.9 and took < 3, "took " .. took)
      proc.stop()
    end)

    it("abandons the session on a malformed reply, with the text in the error", function()
      local s = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "hello? this is not SMTP\r\n" },
      }
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "x" }
      assert.is_nil(r)
      assert.equal("smtp", err.kind)
      assert.equal("malformed", err.reason)
      assert.truthy(err.message:find("this is not SMTP", 1, true))
    end)

    -- only 354 leads to the body; a 2xx to DATA is no receipt (nothing was sent)
    for _, reply in ipairs { "250 2.0.0 ok\r\n", "221 2.0.0 bye\r\n" } do
      it("never counts a DATA answered with " .. reply:sub(1, 3) .. " as delivered (pipelined)", function()
        local s, t = fake_session {
          { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
          { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
          { "S", "250 ok\r\n250 ok\r\n" .. reply },
        }
        local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "the body\r\n" }
        assert.is_nil(r)
        assert.equal("smtp", err.kind)
        assert.equal(tonumber(reply:sub(1, 3)), err.code)
        assert.truthy(err.message:find("instead of 354", 1, true))
        assert.truthy(err.message:find("not sent", 1, true))
        assert.is_true(t.done())          -- not one byte of the body went out
        assert.is_true(t.closed)          -- the dialogue is out of step: dropped
        local r2, err2 = s:send { from = "a@example.org", to = "b@example.org", data = "x" }
        assert.is_nil(r2)
        assert.equal(err, err2)
      end)

      it("never counts a DATA answered with " .. reply:sub(1, 3) .. " as delivered (lock-step)", function()
        local s, t = fake_session {
          { "S", "250 mx.test\r\n" },
          { "C", "MAIL FROM:<a@example.org>\r\n" }, { "S", "250 ok\r\n" },
          { "C", "RCPT TO:<b@example.org>\r\n" }, { "S", "250 ok\r\n" },
          { "C", "DATA\r\n" }, { "S", reply },
        }
        local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "the body\r\n" }
        assert.is_nil(r)
        assert.equal(tonumber(reply:sub(1, 3)), err.code)
        assert.truthy(err.message:find("instead of 354", 1, true))
        assert.is_true(t.done())
        assert.is_true(t.closed)
      end)
    end

    it("reports a refused DATA (554) as the message refused, and stays usable", function()
      local s, t = fake_session {
        { "S", "250 mx.test\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "RCPT TO:<b@example.org>\r\n" }, { "S", "250 ok\r\n" },
        { "C", "DATA\r\n" }, { "S", "554 5.6.0 no\r\n" },
        { "C", "RSET\r\n" }, { "S", "250 ok\r\n" },
      }
      local r, err = s:send { from = "a@example.org", to = "b@example.org", data = "x" }
      assert.is_nil(r)
      assert.equal(554, err.code)
      assert.is_true(t.done())
      assert.is_falsy(t.closed)
    end)

    it("reports a 421 shutdown as retryable", function()
      local s = fake_session {
        { "S", "250 mx.test\r\n421 4.4.2 idle too long\r\n" }, { "C", "NOOP\r\n" },
      }
      local ok, err = s:noop()
      assert.is_nil(ok)
      assert.equal("smtp", err.kind)
      assert.equal(421, err.code)
      assert.is_true(err.retryable)
    end)

    it("closes with QUIT once", function()
      local s, t = fake_session { CAPS_FULL, { "C", "QUIT\r\n" }, { "S", "221 bye\r\n" } }
      assert.is_true(s:close())
      assert.is_true(s:close())
      assert.is_true(t.done())
      assert.is_true(t.closed)
      assert.has_error(function() s:send { from = "a@b.c", to = "d@e.f", data = "" } end)
    end)
  end)

  describe("send_many", function()
    it("pipelines RSET/MAIL/RCPT/BDAT LAST across messages in one write", function()
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "MAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<b@example.org>\r\nBDAT 4 LAST\r\nm1\r\n" ..
          "RSET\r\nMAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<bad@example.org>\r\nBDAT 4 LAST\r\nm2\r\n" ..
          "RSET\r\nMAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<c@example.org>\r\nBDAT 4 LAST\r\nm3\r\n" },
        -- the second window goes out before the first one's replies are
        -- read, so it opens with RSET too
        { "C", "RSET\r\nMAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<bad@example.org>\r\nBDAT 4 LAST\r\nm5\r\n" },
        { "S", "250 ok\r\n250 ok\r\n250 2.0.0 one\r\n" ..
          "250 flushed\r\n250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n" ..
          "250 flushed\r\n250 ok\r\n250 ok\r\n250 2.0.0 three\r\n" ..
          "250 flushed\r\n250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n" },
        { "C", "RSET\r\n" }, { "S", "250 flushed\r\n" },
      }
      local list = {
        { from = "a@example.org", to = "b@example.org", data = "m1" },
        { from = "a@example.org", to = "bad@example.org", data = "m2" },
        { from = "a@example.org", to = "c@example.org", data = "m3" },
        { from = "a@example.org\n", to = "c@example.org", data = "m4" },
        { from = "a@example.org", to = "bad@example.org", data = "m5" },
      }
      local n = #t.writes
      local res = assert(s:send_many(list, { window = 4 }))
      assert.equal(3, #t.writes - n)
      assert.equal("one", res[1].text)
      assert.equal("smtp", res[2].kind)
      assert.equal(550, res[2].rejected["bad@example.org"].code)
      assert.equal("three", res[3].text)
      assert.equal("config", res[4].kind)
      -- the window's last message failed: RSET before anything else is said
      assert.equal(550, res[5].rejected["bad@example.org"].code)
      assert.is_true(t.done())
    end)

    it("never delivers a message twice or under another sender after a failed one", function()
      -- Postfix-like: a transaction whose BDAT was refused stays open, so a
      -- following MAIL is "nested" and its RCPTs join the old transaction
      local tx, delivered = nil, {}
      local t = server(function(line)
        if line:match("^EHLO") then return "250-fake\r\n250-PIPELINING\r\n250 CHUNKING\r\n" end
        local from = line:match("^MAIL FROM:<(.-)>")
        if from then
          if tx then return "503 5.5.1 Error: nested MAIL command\r\n" end
          tx = { from = from, rcpt = {} }
          return "250 2.1.0 Ok\r\n"
        end
        local to = line:match("^RCPT TO:<(.-)>")
        if to then
          if not tx then return "503 5.5.1 Error: need MAIL command\r\n" end
          if to:match("^bad") then return "550 5.1.1 unknown user\r\n" end
          tx.rcpt[#tx.rcpt + 1] = to
          return "250 2.1.5 Ok\r\n"
        end
        if line:match("^BDAT %d+ LAST") then
          if not tx or #tx.rcpt == 0 then return "554 5.5.1 Error: no valid recipients\r\n" end
          delivered[#delivered + 1] = tx.from .. " -> " .. table.concat(tx.rcpt, ",")
          tx = nil
          return "250 2.0.0 Ok: queued\r\n"
        end
        if line == "RSET" then
          tx = nil
          return "250 2.0.0 Ok\r\n"
        end
        if line == "QUIT" then return "221 bye\r\n" end
        return "500 5.5.2 what?\r\n"
      end)
      local s = assert(smtp.open { transport = t, tls = "none" })
      local res = s:send_many {
        { from = "alice@x.example", to = { "bad@y.example" }, data = "Subject: one\r\n\r\nfirst\r\n" },
        { from = "bob@x.example", to = { "carol@y.example" }, data = "Subject: two\r\n\r\nsecond\r\n" },
        { from = "dave@x.example", to = { "bad2@y.example", "erin@y.example" }, data = "three\r\n" },
        { from = "frank@x.example", to = { "bad3@y.example" }, data = "four\r\n" },
      }
      assert.equal("smtp", res[1].kind)
      assert.equal(550, res[1].rejected["bad@y.example"].code)
      assert.equal(250, res[2].code)
      assert.equal(250, res[3].code)
      assert.same({ "erin@y.example" }, res[3].accepted)
      assert.equal("smtp", res[4].kind)
      assert.same({ "bob@x.example -> carol@y.example", "dave@x.example -> erin@y.example" }, delivered)
      -- the session is left without an open transaction
      assert.is_nil(tx)
    end)

    it("marks every unconfirmed message failed when the connection drops mid-batch", function()
      local s, t = fake_session {
        CAPS_FULL,
        { "C", "MAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<b@example.org>\r\nBDAT 4 LAST\r\nm1\r\n" ..
          "RSET\r\nMAIL FROM:<a@example.org> SIZE=2\r\nRCPT TO:<b@example.org>\r\nBDAT 4 LAST\r\nm2\r\n" },
        { "S", "250 ok\r\n250 ok\r\n250 2.0.0 one\r\n250 flushed\r\n250 ok\r\n" },
      }
      local res = s:send_many {
        { from = "a@example.org", to = "b@example.org", data = "m1" },
        { from = "a@example.org", to = "b@example.org", data = "m2" },
      }
      assert.equal(250, res[1].code)
      assert.equal("network", res[2].kind)
      assert.is_true(res[2].retryable)
      assert.is_true(t.closed)
    end)

    -- A server for the batch tests: PIPELINING, CHUNKING and what `caps`
    -- adds; `answer(line, t)` may override the reply to any command.
    local function batch_server(caps, answer)
      local t
      t = server(function(line)
        local r = answer and answer(line, t)
        if r then return r end
        if line:match("^EHLO") then return "250-fake\r\n250-PIPELINING\r\n250-CHUNKING\r\n" .. (caps or "") .. "250 AUTH XOAUTH2\r\n" end
        if line:match("^AUTH") then return "235 2.7.0 ok\r\n" end
        if line:match("^MAIL") then return "250 2.1.0 ok\r\n" end
        if line:match("^RCPT") then return "250 2.1.5 ok\r\n" end
        if line:match("^BDAT") then return "250 2.0.0 queued\r\n" end
        if line == "RSET" then return "250 2.0.0 flushed\r\n" end
        if line == "QUIT" then return "221 bye\r\n" end
        return "500 5.5.2 what?\r\n"
      end)
      return t
    end
    local function msgs(n, extra)
      local l = {}
      for i = 1, n do
        l[i] = { from = "a@example.org", to = "b" .. i .. "@example.org", data = "Subject: " .. i .. "\r\n\r\nm" .. i .. "\r\n" }
        for k, v in pairs(extra and extra[i] or {}) do l[i][k] = v end
      end
      return l
    end

    it("raises for a message of the wrong shape before anything of the batch is written", function()
      local t = batch_server()
      local s = assert(smtp.open { transport = t, tls = "none" })
      local before = #t.lines
      local list = msgs(3, { [2] = { from = 42 } })
      local ok, err = pcall(s.send_many, s, list)
      assert.is_false(ok)
      assert.matches("session:send: 'from' must be a string", err)
      list = msgs(2, { [2] = { to = { "c@example.org", false } } })
      ok, err = pcall(s.send_many, s, list)
      assert.is_false(ok)
      assert.matches("'to%[2%]' must be a string", err)
      assert.equal(before, #t.lines)
      -- and the session goes on
      local res = s:send_many(msgs(2))
      assert.equal(250, res[1].code)
      assert.equal(250, res[2].code)
    end)

    it("refuses a message over the server's SIZE or with a bad address before sending it, and sends the rest", function()
      local t = batch_server("250-SIZE 200\r\n")
      local s = assert(smtp.open { transport = t, tls = "none" })
      local big = "Subject: big\r\n\r\n" .. string.rep("x", 300) .. "\r\n"
      local res = s:send_many(msgs(4, { [2] = { data = big }, [3] = { to = "bad address@example.org" } }))
      assert.equal(250, res[1].code)
      assert.equal("too_large", res[2].reason)
      assert.is_false(res[2].retryable)
      assert.equal("config", res[3].kind)
      assert.is_false(res[3].retryable)
      assert.equal(250, res[4].code)
      local mails = {}
      for _, l in ipairs(t.lines) do if l:match("^MAIL") then mails[#mails + 1] = l end end
      assert.same({ "MAIL FROM:<a@example.org> SIZE=18", "MAIL FROM:<a@example.org> SIZE=18" }, mails)
      for _, l in ipairs(t.lines) do assert.is_nil(l:find("b2@", 1, true)) assert.is_nil(l:find("bad address", 1, true)) end
    end)

    it("asks for 8BITMIME and SMTPUTF8 per message, and refuses a UTF-8 address the server cannot take", function()
      local t = batch_server("250-8BITMIME\r\n250-SMTPUTF8\r\n")
      local s = assert(smtp.open { transport = t, tls = "none" })
      local res = s:send_many(msgs(3, { [2] = { data = "Subject: \195\169\r\n\r\nd\195\169j\195\160\r\n" },
        [3] = { to = "j\195\182rg@example.org" } }))
      for i = 1, 3 do assert.equal(250, res[i].code) end
      local mails = {}
      for _, l in ipairs(t.lines) do if l:match("^MAIL") then mails[#mails + 1] = l end end
      assert.same({ "MAIL FROM:<a@example.org>", "MAIL FROM:<a@example.org> BODY=8BITMIME",
        "MAIL FROM:<a@example.org> SMTPUTF8" }, mails)
      local t2 = batch_server()
      local s2 = assert(smtp.open { transport = t2, tls = "none" })
      res = s2:send_many(msgs(2, { [1] = { to = "j\195\182rg@example.org" } }))
      assert.equal("invalid_address", res[1].reason)
      assert.matches("SMTPUTF8", res[1].message)
      assert.equal(250, res[2].code)
    end)

    it("matches every reply to its message when they arrive a byte at a time", function()
      local t = batch_server(nil, function(line)
        if line:match("^RCPT TO:<b3@") then return "550 5.1.1 no such user\r\n" end
        if line:match("^RCPT TO:<b5@") then return "450-4.2.1 busy\r\n450 4.2.1 try later\r\n" end
      end)
      local whole = t.receive_some
      local buf = ""
      function t.receive_some()
        if buf == "" then
          local d, err = whole()
          if not d then return nil, err end
          buf = d
        end
        local c = buf:sub(1, 1)
        buf = buf:sub(2)
        return c
      end
      local s = assert(smtp.open { transport = t, tls = "none" })
      local list = msgs(6, { [4] = { to = { "c@example.org", "b4@example.org" } } })
      local res = s:send_many(list, { window = 4 })
      assert.equal(250, res[1].code)
      assert.equal(250, res[2].code)
      assert.equal("every recipient was refused: 550 5.1.1 no such user", res[3].message)
      assert.equal(550, res[3].rejected["b3@example.org"].code)
      assert.same({ "c@example.org", "b4@example.org" }, res[4].accepted)
      assert.equal(450, res[5].code)
      assert.is_true(res[5].retryable)
      assert.equal("busy\ntry later", res[5].rejected["b5@example.org"].text)
      assert.equal(250, res[6].code)
      assert.is_nil(s.broken)
    end)

    it("gives a compact receipt (the final reply alone) to a message every recipient took, when asked", function()
      local t = batch_server(nil, function(line)
        if line:match("^RCPT TO:<b2@") then return "550 5.1.1 no such user\r\n" end
      end)
      local s = assert(smtp.open { transport = t, tls = "none" })
      local list = msgs(3, { [2] = { to = { "c@example.org", "b2@example.org" } } })
      local res = s:send_many(list, { compact = true })
      assert.same({ code = 250, enhanced = "2.0.0", text = "queued" }, res[1])
      assert.equal(250, res[2].code)
      assert.same({ "c@example.org" }, res[2].accepted)
      assert.equal(550, res[2].rejected["b2@example.org"].code)
      assert.same({ code = 250, enhanced = "2.0.0", text = "queued" }, res[3])
      -- without it, every receipt has its lists
      res = s:send_many(msgs(1))
      assert.same({ "b1@example.org" }, res[1].accepted)
      assert.same({}, res[1].rejected)
    end)

    it("drops the session when the server refuses RSET in a batch", function()
      local t = batch_server(nil, function(line) if line == "RSET" then return "502 5.5.1 no RSET here\r\n" end end)
      local s = assert(smtp.open { transport = t, tls = "none" })
      local res = s:send_many(msgs(3))
      assert.equal(250, res[1].code)
      assert.equal("rset_refused", s.broken.reason)
      assert.truthy(t.closed)
      local r, err = s:send_many(msgs(1))
      assert.equal("rset_refused", (r and r[1] or err).reason)
    end)

    it("reports a 421 in the middle of a batch to the message it answered and to those after it", function()
      local t = batch_server(nil, function(line, tt)
        if line == "MAIL FROM:<a@example.org>" and tt.mails then
          tt.gone = true
          return "421 4.3.2 shutting down\r\n"
        end
        if line:match("^MAIL") then tt.mails = true end
        if tt.gone then return "" end
      end)
      local whole = t.receive_some
      function t.receive_some()
        local d, err = whole()
        if d then return d end
        if t.gone then return nil, errors.new("network", "closed", { reason = "closed" }) end
        return nil, err
      end
      local s = assert(smtp.open { transport = t, tls = "none" })
      local res = s:send_many(msgs(3))
      assert.equal(250, res[1].code)
      assert.equal("smtp", res[2].kind)
      assert.equal(421, res[2].code)
      assert.equal(421, res[3].code)
      assert.matches("server closed the session", res[3].message)
      assert.truthy(s.broken)
    end)

    it("drops the session on a malformed reply in a batch", function()
      local t = batch_server(nil, function(line)
        if line:match("^RCPT TO:<b2@") then return "hello there\r\n" end
      end)
      local s = assert(smtp.open { transport = t, tls = "none" })
      local res = s:send_many(msgs(3))
      assert.equal(250, res[1].code)
      assert.equal("malformed", res[2].reason)
      assert.equal("malformed", res[3].reason)
      assert.truthy(s.broken)
    end)

    it("waits data_timeout, not timeout, for the replies to a batch's data", function()
      local function slow(delay)
        local t = batch_server(nil, function(line, tt)
          if line:match("^BDAT") then tt.final_at = core.monotime() + delay return "" end
        end)
        local whole = t.receive_some
        function t.receive_some(_, _, deadline)
          local d = whole()
          if d then return d end
          if not t.final_at then return nil, errors.new("network", "nothing to say", { reason = "closed" }) end
          if t.final_at > deadline then
            core.sleep(math.max(deadline - core.monotime(), 0))
            return nil, errors.new("network", "timed out", { reason = "timeout" })
          end
          core.sleep(math.max(t.final_at - core.monotime(), 0))
          t.final_at = nil
          return "250 2.0.0 queued\r\n"
        end
        return t
      end
      local s = assert(smtp.open { transport = slow(0.8), tls = "none", timeout = 0.3 })
      local res = s:send_many(msgs(1))
      assert.equal(250, res[1].code)
      s = assert(smtp.open { transport = slow(5), tls = "none", timeout = 0.3, data_timeout = 0.5 })
      local t0 = core.monotime()
      res = s:send_many(msgs(1))
      local took = core.monotime() - t0
      assert.truthy(took >= 0.45 and took < 2, "took " .. took)
      assert.is_true(res[1].after_data)
      assert.is_true(res[1].retryable)
      assert.matches("within 0.5 s %(data_timeout%)", res[1].message)
    end)

    it("traces a batch's commands and replies, and never the token", function()
      local trace = h.trace_collector()
      local t = batch_server()
      local s = assert(smtp.open { transport = t, tls = "none", allow_plaintext_auth = true, trace = trace })
      assert.is_true(s:auth { mechanism = "xoauth2", user = USER, token = TOKEN })
      local res = s:send_many(msgs(3, { [2] = { data = "Subject: x\r\n\r\n" .. TOKEN .. "\r\n" } }))
      for i = 1, 3 do assert.equal(250, res[i].code) end
      local text = trace.text()
      assert.truthy(text:find("dir=send proto=smtp text=RSET", 1, true), text)
      assert.truthy(text:find("dir=send proto=smtp text=BDAT 65 LAST", 1, true), text)
      assert.truthy(text:find("dir=recv proto=smtp text=250 2.1.5 ok", 1, true), text)
      assert.truthy(text:find("bytes of message data", 1, true), text)
      h.assert_no_secrets(text, { TOKEN })
    end)

    it("falls back to per-message pipelining without CHUNKING", function()
      local s, t = fake_session {
        { "S", "250-mx.test\r\n250 PIPELINING\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "m1\r\n.\r\n" }, { "S", "250 one\r\n" },
        { "C", "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" },
        { "S", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "C", "m2\r\n.\r\n" }, { "S", "250 two\r\n" },
      }
      local res = assert(s:send_many {
        { from = "a@example.org", to = "b@example.org", data = "m1" },
        { from = "a@example.org", to = "b@example.org", data = "m2" },
      })
      assert.equal("one", res[1].text)
      assert.equal("two", res[2].text)
      assert.is_true(t.done())
    end)
  end)
end)

-- ------------------------------------------------------------------ real peers

describe("smtp session against smtp-server (node)", function()
  local certs = require("spec.support.certs")
  local starttls_peer, implicit_peer
  setup(function()
    starttls_peer = peers.node_smtp { token = TOKEN, reject = { "nobody@example.org" }, password = "correct horse" }
    implicit_peer = peers.node_smtp { token = TOKEN, tls = "implicit" }
  end)
  teardown(function()
    if starttls_peer then starttls_peer.stop() end
    if implicit_peer then implicit_peer.stop() end
  end)

  local function open(peer, extra)
    local o = { host = "localhost", port = peer.port, ca_file = certs.get().ca, timeout = 10,
      tls = peer == implicit_peer and "implicit" or "starttls" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return smtp.open(o)
  end

  it("authenticates over STARTTLS with a valid token and delivers, tracing no secret", function()
    local trace = h.trace_collector()
    local s = assert(open(starttls_peer, { trace = trace }))
    assert.truthy(s.capabilities.PIPELINING)
    assert.truthy(s.capabilities.AUTH.XOAUTH2)
    assert.is_nil(s.capabilities.STARTTLS)
    assert.is_true(s:auth { user = USER, token = TOKEN })
    local r = assert(s:send { from = USER, to = { "bob@example.org", "nobody@example.org" },
      data = "Subject: over starttls\r\n\r\n.leading dot\r\nbody\r\n" })
    assert.equal(250, r.code)
    assert.same({ "bob@example.org" }, r.accepted)
    assert.equal(550, r.rejected["nobody@example.org"].code)
    assert.equal("5.1.1", r.rejected["nobody@example.org"].enhanced)
    s:close()
    local msgs = starttls_peer.messages()
    local last = msgs[#msgs]
    assert.same({ "bob@example.org" }, last.to)
    assert.equal(USER, last.user)
    assert.equal("Subject: over starttls\r\n\r\n.leading dot\r\nbody\r\n", last.data)
    local text = trace.text()
    assert.truthy(text:find("STARTTLS", 1, true))
    h.assert_no_secrets(text, { TOKEN })
  end)

  it("authenticates over implicit TLS, two-step", function()
    local s = assert(open(implicit_peer))
    assert.is_true(s:auth { user = USER, token = TOKEN, two_step = true })
    assert.truthy(s:send { from = USER, to = "bob@example.org", data = "implicit\r\n" })
    s:close()
  end)

  it("gets the real error challenge and 535 for a wrong token", function()
    local trace = h.trace_collector()
    local s = assert(open(starttls_peer, { trace = trace }))
    local wrong = "ya29.wrong-token-" .. string.rep("q", 40)
    local ok, err = s:auth { user = USER, token = wrong }
    assert.is_nil(ok)
    assert.equal("auth", err.kind)
    assert.equal(535, err.code)
    assert.equal("401", err.challenge.status)
    assert.equal("https://mail.example.org/smtp.send", err.challenge.scope)
    assert.truthy(err.text:find("not accepted", 1, true), err.text)
    s:close()
    h.assert_no_secrets(trace.text(), { wrong, TOKEN })
  end)

  it("refuses a server that hides STARTTLS", function()
    local peer = peers.node_smtp { token = TOKEN, hide_starttls = true }
    local s, err = open(peer)
    peer.stop()
    assert.is_nil(s)
    assert.equal("tls", err.kind)
    assert.equal("starttls_not_offered", err.reason)
  end)

  it("refuses a server whose certificate is not trusted", function()
    local s, err = smtp.open { host = "localhost", port = starttls_peer.port, tls = "starttls", timeout = 10 }
    assert.is_nil(s)
    assert.equal("tls", err.kind)
  end)

  it("sends 1,000 messages over one session, then a batch", function()
    local s = assert(open(starttls_peer))
    assert.is_true(s:auth { user = USER, token = TOKEN })
    local before = #starttls_peer.messages()
    for i = 1, 1000 do
      local r, err = s:send { from = USER, to = "bulk@example.org", data = "Subject: " .. i .. "\r\n\r\nmessage " .. i .. "\r\n" }
      assert(r, err)
    end
    local list = {}
    for i = 1, 200 do list[i] = { from = USER, to = "batch@example.org", data = "batch " .. i .. "\r\n" } end
    local res = assert(s:send_many(list))
    for i = 1, 200 do assert.equal(250, res[i].code) end
    s:close()
    local msgs = starttls_peer.messages()
    assert.equal(1200, #msgs - before)
    assert.equal("Subject: 1000\r\n\r\nmessage 1000\r\n", msgs[before + 1000].data)
    assert.equal("batch 200\r\n", msgs[before + 1200].data)
  end)

  it("delivers each message of a batch once, under its own sender, around refused ones", function()
    local s = assert(open(starttls_peer))
    assert.is_true(s:auth { user = USER, token = TOKEN })
    local before = #starttls_peer.messages()
    local list = {}
    for i = 1, 30 do
      local refused = i % 3 == 1
      list[i] = { from = "sender" .. i .. "@example.org", to = refused and "nobody@example.org" or "bob@example.org",
        data = "Subject: " .. i .. "\r\n\r\nbatch " .. i .. "\r\n" }
    end
    local res = assert(s:send_many(list, { window = 8 }))
    s:close()
    local want = {}
    for i = 1, 30 do
      if i % 3 == 1 then
        assert.equal(550, res[i].rejected["nobody@example.org"].code, tostring(res[i]))
      else
        assert.equal(250, res[i].code, tostring(res[i]))
        want[#want + 1] = { from = "sender" .. i .. "@example.org", data = "Subject: " .. i .. "\r\n\r\nbatch " .. i .. "\r\n" }
      end
    end
    local got = {}
    local msgs = starttls_peer.messages()
    for k = before + 1, #msgs do
      got[#got + 1] = { from = msgs[k].from, data = msgs[k].data }
      assert.same({ "bob@example.org" }, msgs[k].to)
    end
    assert.same(want, got)
  end)

  it("uses PLAIN when asked, for servers without OAuth", function()
    local s = assert(open(starttls_peer))
    assert.is_true(s:auth { mechanism = "plain", user = USER, password = "correct horse" })
    s:close()
    s = assert(open(starttls_peer))
    local ok, err = s:auth { mechanism = "login", user = USER, password = "wrong horse" }
    assert.is_nil(ok)
    assert.equal(535, err.code)
    s:close()
  end)
end)

describe("smtp session against Dovecot submission (OAUTHBEARER)", function()
  local dove
  setup(function()
    if peers.have_dovecot() then dove = peers.dovecot { token = TOKEN, user = USER } end
  end)
  teardown(function()
    if dove then dove.stop() end
  end)

  local function open(extra)
    local o = { host = "localhost", port = dove.port, ca_file = dove.ca, timeout = 10, tls = "starttls" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return smtp.open(o)
  end

  it("is installed (apt-get install dovecot-core dovecot-submissiond)", function()
    assert.truthy(dove, "dovecot is not installed")
  end)

  it("accepts OAUTHBEARER over STARTTLS and relays", function()
    local trace = h.trace_collector()
    local s = assert(open { trace = trace })
    assert.truthy(s.capabilities.AUTH.OAUTHBEARER)
    assert.truthy(s.capabilities.CHUNKING)
    assert.is_true(s:auth { mechanism = "oauthbearer", user = USER, token = TOKEN })
    local r = assert(s:send { from = USER, to = { "bob@example.org" },
      data = "Subject: via dovecot\r\n\r\n.dot\r\n" })
    assert.same({ "bob@example.org" }, r.accepted)
    s:close()
    local msgs = dove.sink.messages()
    -- Dovecot prepends its Received: header
    assert.equal("Subject: via dovecot\r\n\r\n.dot\r\n", msgs[#msgs].data:match("\r\n(Subject:.*)$"))
    assert.same({ "bob@example.org" }, msgs[#msgs].to)
    h.assert_no_secrets(trace.text(), { TOKEN })
  end)

  it("accepts XOAUTH2 over implicit TLS, two-step", function()
    local s = assert(open { port = dove.tls_port, tls = "implicit" })
    assert.is_true(s:auth { mechanism = "xoauth2", user = USER, token = TOKEN, two_step = true })
    s:close()
  end)

  it("refuses a wrong token with its error challenge and final reply", function()
    local trace = h.trace_collector()
    local s = assert(open { trace = trace })
    local wrong = "wrong-" .. string.rep("z", 40)
    local ok, err = s:auth { mechanism = "oauthbearer", user = USER, token = wrong }
    assert.is_nil(ok)
    assert.equal("auth", err.kind)
    assert.equal(535, err.code)
    assert.truthy(err.challenge, "Dovecot sends an RFC 7628 error challenge")
    assert.equal("invalid_token", err.challenge.status)
    s:close()
    h.assert_no_secrets(trace.text(), { wrong, TOKEN })
  end)

  -- Dovecot 2.3.19 panics (smtp-server-transaction.c:226, pending_rcpt_cmds
  -- == 0) when a MAIL follows BDAT LAST in the same pipelined group, so the
  -- batch runs one message per window here; smtp.mjs-free cross-message
  -- batching is covered by the fake transport and bench/smtp_throughput.
  it("sends with BDAT and in a pipelined CHUNKING batch, one message per window", function()
    local s = assert(open())
    assert.is_true(s:auth { mechanism = "oauthbearer", user = USER, token = TOKEN })
    local before = #dove.sink.messages()
    assert.truthy(s:send { from = USER, to = "bob@example.org", data = "bdat\nbody", chunking = true })
    local list = {}
    for i = 1, 100 do list[i] = { from = USER, to = "bob@example.org", data = "batch " .. i .. "\r\n" } end
    local res = assert(s:send_many(list, { window = 1 }))
    for i = 1, 100 do assert.equal(250, res[i].code, tostring(res[i])) end
    s:close()
    local msgs = dove.sink.messages()
    assert.equal(101, #msgs - before)
    assert.equal("\r\nbdat\r\nbody\r\n", msgs[before + 1].data:sub(-14))
    assert.equal(">; ", msgs[before + 1].data:match("for <bob@example.org(>; )"))
    assert.equal("\r\nbatch 100\r\n", msgs[#msgs].data:sub(-13))
  end)
end)
