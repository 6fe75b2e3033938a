-- oauthmail.wait.cqueues — the waiter for programs that run cqueues
-- (lua-http, cqueues servers). Install it once:
--   require("oauthmail.wait").use(require "oauthmail.wait.cqueues")
-- Inside a coroutine a cqueues controller runs, every oauthmail wait becomes
-- a cqueues.poll on a pollable object ({pollfd, events, timeout}, cqueues'
-- own protocol), so the controller runs its other coroutines meanwhile.
-- Outside a controller the waits block as with the default waiter.
local cqueues = require "cqueues"
local condition = require "cqueues.condition"
local sys = require "oauthmail.sys"
local wait = require "oauthmail.wait"

local W = { name = "cqueues" }

local function inside()
  return cqueues.running() ~= nil
end

-- cqueues reads pollfd/events/timeout as methods of the object it polls
local Pollable = {}
Pollable.__index = Pollable
function Pollable:pollfd() return self.fd end
function Pollable:events() return self.mode end
function Pollable:timeout() return self.left end

function W.fd(fd, mode, deadline)
  if not inside() then return wait.poll.fd(fd, mode, deadline) end
  local left = deadline - sys.monotime()
  if left < 0 then left = 0 end
  local obj = setmetatable({ fd = fd, mode = mode, left = left }, Pollable)
  local ready = cqueues.poll(obj, left)
  -- the descriptor may be closed before it is polled again (by oauthmail's
  -- C side, which cqueues cannot see): take it out of the controller's set
  -- now, as cqueues asks before a close
  local cq = cqueues.running()
  if cq then cq:cancel(fd) end
  return ready == obj
end

function W.sleep(seconds)
  if not inside() then return wait.poll.sleep(seconds) end
  cqueues.sleep(seconds)
end

function W.park(cond, deadline)
  if not inside() then return wait.poll.park(cond, deadline) end
  cond.cq = cond.cq or condition.new()
  local left = deadline - sys.monotime()
  if left <= 0 then return false end
  return cqueues.poll(cond.cq, left) == cond.cq
end

function W.wake(cond)
  if cond.cq then cond.cq:signal() end
end

-- tasks side by side on the running controller (mailer:send_many)
function W.spawn(fn, ...)
  local cq = cqueues.running()
  if not cq then return nil end
  local args = { n = select("#", ...), ... }
  cq:wrap(function() fn((table.unpack or unpack)(args, 1, args.n)) end)
  return true
end

return W
