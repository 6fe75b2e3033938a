-- spec/support/concurrency.lua — the scenario every waiter adapter must
-- pass (spec/loop_spec.lua, spec/wait_cqueues_spec.lua, spec/wait_luv_spec.lua):
-- a ticker task keeps counting while senders wait for real peers that answer
-- slowly. `host` runs the tasks: host.run(main) runs main to its end with
-- host.spawn(fn) available for side tasks.
local assert = require "luassert"
local oauthmail = require "oauthmail"
local wait = require "oauthmail.wait"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local smtp_peers = require "spec.support.smtp_peers"

local M = {}

local USER = "alice@example.org"

local function message(i)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: waiter " .. i .. "\r\nMessage-ID: <w" .. i
    .. "@waiter.test>\r\n\r\nbody " .. i .. "\r\n"
end

-- Run n senders beside a ticker; returns the ticks counted while they ran and their results.
local function with_ticker(host, n, send)
  local ticks, during, results = 0, nil, {}
  host.run(function()
    local stop, done = false, 0
    host.spawn(function()
      while not stop do ticks = ticks + 1 wait.sleep(0.02) end
    end)
    local first = ticks
    for i = 1, n do
      host.spawn(function()
        results[i] = { send(i) }
        done = done + 1
      end)
    end
    while done < n do wait.sleep(0.05) end
    during = ticks - first
    stop = true
  end)
  return during, results
end

-- 20 sends through one mailer (20 sessions) against an smtp-server that
-- answers each message after 600 ms: all 20 open at once, ticker running.
function M.twenty_slow_sends(host, token)
  local peer = smtp_peers.node_smtp { token = token, data_delay_ms = 600 }
  local store = { load = function() return { access_token = token, token_type = "Bearer", expires_at = os.time() + 3600 } end,
    save = function() return true end, lock = function() return function() return true end end }
  local mailer = assert(oauthmail.new {
    name = "waiter", provider = "generic", token_endpoint = "https://127.0.0.1:9/token", flow = "client_credentials",
    client_id = "unused", client_secret = "unused", user = USER, store = store, limits = { connections = 20 },
    smtp = { host = "127.0.0.1", port = peer.port, tls = "starttls", ca_file = peer.ca, servername = "localhost", timeout = 30 },
  })
  local during, results = with_ticker(host, 20, function(i)
    return mailer:send { raw = message(i), to = "ops@example.org" }
  end)
  mailer:close()
  for i = 1, 20 do assert.is_truthy(results[i][1], tostring(results[i][2])) end
  assert.equals(20, #peer.messages())
  assert.equals(20, peer.stats().max_concurrent)   -- all in flight at once
  assert.truthy(during >= 15, "ticker ran " .. during .. " times")
  peer.stop()
end

-- Five senders that need a token the real oidc-provider hands out after 1.5 s.
function M.slow_refresh(host)
  local srv = oidc.start()
  local sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  assert.equals(200, (srv.request("POST", "/test/slow", { path = "/token", ms = 1500 })))
  local mailer = assert(oauthmail.new {
    name = "waiter", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
    flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
    client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
    smtp = sb.smtp(), limits = { connections = 5 },
  })
  local before = srv.stats().token_requests
  local during, results = with_ticker(host, 5, function(i)
    return mailer:send { raw = message(i), to = "ops@example.org" }
  end)
  mailer:close()
  for i = 1, 5 do assert.is_truthy(results[i][1], tostring(results[i][2])) end
  assert.equals(1, srv.stats().token_requests - before)   -- five senders, one (slow) refresh
  assert.equals(5, #sb.messages())
  assert.truthy(during >= 30, "ticker ran " .. during .. " times")
  sb.stop()
  srv.stop()
  h.stop_all()
end

-- Four tasks load and save tokens through a command store (a secret
-- manager) whose commands take 0.5 s each. Run through io.popen, each
-- command stopped the whole Lua state: the ticker counted nothing while
-- they ran, one after the other (4 s). Now the four run side by side, their
-- pipes waited on through the waiter; counted, not timed. `secret` shows
-- that what the commands print is read back whole.
function M.slow_command_store(host)
  local dir = h.tmpdir()
  local q = h.quote(dir)
  local store = require("oauthmail.store").command {
    get = "sleep 0.5; cat " .. q .. "/$OAUTHMAIL_STORE_KEY_ID 2>/dev/null || true",
    put = "sleep 0.5; cat > " .. q .. "/$OAUTHMAIL_STORE_KEY_ID",
    lock_dir = dir, timeout = 30,
  }
  local function rec(i)
    return { access_token = "cmd-store-secret-" .. i .. string.rep("x", 5000), token_type = "Bearer", expires_at = 1900000000 + i }
  end
  local during, results = with_ticker(host, 4, function(i)
    local key = "account-" .. i
    local ok, err = store:save(key, rec(i))
    if not ok then return nil, err end
    return store:load(key)
  end)
  for i = 1, 4 do assert.same(rec(i), results[i][1], tostring(results[i][2])) end
  assert.truthy(during >= 25, "ticker ran " .. during .. " times")
end

M.USER = USER
return M
