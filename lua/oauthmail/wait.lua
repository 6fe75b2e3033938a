-- oauthmail.wait — the one waiter. Nothing in oauthmail waits on its own:
-- the C steps say what they wait for (a descriptor to become readable or
-- writable, until a deadline) and the Lua code that drives them waits here.
-- The default waiter blocks in poll(2), so a plain script works unchanged;
-- a host with an event loop installs another one (wait.use), and then every
-- wait in the library - DNS, connect, TLS, reads, writes, HTTP token calls,
-- store locks, back-off and governor sleeps - yields to that loop instead.
-- See docs/concurrency.md.
local sys = require "oauthmail.sys"

local M = {}

-- Yielded by a waiter that cannot suspend the caller itself (the default
-- one, in a coroutine the library does not know): the caller's own
-- scheduler resumes it later. oauthmail.tokens.WAIT is the same value.
M.WAIT = setmetatable({}, { __tostring = function() return "oauthmail.wait.WAIT" end })

M.now = sys.monotime

local finite = require("oauthmail.options").finite

-- ------------------------------------------------------------ the default waiter

local poll_waiter = { name = "poll" }

function poll_waiter.fd(fd, mode, deadline)
  local ok, err = sys.poll(fd, mode, deadline - sys.monotime())
  if ok == nil then error(err, 0) end
  return ok
end

function poll_waiter.sleep(seconds)
  sys.sleep(seconds)
end

-- Coroutines cannot wait for each other while this thread blocks: a
-- coroutine hands the wait to its resumer (the WAIT protocol); the main
-- thread cannot wait at all and is told so.
function poll_waiter.park(_, deadline)
  local _, ismain = coroutine.running()
  if coroutine.running() == nil or ismain then return false end
  if sys.monotime() >= deadline then return false end
  coroutine.yield(M.WAIT)
  return true
end

function poll_waiter.wake() end

M.poll = poll_waiter

local current = poll_waiter

-- wait.use(waiter) -> previous waiter. A waiter is a table with
--   fd(fd, "r"|"w", deadline) -> true (ready) | false (deadline passed)
--   sleep(seconds)
--   park(cond, deadline) -> returns when cond is signalled or at the deadline
--   wake(cond)            -> makes the coroutines parked on cond runnable
-- nil restores the default (blocking poll).
function M.use(w)
  if w ~= nil then
    if type(w) ~= "table" then error("wait.use: expected a waiter table or nil", 2) end
    for _, k in ipairs { "fd", "sleep", "park", "wake" } do
      if type(w[k]) ~= "function" then error("wait.use: the waiter's '" .. k .. "' must be a function", 2) end
    end
  end
  local prev = current
  current = w or poll_waiter
  return prev
end

-- wait.current() -> the waiter in use
function M.current() return current end

-- wait.fd(fd, "r"|"w", deadline) -> true | false: the descriptor is ready, or the deadline passed.
function M.fd(fd, mode, deadline)
  return current.fd(fd, mode, deadline)
end

-- wait.sleep(seconds): NaN and infinities are argument errors; a day at most.
function M.sleep(seconds)
  if not finite(seconds) then error("wait.sleep: duration must be a finite number of seconds", 2) end
  if seconds < 0 then seconds = 0 end
  if seconds > 86400 then seconds = 86400 end
  return current.sleep(seconds)
end

-- wait.pcall(f, ...) -> pcall's results, but a wait inside f may yield to a
-- loop on every Lua version (errors.pcall: on PUC 5.1, f runs in a coroutine
-- whose yields are passed up).
M.pcall = require("oauthmail.errors").pcall

-- ------------------------------------------------------------ conditions

local Cond = {}
Cond.__index = Cond

-- wait.cond() -> cond: cond:wait(deadline) -> true (signalled, or a spurious
-- wake-up: re-check) | false (deadline passed, or this waiter cannot wait
-- here); cond:signal() wakes every coroutine waiting on it.
function M.cond()
  return setmetatable({ gen = 0 }, Cond)
end

function Cond:wait(deadline)
  if sys.monotime() >= deadline then return false end
  local gen = self.gen
  local w = current
  local r = w.park(self, deadline)
  if self.gen ~= gen then return true end
  return r and sys.monotime() < deadline
end

function Cond:signal()
  self.gen = self.gen + 1
  current.wake(self)
end

return M
