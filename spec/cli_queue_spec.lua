-- spec/cli_queue_spec.lua — `oauthmail queue` and `oauthmail worker` run as
-- separate processes (spec/support/cli.lua), tokens from the real
-- oidc-provider, mail into the sandbox: a spool listed, an entry dropped, a
-- run that delivers the rest, dead letters flushed back; a worker on a
-- Redis outbox (real redis-server).
local h = require "spec.support.helpers"
local cli = require "spec.support.cli"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local rsupport = require "spec.support.redis"

local USER = "noreply@contoso.test"

describe("oauthmail queue and worker", function()
  local srv, sb, outbox
  setup(function()
    outbox = require "oauthmail.outbox"
    srv = oidc.start()
    sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  end)
  teardown(function()
    if sb then sb.stop() end
    if srv then srv.stop() end
    h.stop_all()
  end)

  local function profile(home)
    home.profile("spec", {
      provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), policy = { attempts = 1 },
    })
  end

  local function msg(i, to)
    return { raw = "From: " .. USER .. "\r\nTo: " .. (to or "ops@example.org") .. "\r\nSubject: queued " .. i
      .. "\r\n\r\nbody " .. i .. "\r\n", to = to or "ops@example.org" }
  end

  it("lists, drops, runs (each once) and flushes dead letters back in, on the profile's spool", function()
    local home = cli.home()
    profile(home)
    local dir = home.state .. "/oauthmail/spec.outbox"   -- the default outbox of profile "spec"
    local ob = outbox.open(dir)
    local ids = {}
    for i = 1, 3 do ids[i] = assert(ob:enqueue(msg(i))) end
    ob:close()
    local before = #sb.messages()
    local r = cli.run(home, { "queue", "list", "--profile", "spec" })
    assert.equals(0, r.rc, r.err)
    assert.truthy(r.out:find(ids[1] .. "  queued  0 attempt(s)  to ops@example.org  queued 1", 1, true), r.out)
    assert.equals(3, select(2, r.out:gsub("\n", "")))
    r = cli.run(home, { "queue", "drop", ids[2], "--outbox", dir })
    assert.equals(0, r.rc, r.err)
    r = cli.run(home, { "queue", "run", "--profile", "spec" })
    assert.equals(0, r.rc, r.err)
    assert.matches("sent 2", r.err)
    assert.equals(before + 2, #sb.messages())
    r = cli.run(home, { "queue", "list", "--profile", "spec", "--json" })
    assert.equals("", r.out)
    -- a message that can never be sent (a malformed address) becomes a dead letter; flush puts it back
    local ob2 = outbox.open(dir)
    assert(ob2:enqueue(msg(9, "bad address@example.org")))
    ob2:close()
    r = cli.run(home, { "queue", "run", "--profile", "spec" })
    assert.equals(0, r.rc, r.err)
    assert.matches("1 dead", r.err)
    r = cli.run(home, { "queue", "list", "--profile", "spec" })
    assert.matches("dead", r.out)
    r = cli.run(home, { "queue", "flush", "--profile", "spec" })
    assert.matches("1 dead letter%(s%) back in the queue", r.err)
    r = cli.run(home, { "queue", "frob" })
    assert.equals(64, r.rc)
  end)

  it("sendmail --queue keeps a message the server cannot take now, and queue run delivers it once", function()
    local home = cli.home()
    profile(home)
    -- the same mailbox while its SMTP server is down (nothing listens on the port)
    home.profile("down", {
      provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = { host = "127.0.0.1", port = h.free_port(), tls = "implicit", timeout = 3 }, policy = { attempts = 1 },
    })
    local text = "From: " .. USER .. "\r\nTo: ops@example.org\r\nBcc: hidden@example.org\r\n" ..
      "Subject: queued while down\r\nMessage-ID: <queued-down@contoso.test>\r\n\r\nlater\r\n"
    -- without --queue: 75, as sendmail callers expect; with it: 0 and one entry in the spool
    local r = cli.run(home, { "sendmail", "--profile", "down", "-t" }, { stdin = text })
    assert.equals(75, r.rc, r.err)
    r = cli.run(home, { "sendmail", "--profile", "down", "--queue", "-t" }, { stdin = text })
    assert.equals(0, r.rc, r.err)
    assert.matches("queued as", r.err)
    local dir = home.state .. "/oauthmail/down.outbox"
    r = cli.run(home, { "queue", "list", "--outbox", dir })
    assert.equals(0, r.rc, r.err)
    assert.equals(1, select(2, r.out:gsub("\n", "")))
    assert.truthy(r.out:find("queued while down", 1, true), r.out)
    -- the server is back (the working profile, same mailbox): one delivery, Bcc only in the envelope
    local before = #sb.messages()
    r = cli.run(home, { "queue", "run", "--profile", "spec", "--outbox", dir })
    assert.equals(0, r.rc, r.err)
    assert.equals(before + 1, #sb.messages())
    local m = sb.messages()[#sb.messages()]
    assert.equals("queued-down@contoso.test", m.message_id)
    assert.same({ "ops@example.org", "hidden@example.org" }, m.to)
    assert.is_nil(m.data:find("hidden@example.org", 1, true))
    r = cli.run(home, { "queue", "run", "--profile", "spec", "--outbox", dir })
    assert.equals(before + 1, #sb.messages())   -- sent once
    h.assert_no_secrets(r.out .. r.err, { srv.secrets.post })
  end)

  local it_redis = rsupport.available() and it or pending
  it_redis("worker --once sends what a Redis outbox holds", function()
    local redis_srv = rsupport.start()
    local home = cli.home()
    profile(home)
    local ob = outbox.open { kind = "redis", url = redis_srv.url }
    for i = 1, 4 do assert(ob:enqueue(msg(i))) end
    local before = #sb.messages()
    local r = cli.run(home, { "worker", "--profile", "spec", "--outbox", redis_srv.url, "--once" })
    assert.equals(0, r.rc, r.err)
    assert.matches("sent 4", r.err)
    assert.equals(before + 4, #sb.messages())
    assert.equals(0, ob:count())
    r = cli.run(home, { "worker", "--profile", "spec", "--outbox", redis_srv.url, "--max-time", "zero" })
    assert.equals(64, r.rc)
    redis_srv.stop()
  end)
end)
