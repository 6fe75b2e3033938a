-- spec/wait_luv_spec.lua — oauthmail.wait.luv: tasks started with its spawn
-- inside a uv loop yield to it on every oauthmail wait (Debian's lua-luv,
-- built for 5.1/LuaJIT, 5.3 and 5.4).
local wait = require "oauthmail.wait"
local h = require "spec.support.helpers"
local concurrency = require "spec.support.concurrency"

local have, uv = pcall(require, "luv")
local it_luv = have and it or function(name) pending(name .. " (lua-luv is not installed for " .. _VERSION .. ")") end

describe("oauthmail.wait.luv", function()
  after_each(function() wait.use(nil) h.stop_all() end)

  local host = {}
  function host.run(main)
    local luvw = require "oauthmail.wait.luv"
    local failure
    luvw.on_error = function(e) failure = failure or e uv.stop() end
    local prev = wait.use(luvw)
    luvw.spawn(main)
    uv.run()
    wait.use(prev)
    luvw.on_error = nil
    assert(not failure, tostring(failure))
  end
  function host.spawn(fn) require("oauthmail.wait.luv").spawn(fn) end

  it_luv("keeps a ticker running while 20 sends through one mailer wait for a server that answers slowly", function()
    concurrency.twenty_slow_sends(host, "luv-spec-token-0123456789")
  end)

  it_luv("keeps a ticker running while a token refresh waits on a slow oidc-provider, then sends", function()
    concurrency.slow_refresh(host)
  end)

  it_luv("keeps a ticker running while a command store's commands (a secret manager) take their time", function()
    concurrency.slow_command_store(host)
  end)
end)
