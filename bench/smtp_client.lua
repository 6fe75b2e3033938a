-- bench/smtp_client.lua — the oauthmail side of bench/smtp_throughput.
-- Usage: lua bench/smtp_client.lua MODE N PORT CA [FILE]
--   MODE lockstep (session:send, DATA), lockstep_bdat (session:send, BDAT),
--        batch (session:send_many), big (one message streamed from FILE)
-- Prints one line: "<mode> <messages> <seconds> <bytes> <peak RSS kB>".
local smtp = require "oauthmail.smtp"
local core = require "oauthmail.core"

local mode, n, port, ca, file = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
local s = assert(smtp.open { host = "127.0.0.1", port = port, tls = "implicit", ca_file = ca, timeout = 120 })
assert(s:auth { mechanism = "xoauth2", user = "bench@example.org", token = "bench-token-" .. string.rep("x", 1200) })

local body = "From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench\r\n\r\n" ..
  string.rep("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=/\r\n", 13)
body = body:sub(1, 1022) .. "\r\n"  -- 1 KB

local t0 = core.monotime()
local bytes = 0
if mode == "lockstep" or mode == "lockstep_bdat" then
  local chunking = mode == "lockstep_bdat"
  for _ = 1, n do
    assert(s:send { from = "bench@example.org", to = "sink@example.org", data = body, chunking = chunking })
  end
  bytes = n * #body
elseif mode == "batch" then
  local list = {}
  for i = 1, n do list[i] = { from = "bench@example.org", to = "sink@example.org", data = body } end
  local res = assert(s:send_many(list, { window = 128 }))
  for i = 1, n do assert(res[i].code == 250, tostring(res[i])) end
  bytes = n * #body
elseif mode == "big" then
  local f = assert(io.open(file, "rb"))
  assert(s:send { from = "bench@example.org", to = "sink@example.org", data = f })
  bytes = f:seek("end")
  f:close()
  n = 1
end
local dt = core.monotime() - t0
s:close()
local rss = (io.open("/proc/self/status"):read("*a")):match("VmHWM:%s*(%d+)")
print(string.format("%s %d %.4f %d %s", mode, n, dt, bytes, rss))
