-- bench/outbox_worker.lua — one outbox worker for bench/outbox_throughput:
-- sends what a Redis outbox holds to the sink (implicit TLS, any AUTH
-- passes) until it is empty, then prints "STATS sent=N seconds=S round_trips=R".
-- Usage: lua bench/outbox_worker.lua REDIS_URL PREFIX SINK_PORT CA BATCH
local oauthmail = require "oauthmail"
local outbox = require "oauthmail.outbox"
local wait = require "oauthmail.wait"

local url, prefix, port, ca, batch = arg[1], arg[2], tonumber(arg[3]), arg[4], tonumber(arg[5] or "20")
local rec = { access_token = "bench-token-0123456789", token_type = "Bearer", expires_at = os.time() + 3600 }
local mailer = assert(oauthmail.new {
  name = "bench", provider = "generic", issuer = "https://127.0.0.1:1", token_endpoint = "https://127.0.0.1:1/token",
  flow = "client_credentials", client_id = "c", client_secret = "unused", user = "bench@example.org",
  store = { load = function() return rec end, save = function() return true end,
            lock = function() return function() return true end end },
  smtp = { host = "127.0.0.1", port = port, tls = "implicit", ca_file = ca, servername = "localhost" },
  limits = { connections = 1 },
})
local ob = outbox.open { kind = "redis", url = url, prefix = prefix, lease = 300 }
local t0 = wait.now()
local st = assert(outbox.worker { outbox = ob, mailer = mailer, batch = batch, idle = 0.01 }:run { until_empty = true })
local dt = wait.now() - t0
mailer:close()
io.stdout:write(string.format("STATS sent=%d seconds=%.3f round_trips=%d window_max_ms=%.2f\n", st.sent, dt,
  ob.client.round_trips, st.window_max * 1000))
