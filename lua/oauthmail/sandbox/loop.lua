-- oauthmail.sandbox.loop — serve several connections at once on the blocking
-- core: every connection's conversation is a coroutine; a read that would
-- block is tried with a 1 ms timeout and, when nothing came, the coroutine
-- yields and the next one runs. This is polling, not an event loop: each
-- idle connection costs about a millisecond per round, and the loop sleeps
-- 5 ms when a round made no progress. Enough for a sandbox with a handful of
-- clients; the non-blocking core's waiter will replace it.
local sys = require "oauthmail.sys"

local M = {}

local POLL = 0.001
local IDLE_SLEEP = 0.005

local Loop = {}
Loop.__index = Loop

function M.new()
  return setmetatable({ tasks = {}, listeners = {}, running = true, progress = false }, Loop)
end

-- loop:listen(listener, handler(conn)): each accepted connection runs handler in a coroutine.
function Loop:listen(l, handler)
  self.listeners[#self.listeners + 1] = { l = l, handler = handler }
end

function Loop:spawn(fn, ...)
  local co = coroutine.create(fn)
  self.tasks[#self.tasks + 1] = { co = co, args = table.pack and table.pack(...) or { n = select("#", ...), ... } }
end

-- Inside a task: receive whatever arrives (waiting by yielding), or nil, err.
function M.receive(c, max, timeout)
  local deadline = sys.monotime() + (timeout or 60)
  c:settimeout(POLL)
  while true do
    local data, err = c:receive_some(max or 65536)
    if data then
      M.moved = true
      return data
    end
    if err.reason ~= "timeout" then return nil, err end
    if sys.monotime() > deadline then return nil, err end
    coroutine.yield()
  end
end

-- Inside a task: send (small replies go out at once; the deadline is generous).
function M.send(c, s)
  c:settimeout(10)
  return c:send(s)
end

-- A buffered line reader over M.receive.
function M.reader(c, timeout)
  local buf = ""
  local r = {}
  function r.line(max)
    max = max or 65536
    while true do
      local i = buf:find("\n", 1, true)
      if i then
        local line = buf:sub(1, i - 1):gsub("\r$", "")
        buf = buf:sub(i + 1)
        return line
      end
      if #buf > max then return nil, "line too long" end
      local d, err = M.receive(c, 65536, timeout)
      if not d then return nil, err end
      buf = buf .. d
    end
  end
  function r.bytes(n)
    while #buf < n do
      local d, err = M.receive(c, 65536, timeout)
      if not d then return nil, err end
      buf = buf .. d
    end
    local s = buf:sub(1, n)
    buf = buf:sub(n + 1)
    return s
  end
  function r.pending() return #buf end
  return r
end

function Loop:step()
  local progress = false
  M.moved = false
  for _, e in ipairs(self.listeners) do
    local c = e.l:accept(POLL)
    if c then
      progress = true
      self:spawn(e.handler, c)
    end
  end
  local keep = {}
  for _, t in ipairs(self.tasks) do
    local ok, err
    if t.args then
      local args = t.args
      t.args = nil
      ok, err = coroutine.resume(t.co, (table.unpack or unpack)(args, 1, args.n))
      progress = true
    else
      ok, err = coroutine.resume(t.co)
    end
    if not ok then io.stderr:write("sandbox: a connection failed: ", tostring(err), "\n") end
    if coroutine.status(t.co) ~= "dead" then keep[#keep + 1] = t end
  end
  if #keep ~= #self.tasks or M.moved then progress = true end
  self.tasks = keep
  return progress
end

-- loop:run([until_fn]): serve until stop() (or until_fn() is true).
function Loop:run(until_fn)
  while self.running do
    if until_fn and until_fn() then break end
    if not self:step() then sys.sleep(IDLE_SLEEP) end
  end
end

function Loop:stop() self.running = false end

return M
