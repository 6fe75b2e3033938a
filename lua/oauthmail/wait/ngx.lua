-- oauthmail.wait.ngx — the waiter inside OpenResty request handlers and
-- timers. nginx cannot wait on a descriptor it did not open, so this waiter
-- looks at the descriptor (poll with a zero timeout: never blocks) and, when
-- it is not ready, yields to nginx with ngx.sleep for a few milliseconds,
-- then looks again. The worker keeps serving other requests meanwhile.
-- What it costs: up to `step` seconds of added latency per wait and a
-- wake-up every `step` while waiting. SMTP itself should run over nginx's
-- own sockets (oauthmail.transport.cosocket), where nginx waits natively;
-- this waiter serves the rest (token requests through libcurl, store locks,
-- back-off). Outside a phase where ngx.sleep is allowed, waits block.
local sys = require "oauthmail.sys"
local wait = require "oauthmail.wait"

local W = { name = "ngx", step = 0.005 }

local YIELDING = {
  rewrite = true, access = true, content = true, timer = true, ssl_cert = true, ssl_session_fetch = true,
}

local function host() return rawget(_G, "ngx") end

local function yieldable()
  local ngx = host()
  return ngx and ngx.get_phase and YIELDING[ngx.get_phase()] and coroutine.running() ~= nil
end

function W.fd(fd, mode, deadline)
  if not yieldable() then return wait.poll.fd(fd, mode, deadline) end
  while true do
    if sys.poll(fd, mode, 0) then return true end
    local left = deadline - sys.monotime()
    if left <= 0 then return false end
    host().sleep(math.min(W.step, left))
  end
end

function W.sleep(seconds)
  if not yieldable() then return wait.poll.sleep(seconds) end
  host().sleep(seconds)
end

function W.park(cond, deadline)
  if not yieldable() then return wait.poll.park(cond, deadline) end
  local gen = cond.gen
  while cond.gen == gen do
    local left = deadline - sys.monotime()
    if left <= 0 then return false end
    host().sleep(math.min(W.step, left))
  end
  return true
end

function W.wake() end   -- parked waiters look at cond.gen every step

function W.spawn(fn, ...)
  if not yieldable() then return nil end
  return host().thread.spawn(fn, ...)
end

return W
