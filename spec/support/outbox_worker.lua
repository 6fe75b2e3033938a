-- spec/support/outbox_worker.lua — a child process for the outbox spec: a
-- worker on an outbox (OM_OUTBOX: a Redis URL or a spool directory) sending
-- through a mailer to the smtp-server peer, until the outbox is empty (or
-- OM_MAX_TIME). Prints "STATS <json>" at the end and "SENT <id>" per message.
-- Environment: OM_OUTBOX, OM_PREFIX, OM_LEASE, OM_SMTP_PORT, OM_CA, OM_TOKEN, OM_MAX_TIME.
local cjson = require "cjson"
local oauthmail = require "oauthmail"
local outbox = require "oauthmail.outbox"

local function env(name) return os.getenv(name) end
local USER = "alice@example.org"
local rec = { access_token = env("OM_TOKEN"), token_type = "Bearer", expires_at = os.time() + 3600 }
local mailer = assert(oauthmail.new {
  name = "outbox", provider = "generic", issuer = "https://127.0.0.1:1", token_endpoint = "https://127.0.0.1:1/token",
  flow = "client_credentials", client_id = "c", client_secret = "unused-secret", user = USER,
  store = { load = function() return rec end, save = function() return true end,
            lock = function() return function() return true end end },
  smtp = { host = "127.0.0.1", port = tonumber(env("OM_SMTP_PORT")), tls = "starttls", ca_file = env("OM_CA"),
           servername = "localhost", timeout = 10 },
  policy = { attempts = 1 },
})
local spec = env("OM_OUTBOX")
local ob
if spec:match("^redis") then
  ob = outbox.open { kind = "redis", url = spec, prefix = env("OM_PREFIX"), lease = tonumber(env("OM_LEASE") or "60") }
else
  ob = outbox.open { kind = "spool", path = spec }
end
local w = outbox.worker { outbox = ob, mailer = mailer, batch = tonumber(env("OM_BATCH") or "10"),
  trace = function(ev)
    if ev.event == "sent" then io.stdout:write("SENT " .. ev.id .. "\n") io.stdout:flush() end
  end }
local st, err = w:run { until_empty = true, max_time = tonumber(env("OM_MAX_TIME") or "120") }
mailer:close()
ob:close()
if not st then io.stdout:write("ERROR " .. tostring(err) .. "\n") os.exit(1) end
io.stdout:write("STATS " .. cjson.encode(st) .. "\n")
os.exit(0)
