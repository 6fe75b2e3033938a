-- spec/outbox_spec.lua — oauthmail.outbox: the local spool (maildir-style,
-- crash-safe enqueue, a run after the server comes back delivers each
-- message once, dead letters) and the Redis stream (a real redis-server and
-- the smtp-server peer: 300 messages, 3 worker processes, one SIGKILLed and
-- replaced; every message delivered, duplicates counted at the server).
local h = require "spec.support.helpers"
local rsupport = require "spec.support.redis"
local smtp_peers = require "spec.support.smtp_peers"
local cjson = require "cjson"

local it_redis = rsupport.available() and it or pending
local TOKEN = "outbox-token-0123456789abcdef"
local USER = "alice@example.org"

local function msg(tag, i)
  return { raw = "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: " .. tag .. " " .. i
    .. "\r\nMessage-ID: <" .. tag .. "-" .. i .. "@outbox.test>\r\n\r\nbody " .. i .. "\r\n", to = "ops@example.org" }
end

local function tally(peer)
  local n, total = {}, 0
  for _, m in ipairs(peer.messages()) do
    local id = (m.data or ""):match("Message%-ID: <([^>]+)>") or "?"
    n[id] = (n[id] or 0) + 1
    total = total + 1
  end
  return n, total
end

local function worker(vars)
  local prefix = ""
  for k, v in pairs(vars) do prefix = prefix .. k .. "=" .. h.quote(v) .. " " end
  return h.spawn("env " .. prefix .. h.lua_bin .. " " .. h.quote(h.root .. "/spec/support/outbox_worker.lua"),
    { lifetime = 200 })
end

local function wait_done(procs, timeout)
  local deadline = h.now() + timeout
  for _, p in ipairs(procs) do
    while p.alive() do
      assert(h.now() < deadline, "worker still running: " .. p.output():sub(-500))
      h.sleep(0.1)
    end
  end
end

describe("outbox", function()
  local outbox
  setup(function() outbox = require "oauthmail.outbox" end)
  teardown(function() h.stop_all() end)

  describe("local spool", function()
    it("enqueues durably into new/, lists, drops, and refuses what JSON cannot carry", function()
      local dir = h.tmpdir() .. "/q"
      local ob = outbox.open(dir)
      local id1 = assert(ob:enqueue(msg("s", 1)))
      local id2 = assert(ob:enqueue(msg("s", 2)))
      assert.is_true(id1 < id2)
      local list = assert(ob:list())
      assert.equals(2, #list)
      assert.equals(id1, list[1].id)
      assert.same(msg("s", 1), list[1].message)
      assert.equals(2, ob:count())
      assert.is_true(ob:drop(id2))
      assert.equals(1, ob:count())
      local none, err = ob:drop("nope")
      assert.is_nil(none)
      assert.equals("missing", err.reason)
      assert.has_error(function() ob:enqueue { raw = "x", to = "a@b", hook = print } end,
        "outbox: the message cannot be queued (it holds a function or binary data)")
      local _, left = h.exec("ls -A " .. h.quote(dir .. "/tmp"))
      assert.equals("", left)   -- nothing stays behind in tmp/
    end)

    it("a process killed during enqueue leaves no message or a whole one, never a part", function()
      local dir = h.tmpdir() .. "/q"
      -- the test hook ends the process after half the bytes reached tmp/
      local code = string.format([[
        local spool = require "oauthmail.outbox.spool"
        local ob = require("oauthmail.outbox").open(%q)
        assert(ob:enqueue({ raw = "whole", to = "a@example.org" }))
        spool._test_fault = "during_put"
        ob:enqueue({ raw = string.rep("x", 100000), to = "a@example.org" })
        print("NOT REACHED")]], dir)
      local ok, out = h.exec(h.lua_bin .. " -e " .. h.quote(code))
      assert.is_false(ok)
      assert.not_matches("NOT REACHED", out)
      local ob = outbox.open(dir)
      local list = assert(ob:list())
      assert.equals(1, #list)
      assert.equals("whole", list[1].message.raw)
      -- SIGKILL at an arbitrary moment of a stream of enqueues
      local dir2 = h.tmpdir() .. "/q2"
      local loop = h.spawn(h.lua_bin .. " -e " .. h.quote(string.format([[
        local ob = require("oauthmail.outbox").open(%q)
        for i = 1, 100000 do
          assert(ob:enqueue({ raw = string.rep("m", 20000) .. i, to = "a@example.org" }))
          io.stdout:write("Q ", i, "\n") io.stdout:flush()
        end]], dir2)), { ready = "Q 50\n" })
      h.sleep(0.3)
      h.exec("pkill -KILL -P " .. loop.pid .. "; kill -KILL " .. loop.pid)
      h.sleep(0.2)
      local printed = 0
      for n in loop.output():gmatch("Q (%d+)\n") do printed = tonumber(n) end
      local all = assert(outbox.open(dir2):list())
      assert.is_true(#all >= printed and #all <= printed + 1, #all .. " queued, " .. printed .. " confirmed")
      for _, e in ipairs(all) do
        assert.is_nil(e.damaged)
        assert.equals(20000, #e.message.raw:match("^m+"))
      end
    end)

    it("a run while the server is down keeps everything; the run after it comes back delivers each once", function()
      local dir = h.tmpdir() .. "/q"
      local ob = outbox.open { kind = "spool", path = dir, attempts = 3 }
      for i = 1, 5 do assert(ob:enqueue(msg("down", i))) end
      ob:close()
      local port = h.free_port()
      local vars = { OM_OUTBOX = dir, OM_SMTP_PORT = port, OM_CA = require("spec.support.certs").get().ca,
        OM_TOKEN = TOKEN }
      local w1 = worker(vars)
      wait_done({ w1 }, 60)
      assert.matches('"retried":5', w1.output())
      assert.equals(5, outbox.open(dir):count())
      local peer = smtp_peers.node_smtp { token = TOKEN, port = port }
      local w2 = worker(vars)
      wait_done({ w2 }, 60)
      assert.matches('"sent":5', w2.output())
      local n, total = tally(peer)
      assert.equals(5, total)
      for i = 1, 5 do assert.equals(1, n["down-" .. i .. "@outbox.test"]) end
      assert.equals(0, outbox.open(dir):count())
      -- a permanent refusal goes to the dead letters with its error
      local ob2 = outbox.open { kind = "spool", path = dir }
      assert(ob2:enqueue { raw = "From: " .. USER .. "\r\nTo: nobody@example.org\r\nSubject: x\r\n\r\nx\r\n",
        to = "nobody@example.org" })
      ob2:close()
      peer.stop()
      local peer2 = smtp_peers.node_smtp { token = TOKEN, port = port, reject = { "nobody@example.org" } }
      wait_done({ worker(vars) }, 60)
      local list = outbox.open(dir):list()
      assert.equals(1, #list)
      assert.is_true(list[1].dead)
      assert.matches("5.1.1", list[1].last_error)
      peer2.stop()
    end)
  end)

  it("a message that can never be sent goes to the dead letters at its first attempt", function()
    local dir = h.tmpdir() .. "/q"
    local ob = outbox.open(dir)
    assert(ob:enqueue { raw = "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: x\r\n\r\n"
      .. string.rep("y", 1200) .. "\r\n", to = "ops@example.org" })
    ob:close()
    local p = worker { OM_OUTBOX = dir, OM_SMTP_PORT = h.free_port(), OM_CA = require("spec.support.certs").get().ca,
      OM_TOKEN = TOKEN }
    wait_done({ p }, 60)
    assert.matches('"dead":1', p.output())
    local list = outbox.open(dir):list()
    assert.equals(1, #list)
    assert.is_true(list[1].dead)
    assert.equals(1, list[1].attempts)
    assert.equals("string", type(list[1].last_error))
  end)

  it("a worker with nothing to send closes its idle sessions after idle_close, and reopens for new work", function()
    local peer = smtp_peers.node_smtp { token = TOKEN }
    local oauthmail = require "oauthmail"
    local rec = { access_token = TOKEN, token_type = "Bearer", expires_at = os.time() + 3600 }
    local mailer = assert(oauthmail.new { provider = "generic", token_endpoint = "https://127.0.0.1:1/token",
      flow = "client_credentials", client_id = "c", client_secret = "unused-secret", user = USER,
      store = { load = function() return rec end, save = function() return true end,
                lock = function() return function() return true end end },
      smtp = { host = "127.0.0.1", port = peer.port, tls = "starttls", ca_file = peer.ca, servername = "localhost" } })
    local ob = outbox.open(h.tmpdir() .. "/q")
    assert(ob:enqueue(msg("idle", 1)))
    local events = {}
    local w = outbox.worker { outbox = ob, mailer = mailer, idle = 0.05, idle_close = 0.3,
      trace = function(ev) events[#events + 1] = ev.event end }
    local enqueued = false
    assert(w:run { max_time = 1.5, stop = function()
      if not enqueued and events[#events] == "idle_close" then
        enqueued = true
        assert(ob:enqueue(msg("idle", 2)))
      end
      return enqueued and #events >= 4 and events[#events] == "idle_close"
    end })
    assert.same({ "sent", "idle_close", "sent", "idle_close" }, events)
    assert.equals(0, (mailer.pool:count()))
    h.sleep(0.3)
    assert.equals(0, peer.stats().current)   -- the server saw the sessions end
    assert.equals(2, peer.stats().connections)
    mailer:close()
    peer.stop()
  end)

  describe("Redis stream", function()
    local redis_srv
    setup(function() if rsupport.available() then redis_srv = rsupport.start() end end)

    it_redis("300 messages, 3 workers, one SIGKILLed mid-run and a new one started: all delivered", function()
      local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 20 }
      local ob = outbox.open { kind = "redis", url = redis_srv.url, prefix = "big:" }
      for i = 1, 300 do assert(ob:enqueue(msg("big", i))) end
      assert.equals(300, ob:count())
      local vars = { OM_OUTBOX = redis_srv.url, OM_PREFIX = "big:", OM_LEASE = "5", OM_BATCH = "5",
        OM_SMTP_PORT = peer.port, OM_CA = peer.ca, OM_TOKEN = TOKEN }
      local w = { worker(vars), worker(vars), worker(vars) }
      local deadline = h.now() + 90
      while select(2, tally(peer)) < 60 do
        assert(h.now() < deadline, "workers made no progress: " .. w[1].output():sub(-300))
        h.sleep(0.05)
      end
      h.exec("pkill -KILL -P " .. w[2].pid .. "; kill -KILL " .. w[2].pid)
      local killed_at = select(2, tally(peer))
      w[4] = worker(vars)
      wait_done({ w[1], w[3], w[4] }, 150)
      local n, total = tally(peer)
      local dups = 0
      for i = 1, 300 do
        local c = n["big-" .. i .. "@outbox.test"]
        assert.is_truthy(c, "message " .. i .. " never arrived")
        dups = dups + c - 1
      end
      assert.equals(300 + dups, total)
      assert.equals(0, ob:count())
      local windows = {}
      for _, i in ipairs { 1, 3, 4 } do
        local st = cjson.decode(w[i].output():match("STATS (%b{})"))
        windows[#windows + 1] = string.format("%.2f ms", st.window_max * 1000)
      end
      -- one message at most was between its 2xx and its delivered record when the worker died
      assert.is_true(dups <= 1, dups .. " duplicates")
      print(string.format("\n  outbox: 300 delivered, %d duplicate(s); worker killed after %d at the server; "
        .. "2xx->record window max per worker: %s", dups, killed_at, table.concat(windows, ", ")))
      peer.stop()
    end)

    it_redis("retries a failed send after the lease, then dead-letters it with the last error", function()
      local port = h.free_port()
      local ob = outbox.open { kind = "redis", url = redis_srv.url, prefix = "dl:", lease = 0.3 }
      local id = assert(ob:enqueue(msg("dl", 1)))
      local vars = { OM_OUTBOX = redis_srv.url, OM_PREFIX = "dl:", OM_LEASE = "0.3", OM_SMTP_PORT = port,
        OM_CA = require("spec.support.certs").get().ca, OM_TOKEN = TOKEN, OM_MAX_TIME = "20" }
      -- nothing listens: five attempts (the default), each taken over after the 0.3 s lease
      local p = worker(vars)
      wait_done({ p }, 60)
      local list = assert(ob:list())
      local dead
      for _, e in ipairs(list) do if e.dead then dead = e end end
      assert.is_truthy(dead, p.output())
      assert.equals(id, dead.id)
      assert.matches("connect", dead.last_error)
      assert.equals(0, ob:count())
      assert.is_true(ob:drop(id))
    end)
  end)
end)
