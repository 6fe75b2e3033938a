-- oauthmail.loop — a small event loop for programs that have none:
-- oauthmail.run(fn) runs fn as a task and returns its results once every
-- task is done; oauthmail.spawn(fn, ...) adds a task. While the loop runs,
-- its waiter is installed (oauthmail.wait): a task that waits for a socket,
-- a timer or a condition yields to the loop, which polls every descriptor
-- the tasks wait on in one poll(2) and resumes the ones that are ready.
-- Code outside a task (or in a coroutine the loop did not start) still
-- waits the blocking way. See docs/concurrency.md.
local sys = require "oauthmail.sys"
local wait = require "oauthmail.wait"

local M = {}

local YIELD = setmetatable({}, { __tostring = function() return "oauthmail.loop.YIELD" end })
local unpack = table.unpack or unpack
local pack = table.pack or function(...) return { n = select("#", ...), ... } end

local active = nil       -- the loop running now
local pending = {}       -- tasks spawned before run()

local function new_task(fn, args)
  local t = { args = args, ready = true }
  t.co = coroutine.create(function() return fn(unpack(args, 1, args.n)) end)
  return t
end

-- ------------------------------------------------------------ the loop's waiter

local waiter = { name = "loop" }

-- The task being resumed, if any. Code in a coroutine nested inside a task
-- yields through it: such a coroutine must pass yields up to its resumer,
-- as oauthmail's own (wait.pcall) do.
local function current_task()
  return active and active.current or nil
end

local function suspend(t)
  t.ready = false
  local v = coroutine.yield(YIELD)
  t.fd, t.mode, t.deadline, t.cond = nil, nil, nil, nil
  return v
end

function waiter.fd(fd, mode, deadline)
  local t = current_task()
  if not t then return wait.poll.fd(fd, mode, deadline) end
  t.fd, t.mode, t.deadline = fd, mode, deadline
  return suspend(t)
end

function waiter.sleep(seconds)
  local t = current_task()
  if not t then return wait.poll.sleep(seconds) end
  t.deadline = sys.monotime() + seconds
  suspend(t)
end

function waiter.park(cond, deadline)
  local t = current_task()
  if not t then return wait.poll.park(cond, deadline) end
  t.cond, t.deadline = cond, deadline
  cond.parked = cond.parked or {}
  cond.parked[t] = true
  return suspend(t)
end

function waiter.wake(cond)
  local parked = cond.parked
  if not parked then return end
  cond.parked = nil
  for t in pairs(parked) do
    if t.cond == cond and not t.done then
      t.ready, t.value = true, true
    end
  end
end

M.waiter = waiter

-- ------------------------------------------------------------ running

local function resume(loop, t)
  local prev = loop.current
  loop.current = t
  local v = t.value
  t.value = nil
  local res = pack(coroutine.resume(t.co, v))
  loop.current = prev
  if not res[1] then
    t.done = true
    error(res[2], 0)
  end
  if coroutine.status(t.co) == "dead" then
    t.done = true
    t.results = res
    return
  end
  if res[2] ~= YIELD then
    -- a plain coroutine.yield() (or the WAIT of a foreign waiter): run again soon
    t.ready = true
  end
end

-- oauthmail.spawn(fn, ...) -> task: runs fn(...) as a task of the running
-- loop (or of the next oauthmail.run). task.done, task.results after it ends.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("oauthmail.spawn: expected a function", 2) end
  local t = new_task(fn, pack(...))
  if active then active.tasks[#active.tasks + 1] = t else pending[#pending + 1] = t end
  return t
end

-- tasks side by side, for mailer:send_many
waiter.spawn = M.spawn

-- oauthmail.run(fn, ...) -> fn's results, once fn and every task spawned
-- meanwhile are done. An error in any task ends the loop and is raised here.
function M.run(fn, ...)
  if type(fn) ~= "function" then error("oauthmail.run: expected a function", 2) end
  if active then error("oauthmail.run: a loop is already running (use oauthmail.spawn)", 2) end
  local main = new_task(fn, pack(...))
  local loop = { tasks = { main } }
  for _, t in ipairs(pending) do loop.tasks[#loop.tasks + 1] = t end
  pending = {}
  active = loop
  local prev_waiter = wait.use(waiter)
  local ok, err = pcall(function()
    local list, owners = {}, {}
    while true do
      -- resume everything runnable (tasks spawned now run in this round too)
      local i = 1
      while i <= #loop.tasks do
        local t = loop.tasks[i]
        if t.ready and not t.done then resume(loop, t) end
        i = i + 1
      end
      -- drop finished tasks
      local live = {}
      for _, t in ipairs(loop.tasks) do if not t.done then live[#live + 1] = t end end
      loop.tasks = live
      if #live == 0 then break end
      local any_ready = false
      for _, t in ipairs(live) do if t.ready then any_ready = true break end end
      local now = sys.monotime()
      local soonest
      local n = 0
      for _, t in ipairs(live) do
        if not t.ready then
          if t.fd then
            n = n + 1
            list[2 * n - 1], list[2 * n] = t.fd, t.mode
            owners[n] = t
          end
          if t.deadline and (not soonest or t.deadline < soonest) then soonest = t.deadline end
        end
      end
      for k = 2 * n + 1, #list do list[k] = nil end
      for k = n + 1, #owners do owners[k] = nil end
      local timeout
      if any_ready then timeout = 0
      elseif soonest then timeout = math.max(0, soonest - now)
      elseif n == 0 then
        error("oauthmail.run: every task is waiting and nothing can wake them", 0)
      end
      local ready, perr = sys.poll_many(list, timeout)
      if not ready then error(perr, 0) end
      for _, k in ipairs(ready) do
        local t = owners[k]
        t.ready, t.value = true, true
      end
      now = sys.monotime()
      for _, t in ipairs(live) do
        if not t.ready and t.deadline and now >= t.deadline then
          t.ready, t.value = true, false
          if t.cond and t.cond.parked then t.cond.parked[t] = nil end
        end
      end
    end
  end)
  active = nil
  wait.use(prev_waiter)
  if not ok then error(err, 0) end
  local res = main.results
  return unpack(res, 2, res.n)
end

-- oauthmail.loop.running() -> true inside a task of the running loop
function M.running()
  return current_task() ~= nil
end

return M
