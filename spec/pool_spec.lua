-- spec/pool_spec.lua — oauthmail.pool through the mailer: many coroutines on
-- one mailer under the built-in loop, counted at real servers (the npm
-- smtp-server peer counts concurrent connections and 432 refusals; the
-- sandbox records which token each message came with; the oidc-provider
-- counts token requests).
local oauthmail = require "oauthmail"
local wait = require "oauthmail.wait"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local smtp_peers = require "spec.support.smtp_peers"

local USER = "alice@example.org"

local function raw(i, tag)
  return "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: pool " .. i .. "\r\nMessage-ID: <" .. tag .. i
    .. "@pool.test>\r\n\r\nmessage " .. i .. "\r\n"
end

-- message ids at the server -> how many times each arrived
local function tally(messages)
  local n = {}
  for _, m in ipairs(messages) do
    local id = m.message_id or (m.data or ""):match("Message%-ID: <([^>]+)>")
    n[id or "?"] = (n[id or "?"] or 0) + 1
  end
  return n
end

describe("mailer pool", function()
  local srv, token

  setup(function()
    srv = oidc.start()
    local oauth2 = require "oauthmail.oauth2"
    token = assert(oauth2.client_credentials(srv.cfg("cc-post")))
  end)

  -- every peer started here goes at the end (the provider serves every test)
  teardown(function() h.stop_all() end)

  -- a store that already holds the token the smtp-server peer accepts
  local function held_store()
    local rec = { access_token = token.access_token, token_type = "Bearer", expires_at = os.time() + 3600 }
    return {
      load = function() return rec end,
      save = function() return true end,
      lock = function() return function() return true end end,
    }
  end

  local function node_profile(peer, extra)
    local p = {
      name = "pool", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", ca_file = srv.ca, user = USER, store = held_store(),
      smtp = { host = "127.0.0.1", port = peer.port, tls = "starttls", ca_file = peer.ca, servername = "localhost",
        timeout = 20 },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  -- 10 coroutines, 3 messages each, on one mailer
  local function ten_by_three(mailer, tag, before_each_send)
    local results = {}
    oauthmail.run(function()
      for c = 1, 10 do
        oauthmail.spawn(function()
          for k = 1, 3 do
            local i = (c - 1) * 3 + k
            if before_each_send then before_each_send(i) end
            local r, err = mailer:send { raw = raw(i, tag), to = "ops@example.org" }
            results[i] = r or err
          end
        end)
      end
    end)
    return results
  end

  it("sends 30 messages from 10 coroutines over at most 3 connections, each delivered once", function()
    local peer = smtp_peers.node_smtp { token = token.access_token, data_delay_ms = 150 }
    local mailer = assert(oauthmail.new(node_profile(peer, { limits = { connections = 3 } })))
    local results = ten_by_three(mailer, "p")
    for i = 1, 30 do
      assert.is_truthy(results[i] and results[i].reply, tostring(results[i] and results[i].message))
      assert.equals("p" .. i .. "@pool.test", results[i].message_id)
    end
    local st = mailer:stats()
    assert.equals(3, st.sessions)
    mailer:close()
    local n = tally(peer.messages())
    for i = 1, 30 do assert.equals(1, n["p" .. i .. "@pool.test"], "message " .. i) end
    local stats = peer.stats()
    assert.equals(3, stats.max_concurrent)   -- the pool was used, and never beyond its limit
    assert.equals(3, stats.connections)      -- and its sessions were kept, not reopened
  end)

  it("lowers the pool to 2 after 432 4.3.2 and never tries a third connection again", function()
    local peer = smtp_peers.node_smtp { token = token.access_token, data_delay_ms = 150, max_connections = 2 }
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(node_profile(peer, {
      limits = { connections = 3 }, trace = trace,
      policy = { backoff_base = 0.05, jitter = 0 },
    })))
    local results = ten_by_three(mailer, "t")
    for i = 1, 30 do assert.is_truthy(results[i] and results[i].reply, tostring(results[i] and results[i].message)) end
    assert.equals(2, mailer:stats().connections)
    mailer:close()
    local n = tally(peer.messages())
    for i = 1, 30 do assert.equals(1, n["t" .. i .. "@pool.test"], "message " .. i) end
    local stats = peer.stats()
    assert.equals(1, stats.refused)            -- one 432, then the pool kept to 2
    assert.truthy(stats.max_concurrent <= 2)
    assert.truthy(trace.text():find("concurrency", 1, true))
    h.assert_no_secrets(trace.text(), { token.access_token, srv.secrets.post })
  end)

  it("send_many pipelines batches over the pool: 30 messages, at most 3 connections, each once", function()
    local peer = smtp_peers.node_smtp { token = token.access_token }
    local mailer = assert(oauthmail.new(node_profile(peer, { limits = { connections = 3 } })))
    local list = {}
    for i = 1, 30 do list[i] = { raw = raw(i, "b"), to = "ops@example.org" } end
    local results = oauthmail.run(function() return mailer:send_many(list, { batch = 5 }) end)
    for i = 1, 30 do
      assert.is_truthy(results[i] and results[i].reply, tostring(results[i] and results[i].message))
      assert.equals("b" .. i .. "@pool.test", results[i].message_id)
    end
    mailer:close()
    local n = tally(peer.messages())
    for i = 1, 30 do assert.equals(1, n["b" .. i .. "@pool.test"], "message " .. i) end
    assert.equals(3, peer.stats().max_concurrent)
    -- without a loop, the same list goes batch after batch on one session
    local peer2 = smtp_peers.node_smtp { token = token.access_token }
    local m2 = assert(oauthmail.new(node_profile(peer2, { limits = { connections = 3 } })))
    results = m2:send_many(list, { batch = 5 })
    for i = 1, 30 do assert.is_truthy(results[i] and results[i].reply) end
    m2:close()
    assert.equals(1, peer2.stats().connections)
    assert.equals(30, #peer2.messages())
  end)

  it("send_many renewing sessions inside a batch gives each governor slot back once", function()
    local peer = smtp_peers.node_smtp { token = token.access_token }
    local policy = require "oauthmail.policy"
    local gov = policy.governor { connections = 2 }
    -- another mailer of the mailbox holds one of the two connections
    local other = assert(oauthmail.new(node_profile(peer, { policy = { governor = gov } })))
    assert(other:send { raw = raw(0, "o"), to = "ops@example.org" })
    assert.equals(1, gov.open)
    local mailer = assert(oauthmail.new(node_profile(peer, {
      policy = { governor = gov, max_messages_per_session = 2 } })))
    local list = {}
    for i = 1, 10 do list[i] = { raw = raw(i, "r"), to = "ops@example.org" } end
    local results = mailer:send_many(list, { batch = 5 })
    for i = 1, 10 do assert.is_truthy(results[i] and results[i].reply, tostring(results[i] and results[i].message)) end
    mailer:close()
    assert.equals(1, gov.open)   -- the other mailer's slot is still counted
    other:close()
    assert.equals(0, gov.open)
    local n = tally(peer.messages())
    for i = 1, 10 do assert.equals(1, n["r" .. i .. "@pool.test"], "message " .. i) end
  end)

  it("a finalizer closes the sockets without talking to the server (no QUIT)", function()
    local peer = smtp_peers.node_smtp { token = token.access_token }
    local trace = h.trace_collector()
    -- in a function of its own: once it returns, no stack slot refers to the
    -- mailer (a do-block's local can outlive its block in LuaJIT's frame)
    local function send_one()
      local mailer = assert(oauthmail.new(node_profile(peer, { trace = trace })))
      assert(mailer:send { raw = raw(1, "g"), to = "ops@example.org" })
      assert.equals(1, peer.stats().current)
    end
    send_one()
    -- LuaJIT: a compiled trace keeps the closures it was specialised on (a
    -- mailer's trace hook among them) alive as constants until flushed
    if rawget(_G, "jit") then jit.flush() end
    collectgarbage()
    collectgarbage()
    local deadline = wait.now() + 10
    while peer.stats().current > 0 and wait.now() < deadline do wait.sleep(0.05) end
    assert.equals(0, peer.stats().current)
    assert.is_nil(trace.text():find("QUIT", 1, true), trace.text())
  end)

  it("a token that expires mid-batch: sessions finish their message, new ones use a fresh token, nothing lost or doubled", function()
    -- the provider hands out a token that lives 6 s (used for half its life,
    -- 3 s), then one that lives an hour; the sandbox accepts both and records
    -- which one each message came with
    local sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
    local short, long = "pool-short-lived-token-0001", "pool-fresh-token-0002"
    sb.tokens { short, long }
    srv.inject("/token", {
      { status = 200, body = { access_token = short, token_type = "Bearer", expires_in = 6 } },
      { status = 200, body = { access_token = long, token_type = "Bearer", expires_in = 3600 } },
    }, true)
    local mailer = assert(oauthmail.new {
      name = "pool", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), limits = { connections = 3 },
    })
    local before = srv.stats().token_requests
    local t0 = wait.now()
    local started_at = {}
    -- each coroutine sends every 2 s: the first messages go at ~2 s with the
    -- short token, the second ~4 s (inside its life), the third ~6 s (past it)
    local results = ten_by_three(mailer, "x", function(i)
      wait.sleep(2)
      started_at[i] = wait.now() - t0
    end)
    mailer:close()
    for i = 1, 30 do assert.is_truthy(results[i] and results[i].reply, tostring(results[i] and results[i].message)) end
    assert.equals(2, srv.stats().token_requests - before)   -- one refresh, shared by every coroutine
    local msgs = sb.messages()
    local n = tally(msgs)
    for i = 1, 30 do assert.equals(1, n["x" .. i .. "@pool.test"], "message " .. i) end
    local label = {}
    for _, m in ipairs(msgs) do label[tonumber(m.message_id:match("^x(%d+)@"))] = m.token end
    local early, late = 0, 0
    for i = 1, 30 do
      if started_at[i] < 4.5 then
        early = early + 1
        assert.equals("list-1", label[i], "message " .. i .. " started at " .. started_at[i])
      elseif started_at[i] > 5.5 then
        late = late + 1
        assert.equals("list-2", label[i], "message " .. i .. " started at " .. started_at[i])
      end
    end
    assert.truthy(early >= 5 and late >= 5, early .. " early, " .. late .. " late")
    h.assert_no_secrets(tostring(results[1].reply.text), { short, long })
    sb.stop()
  end)
end)

-- Many coroutines on one mailer under its rate limits. Every message is in
-- flight (admitted, not yet sent) at the same time: the server delays its
-- reply to the data, so none is recorded before the others are admitted.
-- Deliveries are counted at the server.
describe("mailer limits with many sends in flight", function()
  local policy = require "oauthmail.policy"
  local TOKEN = "pool-limits-token-0123456789"

  teardown(function() h.stop_all() end)

  local function profile(peer, extra)
    local p = {
      name = "limits", provider = "generic", token_endpoint = "https://127.0.0.1:9/token", flow = "client_credentials",
      client_id = "unused", client_secret = "unused", user = USER,
      store = { load = function() return { access_token = TOKEN, token_type = "Bearer", expires_at = os.time() + 3600 } end,
        save = function() return true end, lock = function() return function() return true end end },
      smtp = { host = "127.0.0.1", port = peer.port, tls = "starttls", ca_file = peer.ca, servername = "localhost",
        timeout = 20 },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  -- n coroutines, one message each (to = the envelope recipient): results[i]
  local function at_once(mailer, n, tag, to)
    local results = {}
    oauthmail.run(function()
      for i = 1, n do
        oauthmail.spawn(function()
          local r, err = mailer:send { raw = raw(i, tag), to = to or "ops@example.org" }
          results[i] = r or err
        end)
      end
    end)
    return results
  end

  local function split(results, n)
    local sent, refused = 0, {}
    for i = 1, n do
      if results[i].reply then sent = sent + 1 else refused[#refused + 1] = results[i] end
    end
    return sent, refused
  end

  it("6 coroutines, messages_per_minute = 3, on_limit = fail: 3 delivered, 3 refused by the limit", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 400 }
    local now = os.time()
    local mailer = assert(oauthmail.new(profile(peer, {
      limits = { connections = 6, messages_per_minute = 3, on_limit = "fail" },
      policy = { clock = function() return now end, sleep = function() error("must not sleep") end },
    })))
    local results = at_once(mailer, 6, "f")
    mailer:close()
    local sent, refused = split(results, 6)
    assert.equals(3, sent)
    assert.equals(3, #refused)
    for _, err in ipairs(refused) do
      assert.equals("policy", err.kind)
      assert.equals("messages_per_minute", err.limit)
      assert.is_true(err.retry_after > 0)
    end
    assert.equals(3, #peer.messages())
    assert.same({ messages = 0, recipients = 0 }, mailer.governor.reserved)
    peer.stop()
  end)

  it("6 coroutines, messages_per_minute = 3, on_limit = wait: the others wait, no minute holds more than 3", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 300 }
    local now = os.time()
    local slept, sent_at = {}, {}
    local mailer = assert(oauthmail.new(profile(peer, {
      limits = { connections = 6, messages_per_minute = 3, max_wait = 300 },
      policy = { clock = function() return now end, sleep = function(s) slept[#slept + 1] = s now = now + s end },
      trace = function(ev) if ev.event == "sent" then sent_at[#sent_at + 1] = now end end,
    })))
    local results = at_once(mailer, 6, "w")
    mailer:close()
    for i = 1, 6 do assert.is_truthy(results[i].reply, tostring(results[i].message)) end
    assert.equals(6, #peer.messages())
    assert.equals(6, #sent_at)
    table.sort(sent_at)
    -- any 4 sends in a row span at least the minute (the window is [t - 60, t))
    for i = 1, 3 do
      assert.is_true(sent_at[i + 3] - sent_at[i] >= 60, "sends at " .. table.concat(sent_at, ", "))
    end
    assert.is_true(#slept >= 1)
    assert.same({ messages = 0, recipients = 0 }, mailer.governor.reserved)
    peer.stop()
  end)

  it("a send the server refuses (5xx) gives its room back: the full limit is there again", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 200, reject = { "nobody@example.org" } }
    local now = os.time()
    local gov = policy.governor({ connections = 6, messages_per_minute = 3, on_limit = "fail" },
      { clock = function() return now end })
    local mailer = assert(oauthmail.new(profile(peer, {
      policy = { clock = function() return now end, governor = gov, sleep = function() error("must not sleep") end },
    })))
    local results = at_once(mailer, 3, "r", "nobody@example.org")
    for i = 1, 3 do
      assert.equals("smtp", results[i].kind, tostring(results[i].message))
      assert.equals(550, results[i].code)
    end
    assert.same({ messages = 0, recipients = 0 }, gov.reserved)
    -- the three refused ones took nothing: three more go, the 4th is refused
    results = at_once(mailer, 4, "ok")
    mailer:close()
    local sent, refused = split(results, 4)
    assert.equals(3, sent)
    assert.equals("messages_per_minute", refused[1].limit)
    assert.equals(3, #peer.messages())
    assert.same({ messages = 0, recipients = 0 }, gov.reserved)
    peer.stop()
  end)

  it("a raising before_send hook or message reader keeps no room", function()
    local peer = smtp_peers.node_smtp { token = TOKEN }
    local now = os.time()
    local gov = policy.governor({ connections = 2, messages_per_minute = 2, on_limit = "fail" },
      { clock = function() return now end })
    local boom = true
    local mailer = assert(oauthmail.new(profile(peer, {
      policy = { clock = function() return now end, governor = gov, sleep = function() error("must not sleep") end },
      before_send = function(msg) if boom and msg.subject == "hook" then error("boom in before_send") end end,
    })))
    local ok, e = pcall(mailer.send, mailer, { from = USER, to = "ops@example.org", subject = "hook", text = "x" })
    assert.is_false(ok)
    assert.truthy(tostring(e):find("boom in before_send", 1, true))
    assert.same({ messages = 0, recipients = 0 }, gov.reserved)
    -- a message object whose reader raises once the session reads it for the data
    local reads = 0
    local object = { envelope = { from = USER, to = { "ops@example.org" } }, message_id = "raise@pool.test",
      reader = function() reads = reads + 1 error("boom in reader") end }
    for _ = 1, 3 do
      ok, e = pcall(mailer.send, mailer, object)
      assert.is_false(ok)
      assert.truthy(tostring(e):find("boom in reader", 1, true))
    end
    assert.equals(3, reads)
    assert.same({ messages = 0, recipients = 0 }, gov.reserved)
    -- the whole limit is there: two go, the third is refused
    boom = false
    local results = at_once(mailer, 3, "after")
    mailer:close()
    local sent, refused = split(results, 3)
    assert.equals(2, sent)
    assert.equals("messages_per_minute", refused[1].limit)
    assert.equals(2, #peer.messages())
    peer.stop()
  end)
end)
