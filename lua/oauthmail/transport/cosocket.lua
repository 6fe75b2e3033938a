-- oauthmail.transport.cosocket — SMTP over OpenResty's cosockets. nginx
-- cannot wait on a descriptor it did not open, so under OpenResty the host
-- provides the socket (ngx.socket.tcp, sslhandshake) and the SMTP engine runs
-- over it, as LuaSocket's smtp.open takes a `create` function:
--   smtp = { host = ..., connect = require("oauthmail.transport.cosocket").connect }
-- Certificates are checked by nginx against lua_ssl_trusted_certificate
-- (ca_file/ca_path of the profile do not apply here); verify = false turns
-- the check off for a test server you control.
local errors = require "oauthmail.errors"

local M = {}
local C = {}
C.__index = C

local function fail(kind, reason, message)
  return errors.fail(kind, message, { reason = reason, retryable = kind == "network" })
end

-- nginx's words for what went wrong, as oauthmail's error values
local function net_error(self, err, what)
  if err == "timeout" then
    return fail("network", "timeout", string.format("timed out after %g s %s %s", self.timeout, what, self.peer))
  elseif err == "closed" then
    return fail("network", "closed", "connection closed by " .. self.peer)
  end
  return fail("network", "error", string.format("%s %s: %s", what, self.peer, tostring(err)))
end

local function ms_until(deadline, default)
  if not deadline then return default end
  local left = deadline - require("oauthmail.sys").monotime()
  if left < 0.001 then left = 0.001 end
  return math.ceil(left * 1000)
end

-- cosocket.connect{host=, port=, tls="none"|"implicit", timeout=, servername=, verify=} -> conn | nil, err
function M.connect(o)
  local ngx = rawget(_G, "ngx")
  if not (ngx and ngx.socket and ngx.socket.tcp) then
    error("oauthmail.transport.cosocket: needs OpenResty (ngx.socket.tcp)", 2)
  end
  local sock = ngx.socket.tcp()
  local timeout = o.timeout or 30
  local self = setmetatable({ sock = sock, timeout = timeout, peer = o.host .. ":" .. tostring(o.port),
    verify = o.verify ~= false }, C)
  sock:settimeouts(timeout * 1000, timeout * 1000, timeout * 1000)
  local ok, err = sock:connect(o.host, o.port)
  if not ok then
    if err == "connection refused" then return fail("network", "refused", "connection refused by " .. self.peer) end
    return net_error(self, err, "connecting to")
  end
  if o.tls == "implicit" then
    ok, err = self:starttls { servername = o.servername or o.host }
    if not ok then return nil, err end
  end
  return self
end

function C:send(s, deadline)
  self.sock:settimeouts(nil, ms_until(deadline, self.timeout * 1000), nil)
  local n, err = self.sock:send(s)
  if not n then return net_error(self, err, "sending to") end
  return true
end

function C:receive_some(max, deadline)
  self.sock:settimeouts(nil, nil, ms_until(deadline, self.timeout * 1000))
  local data, err = self.sock:receiveany(max or 65536)
  if not data then return net_error(self, err, "waiting for data from") end
  return data
end

function C:starttls(o)
  local ok, err = self.sock:sslhandshake(nil, o.servername or o.host, self.verify)
  if not ok then
    self.sock:close()
    return fail("tls", "handshake", string.format("TLS handshake with %s failed: %s", self.peer, tostring(err)))
  end
  self.tls = true
  return true
end

function C:close()
  self.sock:close()
  return true
end

return M
