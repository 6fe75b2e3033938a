-- spec/support/tls_peer.lua — a tiny line server on the project's own
-- listener, run as a child process by spec/conn_spec.lua (a client and a
-- server can't both block in one process during a handshake).
-- Usage: lua tls_peer.lua MODE CERT KEY
--   starttls  plain greeting; STARTTLS upgrades (server side); lines echo as "250 <line>"
--   inject    like starttls, but sends extra plain-text bytes right after "220 go"
--   implicit  TLS from the first byte; "HALF" makes it send half a line and close
local conn = require "oauthmail.conn"
local mode, cert, key = arg[1], arg[2], arg[3]

local l = assert(conn.listen { host = "127.0.0.1", port = 0,
  tls = mode == "implicit" and { cert = cert, key = key } or nil })
io.stdout:write("PORT ", l:port(), "\n")
io.stdout:flush()
local c = assert(l:accept(20))
c:settimeout(20)
if mode ~= "implicit" then assert(c:send("220 ready\r\n")) end
while true do
  local line, err = c:receive_line()
  if not line then io.stdout:write("server: ", tostring(err), "\n") break end
  if line == "STARTTLS" then
    assert(c:send(mode == "inject" and "220 go\r\n250 injected\r\n" or "220 go\r\n"))
    local ok, terr = c:starttls { server = true, cert = cert, key = key }
    io.stdout:write("server starttls: ", tostring(ok or terr), "\n")
    if not ok then break end
  elseif line == "HALF" then
    c:send("250 half")
    break
  elseif line == "QUIT" then
    c:send("221 bye\r\n")
    break
  else
    assert(c:send("250 " .. line .. "\r\n"))
  end
end
io.stdout:flush()
c:close()
l:close()
