-- spec/support/redis.lua — a real redis-server (Debian's) on loopback for one
-- spec: a config file in a temporary folder (so passwords stay out of ps),
-- an ACL user when asked, TLS with the test PKI when asked, stopped by pid.
--   local srv = redis.start{ password = "pw", user = "alice", tls = true, persist = true }
--   srv.url, srv.port, srv.stop(), srv.restart()
local h = require "spec.support.helpers"

local M = {}

function M.available()
  return (h.exec("command -v redis-server"))
end

function M.start(opts)
  opts = opts or {}
  local dir = h.tmpdir()
  local srv = { dir = dir, password = opts.password, user = opts.user }
  srv.port = opts.port or h.free_port()
  local lines = {
    "bind 127.0.0.1", "dir " .. dir, "save \"\"", "daemonize no", "protected-mode no",
    "appendonly " .. (opts.persist and "yes" or "no"), "appendfsync always",
  }
  if opts.tls then
    local certs = require("spec.support.certs").get()
    srv.certs = certs
    lines[#lines + 1] = "port 0"
    lines[#lines + 1] = "tls-port " .. srv.port
    lines[#lines + 1] = "tls-cert-file " .. certs.server.cert
    lines[#lines + 1] = "tls-key-file " .. certs.server.key
    lines[#lines + 1] = "tls-ca-cert-file " .. certs.ca
    lines[#lines + 1] = "tls-auth-clients no"
  else
    lines[#lines + 1] = "port " .. srv.port
  end
  if opts.password then
    if opts.user then
      lines[#lines + 1] = "user default off"
      lines[#lines + 1] = "user " .. opts.user .. " on >" .. opts.password .. " ~* &* +@all"
    else
      lines[#lines + 1] = "requirepass " .. opts.password
    end
  end
  local conf = dir .. "/redis.conf"
  h.write_file(conf, table.concat(lines, "\n") .. "\n", "600")
  local auth = ""
  if opts.password then auth = (opts.user or "") .. ":" .. opts.password .. "@" end
  srv.url = (opts.tls and "rediss://" or "redis://") .. auth .. "127.0.0.1:" .. srv.port
  function srv.start()
    srv.proc = h.spawn("redis-server " .. h.quote(conf), { ready = "Ready to accept connections", timeout = 30 })
    srv.pid = srv.proc.pid
  end
  function srv.stop() if srv.proc then srv.proc.stop() srv.proc = nil end end
  function srv.restart() srv.stop() srv.start() end
  -- redis-cli for assertions that must not go through the client under test
  function srv.cli(args)
    local a = "redis-cli -p " .. srv.port
    if opts.tls then a = a .. " --tls --cacert " .. h.quote(srv.certs.ca) end
    if opts.password then
      a = "REDISCLI_AUTH=" .. h.quote(opts.password) .. " " .. a .. (opts.user and (" --user " .. opts.user) or "")
    end
    local ok, out = h.exec(a .. " --no-auth-warning " .. args)
    assert(ok, out)
    return out
  end
  srv.start()
  return srv
end

return M
