-- spec/sandbox_spec.lua — the Lua sandbox (`oauthmail sandbox`) run as its
-- own process and driven by the command line and by oauthmail.smtp sessions:
-- delivery, the doctor passing Exchange's claim checks, every Exchange reply
-- it imitates, several connections at once, and the sign-in flows.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local cli = require "spec.support.cli"

-- the messages in a sandbox folder's maildir, each with its text
local function delivered(dir) return h.maildir_messages(dir .. "/maildir") end

local function start(home, args)
  local dir = h.tmpdir()
  local argv = { "sandbox", "--dir", dir, "--device-delay", "1" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local proc = cli.spawn(home, argv, { ready = "SANDBOX READY smtp=(%d+) idp=(%d+) control=(%d+)" })
  local sb = { proc = proc, dir = dir, smtp_port = tonumber(proc.match[1]), idp_port = tonumber(proc.match[2]),
    control_port = tonumber(proc.match[3]), profile = dir .. "/sandbox.lua", device = dir .. "/sandbox-device.lua" }
  function sb.stop() proc.stop() end
  function sb.control(method, path, body) return h.http_json({ port = sb.control_port }, method, path, body) end
  function sb.messages() return delivered(dir) end
  -- a copy of the written profile with some fields changed
  function sb.variant(name, changes)
    local p = dofile(sb.profile)
    for k, v in pairs(changes) do
      if v == false then p[k] = nil else p[k] = v end
    end
    p.name = name
    local path = dir .. "/" .. name .. ".lua"
    h.write_file(path, "return " .. cli.lua_source(p) .. "\n")
    return path
  end
  return sb
end

local function send(home, profile, extra)
  local argv = { "send", "--profile", profile, "--to", "ops@example.org", "--subject", "sandbox", "--text", "hello" }
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  return cli.run(home, argv)
end

describe("oauthmail sandbox", function()
  local home, sb

  setup(function()
    home = cli.home()
    sb = start(home)
  end)
  teardown(function() if sb then sb.stop() end end)

  it("writes a ready profile; mail sent with it lands in the maildir", function()
    local r = send(home, sb.profile)
    assert.equals(0, r.rc, r.err)
    assert.matches("250 OK <%d+%.sandbox@sandbox%.outlook%.test>", r.out)
    local m = sb.messages()
    assert.equals(1, #m)
    assert.same({ "ops@example.org" }, m[1].to)
    assert.equals("noreply@contoso.test", m[1].user)
    assert.matches("Subject: sandbox\r\n", m[1].data)
  end)

  it("passes every doctor step, including Exchange's audience and role checks", function()
    local r = cli.run(home, { "doctor", "--profile", sb.profile })
    assert.equals(0, r.rc, r.out .. r.err)
    assert.matches("claims%s+aud=https://outlook%.office365%.com roles=SMTP%.SendAsApp tid=contoso%.test", r.out)
    assert.matches("ehlo%s+AUTH LOGIN OAUTHBEARER XOAUTH2", r.out)
    assert.matches("auth%s+AUTH XOAUTH2 as noreply@contoso%.test accepted", r.out)
  end)

  it("serves several connections at once and answers a fourth for the mailbox with 432 4.3.2", function()
    local tok = cli.run(home, { "token", "--profile", sb.profile }).out:match("%S+")
    local smtp = require "oauthmail.smtp"
    local function session()
      return assert(smtp.open { host = "127.0.0.1", port = sb.smtp_port, tls = "starttls",
        ca_file = sb.dir .. "/sandbox.crt", timeout = 10 })
    end
    local open = {}
    for i = 1, 3 do
      open[i] = session()
      assert.is_true(open[i]:auth { mechanism = i == 2 and "oauthbearer" or "xoauth2", user = "noreply@contoso.test",
        token = tok })
    end
    local fourth = session()
    local ok, err = fourth:auth { mechanism = "xoauth2", user = "noreply@contoso.test", token = tok }
    assert.is_nil(ok)
    assert.equals(432, err.code)
    assert.equals("4.3.2", err.enhanced)
    fourth:close()
    -- the three are still served, interleaved
    for i = 3, 1, -1 do
      local rc = assert(open[i]:send { from = "noreply@contoso.test", to = { "x" .. i .. "@example.org" },
        data = "Subject: n" .. i .. "\r\n\r\nbody\r\n" })
      assert.same({ "x" .. i .. "@example.org" }, rc.accepted)
    end
    open[1]:close()
    local again = session()
    assert.is_true(again:auth { mechanism = "xoauth2", user = "noreply@contoso.test", token = tok })
    again:close()
    open[2]:close()
    open[3]:close()
  end)

  it("client credentials with a certificate: the assertion's signature is verified against the registered one", function()
    local r = send(home, sb.dir .. "/sandbox-cert.lua")
    assert.equals(0, r.rc, r.err)
    local other = require("spec.support.oidc").make_client_cert(h.tmpdir(), "stranger")
    local p = dofile(sb.dir .. "/sandbox-cert.lua")
    p.client_certificate = { cert = other.cert, key = other.key }
    p.store = { kind = "file", path = sb.dir .. "/stranger.json" }
    local path = h.write_file(sb.dir .. "/stranger.lua", "return " .. cli.lua_source(p) .. "\n")
    local bad = send(home, path)
    assert.equals(77, bad.rc, bad.err)
    assert.matches("AADSTS700027", bad.err)
    assert.matches("does not verify", bad.err)
  end)

  it("535 5.7.139 for a mailbox with SMTP AUTH off: exit 77 and the Exchange fix", function()
    local p = sb.variant("disabled", { user = "disabled@contoso.test" })
    local r = send(home, p)
    assert.equals(77, r.rc, r.err)
    assert.matches("535 5%.7%.139", r.err)
    assert.matches("Set%-CASMailbox", r.err)
  end)

  it("535 5.7.3 for a token it never issued", function()
    local smtp = require "oauthmail.smtp"
    local s = assert(smtp.open { host = "127.0.0.1", port = sb.smtp_port, ca_file = sb.dir .. "/sandbox.crt" })
    local ok, err = s:auth { mechanism = "xoauth2", user = "noreply@contoso.test", token = "eyJ.forged.token" }
    s:close()
    assert.is_nil(ok)
    assert.equals(535, err.code)
    assert.equals("5.7.3", err.enhanced)
  end)

  it("Google-shaped mailbox: the 334 error challenge, then 535 5.7.8", function()
    local p = sb.variant("google", { user = "sender@gmail.test" })
    local r = send(home, p)
    assert.equals(77, r.rc, r.err)
    assert.matches("error challenge: status 401, scope https://mail%.google%.com/", r.err)
    assert.matches("535 5%.7%.8", r.err)
  end)

  it("fault switches over the control API: 421 4.7.66 at the greeting is named by the doctor", function()
    assert.equals(200, (sb.control("POST", "/faults", { faults = { { stage = "connect", code = 421,
      enhanced = "4.7.66", times = 2 } } })))  -- the doctor's TCP probe meets the first
    local r = cli.run(home, { "doctor", "--profile", sb.profile })
    assert.equals(1, r.rc)
    assert.matches("FAIL ehlo%s+[^\n]*4%.7%.66", r.out)
    assert.matches("TLS 1%.2", r.out)
    local _, stats = sb.control("GET", "/stats")
    assert.same({ "connect:421", "connect:421" }, stats.faults_used)
  end)

  it("a client that never speaks and one stalled in its STARTTLS handshake hold up nobody", function()
    local conn = require "oauthmail.conn"
    local silent = assert(conn.connect { host = "127.0.0.1", port = sb.smtp_port, timeout = 10 })
    local stalled = assert(conn.connect { host = "127.0.0.1", port = sb.smtp_port, timeout = 10 })
    assert.matches("^220 ", stalled:receive_line())
    assert(stalled:send("EHLO stalled.test\r\n"))
    repeat local l = assert(stalled:receive_line()) until l:match("^250 ")
    assert(stalled:send("STARTTLS\r\n"))
    assert.matches("^220 ", stalled:receive_line())
    -- the start of a ClientHello record, then nothing: the server's handshake waits for the rest (10 s)
    assert(stalled:send("\22\3\1\2\0\1\0\1\252\3\3"))
    local before = #sb.messages()
    -- a client that waits 3 s for anything and tries once: it gets through only if the
    -- stalled handshake blocks no one (the old polling loop sat in it for 10 s)
    local p = dofile(sb.profile)
    p.smtp.timeout = 3
    local path = sb.variant("impatient", { smtp = p.smtp, oauth = { timeout = 3, retry = { attempts = 1 } },
      policy = { attempts = 1 }, store = { kind = "file", path = sb.dir .. "/impatient.json" } })
    local r = send(home, path, { "--subject", "past the stalled ones" })
    silent:close()
    stalled:close()
    assert.equals(0, r.rc, r.err)
    local m = sb.messages()
    assert.equals(before + 1, #m)
    assert.matches("Subject: past the stalled ones\r\n", m[#m].data)
  end)

  it("a line over the bound is refused (500 5.5.2) and the connection closed, not buffered on", function()
    local conn = require "oauthmail.conn"
    local c = assert(conn.connect { host = "127.0.0.1", port = sb.smtp_port, timeout = 10 })
    assert.matches("^220 ", c:receive_line())
    -- 64 kB with no line feed: far over a command's 4096 bytes
    assert(c:send("NOOP " .. string.rep("x", 65536)))
    assert.equals("500 5.5.2 Line too long", c:receive_line())
    local none, err = c:receive_line()
    assert.is_nil(none)
    assert.equals("closed", err.reason)
    c:close()
    -- a long line that does end is refused the same way
    c = assert(conn.connect { host = "127.0.0.1", port = sb.smtp_port, timeout = 10 })
    assert.matches("^220 ", c:receive_line())
    assert(c:send("NOOP " .. string.rep("y", 5000) .. "\r\nNOOP\r\n"))
    assert.equals("500 5.5.2 Line too long", c:receive_line())
    c:close()
  end)
end)

describe("oauthmail sandbox with switches", function()
  it("progress on a terminal: a failed attempt and the retry are said on stderr; --quiet silences them", function()
    local home = cli.home()
    local sb = start(home, { "--fault", "mail:451:4.7.500" })
    local p = sb.variant("retry", { policy = { backoff_base = 0 } })
    local r = cli.run(home, { "send", "--profile", p, "--to", "ops@example.org", "--text", "x" }, { env = { OAUTHMAIL_TTY = "1" } })
    assert.equals(0, r.rc, r.err)
    assert.matches("attempt 1 failed with 451 4%.7%.500: will retry", r.err)
    assert.matches("\r\27%[K", r.err)
    -- a big attachment: the upload's percentage
    local big = h.write_file(home.dir .. "/big.bin", string.rep("0123456789abcdef", 96 * 1024))
    local up = cli.run(home, { "send", "--profile", p, "--to", "ops@example.org", "--attach", big },
      { env = { OAUTHMAIL_TTY = "1" } })
    assert.equals(0, up.rc, up.err)
    assert.matches("uploading: 0%% of 2%.1 MB", up.err)
    assert.matches("uploading: 4%d%% of 2%.1 MB.*uploading: 100%% of 2%.1 MB", up.err)
    local msgs = sb.messages()
    assert.is_true(msgs[#msgs].size > 2 * 1024 * 1024)
    -- without a terminal: nothing on stderr
    local plain = cli.run(home, { "send", "--profile", p, "--to", "ops@example.org", "--attach", big })
    assert.equals(0, plain.rc, plain.err)
    assert.equals("", plain.err)
    sb.control("POST", "/faults", { faults = { { stage = "mail", code = 451, enhanced = "4.7.500" } } })
    local q = cli.run(home, { "send", "--profile", p, "--to", "ops@example.org", "--text", "x", "--quiet" },
      { env = { OAUTHMAIL_TTY = "1" } })
    sb.stop()
    assert.equals(0, q.rc, q.err)
    assert.equals("", q.err)
  end)

  it("logout keeps the tokens when revocation fails; --local-only deletes them", function()
    local home = cli.home()
    local sb = start(home)
    local p = sb.variant("norevoke", { flow = "device_code", client_id = "00000000-0000-0000-0000-0000000000bb",
      client_secret = false, store = { kind = "file", path = sb.dir .. "/nr.json" },
      revocation_endpoint = "http://127.0.0.1:" .. h.free_port() .. "/revoke" })
    assert.equals(0, cli.run(home, { "login", "--profile", p }).rc)
    local r = cli.run(home, { "logout", "--profile", p })
    assert.equals(75, r.rc, r.err)
    assert.matches("revocation failed, the stored tokens are kept", r.err)
    assert.matches("%-%-local%-only", r.err)
    assert.equals(0, cli.run(home, { "token", "--profile", p }).rc)
    r = cli.run(home, { "logout", "--profile", p, "--local-only" })
    sb.stop()
    assert.equals(0, r.rc, r.err)
    assert.matches("deleted the stored tokens", r.err)
    assert.equals(77, cli.run(home, { "token", "--profile", p }).rc)
  end)

  it("--token-lifetime under 10 minutes: 501 5.5.127 and the margin hint", function()
    local home = cli.home()
    local sb = start(home, { "--token-lifetime", "400" })
    local r = send(home, sb.profile)
    sb.stop()
    assert.is_true(r.rc ~= 0)
    assert.matches("501 5%.5%.127", r.err)
    assert.matches("margin", r.err)
  end)

  it("--quota 1: the second recipient gets 554 5.2.0 (exit 69)", function()
    local home = cli.home()
    local sb = start(home, { "--quota", "1" })
    assert.equals(0, send(home, sb.profile).rc)
    local r = send(home, sb.profile)
    sb.stop()
    assert.equals(69, r.rc, r.err)
    assert.matches("554 5%.2%.0", r.err)
  end)

  it("--fault on the command line: mail:451:4.7.500*9 makes sendmail exit 75", function()
    local home = cli.home()
    local sb = start(home, { "--fault", "mail:451:4.7.500:Server busy*9" })
    local p = sb.variant("once", { policy = { attempts = 2, backoff_base = 0 } })
    local r = cli.run(home, { "sendmail", "--profile", p, "ops@example.org" }, { stdin = "Subject: x\n\nbody\n" })
    sb.stop()
    assert.equals(75, r.rc, r.err)
    assert.matches("451 4%.7%.500", r.err)
  end)

  it("device code approved by itself, refresh with rotation, logout revokes", function()
    local home = cli.home()
    local sb = start(home, { "--token-lifetime", "2" })
    local trace = home.dir .. "/t.jsonl"
    local login = cli.run(home, { "login", "--profile", sb.device, "--trace", trace })
    assert.equals(0, login.rc, login.err)
    assert.matches("To sign in, open http://127%.0%.0%.1:%d+/device and enter the code %x+", login.err)
    local store = function()
      local doc = cjson.decode(h.read_file(sb.dir .. "/tokens-device.json"))
      local _, rec = next(doc.accounts)
      return rec
    end
    local first = store()
    h.sleep(2.1)   -- whole seconds: past the token's end, whatever the rounding
    local t = cli.run(home, { "token", "--profile", sb.device, "--trace", trace })
    assert.equals(0, t.rc, t.err)
    local second = store()
    assert.are_not.equal(first.refresh_token, second.refresh_token)
    assert.equals(second.access_token .. "\n", t.out)
    assert.matches('"event":"refresh"', h.read_file(trace))
    local oauth2 = require "oauthmail.oauth2"
    local cfg = { client_id = "00000000-0000-0000-0000-0000000000bb", client_auth = "none",
      token_endpoint = "http://127.0.0.1:" .. sb.idp_port .. "/token", scope = "x",
      revocation_endpoint = "http://127.0.0.1:" .. sb.idp_port .. "/revoke" }
    local tok, err = oauth2.refresh(cfg, first.refresh_token)
    assert.is_nil(tok)
    assert.equals("invalid_grant", err.oauth_error)
    local lo = cli.run(home, { "logout", "--profile", sb.device })
    assert.equals(0, lo.rc, lo.err)
    assert.matches("revoked and deleted", lo.err)
    tok, err = oauth2.refresh(cfg, second.refresh_token)
    sb.stop()
    assert.is_nil(tok)
    assert.equals("invalid_grant", err.oauth_error)
    h.assert_no_secrets(login.err .. lo.err .. h.read_file(trace),
      { first.access_token, first.refresh_token, second.access_token, second.refresh_token })
  end)

  it("doctor: a Microsoft refresh token unused for 70 days warns, for 95 days fails (90-day inactivity expiry)", function()
    local home = cli.home()
    local sb = start(home)
    assert.equals(0, cli.run(home, { "login", "--profile", sb.device }).rc)
    local path = sb.dir .. "/tokens-device.json"
    local function age(days)
      local doc = cjson.decode(h.read_file(path))
      for _, rec in pairs(doc.accounts) do rec.obtained_at = os.time() - days * 86400 end
      h.write_file(path, cjson.encode(doc), "600")
    end
    age(70)
    local r = cli.run(home, { "doctor", "--profile", sb.device })
    assert.equals(0, r.rc, r.out)
    assert.matches("WARN credentials refresh token last used 70 days ago %(dies after 90 unused%)", r.out)
    age(95)
    r = cli.run(home, { "doctor", "--profile", sb.device })
    sb.stop()
    assert.equals(1, r.rc, r.out)
    assert.matches("FAIL credentials refresh token last used 95 days ago", r.out)
    assert.matches("fix:%s+sign in again: oauthmail login", r.out)
  end)

  it("browser sign-in: the authorization page approves and redirects to the loopback listener", function()
    local home = cli.home()
    local sb = start(home)
    local p = sb.variant("browser", { flow = "authorization_code" })
    local r = cli.run(home, { "login", "--profile", p, "--browser",
      -- (the sanitizer run's preload is for the Lua that loads the core, not for curl)
      "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS curl -s -L -o /dev/null", "--timeout", "30" })
    sb.stop()
    assert.equals(0, r.rc, r.err)
    assert.matches("signed in %(authorization_code%)", r.err)
  end)
end)

describe("oauthmail.sandbox in this process", function()
  local oauthmail = require "oauthmail"
  local sandbox = require "oauthmail.sandbox"
  local conn = require "oauthmail.conn"
  local wait = require "oauthmail.wait"

  it("serves inside the caller's oauthmail.run while a mailer of the same loop sends to it", function()
    local dir = h.tmpdir()
    local sb = assert(sandbox.new { dir = dir })
    local lines, receipts, errs = {}, {}, {}
    oauthmail.run(function()
      sb:serve()
      -- a client that connects and never speaks, open for the whole run
      local silent = assert(conn.connect { host = "127.0.0.1", port = sb.smtp_l:port(), timeout = 10 })
      local p = sb:profile()
      p.trace = function(ev) lines[#lines + 1] = oauthmail.format_event(ev) end
      local mailer = assert(oauthmail.new(p))
      local finished, all = 0, wait.cond()
      for i = 1, 3 do
        oauthmail.spawn(function()
          receipts[i], errs[i] = mailer:send { to = "ops" .. i .. "@example.org", subject = "same loop " .. i,
            text = "hello " .. i }
          finished = finished + 1
          all:signal()
        end)
      end
      local deadline = wait.now() + 60
      while finished < 3 and all:wait(deadline) do end
      mailer:close()
      silent:close()
      sb:stop()
    end)
    sb:close()
    for i = 1, 3 do
      assert.is_table(receipts[i], tostring(errs[i]))
      assert.equals(250, receipts[i].reply.code)
    end
    local m = delivered(dir)
    assert.equals(3, #m)
    local subjects = {}
    for _, msg in ipairs(m) do subjects[#subjects + 1] = msg.data:match("Subject: ([^\r\n]+)") end
    table.sort(subjects)
    assert.same({ "same loop 1", "same loop 2", "same loop 3" }, subjects)
    -- the trace names the steps and never a secret
    local text = table.concat(lines, "\n")
    assert.matches("235", text)
    local secrets = { sb.client_secret }
    for token in pairs(sb.idp.access) do secrets[#secrets + 1] = token end
    assert.is_true(#secrets > 1)
    h.assert_no_secrets(text, secrets)
  end)

  it("sb:run() serves a client process until POST /stop", function()
    local home = cli.home()
    local dir = h.tmpdir()
    local sb = assert(sandbox.new { dir = dir })
    local profile = sb:write_profiles()
    local proc = h.spawn("sh -c " .. h.quote(h.quote(home.oauthmail) .. " send --profile " .. h.quote(profile)
      .. " --to ops@example.org --subject stopped --text x; echo SENT=$?; curl -s -X POST http://127.0.0.1:"
      .. sb.control_l:port() .. "/stop"), { env = home.env })
    local deadline = h.now() + 60
    sb:run(function() return h.now() > deadline end)   -- (a bound only: POST /stop ends it)
    sb:close()
    proc.stop()
    assert.is_true(h.now() < deadline, "the sandbox did not stop on POST /stop")
    assert.matches("SENT=0", proc.output())
    local m = delivered(dir)
    assert.equals(1, #m)
    assert.matches("Subject: stopped\r\n", m[1].data)
  end)

  it("sb:run(until_fn) returns once until_fn says so; run inside a loop is refused", function()
    local dir = h.tmpdir()
    local sb = assert(sandbox.new { dir = dir })
    local asked = 0
    sb:run(function() asked = asked + 1 return asked == 3 end)
    assert.equals(3, asked)
    local ok, err = pcall(oauthmail.run, function() sb:run() end)
    assert.is_false(ok)
    assert.matches("use sb:serve%(%) there", err)
    sb:close()
  end)
end)

describe("oauthmail.sandbox.serve's line reader", function()
  local serve = require "oauthmail.sandbox.serve"

  -- a connection that hands out the given chunks, then says closed
  local function fake(chunks)
    local c = { reads = 0 }
    function c.receive_some()
      c.reads = c.reads + 1
      if c.reads > #chunks then return nil, { reason = "closed" } end
      return chunks[c.reads]
    end
    return c
  end

  it("joins lines and counted bytes across chunks, CR LF split or not", function()
    local r = serve.reader(fake { "EHLO a", "b\r", "\nMAIL FROM:<x>\r\nDA", "TA\r\n\r\n", "0123", "456789tail\n" }, 1)
    assert.equals("EHLO ab", r.line(100))
    assert.equals("MAIL FROM:<x>", r.line(100))
    assert.equals("DATA", r.line(100))
    assert.equals("", r.line(100))
    assert.equals("012345", r.bytes(6))
    assert.equals("", r.bytes(0))
    assert.equals("6789", r.bytes(4))
    assert.equals("tail", r.line(100))
    local none, err = r.line(100)
    assert.is_nil(none)
    assert.equals("closed", err.reason)
  end)

  it("takes a line of exactly max bytes and refuses max + 1, in one chunk or many", function()
    assert.equals(string.rep("a", 10), serve.reader(fake { string.rep("a", 10) .. "\r\n" }, 1).line(10))
    assert.same({ nil, "line too long" }, { serve.reader(fake { string.rep("a", 11) .. "\r\n" }, 1).line(10) })
    local pieces = {}
    for i = 1, 11 do pieces[i] = "b" end
    pieces[12] = "\n"
    assert.same({ nil, "line too long" }, { serve.reader(fake(pieces), 1).line(10) })
  end)

  it("stops reading once more than max bytes came without a line feed", function()
    local chunks = {}
    for i = 1, 1000 do chunks[i] = string.rep("z", 1000) end
    local c = fake(chunks)
    assert.same({ nil, "line too long" }, { serve.reader(c, 1).line(4096) })
    assert.equals(5, c.reads)
  end)
end)
