-- spec/policy_spec.lua — the send policy's decisions, back-off and the
-- governor's windows, with an injected clock and sleep (a day in no time).
-- The policy driving real sends is in spec/mailer_spec.lua.
local errors = require "oauthmail.errors"
local policy = require "oauthmail.policy"

local function fake_time(start)
  local t = { now = start or 1800000000, slept = {} }
  t.clock = function() return t.now end
  t.sleep = function(s) t.slept[#t.slept + 1] = s t.now = t.now + s end
  return t
end

describe("policy.classify", function()
  local function e(kind, fields) return errors.new(kind, "x", fields) end
  it("maps failures to actions", function()
    assert.equals("reauth", policy.classify(e("auth", { code = 535, enhanced = "5.7.3" })))
    assert.equals("reauth", policy.classify(e("auth", { code = 535, challenge = { status = "401" } })))
    assert.equals("reconnect", policy.classify(e("smtp", { code = 421, retryable = true })))
    assert.equals("reconnect", policy.classify(e("network", { reason = "closed", retryable = true })))
    assert.equals("reconnect", policy.classify(e("network", { reason = "timeout" })))
    assert.equals("throttle", policy.classify(e("smtp", { code = 432, enhanced = "4.3.2", retryable = true })))
    assert.equals("retry", policy.classify(e("smtp", { code = 451, enhanced = "4.7.500", retryable = true })))
    assert.equals("fail", policy.classify(e("smtp", { code = 550, enhanced = "5.7.60", retryable = false })))
    assert.equals("fail", policy.classify(e("smtp", { code = 421, enhanced = "4.7.66", retryable = false })))
    assert.equals("fail", policy.classify(e("tls", { reason = "verify", retryable = false })))
    assert.equals("fail", policy.classify(e("oauth", { oauth_error = "invalid_client" })))
    assert.equals("fail", policy.classify(e("oauth", { code = 429, retryable = true })))
    assert.equals("fail", policy.classify(e("http", { code = 503 })))
    assert.equals("fail", policy.classify(e("config", {})))
    assert.equals("fail", policy.classify(nil))
  end)

  it("never retries on top of a layer that retried already, nor a name that does not exist", function()
    -- the token endpoint's call owns its retries (oauth2/endpoint)
    assert.equals("fail", policy.classify(e("network", { reason = "closed", retryable = true, stage = "token" })))
    assert.equals("fail", policy.classify(e("network", { reason = "dns", retryable = false })))
    assert.equals("reconnect", policy.classify(e("network", { reason = "dns_temporary", retryable = true })))
  end)
end)

describe("policy arguments", function()
  it("raises on numbers that would break the send loop or the windows, naming them", function()
    local function raises(fn, pattern)
      local ok, err = pcall(fn)
      assert.is_false(ok)
      assert.truthy(tostring(err):find(pattern, 1, true), tostring(err))
    end
    for _, v in ipairs { 0, 2.5, -1, 0 / 0, math.huge } do
      raises(function() policy.governor { messages_per_minute = v } end,
        "policy.governor: messages_per_minute must be a positive whole number or false")
      raises(function() policy.new { attempts = v } end, "policy.new: attempts must be a positive whole number")
    end
    raises(function() policy.governor { connections = 0 } end, "connections must be a positive whole number or false")
    raises(function() policy.governor { max_wait = -1 } end, "max_wait must be a finite number of seconds >= 0")
    raises(function() policy.new { jitter = 2 } end, "jitter must be a number from 0 to 1")
    raises(function() policy.new { max_time = 0 / 0 } end, "max_time must be a finite number of seconds >= 0")
    -- false turns a limit off, and the governor then never waits for it
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = false, on_limit = "fail" }, t)
    for _ = 1, 100 do g:record(1) end
    assert.is_true(g:admit(1))
  end)
end)

describe("policy backoff", function()
  it("doubles up to the cap and applies jitter", function()
    local p = policy.new { backoff_base = 1, backoff_max = 8, jitter = 0.5, random = function() return 0 end }
    assert.same({ 1, 2, 4, 8, 8 }, { p:backoff(1), p:backoff(2), p:backoff(3), p:backoff(4), p:backoff(5) })
    p = policy.new { backoff_base = 2, jitter = 0.5, random = function() return 1 end }
    assert.equals(1, p:backoff(1))
    assert.equals(2, p:backoff(2))
    assert.has_error(function() policy.new { attempts = 0 } end)
  end)
end)

describe("governor", function()
  it("holds the 31st message of a minute and lets it go when the window passes", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = 30 }, t)
    for _ = 1, 30 do
      assert.is_true(g:admit(1))
      g:record(1)
      t.now = t.now + 1
    end
    assert.is_true(g:admit(1))
    assert.equals(1, #t.slept)
    assert.equals(30, t.slept[1])   -- the first send was at +0, now is +30: 30 s more
  end)

  it("fails with kind policy instead of waiting when on_limit is fail, or beyond max_wait", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = 2, on_limit = "fail" }, t)
    for _ = 1, 2 do assert(g:admit(1)) g:record(1) end
    local ok, err = g:admit(1)
    assert.is_nil(ok)
    assert.equals("policy", err.kind)
    assert.equals("messages_per_minute", err.limit)
    assert.equals(60, err.retry_after)
    assert.is_true(err.retryable)
    g = policy.governor({ messages_per_minute = 1, max_wait = 10 }, t)
    g:record(1)
    ok, err = g:admit(1)
    assert.is_nil(ok)
    assert.equals("policy", err.kind)
    assert.same({}, t.slept)
  end)

  it("admits beside a batch's unsent messages only what fits with them, else says false without waiting", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = 3, recipients_per_day = 10, on_limit = "fail" }, t)
    g:record(1)
    -- two admitted and not yet recorded: a third fits, a fourth does not
    assert.is_true(g:admit(1, { messages = 1, recipients = 1 }))
    assert.is_false(g:admit(1, { messages = 2, recipients = 2 }))
    -- recipients count too: 1 recorded + 5 ahead + 5 is over 10
    assert.is_false(g:admit(5, { messages = 1, recipients = 5 }))
    assert.is_true(g:admit(4, { messages = 1, recipients = 5 }))
    -- nothing ahead: the usual answer (here a failure, on_limit = "fail")
    g:record(1) g:record(1)
    local ok, err = g:admit(1, { messages = 0, recipients = 0 })
    assert.is_nil(ok)
    assert.equals("messages_per_minute", err.limit)
    -- a message that can never go is refused as before, once the batch is out
    assert.is_false(g:admit(11, { messages = 1, recipients = 1 }))
    ok, err = g:admit(11)
    assert.is_nil(ok)
    assert.equals("recipients_per_day", err.reason)
    assert.same({}, t.slept)
  end)

  it("keeps no window a limit does not read: a governor without rate limits stays empty", function()
    local t = fake_time()
    local g = policy.governor({ connections = 3 }, t)
    for _ = 1, 1000 do assert(g:admit(2)) g:record(2) end
    assert.equals(0, g.minute:count())
    assert.equals(0, g.day:count())
    -- a minute limit alone counts messages, not the day's recipients
    g = policy.governor({ messages_per_minute = 5 }, t)
    g:record(3)
    assert.equals(1, g.minute:count())
    assert.equals(0, g.day:count())
    g = policy.governor({ recipients_per_day = 5 }, t)
    g:record(3)
    assert.equals(0, g.minute:count())
    assert.equals(3, g.day.sum)
  end)

  it("counts recipients over a rolling 24 hours", function()
    local t = fake_time()
    local g = policy.governor({ recipients_per_day = 100, max_wait = 90000 }, t)
    assert(g:admit(60)) g:record(60)
    t.now = t.now + 3600
    assert(g:admit(40)) g:record(40)
    t.now = t.now + 3600
    assert.is_true(g:admit(10))       -- waits until the first 60 leave the window
    assert.equals(1, #t.slept)
    assert.equals(86400 - 7200, t.slept[1])
    local ok, err = g:admit(101)
    assert.is_nil(ok)
    assert.equals("recipients_per_day", err.reason)
    assert.is_false(err.retryable)
  end)

  -- the day window once summed and shifted the whole day per message: a
  -- batch under Exchange's preset (10,000 recipients a day) went quadratic
  it("keeps admit and record cheap over a full day of sends, and the windows exact", function()
    local core = require "oauthmail.core"
    local t = fake_time()
    local g = policy.governor({ recipients_per_day = 50000, messages_per_day = 40000, messages_per_minute = 1000000,
      max_wait = 90000 }, t)
    local t0 = core.monotime()
    for _ = 1, 40000 do
      assert(g:admit(1))
      g:record(1)
      t.now = t.now + 1          -- 40,000 s: the first sends leave the day window at the end
    end
    assert.truthy(core.monotime() - t0 < 10, "40,000 sends took " .. (core.monotime() - t0) .. " s")
    -- the window holds exactly the sends of the last 24 hours
    t.now = t.now + 86400 - 40000 + 99      -- the first 100 sends (t+0..t+99) are now a day old
    assert.is_true(g:admit(1))
    assert.equals(40000 - 100, g.day:count())
    assert.equals(40000 - 100, g.day.sum)
    assert.same({}, t.slept)
  end)

  it("applies messages_per_day and recipients_per_message", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_day = 2, recipients_per_message = 3, max_wait = 90000 }, t)
    g:record(1) g:record(1)
    assert.is_true(g:admit(1))
    assert.equals(86400, t.slept[1])
    local ok, err = g:admit(4)
    assert.is_nil(ok)
    assert.equals("recipients_per_message", err.reason)
  end)

  it("limits connections and lowers the limit on 432 (never below one)", function()
    local t = fake_time()
    local g = policy.governor({ connections = 2, on_limit = "fail" }, t)
    assert.is_true(g:acquire())
    assert.is_true(g:acquire())
    local ok, err = g:acquire()
    assert.is_nil(ok)
    assert.equals("connections", err.limit)
    g:release()
    assert.equals(1, g:lower())
    ok = g:acquire()
    assert.is_nil(ok)
    g:release()
    assert.is_true(g:acquire())
    assert.equals(1, g:lower())
  end)

  it("waits (bounded) for a connection held by another mailer sharing the governor", function()
    local t = fake_time()
    local g = policy.governor({ connections = 1, max_wait = 1 }, t)
    assert(g:acquire())
    local ok, err = g:acquire()
    assert.is_nil(ok)
    assert.equals("policy", err.kind)
    assert.is_true(#t.slept >= 19 and #t.slept <= 21)
  end)
end)

-- Senders in flight together (coroutines between admission and delivery)
-- must see each other's room: a reservation holds it until record or cancel.
describe("governor reservations", function()
  local oauthmail = require "oauthmail"
  local wait = require "oauthmail.wait"

  it("counts reserved messages and recipients for every other sender until record or cancel, each once", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = 3, recipients_per_day = 10, on_limit = "fail" }, t)
    local a = assert(g:reserve(1))
    local b = assert(g:reserve(4))
    local c = assert(g:reserve(1))
    -- nothing was sent yet: only the three in flight stand in the way
    local none, err = g:reserve(1)
    assert.is_nil(none)
    assert.equals("policy", err.kind)
    assert.equals("messages_per_minute", err.limit)
    assert.is_true(err.in_flight)
    assert.equals(60, err.retry_after)
    g:cancel(b)
    g:cancel(b)                            -- a second cancel gives nothing more back
    assert.same({ messages = 2, recipients = 2 }, g.reserved)
    none, err = g:reserve(9)               -- 2 recipients in flight + 9 > 10
    assert.is_nil(none)
    assert.equals("recipients_per_day", err.limit)
    local d = assert(g:reserve(1))
    g:record(1, a)
    g:record(1, c)
    g:cancel(a)                            -- sent: nothing to give back
    g:cancel(c)
    assert.same({ messages = 1, recipients = 1 }, g.reserved)
    assert.equals(2, g.minute:count())
    -- two sent and one in flight: the window must slide first
    none, err = g:reserve(1)
    assert.is_nil(none)
    assert.is_nil(err.in_flight)
    assert.equals(60, err.retry_after)
    -- a batch's own unsent messages count beside the reservations
    assert.is_false(g:admit(1, { messages = 1, recipients = 1 }))
    g:cancel(d)
    assert.is_false(g:admit(1, { messages = 1, recipients = 1 }))
    assert.is_true(g:fits(1, { messages = 0, recipients = 0 }))
    t.now = t.now + 60                     -- the two sends leave the window
    assert.truthy(g:reserve(1))
    assert.truthy(g:reserve(1))
    assert.truthy(g:reserve(1))
    assert.is_nil((g:reserve(1)))
    assert.same({}, t.slept)
  end)

  it("wakes a waiting sender when a message in flight is cancelled (at once) or sent (then the window slides)", function()
    local t = fake_time()
    local events = {}
    local g = policy.governor({ messages_per_minute = 2, max_wait = 120 },
      { clock = t.clock, sleep = t.sleep, trace = function(ev) events[#events + 1] = ev end })
    local order, waited = {}, nil
    oauthmail.run(function()
      local a = assert(g:reserve(1))
      local b = assert(g:reserve(1))
      oauthmail.spawn(function()
        local t0 = wait.now()
        local r = assert(g:reserve(1))      -- parks until a is cancelled
        waited = wait.now() - t0
        order[#order + 1] = "third admitted"
        g:record(1, r)
      end)
      wait.sleep(0.3)
      order[#order + 1] = "a cancelled"
      g:cancel(a)
      g:record(1, b)
    end)
    assert.same({ "a cancelled", "third admitted" }, order)
    assert.is_true(waited >= 0.25 and waited < 1.5, "waited " .. tostring(waited))
    assert.same({}, t.slept)                 -- no window sleep: the cancelled room was free
    assert.equals("hold", events[1].event)
    assert.is_true(events[1].in_flight)
    assert.same({ messages = 0, recipients = 0 }, g.reserved)

    -- the one in flight is sent instead: the waiting sender then waits for the window
    order = {}
    t.now = t.now + 3600
    oauthmail.run(function()
      local a = assert(g:reserve(1))
      local b = assert(g:reserve(1))
      oauthmail.spawn(function()
        assert(g:reserve(1))
        order[#order + 1] = "third admitted"
      end)
      wait.sleep(0.1)
      order[#order + 1] = "a sent"
      g:record(1, a)
      wait.sleep(0.1)
      g:cancel(b)
    end)
    assert.same({ "a sent", "third admitted" }, order)
    assert.same({ 60 }, t.slept)
    assert.same({ messages = 1, recipients = 1 }, g.reserved)
  end)

  it("where nothing can cancel meanwhile (the main thread), waits max_wait in slices, then fails", function()
    local t = fake_time()
    local g = policy.governor({ messages_per_minute = 1, max_wait = 3 }, t)
    assert(g:reserve(1))
    local none, err = g:reserve(1)
    assert.is_nil(none)
    assert.equals("messages_per_minute", err.limit)
    assert.is_true(err.in_flight)
    assert.equals(3, #t.slept)
    for _, s in ipairs(t.slept) do assert.is_true(s > 0.9 and s <= 1, tostring(s)) end
  end)
end)
