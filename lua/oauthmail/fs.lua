-- oauthmail.fs — the file primitives of sys.fs, plus fs.lock: a lock with
-- a deadline, whose waits go through oauthmail.wait (so a store waiting for
-- another process's refresh yields to the host's loop instead of blocking it).
local sys = require "oauthmail.sys"
local errors = require "oauthmail.errors"
local wait = require "oauthmail.wait"

local M = setmetatable({}, { __index = sys.fs })

local MAX_WAIT = 86400

-- fs.lock(path [, {exclusive=true, timeout=10}]) -> lock | nil, err
function M.lock(path, opts)
  if type(path) ~= "string" then error("bad argument #1 to 'lock' (string expected, got " .. type(path) .. ")", 2) end
  local exclusive, timeout = true, 10
  if opts ~= nil then
    if type(opts) ~= "table" then error("bad argument #2 to 'lock' (table expected, got " .. type(opts) .. ")", 2) end
    local t = rawget(opts, "timeout")
    if t ~= nil and type(t) ~= "number" then error("option 'timeout': expected a number, got " .. type(t), 2) end
    local x = rawget(opts, "exclusive")
    if x ~= nil and type(x) ~= "boolean" then error("option 'exclusive': expected a boolean, got " .. type(x), 2) end
    if t ~= nil then timeout = t end
    if x ~= nil then exclusive = x end
  end
  -- NaN and inf would make the deadline unreachable
  if timeout ~= timeout or timeout < 0 or timeout > MAX_WAIT then
    error("bad argument #2 to 'lock' (timeout must be a number of seconds in [0, 86400])", 2)
  end
  local deadline = sys.monotime() + timeout
  local pause = 0.005
  while true do
    local lk, err = sys.fs.lock_try(path, { exclusive = exclusive })
    if lk then return lk end
    if lk == nil then return nil, err end
    local left = deadline - sys.monotime()
    if left <= 0 then
      return errors.fail("store", string.format("timed out after %g s waiting for lock on %s", timeout, path),
        { reason = "timeout" })
    end
    wait.sleep(math.min(pause, left))
    if pause < 0.05 then pause = pause * 2 end
  end
end

return M
