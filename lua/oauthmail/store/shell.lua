-- oauthmail.store.shell — runs the external commands that key sources and the
-- command store rely on: `/bin/sh -c cmd` as a child process (sys.proc) whose
-- pipes are waited on through oauthmail.wait, so a slow secret manager makes
-- its caller wait, not the host's loop. Output is bounded, every command has
-- a deadline (the child is killed when it passes), and the exit status comes
-- from the shell itself, on every Lua version and in hosts that reap
-- children they did not start (nginx). Nothing a command prints is
-- ever put into an error message: it may be a secret.
local sys = require "oauthmail.sys"
local wait = require "oauthmail.wait"

local M = {}

local MAX_OUTPUT = 1024 * 1024
M.DEFAULT_TIMEOUT = 60

-- good_timeout(t): a command's deadline in seconds, 0 < t <= one day.
function M.good_timeout(t)
  return type(t) == "number" and t == t and t > 0 and t <= 86400
end

function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function env_list(env)
  local list = {}
  for k, v in pairs(env or {}) do
    assert(tostring(k):match("^[%a_][%w_]*$"), "bad environment variable name")
    list[#list + 1] = k .. "=" .. tostring(v)
  end
  table.sort(list)
  return list
end

local seconds_text = require("oauthmail.options").seconds_text

-- Kill a child that overran or failed us and reap it (a killed child ends
-- at once; the collector reaps it should it not have yet).
local function stop(p, why, reason)
  p:kill()
  for _ = 1, 100 do
    if p:exit() ~= false then break end
    wait.sleep(0.001)
  end
  return nil, why, reason
end

local function overdue(p, timeout)
  return stop(p, "it did not finish within " .. seconds_text(timeout) .. " and was stopped", "timeout")
end

-- The child's exit code, waiting (through the waiter) until it ends or the
-- deadline passes, when it is stopped. -> code | nil, "reason"
local function finish(p, deadline, timeout)
  local pause = 0.001
  while true do
    local code, fd = p:exit()
    if code == nil then return stop(p, fd.message) end
    if code then return code end
    if wait.now() >= deadline then return overdue(p, timeout) end
    if fd then
      wait.fd(fd, "r", deadline)
    else
      wait.sleep(math.min(pause, deadline - wait.now()))
      pause = math.min(pause * 2, 0.05)
    end
  end
end

local function start(cmd, env, mode, timeout)
  timeout = timeout or M.DEFAULT_TIMEOUT
  local p, err = sys.proc.spawn(cmd, env_list(env), mode)
  if not p then return nil, err.message end
  return p, wait.now() + timeout, timeout
end

-- capture(cmd, env, timeout) -> output, exit code | nil, "why", reason
-- (reason "timeout" when the deadline passed)
function M.capture(cmd, env, timeout)
  local p, deadline
  p, deadline, timeout = start(cmd, env, "r", timeout)
  if not p then return nil, deadline end
  local chunks, total = {}, 0
  while true do
    local chunk, fd = p:read(8192)
    if chunk == nil then return stop(p, fd.message) end
    if chunk == false then break end
    if chunk == true then
      if not wait.fd(fd, "r", deadline) and wait.now() >= deadline then return overdue(p, timeout) end
    else
      total = total + #chunk
      if total > MAX_OUTPUT then return stop(p, "the command printed more than " .. MAX_OUTPUT .. " bytes") end
      chunks[#chunks + 1] = chunk
    end
  end
  local rc, why, reason = finish(p, deadline, timeout)
  if not rc then return nil, why, reason end
  return table.concat(chunks), rc
end

-- feed(cmd, input, env, timeout) -> exit code | nil, "why", reason: input goes to
-- the command's standard input (a command that exits without reading it all
-- is judged by its exit status).
function M.feed(cmd, input, env, timeout)
  local p, deadline
  p, deadline, timeout = start(cmd, env, "w", timeout)
  if not p then return nil, deadline end
  local off = 0
  while off < #input do
    local n, want, fd = p:write(input, off)
    if n == nil then return stop(p, want.message) end
    if n == false then break end
    off = n
    if want and not wait.fd(fd, "w", deadline) and wait.now() >= deadline then return overdue(p, timeout) end
  end
  p:close_pipe()
  return finish(p, deadline, timeout)
end

return M
