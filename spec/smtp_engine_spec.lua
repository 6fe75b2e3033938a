-- The C SMTP engine, byte for byte and without sockets: what it writes for
-- each command, how it parses what servers say, and what it refuses.
local core = require "oauthmail.core"
local h = require "spec.support.helpers"

local function b64(s) return h.secret_forms(s)[2] end

local function engine(o) return core.smtp.engine(o) end

-- Feed a server's bytes and collect every reply.
local function replies(eng, bytes)
  eng:feed(bytes)
  local out = {}
  while true do
    local r, err = eng:reply()
    if not r then
      assert.is_nil(err, err and err.message)
      return out
    end
    out[#out + 1] = r
  end
end

local function trace_text(eng)
  local evs = eng:trace_events() or {}
  local lines = {}
  for _, e in ipairs(evs) do lines[#lines + 1] = e.dir .. " " .. e.text end
  return table.concat(lines, "\n")
end

local TOKEN = "ya29.a0AfH6SMBx-secret-token-value_0123456789"

describe("smtp engine", function()
  it("names its states from one list", function()
    assert.same("IDLE", core.smtp.states[1])
    local eng = engine()
    assert.equal("IDLE", eng:state())
    eng:expect_greeting()
    assert.equal("GREETING", eng:state())
  end)

  describe("replies", function()
    it("parses the greeting and EHLO capabilities, both AUTH forms", function()
      local eng = engine()
      eng:expect_greeting()
      local r = replies(eng, "220 mx.example.org ESMTP ready\r\n")[1]
      assert.equal(220, r.code)
      assert.equal("GREETING", r.command)
      assert.equal("mx.example.org ESMTP ready", r.text)
      assert.truthy(eng:ehlo("client.example"))
      assert.equal("EHLO client.example\r\n", eng:output())
      r = replies(eng, table.concat({
        "250-mx.example.org greets you",
        "250-SIZE 35882577",
        "250-8BITMIME",
        "250-AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER",
        "250-AUTH=LOGIN CRAM-MD5",
        "250-ENHANCEDSTATUSCODES",
        "250-pipelining",
        "250-CHUNKING",
        "250-SMTPUTF8",
        "250-DSN",
        "250-X-CUSTOM some params",
        "250 STARTTLS", "" }, "\r\n"))[1]
      assert.equal("EHLO", r.command)
      assert.equal(12, #r.lines)
      assert.same({
        SIZE = 35882577, ["8BITMIME"] = true, ENHANCEDSTATUSCODES = true, PIPELINING = true,
        CHUNKING = true, SMTPUTF8 = true, DSN = true, STARTTLS = true, ["X-CUSTOM"] = "some params",
        AUTH = { LOGIN = true, PLAIN = true, XOAUTH2 = true, OAUTHBEARER = true, ["CRAM-MD5"] = true },
      }, r.caps)
      assert.equal("IDLE", eng:state())
    end)

    it("keeps a capability keyword with a NUL apart from AUTH (found by fuzz/smtp_engine)", function()
      -- "AUTH\0x" was stored under the C string "AUTH"; the AUTH line after
      -- it then wrote mechanisms into that string as if it were a table
      local eng = engine()
      eng:expect_greeting()
      replies(eng, "220 hi\r\n")
      assert.truthy(eng:ehlo("client.example"))
      local r = replies(eng, "250-hi\r\n250-AUTH\0x y\r\n250 AUTH PLAIN xoauth2\r\n")[1]
      assert.same({ PLAIN = true, XOAUTH2 = true }, r.caps.AUTH)
      assert.equal("y", r.caps["AUTH\0X"])
    end)

    it("assembles multi-line replies fed one byte at a time and splits enhanced codes", function()
      local eng = engine()
      eng:noop()
      eng:output()
      local text = "250-2.0.0 first line\r\n250-2.0.0 second\n250 2.0.0 OK done\r\n"
      for i = 1, #text - 1 do
        eng:feed(text:sub(i, i))
        assert.is_nil(eng:reply())
      end
      eng:feed(text:sub(-1))
      local r = assert(eng:reply())
      assert.equal(250, r.code)
      assert.equal("2.0.0", r.enhanced)
      assert.equal("first line\nsecond\nOK done", r.text)
      assert.same({ "2.0.0 first line", "2.0.0 second", "2.0.0 OK done" }, r.lines)
      assert.is_nil(eng:reply())
    end)

    it("labels a reply that answers no command", function()
      local r = replies(engine(), "421 4.4.2 closing\r\n")[1]
      assert.equal("IDLE", r.command)
      assert.equal(421, r.code)
    end)

    it("does not take an enhanced code of another class, and accepts a bare code", function()
      local eng = engine()
      eng:noop() eng:noop()
      local rs = replies(eng, "250 5.1.1 odd\r\n250\r\n")
      assert.is_nil(rs[1].enhanced)
      assert.equal("5.1.1 odd", rs[1].text)
      assert.equal(250, rs[2].code)
      assert.equal("", rs[2].text)
    end)

    for _, bad in ipairs {
      { "text without a code", "hello there\r\n", "hello there" },
      { "a code out of range", "650 what\r\n", "650 what" },
      { "a bad separator", "250x nope\r\n", "250x nope" },
      { "a short code", "25\r\n", "'25'" },
      { "a multi-line reply that changes its code", "250-first\r\n251 second\r\n", "251 second" },
    } do
      it("refuses a malformed reply: " .. bad[1], function()
        local eng = engine()
        eng:noop()
        eng:feed(bad[2])
        local r, err = eng:reply()
        assert.is_nil(r)
        assert.equal("smtp", err.kind)
        assert.equal("malformed", err.reason)
        assert.is_false(err.retryable)
        assert.truthy(err.message:find(bad[3], 1, true), err.message)
      end)
    end

    it("redacts credential-looking text in a malformed reply", function()
      local eng = engine()
      eng:noop()
      eng:feed("XXX " .. b64("user=a\1auth=Bearer " .. TOKEN .. "\1\1") .. "\r\n")
      local _, err = eng:reply()
      assert.equal("malformed", err.reason)
      assert.truthy(err.message:find("<redacted>", 1, true))
      h.assert_no_secrets(err.message, { TOKEN })
    end)

    it("bounds the length of one line, even before its end arrives", function()
      local eng = engine { max_line = 64 }
      eng:noop()
      eng:feed("250 " .. string.rep("a", 100))
      local r, err = eng:reply()
      assert.is_nil(r)
      assert.equal("too_long", err.reason)
      eng = engine { max_line = 64 }
      eng:noop()
      eng:feed("250 " .. string.rep("a", 100) .. "\r\n")
      r, err = eng:reply()
      assert.is_nil(r)
      assert.equal("too_long", err.reason)
    end)

    it("bounds the total size of a multi-line reply", function()
      local eng = engine { max_line = 100, max_reply = 1000 }
      eng:noop()
      local r, err
      for _ = 1, 100 do
        eng:feed("250-" .. string.rep("b", 40) .. "\r\n")
        r, err = eng:reply()
        if err then break end
        assert.is_nil(r)
      end
      assert.equal("too_long", err.reason)
    end)

    it("flags bytes that came after the 220 to STARTTLS (plain-text injection)", function()
      local eng = engine()
      eng:starttls()
      assert.equal("STARTTLS\r\n", eng:output())
      local r = replies(eng, "220 go ahead\r\n250 injected\r\n")[1]
      assert.is_true(r.injected)
      eng:reset()
      assert.equal(0, select(2, eng:pending()))
      eng = engine()
      eng:starttls()
      r = replies(eng, "220 go ahead\r\n")[1]
      assert.is_nil(r.injected)
    end)
  end)

  describe("envelope", function()
    it("pipelines MAIL, RCPT and DATA and matches replies to commands", function()
      local eng = engine()
      assert.truthy(eng:mail("a@example.org", { "SIZE=120", "BODY=8BITMIME" }))
      assert.truthy(eng:rcpt("b@example.org"))
      assert.truthy(eng:rcpt("<c@example.org>"))
      eng:data()
      assert.equal("MAIL FROM:<a@example.org> SIZE=120 BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\n" ..
        "RCPT TO:<c@example.org>\r\nDATA\r\n", eng:output())
      assert.equal(4, (eng:pending()))
      local rs = replies(eng, "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
      assert.same({ "MAIL", "RCPT", "RCPT", "DATA" }, { rs[1].command, rs[2].command, rs[3].command, rs[4].command })
      assert.equal(550, rs[3].code)
      assert.equal("5.1.1", rs[3].enhanced)
      assert.equal("no such user", rs[3].text)
      assert.equal("DATA", rs[4].command)
      assert.equal(0, (eng:pending()))
    end)

    it("allows the null reverse-path", function()
      local eng = engine()
      assert.truthy(eng:mail(""))
      assert.equal("MAIL FROM:<>\r\n", eng:output())
    end)

    for _, bad in ipairs {
      { "a@example.org\r\nRCPT TO:<evil@example.org>", "CR or LF" },
      { "a@example.org\nDATA", "CR or LF" },
      { "a@exa\0mple.org", "NUL" },
      { "a@example.org>", "unbalanced" },
      { "<a@example.org", "unbalanced" },
      { "a>b@example.org", "unbalanced" },
      { "a b@example.org", "space" },
      { "jürgen@example.org", "SMTPUTF8" },
      { string.rep("a", 300) .. "@example.org", "256" },
    } do
      it("refuses an address before anything is sent: " .. bad[1]:gsub("[%c]", "?"):sub(1, 30), function()
        local eng = engine()
        local ok, err = eng:mail(bad[1])
        assert.is_nil(ok)
        assert.equal("config", err.kind)
        assert.truthy(err.message:find(bad[2], 1, true), err.message)
        ok, err = eng:rcpt(bad[1])
        assert.is_nil(ok)
        assert.equal("config", err.kind)
        assert.equal("", eng:output())
        assert.equal(0, (eng:pending()))
        ok, err = core.smtp.check_address(bad[1])
        assert.is_nil(ok)
        assert.equal("config", err.kind)
      end)
    end

    it("counts the 256-octet path limit with its angle brackets (RFC 5321 4.5.3.1.3)", function()
      local a254 = string.rep("a", 242) .. "@example.org"
      local a255 = "a" .. a254
      assert.equal(254, #a254)
      for _, a in ipairs { a254, "<" .. a254 .. ">" } do
        local eng = engine()
        assert.truthy(eng:mail(a))
        assert.truthy(eng:rcpt(a))
        assert.truthy(core.smtp.check_address(a))
      end
      for _, a in ipairs { a255, "<" .. a255 .. ">" } do
        local eng = engine()
        local ok, err = eng:mail(a)
        assert.is_nil(ok)
        assert.truthy(err.message:find("256", 1, true), err.message)
        assert.is_nil((eng:rcpt(a)))
        assert.is_nil((core.smtp.check_address(a)))
      end
    end)

    it("gives SIZE as an integer", function()
      local eng = engine()
      eng:ehlo("c")
      eng:output()
      local r = replies(eng, "250-mx\r\n250 SIZE 35882577\r\n")[1]
      assert.equal("35882577", tostring(r.caps.SIZE))
      if math.type then assert.equal("integer", math.type(r.caps.SIZE)) end
      eng:ehlo("c")
      r = replies(eng, "250-mx\r\n250 SIZE 99999999999999999999999\r\n")[1]
      assert.truthy(r.caps.SIZE > 1e12)
    end)

    it("refuses parameters carrying CR, LF, spaces or NUL", function()
      for _, p in ipairs { "SIZE=1\r\nRSET", "BODY=8BIT MIME", "X=\0", "" } do
        local eng = engine()
        local ok, err = eng:mail("a@example.org", { p })
        assert.is_nil(ok)
        assert.equal("config", err.kind)
        assert.equal("", eng:output())
      end
    end)

    it("takes a non-ASCII address only with SMTPUTF8 offered and requested", function()
      local eng = engine()
      eng:ehlo("c")
      eng:output()
      replies(eng, "250-mx\r\n250 SMTPUTF8\r\n")
      assert.is_nil((eng:mail("jürgen@example.org")))
      assert.is_nil((eng:rcpt("jürgen@example.org")))
      assert.truthy(eng:mail("jürgen@example.org", { "SMTPUTF8" }))
      assert.truthy(eng:rcpt("zoë@example.org"))
      assert.equal("MAIL FROM:<jürgen@example.org> SMTPUTF8\r\nRCPT TO:<zoë@example.org>\r\n", eng:output())
      eng:rset()
      assert.is_nil((eng:rcpt("zoë@example.org")))
      assert.truthy(core.smtp.check_address("zoë@example.org", true))
    end)

    it("refuses a domain with CRLF in EHLO", function()
      local ok, err = engine():ehlo("x\r\nMAIL FROM:<a@b>")
      assert.is_nil(ok)
      assert.equal("config", err.kind)
    end)
  end)

  describe("message data", function()
    local cases = {
      { "plain lines", "a\r\nb\r\n", "a\r\nb\r\n.\r\n" },
      { "a line starting with a dot", "x\r\n.hidden\r\n", "x\r\n..hidden\r\n.\r\n" },
      { "a lone dot", "x\r\n.\r\ny\r\n", "x\r\n..\r\ny\r\n.\r\n" },
      { "a dot on the first line", ".first\r\n", "..first\r\n.\r\n" },
      { "data ending without CRLF", "no newline", "no newline\r\n.\r\n" },
      { "bare LF", "a\nb\n", "a\r\nb\r\n.\r\n" },
      { "bare CR", "a\rb\r", "a\r\nb\r\n.\r\n" },
      { "CR CR LF", "a\r\r\nb", "a\r\n\r\nb\r\n.\r\n" },
      { "a dot after a bare LF", "a\n.b\n..c", "a\r\n..b\r\n...c\r\n.\r\n" },
      { "an empty message", "", ".\r\n" },
      { "dots inside lines", "a.b. .\r\n", "a.b. .\r\n.\r\n" },
    }
    for _, c in ipairs(cases) do
      it("stuffs and normalises " .. c[1] .. ", split at every chunk boundary", function()
        for cut = 0, #c[2] do
          for cut2 = cut, #c[2] do
            local eng = engine()
            eng:body(c[2]:sub(1, cut))
            eng:body(c[2]:sub(cut + 1, cut2))
            eng:body(c[2]:sub(cut2 + 1))
            eng:body_end()
            assert.equal(c[3], eng:output(), "cuts " .. cut .. "," .. cut2)
          end
        end
      end)
    end

    it("frames BDAT chunks with the normalised size, without dot stuffing", function()
      local eng = engine()
      eng:bdat("a\n.b\r", false)
      eng:bdat("\nc", true)
      assert.equal("BDAT 7\r\na\r\n.b\r\nBDAT 3 LAST\r\nc\r\n", eng:output())
      assert.equal(2, (eng:pending()))
      eng = engine()
      eng:bdat("", true)
      assert.equal("BDAT 0 LAST\r\n", eng:output())
    end)

    it("starts the filter afresh after RSET and after MAIL", function()
      -- a refused non-last chunk ending in CR, then RSET: the next message's
      -- leading LF is its own line, not the rest of the old CRLF
      local eng = engine()
      eng:bdat("abc\r", false)
      eng:output()
      eng:rset()
      eng:bdat("\nline", true)
      assert.equal("RSET\r\nBDAT 8 LAST\r\n\r\nline\r\n", eng:output())
      -- a chunk ending mid-line, then RSET: the next message's first line is
      -- at the start of a line, so its dot is stuffed
      eng = engine()
      eng:bdat("abc", false)
      eng:rset()
      eng:output()
      eng:data()
      eng:body(".x")
      eng:body_end()
      assert.equal("DATA\r\n..x\r\n.\r\n", eng:output())
      -- the same with MAIL instead of RSET
      eng = engine()
      eng:body("abc")
      eng:output()
      assert.truthy(eng:mail("a@example.org"))
      eng:body(".x")
      eng:body_end()
      assert.equal("MAIL FROM:<a@example.org>\r\n..x\r\n.\r\n", eng:output())
      local t = engine { trace = true }
      t:bdat("abcdef", false)
      t:rset()
      t:bdat("x", true)
      assert.truthy(trace_text(t):find("<1 bytes of message data>", 1, true))
    end)

    it("traces a summary of the data, never its lines", function()
      local eng = engine { trace = true }
      eng:body("Subject: secret-body-line\r\n\r\nhello\r\n")
      eng:body_end()
      eng:bdat("another-body-line", true)
      local t = trace_text(eng)
      assert.truthy(t:find("<36 bytes of message data>", 1, true), t)
      assert.truthy(t:find("<17 bytes of message data>", 1, true), t)
      assert.falsy(t:find("body-line", 1, true))
    end)
  end)

  describe("AUTH", function()
    local function xo(user, token) return "user=" .. user .. "\1auth=Bearer " .. token .. "\1\1" end

    it("sends XOAUTH2 as an initial response", function()
      local eng = engine { trace = true }
      local initial = eng:auth("xoauth2", { user = "alice@example.org", token = TOKEN })
      assert.is_true(initial)
      assert.equal("AUTH XOAUTH2 " .. b64(xo("alice@example.org", TOKEN)) .. "\r\n", eng:output())
      local r = replies(eng, "235 2.7.0 Accepted\r\n")[1]
      assert.equal(235, r.code)
      assert.equal("AUTH_RESP", r.command)
      local t = trace_text(eng)
      assert.truthy(t:find("AUTH XOAUTH2 <user=alice@example.org auth=Bearer <redacted>>", 1, true), t)
      h.assert_no_secrets(t, { TOKEN, xo("alice@example.org", TOKEN) })
    end)

    it("sends XOAUTH2 in two steps when asked (Microsoft)", function()
      local eng = engine { trace = true }
      assert.is_false((eng:auth("XOAUTH2", { user = "alice@example.org", token = TOKEN, initial = false })))
      assert.equal("AUTH XOAUTH2\r\n", eng:output())
      local r = replies(eng, "334 \r\n")[1]
      assert.is_true(r.continue)
      assert.equal(b64(xo("alice@example.org", TOKEN)) .. "\r\n", eng:output())
      r = replies(eng, "235 2.7.0 Authentication successful\r\n")[1]
      assert.is_nil(r.continue)
      assert.equal("IDLE", eng:state())
      h.assert_no_secrets(trace_text(eng), { TOKEN })
    end)

    it("switches to two steps by itself when the AUTH line would be too long", function()
      local long = string.rep("T", 2500)
      local eng = engine { trace = true }
      local initial, len = eng:auth("xoauth2", { user = "u@example.org", token = long })
      assert.is_false(initial)
      assert.truthy(len > 1000)
      assert.equal("AUTH XOAUTH2\r\n", eng:output())
      replies(eng, "334 \r\n")
      local blob = eng:output()
      assert.equal(b64(xo("u@example.org", long)) .. "\r\n", blob)
      -- OAUTHBEARER too
      eng = engine()
      assert.is_false((eng:auth("oauthbearer", { user = "u@example.org", token = long, host = "h", port = 587 })))
      assert.equal("AUTH OAUTHBEARER\r\n", eng:output())
      -- and a short one fits
      eng = engine()
      assert.is_true((eng:auth("oauthbearer", { user = "u@example.org", token = "short-token", max_initial = 1000 })))
    end)

    it("builds the OAUTHBEARER GS2 header with a=, host= and port=", function()
      local eng = engine()
      eng:auth("oauthbearer", { user = "a,b=c@example.org", token = TOKEN, host = "smtp.example.org", port = 587 })
      local want = "n,a=a=2Cb=3Dc@example.org,\1host=smtp.example.org\1port=587\1auth=Bearer " .. TOKEN .. "\1\1"
      assert.equal("AUTH OAUTHBEARER " .. b64(want) .. "\r\n", eng:output())
    end)

    it("answers the OAUTHBEARER error challenge with ^A and returns the final reply", function()
      local eng = engine { trace = true }
      eng:auth("oauthbearer", { user = "u@example.org", token = TOKEN, host = "h", port = 465 })
      eng:output()
      local json = '{"status":"invalid_token","schemes":"Bearer","scope":"https://mail.example/"}'
      local r = replies(eng, "334 " .. b64(json) .. "\r\n")[1]
      assert.is_true(r.continue)
      assert.equal(json, r.challenge)
      assert.equal("AQ==\r\n", eng:output())
      r = replies(eng, "535 5.7.8 Authentication credentials invalid\r\n")[1]
      assert.equal(535, r.code)
      assert.equal("AUTH_ERRACK", r.command)
      local t = trace_text(eng)
      assert.truthy(t:find("error challenge: " .. json, 1, true), t)
      h.assert_no_secrets(t, { TOKEN })
    end)

    it("answers the XOAUTH2 error challenge with an empty line, also in two steps", function()
      local eng = engine { trace = true }
      eng:auth("xoauth2", { user = "u@example.org", token = TOKEN, initial = false })
      eng:output()
      replies(eng, "334 \r\n")
      eng:output()
      local json = '{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'
      local r = replies(eng, "334 " .. b64(json) .. "\r\n")[1]
      assert.equal(json, r.challenge)
      assert.equal("\r\n", eng:output())
      r = replies(eng, "535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n")[1]
      assert.equal(535, r.code)
      assert.equal("Username and Password not accepted.\nLearn more", r.text)
      h.assert_no_secrets(trace_text(eng), { TOKEN })
    end)

    it("sends PLAIN and LOGIN", function()
      local eng = engine { trace = true }
      eng:auth("plain", { user = "bob", password = "hunter2-password" })
      assert.equal("AUTH PLAIN " .. b64("\0bob\0hunter2-password") .. "\r\n", eng:output())
      eng = engine { trace = true }
      assert.is_false((eng:auth("login", { user = "bob", password = "hunter2-password" })))
      assert.equal("AUTH LOGIN\r\n", eng:output())
      replies(eng, "334 VXNlcm5hbWU6\r\n")
      assert.equal(b64("bob") .. "\r\n", eng:output())
      replies(eng, "334 UGFzc3dvcmQ6\r\n")
      assert.equal(b64("hunter2-password") .. "\r\n", eng:output())
      local r = replies(eng, "235 ok\r\n")[1]
      assert.equal(235, r.code)
      h.assert_no_secrets(trace_text(eng), { "hunter2-password" })
    end)

    it("cancels with '*' when a challenge comes where none may", function()
      local eng = engine()
      eng:auth("plain", { user = "bob", password = "hunter2-password" })
      eng:output()
      replies(eng, "334 what\r\n")
      assert.equal("*\r\n", eng:output())
      local r = replies(eng, "501 cancelled\r\n")[1]
      assert.equal(501, r.code)
    end)

    it("takes a 334 after the cancel, the acknowledgement or the password as a protocol error", function()
      local function expect_malformed(eng, bytes)
        eng:feed(bytes)
        local r, err = eng:reply()
        assert.is_nil(r)
        assert.equal("smtp", err.kind)
        assert.equal("malformed", err.reason)
        assert.equal("", eng:output())
        assert.equal("IDLE", eng:state())
      end
      -- PLAIN: 334 -> '*', 334 again
      local eng = engine()
      eng:auth("plain", { user = "bob", password = "hunter2-password" })
      eng:output()
      replies(eng, "334 what\r\n")
      assert.equal("*\r\n", eng:output())
      expect_malformed(eng, "334 what\r\n")
      -- XOAUTH2: error challenge acknowledged, then 334 again
      eng = engine()
      eng:auth("xoauth2", { user = "u@example.org", token = TOKEN })
      eng:output()
      replies(eng, "334 " .. b64('{"status":"401"}') .. "\r\n")
      assert.equal("\r\n", eng:output())
      expect_malformed(eng, "334 \r\n")
      -- LOGIN: user, password, then 334 again
      eng = engine()
      eng:auth("login", { user = "bob", password = "hunter2-password" })
      eng:output()
      replies(eng, "334 VXNlcm5hbWU6\r\n")
      replies(eng, "334 UGFzc3dvcmQ6\r\n")
      eng:output()
      expect_malformed(eng, "334 UGFzc3dvcmQ6\r\n")
    end)

    it("redacts base64-looking runs and the credential in replies during AUTH", function()
      local eng = engine { trace = true }
      eng:auth("xoauth2", { user = "u@example.org", token = TOKEN })
      local line = eng:output():sub(1, -3)
      local r = replies(eng, '500-5.5.1 Command unrecognized: "' .. line .. '"\r\n500 5.5.1 ' .. TOKEN .. "\r\n")[1]
      assert.equal(500, r.code)
      assert.equal('Command unrecognized: "AUTH XOAUTH2 <redacted>"\n<redacted>', r.text)
      assert.same({ '5.5.1 Command unrecognized: "AUTH XOAUTH2 <redacted>"', "5.5.1 <redacted>" }, r.lines)
      local t = trace_text(eng)
      assert.truthy(t:find('recv 500-5.5.1 Command unrecognized: "AUTH XOAUTH2 <redacted>"', 1, true), t)
      h.assert_no_secrets(t, { TOKEN, xo("u@example.org", TOKEN) })
      -- outside AUTH, replies are kept as they are
      eng:noop()
      r = replies(eng, "250 " .. string.rep("A", 30) .. "\r\n")[1]
      assert.equal(string.rep("A", 30), r.text)
    end)

    it("decodes only strict base64 in an error challenge", function()
      for _, bad in ipairs { "====", "A===", "  ==", "AB==    ", "    ", "QQ==QQ==", "Q===", "QQ=A",
        "====AAAA", "    ====", "QQ", "QQ=", "Q!==", "QUJD\tREVG" } do
        local eng = engine { trace = true }
        eng:auth("xoauth2", { user = "u", token = "t", initial = true })
        eng:output()
        local r = replies(eng, "334 " .. bad .. "\r\n")[1]
        assert.equal(334, r.code)
        assert.is_nil(r.challenge, ("%q"):format(bad))
        assert.equal("\r\n", eng:output())
      end
      for enc, dec in pairs { ["QQ=="] = "A", ["QUI="] = "AB", ["QUJD"] = "ABC", ["AA=="] = "\0", [""] = "" } do
        local eng = engine()
        eng:auth("xoauth2", { user = "u", token = "t", initial = true })
        eng:output()
        local r = replies(eng, "334 " .. enc .. "\r\n")[1]
        assert.equal(dec, r.challenge, enc)
      end
    end)

    it("builds the SASL response in one allocation and leaves nothing behind when an option is bad", function()
      -- the checks come before anything is allocated: a bad token after a
      -- good host raises and the engine is still usable
      local eng = engine()
      assert.has_error(function()
        eng:auth("oauthbearer", { user = "u@example.org", host = "smtp.example.org", token = "bad\r\ntoken" })
      end)
      assert.has_error(function() eng:auth("xoauth2", { user = "u@example.org", token = 12 }) end)
      assert.has_error(function() eng:auth("xoauth2", { user = "u@example.org", token = "t", port = "x" }) end)
      assert.equal("IDLE", eng:state())
      assert.is_true((eng:auth("oauthbearer", { user = "u@example.org", token = TOKEN, host = "h", port = 587 })))
      assert.equal("AUTH OAUTHBEARER " .. b64("n,a=u@example.org,\1host=h\1port=587\1auth=Bearer " .. TOKEN .. "\1\1") ..
        "\r\n", eng:output())
      -- long users and tokens (growth past every power of two on the way)
      for _, n in ipairs { 1, 200, 255, 256, 257, 1000, 5000 } do
        local user, tok = string.rep("u", n) .. "@e.org", string.rep("T", n)
        eng = engine()
        eng:auth("oauthbearer", { user = user, token = tok, host = "h", port = 25, initial = true })
        assert.equal("AUTH OAUTHBEARER " .. b64("n,a=" .. user .. ",\1host=h\1port=25\1auth=Bearer " .. tok .. "\1\1") ..
          "\r\n", eng:output())
        eng = engine()
        eng:auth("plain", { user = user, password = tok, initial = true })
        assert.equal("AUTH PLAIN " .. b64("\0" .. user .. "\0" .. tok) .. "\r\n", eng:output())
      end
    end)

    it("leaks nothing when an option is refused half-way (ASan leak check in a child)", function()
      local preload = os.getenv("LD_PRELOAD") or ""
      if not preload:find("libasan", 1, true) then
        pending("runs under make asan, where leaks can be seen")
        return
      end
      local dir = h.tmpdir()
      h.write_file(dir .. "/leak.lua", [[
        local core = require "oauthmail.core"
        for _ = 1, 3 do
          for _, o in ipairs {
            { "oauthbearer", { user = "u@example.org", host = "smtp.example.org", token = "bad\r\ntoken" } },
            { "oauthbearer", { user = "u@example.org", host = "smtp.example.org", token = 12 } },
            { "xoauth2", { user = "u@example.org", token = string.rep("t", 70000) } },
            { "login", { user = "u@example.org" } },
          } do
            local e = core.smtp.engine {}
            assert(not pcall(e.auth, e, o[1], o[2]))
            e:close()
          end
          local e = core.smtp.engine {}
          e:auth("login", { user = "u@example.org", password = "pw-secret" })
          e:output()
          e:feed("334 VXNlcm5hbWU6\r\n")
          e:reply()
        end
        collectgarbage()
        print("done")
      ]])
      local cmd = string.format("LD_PRELOAD=%s ASAN_OPTIONS=detect_leaks=1 %s %s 2>&1",
        h.quote(preload), h.lua_bin, h.quote(dir .. "/leak.lua"))
      local p = assert(io.popen(cmd))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("done", 1, true), out)
      assert.falsy(out:find("leaked", 1, true), out)
    end)

    it("raises for credentials that would break the line, and for pipelined AUTH", function()
      assert.has_error(function() engine():auth("xoauth2", { user = "u", token = "a\r\nQUIT" }) end)
      assert.has_error(function() engine():auth("xoauth2", { user = "u\1x", token = "t" }) end)
      assert.has_error(function() engine():auth("cram-md5", { user = "u", password = "p" }) end)
      local eng = engine()
      eng:noop()
      assert.has_error(function() eng:auth("xoauth2", { user = "u", token = "t" }) end)
    end)
  end)

  it("survives arbitrary bytes from the server (a small fuzz, fixed seed)", function()
    math.randomseed(5321)
    local alphabet = { "2", "5", "0", "-", " ", "\r", "\n", "a", "3", "4", ".", "\0", "\255" }
    for _ = 1, 300 do
      local eng = engine { max_line = 32, max_reply = 256 }
      for _ = 1, 5 do eng:noop() end
      eng:output()
      local parts = {}
      for k = 1, math.random(1, 400) do parts[k] = alphabet[math.random(#alphabet)] end
      eng:feed(table.concat(parts))
      for _ = 1, 50 do
        local r, err = eng:reply()
        if not r then
          if err then assert.truthy(err.reason == "malformed" or err.reason == "too_long", err.reason) end
          break
        end
        assert.truthy(r.code >= 200 and r.code < 600)
      end
    end
  end)

  it("closes idempotently and refuses use after close", function()
    local eng = engine()
    eng:close()
    eng:close()
    assert.has_error(function() eng:noop() end)
    assert.truthy(tostring(eng):find("closed"))
  end)
end)
