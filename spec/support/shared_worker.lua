-- spec/support/shared_worker.lua — a child process for the shared governor
-- spec: one mailer (limits from OM_LIMITS, JSON; shared through Redis when
-- OM_REDIS_URL is set) with a token already in its store, OM_SESSIONS tasks
-- of the built-in loop sending OM_MESSAGES messages each to the smtp-server
-- peer after a start signal. Prints "SENT <id>" or "ERROR <id> <message>".
-- Environment: OM_SMTP_PORT, OM_CA, OM_TOKEN, OM_REDIS_URL, OM_PREFIX,
-- OM_LIMITS, OM_SESSIONS, OM_MESSAGES, OM_TAG, OM_GO_FILE.
local core = require "oauthmail.core"
local cjson = require "cjson"
local oauthmail = require "oauthmail"

local function env(name) return os.getenv(name) end
local USER = "alice@example.org"

local rec = { access_token = env("OM_TOKEN"), token_type = "Bearer", expires_at = os.time() + 3600 }
local limits = cjson.decode(env("OM_LIMITS"))
if env("OM_REDIS_URL") then
  limits.shared = { kind = "redis", url = env("OM_REDIS_URL"), prefix = env("OM_PREFIX"), lease = 30,
                    minute = tonumber(env("OM_MINUTE") or "60") }
end
local mailer = assert(oauthmail.new {
  name = "shared", provider = "generic", issuer = "https://127.0.0.1:1", token_endpoint = "https://127.0.0.1:1/token",
  flow = "client_credentials", client_id = "c", client_secret = "unused-secret", user = USER,
  store = { load = function() return rec end, save = function() return true end,
            lock = function() return function() return true end end },
  smtp = { host = "127.0.0.1", port = tonumber(env("OM_SMTP_PORT")), tls = "starttls", ca_file = env("OM_CA"),
           servername = "localhost", timeout = 30 },
  limits = limits,
})

local go = env("OM_GO_FILE")
local deadline = core.monotime() + 60
while not io.open(go, "rb") do
  if core.monotime() > deadline then print("ERROR start signal never came") os.exit(3) end
  core.sleep(0.002)
end

local out, failed = {}, false
local tag, per = env("OM_TAG"), tonumber(env("OM_MESSAGES"))
oauthmail.run(function()
  for s = 1, tonumber(env("OM_SESSIONS")) do
    oauthmail.spawn(function()
      for k = 1, per do
        local id = tag .. "-" .. s .. "-" .. k
        local r, err = mailer:send { raw = "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: " .. id
          .. "\r\nMessage-ID: <" .. id .. "@shared.test>\r\n\r\nbody\r\n", to = "ops@example.org" }
        if r then out[#out + 1] = "SENT " .. id
        else out[#out + 1] = "ERROR " .. id .. " " .. tostring(err):gsub("\n", " ") failed = true end
      end
    end)
  end
end)
mailer:close()
io.stdout:write(table.concat(out, "\n") .. "\n")
io.stdout:flush()
os.exit(failed and 1 or 0)
