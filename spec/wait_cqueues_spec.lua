-- spec/wait_cqueues_spec.lua — oauthmail.wait.cqueues: under a cqueues
-- controller, oauthmail's waits yield to it (Debian's lua-cqueues, built for
-- 5.1/LuaJIT, 5.3 and 5.4).
local wait = require "oauthmail.wait"
local h = require "spec.support.helpers"
local concurrency = require "spec.support.concurrency"

local have, cqueues = pcall(require, "cqueues")
local it_cq = have and it or function(name) pending(name .. " (lua-cqueues is not installed for " .. _VERSION .. ")") end

describe("oauthmail.wait.cqueues", function()
  after_each(function() wait.use(nil) h.stop_all() end)

  local host = {}
  function host.run(main)
    local cq = cqueues.new()
    local prev = wait.use(require "oauthmail.wait.cqueues")
    cq:wrap(main)
    local ok, err = cq:loop()
    wait.use(prev)
    assert(ok, tostring(err))
  end
  function host.spawn(fn) cqueues.running():wrap(fn) end

  it_cq("waits the blocking way outside a controller", function()
    local cqw = require "oauthmail.wait.cqueues"
    wait.use(cqw)
    local t0 = wait.now()
    wait.sleep(0.05)
    assert.truthy(wait.now() - t0 >= 0.05)
  end)

  it_cq("keeps a ticker running while 20 sends through one mailer wait for a server that answers slowly", function()
    concurrency.twenty_slow_sends(host, "cqueues-spec-token-0123456789")
  end)

  it_cq("keeps a ticker running while a token refresh waits on a slow oidc-provider, then sends", function()
    concurrency.slow_refresh(host)
  end)

  it_cq("keeps a ticker running while a command store's commands (a secret manager) take their time", function()
    concurrency.slow_command_store(host)
  end)
end)
