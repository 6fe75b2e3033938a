-- spec/policy_shared_spec.lua — oauthmail.policy.shared: per-mailbox limits
-- that hold across processes, counted at the real smtp-server peer, with a
-- real redis-server on loopback: the connection semaphore (and a control run
-- without it), leases of crashed holders, the minute window, and a 432 4.3.2
-- seen by one process lowering the limit for all.
local h = require "spec.support.helpers"
local rsupport = require "spec.support.redis"
local smtp_peers = require "spec.support.smtp_peers"
local cjson = require "cjson"

local it_redis = rsupport.available() and it or pending
local TOKEN = "shared-governor-token-0123456789"

-- Start `count` worker processes together and collect their outputs.
local function run_workers(count, vars)
  local dir = h.tmpdir()
  local go = dir .. "/go"
  vars.OM_GO_FILE = go
  local script = {}
  for i = 1, count do
    local prefix = "OM_TAG=w" .. i .. " "
    for k, v in pairs(vars) do prefix = prefix .. k .. "=" .. h.quote(v) .. " " end
    script[#script + 1] = string.format("(env %s timeout -s KILL 150 %s %s >%s 2>&1; echo $? >%s) &", prefix,
      h.lua_bin, h.quote(h.root .. "/spec/support/shared_worker.lua"), h.quote(dir .. "/out." .. i),
      h.quote(dir .. "/rc." .. i))
  end
  script[#script + 1] = "sleep 0.5; touch " .. h.quote(go) .. "; wait"
  h.exec(table.concat(script, "\n"))
  local res = {}
  for i = 1, count do
    res[i] = { out = h.read_file(dir .. "/out." .. i) or "", rc = (h.read_file(dir .. "/rc." .. i) or ""):match("%d+") }
  end
  return res
end

local function all_sent(res, per_worker)
  for i, r in ipairs(res) do
    assert.equals("0", r.rc, "worker " .. i .. ": " .. r.out)
    local n = 0
    for _ in r.out:gmatch("SENT ") do n = n + 1 end
    assert.equals(per_worker, n, r.out)
  end
end

describe("shared governor (limits.shared)", function()
  local redis_srv
  setup(function() if rsupport.available() then redis_srv = rsupport.start() end end)
  teardown(function() h.stop_all() end)

  it("is refused without a URL or a mailbox, as a config error", function()
    local oauthmail = require "oauthmail"
    local m, err = oauthmail.new { provider = "generic", token_endpoint = "https://127.0.0.1:1/token",
      flow = "client_credentials", client_id = "c", client_secret = "s", user = "a@example.org",
      smtp = { host = "127.0.0.1" }, limits = { connections = 3, shared = { kind = "redis" } } }
    assert.is_nil(m)
    assert.equals("config", err.kind)
    assert.matches("limits.shared: 'url' is required", err.message)
    local shared = require "oauthmail.policy.shared"
    assert.has_error(function() shared.new({ shared = { kind = "redis", url = "redis://h", leese = 1 } }, { mailbox = "m" }) end,
      "limits.shared: unknown option 'leese' (did you mean 'lease'?)")
  end)

  it_redis("3 processes x 3 sessions, connections = 3: the SMTP server never sees more than 3 (9 without it)", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 150 }
    local vars = { OM_SMTP_PORT = peer.port, OM_CA = peer.ca, OM_TOKEN = TOKEN, OM_REDIS_URL = redis_srv.url,
      OM_PREFIX = "conn:", OM_LIMITS = cjson.encode { connections = 3 }, OM_SESSIONS = "3", OM_MESSAGES = "4" }
    all_sent(run_workers(3, vars), 12)
    assert.equals(36, #peer.messages())
    local st = peer.stats()
    assert.is_true(st.max_concurrent <= 3, "the server saw " .. st.max_concurrent .. " at once")
    assert.is_true(st.max_concurrent >= 2)
    -- every slot was given back
    -- every slot was given back (and lingered 1 s): no lease ends in the future
    h.sleep(1.2)
    local sem = redis_srv.cli("--scan --pattern 'conn:gov:*:sem'"):match("%S+")
    local live = sem and redis_srv.cli([[EVAL "local t = redis.call('TIME') return ]]
      .. [[redis.call('ZCOUNT', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), '+inf')" 1 ]] .. sem) or "0"
    assert.equals("0", live:match("%d+"), sem and (redis_srv.cli("ZRANGE " .. sem .. " 0 -1 WITHSCORES") .. redis_srv.cli("TIME")))
    peer.stop()
    -- control: the same run without the shared governor opens more than 3
    local peer2 = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 150 }
    vars.OM_SMTP_PORT, vars.OM_REDIS_URL = peer2.port, nil
    all_sent(run_workers(3, vars), 12)
    assert.is_true(peer2.stats().max_concurrent > 3, "control saw " .. peer2.stats().max_concurrent)
    peer2.stop()
  end)

  it_redis("a crashed holder's slot comes back when its lease runs out", function()
    local shared = require "oauthmail.policy.shared"
    local limits = { connections = 1, max_wait = 5, shared = { kind = "redis", url = redis_srv.url, prefix = "lease:",
      lease = 0.5 } }
    local a = shared.new(limits, { mailbox = "m@example.org" })
    local b = shared.new(limits, { mailbox = "m@example.org" })
    local other = shared.new(limits, { mailbox = "other@example.org" })
    assert.is_true(a:acquire())           -- a "crashes": never releases
    assert.is_true(other:acquire())       -- another mailbox is not affected
    local t0 = h.now()
    assert.is_true(b:acquire())
    local waited = h.now() - t0
    assert.is_true(waited >= 0.3 and waited < 3, "waited " .. waited)
    b.on_limit = "fail"
    local c = shared.new(limits, { mailbox = "m@example.org" })
    c.on_limit = "fail"
    local none, err = c:acquire()
    assert.is_nil(none)
    assert.equals("policy", err.kind)
    assert.equals("connections", err.limit)
    b:release()
    assert.is_nil((c:acquire()))           -- b's slot lingers a moment
    c.on_limit = "wait"
    assert.is_true(c:acquire())
    c:release()
    other:release()
  end)

  it_redis("a process idle past its lease finds its slot lost, and its next release frees nobody else's", function()
    local shared = require "oauthmail.policy.shared"
    local limits = { connections = 1, shared = { kind = "redis", url = redis_srv.url,
      prefix = "lost:", lease = 0.4, linger = 0 } }
    local a = shared.new(limits, { mailbox = "m@example.org" })
    local b = shared.new(limits, { mailbox = "m@example.org" })
    local c = shared.new(limits, { mailbox = "m@example.org" })
    assert.is_true(a:try_acquire())
    assert.is_false((b:try_acquire()))
    h.sleep(0.6)                          -- a stays idle past its lease
    assert.is_true(b:try_acquire())      -- the slot came back and went to b
    assert.is_true(a:admit(1))           -- a's next message renews, and finds the slot gone
    assert.equals(1, a:lost_count())
    a:release()                           -- a closes the session of the lost slot...
    assert.equals(0, a:lost_count())
    assert.is_false((c:try_acquire()))    -- ...which does not free b's slot
    b:release()
  end)

  it_redis("60 messages with messages_per_minute = 30 across 3 processes (a 2 s window): the window holds", function()
    local peer = smtp_peers.node_smtp { token = TOKEN }
    local vars = { OM_SMTP_PORT = peer.port, OM_CA = peer.ca, OM_TOKEN = TOKEN, OM_REDIS_URL = redis_srv.url,
      OM_PREFIX = "win:", OM_MINUTE = "2", OM_LIMITS = cjson.encode { connections = 3, messages_per_minute = 30 },
      OM_SESSIONS = "1", OM_MESSAGES = "20" }
    -- one sender per process, three connections for three processes: no
    -- message waits for a connection after its admission (docs/redis.md)
    all_sent(run_workers(3, vars), 20)
    local at = {}
    for _, m in ipairs(peer.messages()) do at[#at + 1] = m.at end
    assert.equals(60, #at)
    table.sort(at)
    -- the 31st message arrived a window after the first, and so on (less the
    -- time a message spends between its admission and the server). The
    -- first message of each process is admitted before its session is
    -- opened, so it reaches the server later by the connection set-up
    -- (TLS, AUTH): the pairs start after those three (docs/redis.md)
    for i = 4, 30 do
      assert.is_true(at[i + 30] - at[i] >= 2000 - 300, string.format("messages %d and %d were %d ms apart",
        i, i + 30, at[i + 30] - at[i]))
    end
    peer.stop()
  end)

  it_redis("a reservation cancelled (the message was not sent) gives its place in the windows back, once", function()
    local shared = require "oauthmail.policy.shared"
    local limits = { messages_per_minute = 2, recipients_per_day = 6, on_limit = "fail",
      shared = { kind = "redis", url = redis_srv.url, prefix = "cancel:" } }
    local a = shared.new(limits, { mailbox = "m@example.org" })
    local b = shared.new(limits, { mailbox = "m@example.org" })
    local r1 = assert(a:reserve(1))
    local r2 = assert(b:reserve(3))
    local none, err = b:reserve(1)
    assert.is_nil(none)
    assert.equals("messages_per_minute", err.limit)
    a:cancel(r1)
    a:cancel(r1)                           -- a second cancel is harmless
    local r3 = assert(b:reserve(1))
    none, err = a:reserve(1)
    assert.is_nil(none)
    assert.equals("messages_per_minute", err.limit)
    b:record(3, r2)                        -- sent: a later cancel keeps it counted
    b:cancel(r2)
    b:cancel(r3)
    none, err = a:reserve(4)               -- 3 sent recipients + 4 > 6: r3's 1 is not counted
    assert.is_nil(none)
    assert.equals("recipients_per_day", err.limit)
    none, err = a:reserve(3)               -- 3 + 3 fits 6, and the minute has room again
    assert.truthy(none, err and err.message)
    none, err = a:reserve(1)
    assert.is_nil(none)
    assert.equals("recipients_per_day", err.limit)
  end)

  it_redis("a mailer's refused sends (5xx) keep no place in the shared windows", function()
    local oauthmail = require "oauthmail"
    local peer = smtp_peers.node_smtp { token = TOKEN, reject = { "nobody@example.org" } }
    local mailer = assert(oauthmail.new {
      provider = "generic", token_endpoint = "https://127.0.0.1:9/token", flow = "client_credentials",
      client_id = "unused", client_secret = "unused", user = "alice@example.org",
      store = { load = function() return { access_token = TOKEN, token_type = "Bearer", expires_at = os.time() + 3600 } end,
        save = function() return true end, lock = function() return function() return true end end },
      smtp = { host = "127.0.0.1", port = peer.port, tls = "starttls", ca_file = peer.ca, servername = "localhost" },
      limits = { connections = 1, messages_per_minute = 2, on_limit = "fail",
        shared = { kind = "redis", url = redis_srv.url, prefix = "refused:" } },
    })
    local function send(to, i)
      return mailer:send { raw = "From: alice@example.org\r\nTo: " .. to .. "\r\nSubject: s" .. i
        .. "\r\n\r\nbody\r\n", to = to }
    end
    for i = 1, 3 do
      local r, err = send("nobody@example.org", i)
      assert.is_nil(r)
      assert.equals(550, err.code, tostring(err))
    end
    assert.truthy(send("ops@example.org", 4))
    assert.truthy(send("ops@example.org", 5))
    local r, err = send("ops@example.org", 6)
    assert.is_nil(r)
    assert.equals("messages_per_minute", err.limit)
    mailer:close()
    assert.equals(2, #peer.messages())
    peer.stop()
  end)

  it_redis("a 432 4.3.2 seen by one process lowers the limit for all of them", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 150, max_connections = 2 }
    local vars = { OM_SMTP_PORT = peer.port, OM_CA = peer.ca, OM_TOKEN = TOKEN, OM_REDIS_URL = redis_srv.url,
      OM_PREFIX = "low:", OM_LIMITS = cjson.encode { connections = 3 }, OM_SESSIONS = "3", OM_MESSAGES = "4" }
    all_sent(run_workers(3, vars), 12)
    assert.equals(36, #peer.messages())
    local st = peer.stats()
    assert.is_true(st.refused >= 1, "no 432 was ever sent")
    -- the server counts a connection until it has seen it close, so a few
    -- more refusals can follow the first; each one lowers the shared limit
    local low = redis_srv.cli("--scan --pattern 'low:gov:*:low'"):match("%S+")
    local n = tonumber(redis_srv.cli("GET " .. low):match("%d+"))
    assert.is_true(n >= 1 and n <= 2, "shared limit " .. tostring(n))
  end)

  it_redis("lower() in one governor is seen by every other on the same mailbox, for `throttle` seconds", function()
    local shared = require "oauthmail.policy.shared"
    local limits = { connections = 3, on_limit = "fail", shared = { kind = "redis", url = redis_srv.url,
      prefix = "thr:", throttle = 1 } }
    local a = shared.new(limits, { mailbox = "m@example.org" })
    local b = shared.new(limits, { mailbox = "m@example.org" })
    assert.equals(2, a:lower())
    assert.is_true(b:acquire())
    assert.is_true(b:acquire())
    local none, err = b:acquire()
    assert.is_nil(none)
    assert.matches("all 2 connections to this mailbox are in use", err.message)
    assert.equals(2, b.connections)   -- b's own pool shrinks too
    b:release()
    b:release()
    h.sleep(1.2)                       -- the throttle ends (and the slots' linger)
    for _ = 1, 3 do assert.is_true(b:acquire()) end
    assert.equals(3, b.connections)
    for _ = 1, 3 do b:release() end
  end)
end)
