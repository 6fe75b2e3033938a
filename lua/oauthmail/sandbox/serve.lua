-- oauthmail.sandbox.serve — the sandbox's connections as tasks of
-- oauthmail's built-in loop (oauthmail.loop): a task per listener accepts
-- and starts a task per connection. Every read, write and TLS handshake
-- waits with a deadline through oauthmail.wait, so an idle client, or one
-- stalled in a handshake, costs nothing while the others are served. Also
-- the line reader the SMTP and HTTP sides share: a line longer than its
-- bound is refused, and what it reads is copied a bounded number of times.
local conn = require "oauthmail.conn"
local loop = require "oauthmail.loop"
local wait = require "oauthmail.wait"

local M = {}

local READ = 65536
local SEND_TIMEOUT = 10
-- An accept task waits this long at a time: it wakes for a client, or for
-- the connection stop() makes to it (M.wake), never on a timer of its own.
local ACCEPT_WAIT = 3600
-- After an accept fails (no descriptors left, say), a pause before the next.
local ACCEPT_PAUSE = 0.1

-- Inside a task: send all of s, or nil, err after SEND_TIMEOUT seconds.
function M.send(c, s)
  return c:send(s, wait.now() + SEND_TIMEOUT)
end

-- M.reader(c, idle) -> r over the connection c, each read waiting at most
-- idle seconds:
--   r.line(max) -> the next line without its CR LF | nil, err ("line too
--     long" once more than max bytes came without a line feed)
--   r.bytes(n)  -> the next n bytes | nil, err
-- The last chunk read is kept with an offset; bytes with no line feed among
-- them wait in a list, joined once their line or count is complete.
function M.reader(c, idle)
  local buf, pos = "", 1
  local held, nheld = {}, 0
  local r = {}

  local function more()
    local d, err = c:receive_some(READ, wait.now() + idle)
    if not d then return nil, err end
    buf, pos = d, 1
    return true
  end

  local function hold_rest()
    if pos <= #buf then
      held[#held + 1] = pos == 1 and buf or buf:sub(pos)
      nheld = nheld + #buf - pos + 1
    end
    buf, pos = "", 1
  end

  local function join(tail)
    if nheld == 0 then return tail end
    held[#held + 1] = tail
    local s = table.concat(held)
    held, nheld = {}, 0
    return s
  end

  function r.line(max)
    max = max or READ
    while true do
      local i = buf:find("\n", pos, true)
      if i then
        if nheld + i - pos > max + 1 then return nil, "line too long" end
        local line = join(buf:sub(pos, i - 1))
        pos = i + 1
        if line:byte(-1) == 13 then line = line:sub(1, -2) end
        if #line > max then return nil, "line too long" end
        return line
      end
      hold_rest()
      if nheld > max + 1 then return nil, "line too long" end
      local ok, err = more()
      if not ok then return nil, err end
    end
  end

  function r.bytes(n)
    while nheld + #buf - pos + 1 < n do
      hold_rest()
      local ok, err = more()
      if not ok then return nil, err end
    end
    local need = n - nheld
    local tail = buf:sub(pos, pos + need - 1)
    pos = pos + need
    return join(tail)
  end

  return r
end

local function report(what, err)
  io.stderr:write("sandbox: ", what, ": ", tostring(err), "\n")
end

-- One connection's task: handler(c) under a pcall that lets its waits
-- yield (a failing conversation is reported and closed; the others go on).
local function converse(state, c, handler)
  state.open[c] = true
  local ok, err = wait.pcall(handler, c)
  state.open[c] = nil
  c:close()
  if not ok and not state.stopping then report("a connection failed", err) end
  M.done(state)
end

-- M.state() -> what the tasks of one sandbox share: stopping (set by the
-- owner), open (the connections in conversation), live (tasks running) and
-- idle (a condition signalled when live falls to 0).
function M.state()
  return { stopping = false, open = {}, live = 0, idle = wait.cond() }
end

function M.started(state)
  state.live = state.live + 1
end

function M.done(state)
  state.live = state.live - 1
  if state.live == 0 then state.idle:signal() end
end

-- M.listen(state, l, handler): a task (of the running loop, or of the next
-- oauthmail.run) accepting on l until state.stopping; each connection's
-- conversation, handler(c), is a task of its own.
function M.listen(state, l, handler)
  M.started(state)
  loop.spawn(function()
    while not state.stopping do
      -- (a listener closed under a stopping sandbox raises: that ends the task too)
      local ok, c, err = wait.pcall(l.accept, l, ACCEPT_WAIT)
      if state.stopping then
        if ok and c then c:close() end
        break
      end
      if not ok then
        report("accept failed", c)
        break
      end
      if c then
        M.started(state)
        loop.spawn(converse, state, c, handler)
      elseif err.reason ~= "timeout" then
        report("accept failed", err)
        wait.sleep(ACCEPT_PAUSE)
      end
    end
    M.done(state)
  end)
end

-- M.wake(l): a connection to l, closed at once, so that its accept task
-- looks at state.stopping now.
function M.wake(l)
  local ok, port = pcall(l.port, l)
  if not ok then return end
  local c = conn.connect { host = "127.0.0.1", port = port, timeout = 2 }
  if c then c:close() end
end

return M
