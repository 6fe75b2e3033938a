-- oauthmail.conn — TCP and TLS connections, client and loopback server side.
-- csrc/conn*.c does the mechanics as steps that never wait; this module
-- drives them, waiting through oauthmail.wait, and is their documented face.
-- Every method may take an absolute deadline (core.monotime() seconds) as
-- its last argument; without one, the connection's timeout applies to the call.
-- See docs/conn.md for every option and error.
local core = require "oauthmail.core"
local errors = require "oauthmail.errors"
local wait = require "oauthmail.wait"

local M = {}
local now = core.monotime

local Conn = {}
local ConnMT = { __index = Conn }
local Listener = {}
local ListenerMT = { __index = Listener }

local HUGE = 2 ^ 30

local function wrap(c)
  return setmetatable({ c = c }, ConnMT)
end

-- Loop over a step until it is done; a step returns true, or what it waits
-- for ("r"|"w", fd, deadline), or nil, err.
local function drive(step, obj, ...)
  while true do
    local r, fd, deadline = step(obj, ...)
    if r == true then return true end
    if r == nil then return nil, fd end
    wait.fd(fd, r, deadline)
  end
end

-- conn.connect{host=, port=, tls="none"|"implicit", timeout=10, ca_file=, ca_path=,
--   verify=true, min_tls="1.2", client_cert=, client_key=, servername=} -> conn | nil, err
function M.connect(opts)
  local c, err = core.conn.new(opts)
  if not c then return nil, err end
  local ok
  ok, err = drive(c.connect_step, c)
  if not ok then return nil, err end
  return wrap(c)
end

-- conn.wrap(core_conn): the Lua face of a connection made by core.conn
M.wrap = wrap

-- conn.core_of(x) -> the core.conn under x when x is a connection of this
-- module, else nil: what the SMTP engine writes to without a Lua string.
function M.core_of(x)
  if getmetatable(x) == ConnMT then return x.c end
end

local function deadline_of(self, deadline)
  return deadline or (now() + self.c:gettimeout())
end

-- c:send(s [, deadline]) -> true | nil, err: all of s, one deadline for the whole write.
function Conn:send(s, deadline)
  local c = self.c
  local d = deadline_of(self, deadline)
  local off, n = 0, #s
  while true do
    local o, want, fd = c:write(s, off, d)
    if not o then return nil, want end
    if o == n then return true end
    off = o
    wait.fd(fd, want, d)
  end
end

-- A read that ended early: say so, and hand over what arrived.
local function midway(self, err, what, always)
  local partial = self.c:take_some(HUGE) or ""
  if #partial > 0 or always then
    if err.reason == "closed" then
      err.message = string.format("connection closed by %s in the middle of %s (%d bytes received)",
        self.c:peer(), what, #partial)
    end
    err.partial = partial
  end
  return nil, err
end

-- c:receive_line([max [, deadline]]) -> line without CRLF | nil, err
function Conn:receive_line(max, deadline)
  local c = self.c
  max = max or 8192
  local d
  while true do
    local line, err = c:take_line(max)
    if line then return line end
    if line == nil then return nil, err end
    d = d or deadline_of(self, deadline)
    local r, fd = c:fill(d, max + 2)
    if r == nil then return midway(self, fd, "a line", false) end
    if r ~= true then wait.fd(fd, r, d) end
  end
end

-- c:receive(n [, deadline]) -> exactly n bytes | nil, err (err.partial on a close)
function Conn:receive(n, deadline)
  local c = self.c
  local d
  while true do
    local s = c:take(n)
    if s then return s end
    d = d or deadline_of(self, deadline)
    local r, fd = c:fill(d, n)
    if r == nil then return midway(self, fd, "a read", true) end
    if r ~= true then wait.fd(fd, r, d) end
  end
end

-- c:receive_some([max [, deadline]]) -> 1..max bytes | nil, err
function Conn:receive_some(max, deadline)
  local c = self.c
  max = max or 65536
  local d
  while true do
    local s = c:take_some(max)
    if s then return s end
    d = d or deadline_of(self, deadline)
    local r, fd = c:fill(d)
    if r == nil then return nil, fd end
    if r ~= true then wait.fd(fd, r, d) end
  end
end

-- c:starttls(opts [, deadline]) -> true | nil, err (the connection is closed on failure)
function Conn:starttls(opts, deadline)
  local c = self.c
  local ok, err = c:starttls(opts)
  if not ok then return nil, err end
  return drive(c.handshake_step, c, deadline_of(self, deadline))
end

function Conn:settimeout(seconds)
  self.c:settimeout(seconds)
  return self
end

function Conn:gettimeout() return self.c:gettimeout() end
function Conn:peer_certificate() return self.c:peer_certificate() end
function Conn:tls_info() return self.c:tls_info() end
function Conn:is_tls() return self.c:is_tls() end
function Conn:pending() return self.c:pending() end
function Conn:peer() return self.c:peer() end
function Conn:close() return self.c:close() end

ConnMT.__tostring = function(self) return tostring(self.c) end
ConnMT.__close = function(self) self.c:close() end

-- ------------------------------------------------------------ listener

-- conn.listen{host="127.0.0.1", port=0, backlog=64, tls={cert=, key=, min_tls=}} -> listener | nil, err
function M.listen(opts)
  local l, err = core.conn.listen(opts)
  if not l then return nil, err end
  return setmetatable({ l = l }, ListenerMT)
end

local function check_timeout(t)
  if type(t) ~= "number" or t ~= t or t <= 0 or t > 86400 then
    error("bad argument #1 to 'accept' (timeout must be a number of seconds greater than 0 and at most 86400)", 3)
  end
  return t
end

local seconds_text = require("oauthmail.options").seconds_text

-- l:accept([timeout]) -> conn (TLS handshake done when configured) | nil, err
function Listener:accept(timeout)
  local l = self.l
  local t = check_timeout(timeout or l:gettimeout())
  local d = now() + t
  while true do
    local c, fd = l:accept_step()
    if c == nil then return nil, fd end
    if c then
      if c:is_tls() then
        local ok, err = drive(c.handshake_step, c, d)
        if not ok then return nil, err end
      end
      return wrap(c)
    end
    if not wait.fd(fd, "r", d) and now() >= d then
      return errors.fail("network", "timed out after " .. seconds_text(t) .. " waiting for a connection",
        { reason = "timeout" })
    end
  end
end

function Listener:port() return self.l:port() end
function Listener:settimeout(s) self.l:settimeout(s) return self end
function Listener:close() return self.l:close() end
ListenerMT.__close = function(self) self.l:close() end

return M
