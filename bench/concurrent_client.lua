-- bench/concurrent_client.lua — the oauthmail side of bench/concurrent_sessions.
-- Usage: lua bench/concurrent_client.lua MODE N M PORT CA
--   sessions   N SMTP sessions in one process under oauthmail.run, each
--              sending its share of M messages lock-step (session:send)
--   mailer     one mailer with a pool of N sessions, N coroutines sending
--              M messages between them (mailer:send)
--   send_many  one mailer with a pool of N sessions, mailer:send_many of M
-- Prints "<mode> <N> <messages> <seconds> <peak RSS kB>". The time covers
-- everything from the first connect to the last reply, as for Nodemailer,
-- whose pooled transports connect on their first message.
local oauthmail = require "oauthmail"
local smtp = require "oauthmail.smtp"
local wait = require "oauthmail.wait"

local mode, n, m, port, ca = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]), arg[5]
local TOKEN = "bench-token-" .. string.rep("x", 1200)
local body = "From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench\r\n\r\n" ..
  string.rep("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=/\r\n", 13)
body = body:sub(1, 1022) .. "\r\n"  -- 1 KB
local per = math.floor(m / n)

local function mailer(connections)
  local rec = { access_token = TOKEN, token_type = "Bearer", expires_at = os.time() + 3600 }
  return assert(oauthmail.new {
    name = "bench", provider = "generic", token_endpoint = "https://127.0.0.1:9/token", flow = "client_credentials",
    client_id = "bench", client_secret = "bench", user = "bench@example.org",
    store = { load = function() return rec end, save = function() return true end,
              lock = function() return function() return true end end },
    limits = { connections = connections, max_wait = 600 },
    policy = { max_messages_per_session = 1e9 },
    smtp = { host = "127.0.0.1", port = port, tls = "implicit", ca_file = ca, servername = "localhost", timeout = 600 },
  })
end

local sent, dt = 0, 0
if mode == "sessions" then
  local t0 = wait.now()
  oauthmail.run(function()
    for _ = 1, n do
      oauthmail.spawn(function()
        local s = assert(smtp.open { host = "127.0.0.1", port = port, tls = "implicit", ca_file = ca,
          servername = "localhost", timeout = 600 })
        assert(s:auth { mechanism = "xoauth2", user = "bench@example.org", token = TOKEN })
        for _ = 1, per do
          assert(s:send { from = "bench@example.org", to = "sink@example.org", data = body })
          sent = sent + 1
        end
        s:close()
      end)
    end
  end)
  dt = wait.now() - t0
elseif mode == "mailer" then
  local ml = mailer(n)
  local t0 = wait.now()
  oauthmail.run(function()
    for _ = 1, n do
      oauthmail.spawn(function()
        for _ = 1, per do
          assert(ml:send { raw = body, from = "bench@example.org", to = "sink@example.org" })
          sent = sent + 1
        end
      end)
    end
  end)
  dt = wait.now() - t0
  ml:close()
elseif mode == "send_many" then
  local ml = mailer(n)
  local list = {}
  for i = 1, m do list[i] = { raw = body, from = "bench@example.org", to = "sink@example.org" } end
  local t0 = wait.now()
  local res = oauthmail.run(function() return ml:send_many(list, { batch = 100 }) end)
  dt = wait.now() - t0
  for i = 1, m do assert(res[i].reply, tostring(res[i].message)) end
  sent = m
  ml:close()
end
local rss = (io.open("/proc/self/status"):read("*a")):match("VmHWM:%s*(%d+)")
print(string.format("%s %d %d %.4f %s", mode, n, sent, dt, rss))
