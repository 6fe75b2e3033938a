-- oauthmail.wait.luv — the waiter for programs on libuv through luv
-- (editors, tools, luvit-style servers). Install it once and start the
-- coroutines that use oauthmail with its spawn, inside the uv loop:
--   local luvw = require "oauthmail.wait.luv"
--   require("oauthmail.wait").use(luvw)
--   luvw.spawn(function() ... mailer:send(...) ... end)
--   uv.run()
-- A wait inside such a task starts a uv poll handle (or a timer) and yields;
-- the handle's callback resumes the task. Anywhere else the waits block as
-- with the default waiter.
local uv = require "luv"
local sys = require "oauthmail.sys"
local wait = require "oauthmail.wait"

local W = { name = "luv" }

local current = nil   -- the task being resumed

local function resume(t, ...)
  local prev = current
  current = t
  local ok, err = coroutine.resume(t.co, ...)
  current = prev
  if not ok then
    t.dead = true
    if W.on_error then W.on_error(err) else error(err, 0) end
  elseif coroutine.status(t.co) == "dead" then
    t.dead = true
  end
end

local function ms(deadline)
  local left = deadline - sys.monotime()
  if left <= 0 then return 0 end
  return math.ceil(left * 1000)
end

-- Resume t with v from a uv callback (never from inside the running task).
local function later(t, v)
  local timer = uv.new_timer()
  timer:start(0, 0, function()
    timer:close()
    resume(t, v)
  end)
end

function W.fd(fd, mode, deadline)
  local t = current
  if not t then return wait.poll.fd(fd, mode, deadline) end
  local poll, timer = uv.new_poll(fd), uv.new_timer()
  local settled = false
  local function finish(v)
    if settled then return end
    settled = true
    poll:stop() poll:close()
    timer:stop() timer:close()
    resume(t, v)
  end
  poll:start(mode == "w" and "w" or "r", function() finish(true) end)
  timer:start(ms(deadline), 0, function() finish(false) end)
  return coroutine.yield()
end

function W.sleep(seconds)
  local t = current
  if not t then return wait.poll.sleep(seconds) end
  local timer = uv.new_timer()
  timer:start(math.ceil(seconds * 1000), 0, function()
    timer:close()
    resume(t)
  end)
  coroutine.yield()
end

function W.park(cond, deadline)
  local t = current
  if not t then return wait.poll.park(cond, deadline) end
  local entry = { t = t }
  cond.luv_parked = cond.luv_parked or {}
  cond.luv_parked[entry] = true
  entry.timer = uv.new_timer()
  entry.timer:start(ms(deadline), 0, function()
    if cond.luv_parked then cond.luv_parked[entry] = nil end
    entry.timer:close()
    entry.timer = nil
    resume(t, false)
  end)
  return coroutine.yield()
end

function W.wake(cond)
  local parked = cond.luv_parked
  if not parked then return end
  cond.luv_parked = nil
  for entry in pairs(parked) do
    if entry.timer then
      entry.timer:stop()
      entry.timer:close()
      entry.timer = nil
      later(entry.t, true)
    end
  end
end

-- luv.spawn(fn, ...): run fn as a task whose waits yield to the uv loop.
-- It starts at once and runs until its first wait.
function W.spawn(fn, ...)
  local args = { n = select("#", ...), ... }
  local t = {}
  t.co = coroutine.create(function() return fn((table.unpack or unpack)(args, 1, args.n)) end)
  resume(t)
  return t
end

return W
