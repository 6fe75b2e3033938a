-- spec/cli_spec.lua — the `oauthmail` command run as separate processes, as
-- a user, cron, msmtp and git send-email run it: real tokens from the
-- oidc-provider, mail through the sandbox (which checks the JWT against the
-- provider's keys), Dovecot and the smtp-server peer; no terminal anywhere.
-- Every command's output and trace is checked for secrets (by value), except
-- what `token` prints on stdout by design.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local cli = require "spec.support.cli"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"

local USER = "noreply@contoso.test"

-- A program that runs the command, then says on stderr whether OpenSSL and
-- libcurl were mapped into the process ([no openssl][no libcurl]).
local function maps_probe(dir)
  return h.write_file(dir .. "/probe.lua", [[
    local rc = require("oauthmail.cli").main(arg)
    local f = assert(io.open("/proc/self/maps"))
    local maps = f:read("*a")
    f:close()
    io.stderr:write(maps:find("libssl", 1, true) and "[openssl loaded]" or "[no openssl]",
      maps:find("libcurl", 1, true) and "[libcurl loaded]" or "[no libcurl]")
    os.exit(rc)
  ]])
end

describe("oauthmail profiles", function()
  it("finds NAME.lua on OAUTHMAIL_PROFILE_PATH, then XDG_CONFIG_HOME, and by path", function()
    local home = cli.home()
    local base = { provider = "generic", token_endpoint = "https://127.0.0.1:1/token", client_id = "x",
      client_secret = "not-used-secret", user = USER, smtp = { host = "127.0.0.1" } }
    home.profile("alpha", base)
    local xdg = home.config .. "/oauthmail/profiles"
    h.exec("mkdir -p " .. h.quote(xdg))
    h.write_file(xdg .. "/alpha.lua", "return " .. cli.lua_source(base) .. "\n")
    h.write_file(xdg .. "/beta.lua", "return " .. cli.lua_source(base) .. "\n")
    h.write_file(xdg .. "/broken.lua", "return { smpt = {} }\n")
    local r = cli.run(home, { "profiles" })
    assert.equals(0, r.rc, r.err)
    assert.matches("alpha%s+generic, client_credentials, " .. USER:gsub("%p", "%%%0"), r.out)
    assert.matches("hidden by " .. (home.profiles .. "/alpha.lua"):gsub("%p", "%%%0"), r.out)
    assert.matches("beta", r.out)
    assert.matches("broken%s+INVALID: smpt: unknown field %(did you mean 'smtp'%?%)", r.out)
    local j = cli.run(home, { "profiles", "--json" })
    local doc = cjson.decode(j.out)
    assert.equals(home.profiles, doc.search_path[1])
    assert.equals(xdg, doc.search_path[2])
    assert.equals("/etc/oauthmail/profiles", doc.search_path[3])
    assert.equals(home.state .. "/oauthmail", doc.state_dir)
    assert.equals(4, #doc.profiles)
  end)

  it("names a missing profile, the folders it looked in, and the nearest name", function()
    local home = cli.home()
    home.profile("contoso", { provider = "generic", token_endpoint = "https://127.0.0.1:1/token",
      client_id = "x", user = USER, smtp = { host = "127.0.0.1" }, refresh_token = "rt-not-used" })
    local r = cli.run(home, { "token", "--profile", "contsoo" })
    assert.equals(78, r.rc)
    assert.equals("", r.out)
    assert.matches("no profile 'contsoo' %(looked for contsoo%.lua in " .. home.profiles:gsub("%p", "%%%0"), r.err)
    assert.matches("did you mean 'contoso'%?", r.err)
    local none = cli.run(home, { "token" })
    assert.equals(78, none.rc)
    assert.matches("no profile given: use %-%-profile NAME", none.err)
    local bad = cli.run(home, { "token", "--profile", home.dir .. "/nowhere.lua" })
    assert.equals(78, bad.rc)
    assert.matches("cannot read profile file", bad.err)
  end)

  it("is installed by make install as a command for the Lua it was built for", function()
    local tree = h.tmpdir()
    local build = os.getenv("OAUTHMAIL_BUILD") or ("build/" .. h.lua_version)
    local ok, out = h.exec("cd " .. h.quote(h.root) .. " && make -s install PREFIX=" .. h.quote(tree) .. " LUA_VERSION="
      .. h.lua_version .. " BUILD=" .. h.quote(build))
    assert.is_true(ok, out)
    local bin = tree .. "/bin/oauthmail"
    local first = h.read_file(bin):match("^#!(%S+)")
    local _, want = h.exec("command -v " .. h.lua_bin)
    assert.equals(want:match("%S+"), first)
    -- no LUA_PATH: the command finds the modules where make install put them
    local home = cli.home()
    local san = ""
    for _, k in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
      if os.getenv(k) then san = san .. " " .. k .. "=" .. h.quote(os.getenv(k)) end
    end
    local run_ok, text = h.exec(h.lua_bin .. " -v >/dev/null; env -i" .. san .. " HOME=" .. h.quote(home.dir)
      .. " OAUTHMAIL_PROFILE_PATH=" .. h.quote(home.profiles)
      .. " " .. h.quote(bin) .. " profiles")
    assert.is_true(run_ok, text)
    assert.matches("search path:\n  " .. home.profiles:gsub("%p", "%%%0"), text)
    -- its modules precompiled for its Lua: loaded instead of the sources...
    local bytecode = tree .. "/lib/oauthmail/" .. h.lua_bin:match("[^/]+$")
    local profiles_bc = bytecode .. "/oauthmail.cli.profiles.luac"
    assert.is_true(h.read_file(profiles_bc):sub(1, 4) == "\27Lua" or h.read_file(profiles_bc):sub(1, 3) == "\27LJ")
    local function run_profiles()
      return h.exec("env -i" .. san .. " HOME=" .. h.quote(home.dir) .. " OAUTHMAIL_PROFILE_PATH="
        .. h.quote(home.profiles) .. " strace -f -e trace=openat -o " .. h.quote(tree .. "/opens") .. " "
        .. h.quote(bin) .. " profiles")
    end
    local have_strace = h.exec("command -v strace >/dev/null")
    if have_strace then
      assert.is_true(run_profiles())
      local opens = h.read_file(tree .. "/opens")
      assert.truthy(opens:find("oauthmail.cli.profiles.luac", 1, true), "the precompiled module was not used")
      assert.falsy(opens:find("share/lua/[%d.]+/oauthmail/cli/profiles.lua\""), "the source was compiled instead")
    end
    -- ...until a source is newer (patched after the install): the source wins
    local src = tree .. "/share/lua/" .. (h.lua_version == "jit" and "5.1" or h.lua_version) .. "/oauthmail/cli/profiles.lua"
    h.write_file(src, h.read_file(src):gsub('"search path:', '"patched search path:', 1))
    h.exec("touch -d '+2 seconds' " .. h.quote(src))
    run_ok, text = h.exec("env -i" .. san .. " HOME=" .. h.quote(home.dir) .. " OAUTHMAIL_PROFILE_PATH="
      .. h.quote(home.profiles) .. " " .. h.quote(bin) .. " profiles")
    assert.is_true(run_ok, text)
    assert.matches("patched search path:", text)
    -- and bytecode this Lua refuses (damaged, or from another interpreter) is skipped
    h.write_file(profiles_bc, "\27Lua-not-really")
    h.exec("touch -d '+4 seconds' " .. h.quote(profiles_bc))
    run_ok, text = h.exec("env -i" .. san .. " HOME=" .. h.quote(home.dir) .. " OAUTHMAIL_PROFILE_PATH="
      .. h.quote(home.profiles) .. " " .. h.quote(bin) .. " profiles")
    assert.is_true(run_ok, text)
    assert.matches("patched search path:", text)
  end)

  it("refuses unknown commands and options with a suggestion (exit 64)", function()
    local home = cli.home()
    local r = cli.run(home, { "tokn" })
    assert.equals(64, r.rc)
    assert.matches("unknown command 'tokn' %(did you mean 'token'%?%)", r.err)
    r = cli.run(home, { "token", "--jsno" })
    assert.equals(64, r.rc)
    assert.matches("unknown option %-%-jsno %(did you mean %-%-json%?%)", r.err)
    r = cli.run(home, { "sendmail", "-bs" })
    assert.equals(64, r.rc)
    assert.matches("%-bs %(SMTP on stdin%) is not supported", r.err)
  end)
end)

describe("oauthmail usage errors (no peers)", function()
  local home
  setup(function()
    home = cli.home()
    home.profile("spec", { provider = "generic", token_endpoint = "https://127.0.0.1:1/token", client_id = "x",
      client_secret = "not-used-secret", user = USER, smtp = { host = "127.0.0.1" } })
  end)

  it("--version prints the library's version and loads neither OpenSSL nor libcurl", function()
    local probe = maps_probe(h.tmpdir())
    for _, flag in ipairs { "--version", "version" } do
      local r = cli.run(home, { flag }, { program = probe })
      assert.equals(0, r.rc, r.err)
      assert.equals(require("oauthmail")._VERSION .. "\n", r.out)
      assert.matches("^oauthmail %d+%.%d+", r.out)
      assert.equals("[no openssl][no libcurl]", r.err)
    end
  end)

  it("send: no recipient, --text with --text-file, a missing attachment, a bad --header", function()
    local r = cli.run(home, { "send", "--profile", "spec", "--subject", "x" })
    assert.equals(64, r.rc)
    assert.matches("no recipient", r.err)
    r = cli.run(home, { "send", "--profile", "spec", "--to", "a@example.org", "--text", "x", "--text-file", "/etc/hostname" })
    assert.equals(64, r.rc)
    assert.matches("not both", r.err)
    r = cli.run(home, { "send", "--profile", "spec", "--to", "a@example.org", "--attach", home.dir .. "/nope.pdf" })
    assert.equals(66, r.rc)
    assert.matches("cannot read attachment", r.err)
    r = cli.run(home, { "send", "--profile", "spec", "--to", "a@example.org", "--header", "no colon" })
    assert.equals(64, r.rc)
    r = cli.run(home, { "send", "--profile", "spec", "a@example.org" })
    assert.equals(64, r.rc)
    assert.matches("recipients go in %-%-to", r.err)
  end)

  it("sendmail: no recipients without -t, a flag missing its value, an unknown flag, queue runs", function()
    local r = cli.run(home, { "sendmail", "--profile", "spec" }, { stdin = "Subject: x\n\nbody\n" })
    assert.equals(64, r.rc)
    assert.matches("no recipients", r.err)
    r = cli.run(home, { "sendmail", "--profile", "spec", "-f" })
    assert.equals(64, r.rc)
    assert.matches("%-f needs a value", r.err)
    r = cli.run(home, { "sendmail", "--profile", "spec", "-Z", "a@example.org" })
    assert.equals(64, r.rc)
    r = cli.run(home, { "sendmail", "-q" })
    assert.equals(64, r.rc)
    assert.matches("queue runs", r.err)
  end)

  it("trace: bad --since, unreadable file, lines that are not JSON", function()
    local r = cli.run(home, { "trace", home.dir .. "/none.jsonl" })
    assert.equals(66, r.rc)
    r = cli.run(home, { "trace", "-", "--since", "yesterday" }, { stdin = "" })
    assert.equals(64, r.rc)
    assert.matches("%-%-since wants", r.err)
    r = cli.run(home, { "trace", "-" }, { stdin = 'not json\n{"ts":"2026-01-01T00:00:00.000Z","type":"cli","event":"x"}\n' })
    assert.equals(0, r.rc)
    assert.matches("cli%s+x", r.out)
    assert.matches("1 line%(s%) were not JSON", r.err)
  end)

  it("doctor --json reports an invalid profile as a failed first step; login --timeout must be a number", function()
    h.write_file(home.profiles .. "/typo.lua", "return { smpt = {} }\n")
    local r = cli.run(home, { "doctor", "--profile", "typo", "--json" })
    assert.equals(1, r.rc)
    local doc = cjson.decode(r.out)
    assert.is_false(doc.ok)
    assert.equals("profile", doc.first_failure)
    assert.matches("smpt: unknown field", doc.steps[1].detail)
    r = cli.run(home, { "login", "--profile", "spec", "--timeout", "soon" })
    assert.equals(64, r.rc)
  end)
end)

describe("oauthmail with the oidc-provider and the sandbox", function()
  local srv, sb

  setup(function()
    srv = oidc.start()
    sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  end)

  teardown(function()
    if sb then sb.stop() end
    if srv then srv.stop() end
  end)

  local seen = 0
  before_each(function()
    sb.clear()
    seen = #sb.messages()
  end)

  -- the messages delivered since the test began (the maildir outlives a test)
  local function delivered()
    local all, out = sb.messages(), {}
    for i = seen + 1, #all do out[#out + 1] = all[i] end
    return out
  end

  local function profile(extra)
    local p = {
      provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), policy = { attempts = 1 },
    }
    for k, v in pairs(extra or {}) do
      if v == false then p[k] = nil else p[k] = v end
    end
    return p
  end

  -- every secret a run may have seen: the client secret and each token issued
  local function secrets(home)
    local l = { srv.secrets.post }
    local text = h.read_file(home.state .. "/oauthmail/spec.json") or ""
    local doc = cjson.decode(text ~= "" and text or "{}")
    for _, acct in pairs(doc.accounts or {}) do
      if type(acct) == "table" then
        for _, k in ipairs { "access_token", "refresh_token" } do
          if type(acct[k]) == "string" then l[#l + 1] = acct[k] end
        end
      end
    end
    return l
  end

  local function no_secrets(home, ...)
    local list = secrets(home)
    assert.is_true(#list >= 2, "the store should hold the token the run obtained")
    for _, text in ipairs { ... } do h.assert_no_secrets(text, list) end
  end

  it("token: a bare token on stdout, stored under XDG_STATE_HOME (0600), then served from the store", function()
    local home = cli.home()
    home.profile("spec", profile())
    local trace = home.dir .. "/token.jsonl"
    local r1 = cli.run(home, { "token", "--profile", "spec", "--trace", trace })
    assert.equals(0, r1.rc, r1.err)
    assert.equals("", r1.err)
    local tok = r1.out:match("^(%S+)\n$")
    assert.truthy(tok, "stdout must be the token and a newline: " .. r1.out)
    assert.equals(3, select(2, tok:gsub("%.", "")) + 1, "a JWT from the provider")
    local store = home.state .. "/oauthmail/spec.json"
    local _, mode = h.exec("stat -c %a " .. h.quote(store))
    assert.equals("600", mode:match("%d+"))
    -- from the store, the command loads neither OpenSSL nor libcurl (it reads a file)
    local probe = maps_probe(home.dir)
    local r2 = cli.run(home, { "token", "--profile", "spec", "--trace", trace }, { program = probe })
    assert.equals(0, r2.rc, r2.err)
    assert.equals(r1.out, r2.out)
    assert.equals("[no openssl][no libcurl]", r2.err)
    r2.err = ""
    local text = h.read_file(trace)
    local from_store, run_flow = 0, 0
    for line in text:gmatch("[^\n]+") do
      local ev = cjson.decode(line)
      assert.truthy(ev.ts:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"), ev.ts)
      assert.equals("spec", ev.profile)
      assert.truthy(ev.type)
      if ev.event == "from_store" then from_store = from_store + 1 end
      if ev.event == "run_flow" then run_flow = run_flow + 1 end
    end
    assert.equals(1, run_flow)
    assert.equals(1, from_store)
    assert.equals(1, srv.stats().token_requests >= 1 and 1 or 0)
    local _, tmode = h.exec("stat -c %a " .. h.quote(trace))
    assert.equals("600", tmode:match("%d+"))
    no_secrets(home, text, r1.err, r2.err)
  end)

  it("token --json: access_token, expires_at, token_type, scope", function()
    local home = cli.home()
    home.profile("spec", profile())
    local r = cli.run(home, { "token", "--profile", "spec", "--json" })
    assert.equals(0, r.rc, r.err)
    local doc = cjson.decode(r.out)
    assert.equals("string", type(doc.access_token))
    assert.is_true(doc.expires_at > os.time())
    assert.equals("Bearer", doc.token_type)
    assert.equals("mail.send", doc.scope)
  end)

  it("token: a wrong client secret exits 77 with the provider's answer and no secret", function()
    local home = cli.home()
    home.profile("spec", profile { client_secret = "wrong-secret-value-123" })
    local r = cli.run(home, { "token", "--profile", "spec" })
    assert.equals(77, r.rc)
    assert.equals("", r.out)
    assert.matches("invalid_client", r.err)
    h.assert_no_secrets(r.err, { "wrong-secret-value-123", srv.secrets.post })
  end)

  it("send: composes, attaches, delivers; Bcc only in the envelope", function()
    local home = cli.home()
    home.profile("spec", profile())
    local att = h.write_file(home.dir .. "/report.csv", "a,b\n1,2\n")
    local trace = home.dir .. "/send.jsonl"
    local r = cli.run(home, { "send", "--profile", "spec", "--to", "ops@example.org", "--bcc", "audit@example.org",
      "--subject", "Nightly report", "--text", "All green.", "--attach", att, "--trace", trace })
    assert.equals(0, r.rc, r.err)
    assert.matches("^sent <[^>]+> to ops@example%.org, audit@example%.org %(1 attempt%): 250 ", r.out)
    local msgs = delivered()
    assert.equals(1, #msgs)
    assert.same({ "ops@example.org", "audit@example.org" }, msgs[1].to)
    assert.matches("Subject: Nightly report", msgs[1].data)
    assert.matches("filename=\"?report%.csv", msgs[1].data)
    assert.is_nil(msgs[1].data:lower():find("audit@example.org", 1, true))
    local t = h.read_file(trace)
    assert.matches('"type":"smtp"', t)
    assert.matches('"dir":"send"', t)
    assert.matches('"event":"delivered"', t)
    no_secrets(home, t, r.out, r.err)
  end)

  local RAW = "From: Reports <" .. USER .. ">\nTo: ops@example.org\nCc: cc@example.org\n"
    .. "Bcc: hidden@example.org\nSubject: cron job\n\nline one\n.\nline after a dot\n"

  it("sendmail -t without a terminal: recipients from the headers, Bcc removed, delivered (exit 0)", function()
    local home = cli.home()
    home.profile("spec", profile())
    local r = cli.run(home, { "sendmail", "--profile", "spec", "-t", "-i" }, { stdin = RAW })
    assert.equals(0, r.rc, r.err)
    assert.equals("", r.out)
    assert.equals("", r.err)
    local msgs = delivered()
    assert.equals(1, #msgs)
    assert.same({ "ops@example.org", "cc@example.org", "hidden@example.org" }, msgs[1].to)
    assert.is_nil(msgs[1].data:find("Bcc", 1, true))
    assert.is_nil(msgs[1].data:find("hidden@", 1, true))
    assert.matches("\r\nline after a dot\r\n", msgs[1].data)
    assert.equals(USER, msgs[1].from)
  end)

  it("sendmail: recipients as arguments, -f, -F, -oi, ignored flags, and a lone dot ending input without -i", function()
    local home = cli.home()
    home.profile("spec", profile())
    local body = "Subject: no from header\n\nfirst\n.\nnot sent\n"
    local r = cli.run(home, { "sendmail", "--profile", "spec", "-oem", "-odb", "-f", USER, "-F", "Cron Daemon",
      "-N", "never", "-v", "--", "a@example.org", "b@example.org" }, { stdin = body })
    assert.equals(0, r.rc, r.err)
    local m = delivered()[1]
    assert.same({ "a@example.org", "b@example.org" }, m.to)
    assert.matches("From: \"?Cron Daemon\"? <" .. USER:gsub("%p", "%%%0") .. ">", m.data)
    assert.matches("first\r\n", m.data)
    assert.is_nil(m.data:find("not sent", 1, true))
    sb.clear()
    local r2 = cli.run(home, { "sendmail", "--profile", "spec", "-oi", "c@example.org" }, { stdin = body })
    assert.equals(0, r2.rc, r2.err)
    assert.matches("not sent", delivered()[2].data)
  end)

  it("sendmail exit codes: 77 for a refused token, 69 for a permanent refusal, 75 for a temporary one", function()
    local home = cli.home()
    home.profile("spec", profile())
    local msg = "From: " .. USER .. "\nTo: ops@example.org\nSubject: x\n\nbody\n"
    sb.faults { { stage = "auth", code = 535, enhanced = "5.7.3", text = "Authentication unsuccessful", times = 4 } }
    local r = cli.run(home, { "sendmail", "--profile", "spec", "-t" }, { stdin = msg })
    assert.equals(77, r.rc, r.err)
    assert.matches("535", r.err)
    assert.matches("hint: ", r.err)
    sb.clear()
    sb.faults { { stage = "rcpt", code = 550, enhanced = "5.1.1", text = "Recipient not found" } }
    r = cli.run(home, { "sendmail", "--profile", "spec", "-t" }, { stdin = msg })
    assert.equals(69, r.rc, r.err)
    assert.matches("550", r.err)
    sb.clear()
    sb.faults { { stage = "mail", code = 451, enhanced = "4.7.500", text = "Server busy", times = 3 } }
    r = cli.run(home, { "sendmail", "--profile", "spec", "-t" }, { stdin = msg })
    assert.equals(75, r.rc, r.err)
    assert.matches("451", r.err)
    sb.clear()
    r = cli.run(home, { "sendmail", "--profile", "spec", "-t" }, { stdin = "not a message at all" })
    assert.equals(65, r.rc, r.err)
    r = cli.run(home, { "sendmail", "--profile", "spec", "-t" }, { stdin = "" })
    assert.equals(66, r.rc, r.err)
    assert.equals(0, #delivered())
    no_secrets(home, r.err)
  end)

  local function msmtp_conf(home, o)
    local conf = home.dir .. "/msmtprc"
    h.write_file(conf, table.concat({
      "defaults", "tls on", "tls_starttls " .. (o.starttls == false and "off" or "on"), "tls_trust_file " .. o.ca,
      "logfile " .. home.dir .. "/msmtp.log", "account spec", "host " .. (o.host or "127.0.0.1"), "port " .. o.port,
      "from " .. USER, "auth " .. o.auth, "user " .. USER,
      "passwordeval \"" .. home.oauthmail .. " token --profile spec\"", "account default : spec", "" }, "\n"), "600")
    return conf
  end

  local function run_tool(home, cmd, stdin)
    local inp = h.write_file(home.dir .. "/tool-stdin", stdin or "")
    local env = {}
    for k, v in pairs(home.env) do if k ~= "LUA_PATH" and k ~= "LUA_CPATH" then env[k] = v end end
    return h.exec("cd " .. h.quote(home.dir) .. " && env -i PATH=" .. h.quote(os.getenv("PATH")) .. " "
      .. cli.env_prefix(env) .. " setsid " .. cmd .. " <" .. h.quote(inp))
  end

  it("msmtp with passwordeval 'oauthmail token' and auth xoauth2 delivers through the sandbox", function()
    local home = cli.home()
    home.profile("spec", profile())
    local conf = msmtp_conf(home, { port = sb.port, ca = sb.ca, auth = "xoauth2" })
    local msg = "From: " .. USER .. "\nTo: ops@example.org\nSubject: via msmtp\n\nhello from msmtp\n"
    local ok, out = run_tool(home, "msmtp -C " .. h.quote(conf) .. " -t", msg)
    assert.is_true(ok, out)
    local msgs = delivered()
    assert.equals(1, #msgs)
    assert.matches("Subject: via msmtp", msgs[1].data)
    assert.matches("^jwt%-", msgs[1].token)   -- the sandbox verified the provider's signature
    -- a second message: the token comes from the store, the provider is not asked again
    local before = srv.stats().token_requests
    ok, out = run_tool(home, "msmtp -C " .. h.quote(conf) .. " -t", msg)
    assert.is_true(ok, out)
    assert.equals(before, srv.stats().token_requests)
    assert.equals(2, #delivered())
    no_secrets(home, out, h.read_file(home.dir .. "/msmtp.log") or "")
  end)

  it("msmtp with auth oauthbearer through Dovecot's submission service (token checked by introspection)", function()
    local peers = require "spec.support.smtp_peers"
    assert.truthy(peers.have_dovecot(), "dovecot is not installed")
    local home = cli.home()
    home.profile("spec", profile())
    local first = cli.run(home, { "token", "--profile", "spec" })
    assert.equals(0, first.rc, first.err)
    local token = first.out:match("^(%S+)")
    local dove = peers.dovecot { token = token, user = USER }
    local ok, out = pcall(function()
      local conf = msmtp_conf(home, { port = dove.port, ca = dove.ca, auth = "oauthbearer", host = "localhost" })
      local msg = "From: " .. USER .. "\nTo: bob@example.org\nSubject: via dovecot\n\nbearer\n"
      local sent, tool_out = run_tool(home, "msmtp -C " .. h.quote(conf) .. " -t", msg)
      assert.is_true(sent, tool_out)
      local msgs = dove.sink.messages()
      assert.equals(1, #msgs)
      assert.matches("Subject: via dovecot", msgs[1].data)
      assert.same({ "bob@example.org" }, msgs[1].to)
      -- a wrong token is refused by the same server: the check is real
      h.write_file(home.dir .. "/bad", "#!/bin/sh\necho not-the-token-at-all\n", "755")
      local bad = h.read_file(conf):gsub("passwordeval [^\n]+", "passwordeval \"" .. home.dir .. "/bad\"")
      h.write_file(conf, bad, "600")
      local refused = run_tool(home, "msmtp -C " .. h.quote(conf) .. " -t", msg)
      assert.is_false(refused)
      assert.equals(1, #dove.sink.messages())
      return tool_out
    end)
    dove.stop()
    assert(ok, out)
    no_secrets(home, out)
  end)

  it("git send-email --sendmail-cmd='oauthmail sendmail' delivers a patch series; Bcc never in the headers", function()
    local home = cli.home()
    home.profile("spec", profile())
    local repo = home.dir .. "/repo"
    local git = "git -C " .. h.quote(repo) .. " -c user.name=Dev -c user.email=" .. USER .. " "
    assert(h.exec("git init -q " .. h.quote(repo)))
    for i = 1, 2 do
      h.write_file(repo .. "/file" .. i .. ".txt", "change " .. i .. "\n")
      assert(h.exec(git .. "add . && " .. git .. "commit -q -m 'change number " .. i .. "'"))
    end
    assert(h.exec(git .. "format-patch -q -2 -o " .. h.quote(home.dir .. "/patches")))
    local ok, out = run_tool(home, "git -C " .. h.quote(repo) .. " -c user.name=Dev -c user.email=" .. USER
      .. " send-email --confirm=never --suppress-cc=all --no-validate "
      .. "--from " .. h.quote("Dev <" .. USER .. ">") .. " --to ops@example.org --bcc secret-bcc@example.org "
      .. "--sendmail-cmd=" .. h.quote(home.oauthmail .. " sendmail --profile spec") .. " "
      .. h.quote(home.dir .. "/patches"))
    assert.is_true(ok, out)
    local msgs = delivered()
    assert.equals(2, #msgs)
    for i, m in ipairs(msgs) do
      assert.matches("Subject: %[PATCH " .. i .. "/2%] change number " .. i, m.data)
      assert.same({ "ops@example.org", "secret-bcc@example.org" }, m.to)
      assert.is_nil(m.data:lower():find("secret%-bcc"))
      assert.is_nil(m.data:find("\nBcc:", 1, true))
    end
    assert.matches("In%-Reply%-To: ", msgs[2].data)
  end)

  -- doctor: one line per step; returns the result and the steps by name
  local function doctor(home, extra_args)
    local argv = { "doctor", "--profile", "spec", "--timeout", "5", "--trace", home.dir .. "/doctor.jsonl" }
    for _, a in ipairs(extra_args or {}) do argv[#argv + 1] = a end
    local r = cli.run(home, argv)
    local steps = {}
    for line in r.out:gmatch("[^\n]+") do
      local mark, step = line:match("^(%S+)%s+(%a+)%s")
      if mark and (mark == "ok" or mark == "WARN" or mark == "FAIL" or mark == "--") and not steps[step] then
        steps[step] = mark
      end
    end
    r.steps = steps
    r.trace = h.read_file(home.dir .. "/doctor.jsonl") or ""
    return r
  end

  it("doctor: a good profile passes every step (exit 0) and sends no mail", function()
    local home = cli.home()
    home.profile("spec", profile())
    local r = doctor(home)
    assert.equals(0, r.rc, r.out .. r.err)
    for _, step in ipairs { "profile", "dns", "tcp", "tls", "ehlo", "token", "claims", "auth" } do
      assert.equals("ok", r.steps[step], step .. " in\n" .. r.out)
    end
    assert.matches("tls%s+TLSv1%.[23] ", r.out)
    assert.matches("certificate [^\n]*localhost, %d+ days left", r.out)
    assert.matches("ehlo%s+AUTH XOAUTH2; SIZE=35882577 PIPELINING SMTPUTF8 8BITMIME", r.out)
    assert.matches("token%s+from the client_credentials flow", r.out)
    assert.matches("claims%s+aud=urn:oauthmail:test:mail", r.out)
    assert.matches("auth%s+AUTH XOAUTH2 as " .. USER:gsub("%p", "%%%0") .. " accepted %(235%)", r.out)
    assert.matches("all checks passed", r.out)
    assert.equals(0, #delivered())
    -- the second run takes the token from the store
    local again = doctor(home, { "--json" })
    assert.equals(0, again.rc)
    local doc = cjson.decode(again.out)
    assert.is_true(doc.ok)
    local by = {}
    for _, st in ipairs(doc.steps) do by[st.step] = st end
    assert.equals("from the store", by.token.source)
    assert.equals("pass", by.auth.verdict)
    assert.matches('"type":"doctor"', again.trace)
    assert.matches('"type":"smtp"', again.trace)
    no_secrets(home, r.out, r.err, again.out, again.trace)
  end)

  local function assert_first_failure(r, step, fix_pattern)
    assert.equals(1, r.rc, r.out .. r.err)
    assert.equals("FAIL", r.steps[step], step .. " in\n" .. r.out)
    assert.matches("first failure: " .. step .. " ", r.out)
    assert.matches("fix:%s+[^\n]*" .. fix_pattern, r.out)
  end

  it("doctor: a wrong client secret fails at the token step with the provider's error and the fix", function()
    local home = cli.home()
    home.profile("spec", profile { client_secret = "wrong-secret-for-doctor" })
    local r = doctor(home)
    assert_first_failure(r, "token", "client_secret")
    assert.equals("ok", r.steps.auth == nil and "ok" or r.steps.auth:gsub("%-%-", "ok"))
    assert.matches("invalid_client", r.out)
    h.assert_no_secrets(r.out .. r.err .. r.trace, { "wrong-secret-for-doctor", srv.secrets.post })
  end)

  it("doctor: a host that does not resolve fails at DNS", function()
    local home = cli.home()
    home.profile("spec", profile { smtp = sb.smtp { host = "no-such-host.invalid" } })
    local r = doctor(home)
    assert_first_failure(r, "dns", "smtp%.host")
  end)

  it("doctor: a port nobody listens on fails at TCP", function()
    local home = cli.home()
    home.profile("spec", profile { smtp = sb.smtp { port = h.free_port() } })
    local r = doctor(home)
    assert_first_failure(r, "tcp", "smtp%.port")
    assert.matches("connection refused", r.out)
  end)

  it("doctor: a server without STARTTLS fails at TLS, never falling back to plain text", function()
    local peers = require "spec.support.smtp_peers"
    local plain = peers.node_smtp { tls = "none", auth = { "XOAUTH2" }, user = USER }
    local home = cli.home()
    home.profile("spec", profile { smtp = { host = "127.0.0.1", port = plain.port, tls = "starttls", ca_file = srv.ca,
      timeout = 5 } })
    local r = doctor(home)
    plain.stop()
    assert_first_failure(r, "tls", "465")
    assert.matches("does not offer STARTTLS", r.out)
    assert.matches('"dir":"recv","text":"250[ %-]AUTH XOAUTH2"', r.trace)
    assert.is_nil(r.trace:find('"dir":"send","text":"AUTH', 1, true))
  end)

  it("doctor: an expired server certificate fails at TLS", function()
    local certs = require("spec.support.certs").get()
    local port = h.free_port()
    local peer = h.spawn("openssl s_server -quiet -accept 127.0.0.1:" .. port .. " -cert " .. h.quote(certs.expired.cert)
      .. " -key " .. h.quote(certs.expired.key), { lifetime = 120 })
    h.wait_port(port)
    local home = cli.home()
    home.profile("spec", profile { smtp = { host = "127.0.0.1", port = port, tls = "implicit", ca_file = srv.ca,
      timeout = 5 } })
    local r = doctor(home)
    peer.stop()
    assert_first_failure(r, "tls", "renew")
    assert.matches("expired", r.out)
  end)

  it("doctor: a token for the wrong audience fails at the claims step (Exchange's needs), AUTH not tried", function()
    local home = cli.home()
    home.profile("spec", profile { provider = "microsoft", tenant = "contoso.test", issuer = false })
    local r = doctor(home)
    assert_first_failure(r, "claims", "outlook%.office365%.com/%.default")
    assert.matches("cause:%s+Exchange Online %(app%-only%) accepts only tokens for the audience", r.out)
    assert.matches("this one is for urn:oauthmail:test:mail", r.out)
    assert.equals("--", r.steps.auth)
    no_secrets(home, r.out, r.err, r.trace)
  end)

  it("doctor: credential life — certificate end date warns, a passed secret end date fails", function()
    local home = cli.home()
    home.profile("spec", profile { client_id = "cc-jwt", client_secret = false, client_auth = "private_key_jwt",
      client_certificate = { cert = srv.keys.jwt.cert, key = srv.keys.jwt.key } })
    local r = doctor(home)
    assert.equals(0, r.rc, r.out .. r.err)
    assert.equals("WARN", r.steps.credentials)
    assert.matches("client certificate expires on %d+%-%d+%-%d+ %(%d days%)", r.out)
    local home2 = cli.home()
    home2.profile("spec", profile { secret_expires = "2020-01-01" })
    local r2 = doctor(home2)
    assert_first_failure(r2, "credentials", "new client secret")
    assert.matches("client secret expired on 2020%-01%-01", r2.out)
    -- every other step still ran and passed
    assert.equals("ok", r2.steps.auth)
  end)

  it("trace FILE: readable lines, filtered by type, profile and time", function()
    local home = cli.home()
    home.profile("spec", profile())
    local trace = home.dir .. "/t.jsonl"
    assert.equals(0, cli.run(home, { "send", "--profile", "spec", "--to", "ops@example.org", "--subject", "t",
      "--text", "x", "--trace", trace }).rc)
    local all = cli.run(home, { "trace", trace })
    assert.equals(0, all.rc, all.err)
    assert.matches("spec%s+smtp%s+> EHLO localhost", all.out)
    assert.matches("spec%s+smtp%s+> AUTH XOAUTH2 <user=noreply@contoso%.test auth=Bearer <redacted>>", all.out)
    assert.matches("spec%s+mailer%s+sent attempts=1 code=250 ", all.out)
    local smtp_only = cli.run(home, { "trace", trace, "--type", "smtp" })
    for line in smtp_only.out:gmatch("[^\n]+") do assert.matches("^%S+ spec%s+smtp ", line) end
    assert.is_nil(smtp_only.out:find(" http ", 1, true))
    local http_only = cli.run(home, { "trace", trace, "--kind", "http" })
    assert.matches(" http ", http_only.out)
    assert.is_nil(http_only.out:find(" smtp ", 1, true))
    assert.equals("", cli.run(home, { "trace", trace, "--profile", "other" }).out)
    assert.equals("", cli.run(home, { "trace", trace, "--since", "2100-01-01" }).out)
    assert.equals(all.out, cli.run(home, { "trace", trace, "--since", "1h" }).out)
    assert.equals("", cli.run(home, { "trace", trace, "--until", "2000-01-01" }).out)
    local json = cli.run(home, { "trace", trace, "--type", "cli", "--json" })
    assert.matches('^{"ts":"[^"]+","type":"cli","profile":"spec"', json.out)
    no_secrets(home, all.out)
  end)
end)

describe("oauthmail login and logout against the oidc-provider", function()
  local srv

  setup(function() srv = oidc.start() end)
  teardown(function() if srv then srv.stop() end end)

  local function profile(client, extra)
    local c = srv.cfg(client)
    local p = {
      provider = "generic", issuer = srv.issuer, token_endpoint = c.token_endpoint,
      authorization_endpoint = c.authorization_endpoint, device_authorization_endpoint = c.device_authorization_endpoint,
      revocation_endpoint = c.revocation_endpoint, client_id = client, client_auth = "none",
      scope = "openid offline_access", ca_file = srv.ca, user = USER,
      smtp = { host = "127.0.0.1", port = 25 },
      oauth = { prompt = "consent" },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  local function stored(home)
    local doc = cjson.decode(h.read_file(home.state .. "/oauthmail/spec.json") or "{}")
    local _, rec = next(doc.accounts or {})
    return rec
  end

  local function secrets_of(rec)
    local l = {}
    for _, k in ipairs { "access_token", "refresh_token", "id_token" } do
      if type(rec[k]) == "string" then l[#l + 1] = rec[k] end
    end
    return l
  end

  it("device code: the code and address, a live countdown on a terminal, stored; then token from the store; "
    .. "logout revokes the refresh token at the provider", function()
    local home = cli.home()
    home.profile("spec", profile("device", { flow = "device_code" }))
    local trace = home.dir .. "/login.jsonl"
    local proc = cli.spawn(home, { "login", "--profile", "spec", "--trace", trace },
      { ready = "enter the code (%S+)", env = { OAUTHMAIL_TTY = "1" } })
    local code = proc.match[1]
    -- let the countdown tick, then approve as the user would on the device page
    h.sleep(1.5)
    assert.is_true(srv.device(code).approved)
    assert.equals(0, proc.wait(60), proc.output())
    local out = proc.output()
    assert.matches("To sign in, open https://127%.0%.0%.1:%d+/device", out)
    assert.matches("The code expires in %d+:%d%d%.", out)
    assert.matches("\r\27%[Kwaiting for approval: %d+:%d%d left %(checked 0 times, every 5 s%)", out)
    assert.matches("signed in %(device_code%); tokens stored in " .. (home.state .. "/oauthmail/spec.json"):gsub("%p", "%%%0"), out)
    local rec = stored(home)
    assert.equals("string", type(rec.refresh_token))
    local before = srv.stats().token_requests
    local t = cli.run(home, { "token", "--profile", "spec" })
    assert.equals(0, t.rc, t.err)
    assert.equals(rec.access_token .. "\n", t.out)
    assert.equals(before, srv.stats().token_requests)
    h.assert_no_secrets(out .. (h.read_file(trace) or ""), secrets_of(rec))

    local lo = cli.run(home, { "logout", "--profile", "spec", "--trace", trace })
    assert.equals(0, lo.rc, lo.err)
    assert.matches("revoked and deleted the stored tokens", lo.err)
    assert.is_nil(stored(home))
    -- the provider now refuses the old refresh token
    local oauth2 = require "oauthmail.oauth2"
    local tok, err = oauth2.refresh(srv.cfg("device"), rec.refresh_token)
    assert.is_nil(tok)
    assert.equals("invalid_grant", err.oauth_error)
    -- and the command says a sign-in is needed (77), without running the flow itself
    local after = cli.run(home, { "token", "--profile", "spec" })
    assert.equals(77, after.rc)
    assert.matches('run "oauthmail login %-%-profile spec"', after.err)
    h.assert_no_secrets(lo.err .. after.err .. (h.read_file(trace) or ""), secrets_of(rec))
    local again = cli.run(home, { "logout", "--profile", "spec" })
    assert.equals(0, again.rc)
    assert.matches("nothing stored", again.err)
  end)

  it("device code without a terminal: no countdown, the code still shown", function()
    local home = cli.home()
    home.profile("spec", profile("device", { flow = "device_code" }))
    local proc = cli.spawn(home, { "login", "--profile", "spec", "--quiet" }, { ready = "enter the code (%S+)" })
    assert.is_true(srv.device(proc.match[1]).approved)
    assert.equals(0, proc.wait(60), proc.output())
    assert.is_nil(proc.output():find("waiting for approval", 1, true))
    assert.is_nil(proc.output():find("signed in", 1, true))
    assert.equals("string", type(stored(home).refresh_token))
  end)

  it("device code denied: exit 77 with the reason", function()
    local home = cli.home()
    home.profile("spec", profile("device", { flow = "device_code" }))
    local proc = cli.spawn(home, { "login", "--profile", "spec" }, { ready = "enter the code (%S+)" })
    srv.device(proc.match[1], "deny")
    assert.equals(77, proc.wait(60), proc.output())
    assert.matches("denied", proc.output())
    assert.is_nil(stored(home))
  end)

  it("browser: --browser CMD opens the sign-in page, the loopback listener gets the code, tokens stored", function()
    local home = cli.home()
    home.profile("spec", profile("native", { flow = "authorization_code" }))
    local browser = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS node "
      .. h.quote(h.peers .. "/oidc.mjs") .. " --open " .. srv.issuer .. " " .. h.quote(srv.ca)
    local r = cli.run(home, { "login", "--profile", "spec", "--browser", browser, "--timeout", "60" })
    assert.equals(0, r.rc, r.err)
    assert.matches("Opening the sign%-in page in the browser", r.err)
    assert.matches("signed in %(authorization_code%)", r.err)
    -- the page the browser was shown on the loopback listener
    local lb = srv.wait_browse()
    assert.equals(200, lb.delivered)
    assert.truthy(lb.page:find("Signed in", 1, true))
    local rec = stored(home)
    assert.equals("string", type(rec.refresh_token))
    local code = lb.location:match("[?&]code=([^&]+)")
    local l = secrets_of(rec)
    l[#l + 1] = code
    h.assert_no_secrets(r.err .. r.out, l)
  end)

  it("browser --no-browser prints the address; a browser elsewhere completes the sign-in", function()
    local home = cli.home()
    home.profile("spec", profile("native", { flow = "authorization_code" }))
    local proc = cli.spawn(home, { "login", "--profile", "spec", "--no-browser" },
      { ready = "(https://127%.0%.0%.1:%d+/auth%?%S+)" })
    srv.browse(proc.match[1], "approve", true)
    assert.equals(0, proc.wait(60), proc.output())
    assert.equals("string", type(stored(home).refresh_token))
  end)

  it("browser, as a user meets it: headless Chromium (chromium-driver) signs in and consents on the provider's "
    .. "pages and lands on the loopback page; screenshot kept in spec/tmp", function()
    assert.truthy(h.exec("command -v chromedriver && test -x /usr/bin/chromium"),
      "needs Debian's chromium and chromium-driver (bin/setup installs them)")
    local home = cli.home()
    home.profile("spec", profile("native", { flow = "authorization_code" }))
    local proc = cli.spawn(home, { "login", "--profile", "spec", "--no-browser", "--timeout", "120" },
      { ready = "(https://127%.0%.0%.1:%d+/auth%?%S+)" })
    local port = h.free_port()
    local driver = h.spawn("chromedriver --port=" .. port, { ready = "started successfully", timeout = 60, lifetime = 300 })
    local function call(method, path, body)
      local status, doc = cli.http11(port, method, path, body)
      assert(status == 200, "webdriver " .. method .. " " .. path .. ": " .. tostring(status) .. " "
        .. (type(doc) == "table" and cjson.encode(doc) or tostring(doc)))
      return doc.value
    end
    local base
    local ok, err = pcall(function()
      local sess = call("POST", "/session", { capabilities = { alwaysMatch = { browserName = "chrome",
        acceptInsecureCerts = true,   -- the provider's certificate comes from the test's own CA
        ["goog:chromeOptions"] = { binary = "/usr/bin/chromium",
          args = { "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage" } } } } })
      base = "/session/" .. sess.sessionId
      local function title() return call("GET", base .. "/title") end
      local function wait_title(want)
        local deadline = h.now() + 60
        repeat
          local t = title()
          if t == want then return t end
          h.sleep(0.2)
        until h.now() > deadline
        error("the browser never showed the page '" .. want .. "' (last: " .. tostring(title()) .. ")")
      end
      local function run(js) return call("POST", base .. "/execute/sync", { script = js, args = { 0 } }) end
      call("POST", base .. "/url", { url = proc.match[1] })
      wait_title("login")
      run("document.querySelector('input[name=login]').value = 'testuser';"
        .. "document.querySelector('input[name=password]').value = 'test-password';"
        .. "document.getElementById('login').submit();")
      wait_title("consent")
      run("document.getElementById('consent').submit();")
      wait_title("Signed in")
      local text = run("return document.body.innerText;")
      assert.matches("You can close this window", text)
      assert.matches("^http://127%.0%.0%.1:%d+/%?code=", run("return location.href;"))
      local png = require("oauthmail.crypto").b64decode(call("GET", base .. "/screenshot"))
      h.exec("mkdir -p " .. h.quote(h.root .. "/spec/tmp"))
      h.write_file(h.root .. "/spec/tmp/login-browser.png", png)
      assert.equals("\137PNG", png:sub(1, 4))
    end)
    if base then pcall(call, "DELETE", base) end   -- closes the browser, also after a failure
    driver.stop()
    assert(ok, err)
    assert.equals(0, proc.wait(60), proc.output())
    assert.equals("string", type(stored(home).refresh_token))
  end)

  it("browser --manual: the address the browser ends on is pasted on stdin", function()
    local home = cli.home()
    home.profile("spec", profile("native", { flow = "authorization_code" }))
    local proc = cli.spawn(home, { "login", "--profile", "spec", "--manual" },
      { ready = "(https://127%.0%.0%.1:%d+/auth%?%S+)", fifo = true })
    local doc = srv.browse(proc.match[1], "approve", false)
    assert.matches("^http://127%.0%.0%.1/%?code=", doc.location)
    proc.feed(doc.location .. "\n")
    assert.equals(0, proc.wait(60), proc.output())
    local rec = stored(home)
    assert.equals("string", type(rec.refresh_token))
    h.assert_no_secrets(proc.output(), secrets_of(rec))
    assert.is_nil(proc.output():find(doc.location:match("code=([^&]+)"), 1, true))
  end)
end)
