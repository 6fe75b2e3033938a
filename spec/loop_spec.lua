-- spec/loop_spec.lua — oauthmail.run/spawn, the built-in loop: waits yield to
-- the loop, so a ticker task keeps running while sends (and a token refresh)
-- are in flight against real peers that answer slowly. Counted, not timed:
-- the ticker's count and the server's concurrent connections.
local oauthmail = require "oauthmail"
local wait = require "oauthmail.wait"
local smtp = require "oauthmail.smtp"
local core = require "oauthmail.core"
local h = require "spec.support.helpers"
local smtp_peers = require "spec.support.smtp_peers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"

local TOKEN = "loop-spec-token-0123456789"
local USER = "alice@example.org"

local function message(i)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: loop " .. i .. "\r\n\r\nbody " .. i .. "\r\n"
end

describe("the built-in loop", function()
  after_each(function() h.stop_all() end)

  it("returns what the main task returns, runs spawned tasks, and puts the default waiter back", function()
    local order = {}
    local a, b = oauthmail.run(function(x)
      oauthmail.spawn(function() wait.sleep(0.05) order[#order + 1] = "late" end)
      oauthmail.spawn(function() order[#order + 1] = "early" end)
      wait.sleep(0.01)
      order[#order + 1] = "main"
      return x, "done"
    end, 42)
    assert.equals(42, a)
    assert.equals("done", b)
    assert.same({ "early", "main", "late" }, order)
    assert.equals(wait.poll, wait.current())
  end)

  it("raises an error from a task out of run, and refuses a nested run", function()
    assert.has_error(function() oauthmail.run(function() error("boom", 0) end) end, "boom")
    assert.equals(wait.poll, wait.current())
    assert.has_error(function()
      oauthmail.run(function() oauthmail.run(function() end) end)
    end, "oauthmail.run: a loop is already running (use oauthmail.spawn)")
  end)

  it("wakes a task parked on a condition when another task signals it", function()
    local cond, got = wait.cond(), nil
    local t0 = core.monotime()
    oauthmail.run(function()
      oauthmail.spawn(function() wait.sleep(0.05) cond:signal() end)
      got = cond:wait(core.monotime() + 10)
    end)
    assert.is_true(got)
    assert.truthy(core.monotime() - t0 < 5)
  end)

  it("keeps a ticker running while 20 SMTP sends are in flight against a server that answers slowly", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, tls = "starttls", data_delay_ms = 600 }
    local ticks, ticks_during, done, results = 0, nil, 0, {}
    oauthmail.run(function()
      local stop = false
      oauthmail.spawn(function()
        while not stop do
          ticks = ticks + 1
          wait.sleep(0.02)
        end
      end)
      local before = ticks
      for i = 1, 20 do
        oauthmail.spawn(function()
          local s, err = smtp.open { host = "127.0.0.1", port = peer.port, ca_file = peer.ca, servername = "localhost", timeout = 30 }
          if not s then results[i] = err return end
          local ok, aerr = s:auth { user = USER, token = TOKEN }
          if not ok then results[i] = aerr s:close() return end
          results[i] = s:send { from = USER, to = { "ops@example.org" }, data = message(i) } or "failed"
          s:close()
          done = done + 1
        end)
      end
      while done < 20 and core.monotime() do
        wait.sleep(0.05)
        local failed = 0
        for i = 1, 20 do if type(results[i]) ~= "table" or results[i].kind then failed = failed + (results[i] and 1 or 0) end end
        if failed > 0 then break end
      end
      ticks_during = ticks - before
      stop = true
    end)
    for i = 1, 20 do
      assert.is_table(results[i], tostring(results[i]))
      assert.equals(250, results[i].code, tostring(results[i].message))
    end
    assert.equals(20, #peer.messages())
    -- all 20 sessions were open at once, and the ticker ran while they waited
    -- for the slow replies (at least the 600 ms of one reply, in 20 ms ticks)
    assert.equals(20, peer.stats().max_concurrent)
    assert.truthy(ticks_during >= 15, "ticker ran " .. ticks_during .. " times")
  end)

  it("keeps a ticker running while a token refresh waits on a slow oidc-provider, then sends", function()
    local srv = oidc.start()
    local sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
    assert.equals(200, (srv.request("POST", "/test/slow", { path = "/token", ms = 1500 })))
    local mailer = assert(oauthmail.new {
      name = "loop", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), limits = { connections = 5 },
    })
    local before = srv.stats().token_requests
    local ticks, ticks_during, results = 0, nil, {}
    oauthmail.run(function()
      local stop = false
      oauthmail.spawn(function()
        while not stop do ticks = ticks + 1 wait.sleep(0.02) end
      end)
      local first = ticks
      local done = 0
      for i = 1, 5 do
        oauthmail.spawn(function()
          results[i] = { mailer:send { raw = message(i), to = "ops@example.org" } }
          done = done + 1
        end)
      end
      while done < 5 do wait.sleep(0.05) end
      ticks_during = ticks - first
      stop = true
    end)
    mailer:close()
    for i = 1, 5 do assert.is_truthy(results[i][1], tostring(results[i][2])) end
    assert.equals(1, srv.stats().token_requests - before)   -- five senders, one (slow) refresh
    assert.equals(5, #sb.messages())
    -- the refresh alone took 1.5 s: the ticker ran through it
    assert.truthy(ticks_during >= 30, "ticker ran " .. ticks_during .. " times")
    srv.request("POST", "/test/slow", { path = "/token", ms = 0 })
    sb.stop()
    srv.stop()
  end)
end)
