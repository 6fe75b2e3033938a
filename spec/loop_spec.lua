-- spec/loop_spec.lua — oauthmail.run/spawn, the built-in loop: waits yield to
-- the loop, so a ticker task keeps running while sends (and a token refresh)
-- are in flight against real peers that answer slowly. Counted, not timed:
-- the ticker's count and the server's concurrent connections.
local oauthmail = require "oauthmail"
local wait = require "oauthmail.wait"
local core = require "oauthmail.core"
local h = require "spec.support.helpers"
local concurrency = require "spec.support.concurrency"

local TOKEN = "loop-spec-token-0123456789"


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

  local host = { run = oauthmail.run, spawn = oauthmail.spawn }

  it("keeps a ticker running while 20 sends through one mailer wait for a server that answers slowly", function()
    concurrency.twenty_slow_sends(host, TOKEN)
  end)

  it("keeps a ticker running while a token refresh waits on a slow oidc-provider, then sends", function()
    concurrency.slow_refresh(host)
  end)

  it("keeps a ticker running while a command store's commands (a secret manager) take their time", function()
    concurrency.slow_command_store(host)
  end)
end)
