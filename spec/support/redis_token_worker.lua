-- spec/support/redis_token_worker.lua — a child process for the Redis token
-- store's concurrency test: a token manager on store = {kind = "redis"}
-- against the real oidc-provider, N tasks of the built-in loop calling get()
-- at once after a start signal; prints "TOKEN <token>" or "ERROR <message>"
-- per call. Environment: OM_REDIS_URL, OM_PREFIX, OM_KEY (store key, hex),
-- OM_ISSUER, OM_CA, OM_SECRET (cc-post's secret), OM_GO_FILE, OM_TASKS.
local core = require "oauthmail.core"
local tokens = require "oauthmail.tokens"
local loop = require "oauthmail.loop"

local function env(name) return (assert(os.getenv(name), name)) end

local manager = tokens.new {
  flow = {
    grant = "client_credentials", token_endpoint = env("OM_ISSUER") .. "/token", ca_file = env("OM_CA"),
    client_id = "cc-post", client_secret = env("OM_SECRET"), client_auth = "client_secret_post",
    scope = "mail.send", timeout = 30,
  },
  store = { kind = "redis", url = env("OM_REDIS_URL"), prefix = env("OM_PREFIX"),
            encryption = { key_env = "OM_KEY" }, lock_timeout = 60 },
  profile = "redis-worker",
}

local go = env("OM_GO_FILE")
local deadline = core.monotime() + 60
while not io.open(go, "rb") do
  if core.monotime() > deadline then print("ERROR start signal never came") os.exit(3) end
  core.sleep(0.002)
end

local lines, failed = {}, false
loop.run(function()
  for i = 1, tonumber(env("OM_TASKS")) do
    loop.spawn(function()
      local tok, err = manager:get()
      if tok then lines[i] = "TOKEN " .. tok.access_token
      else lines[i] = "ERROR " .. tostring(err):gsub("\n", " ") failed = true end
    end)
  end
end)
io.stdout:write(table.concat(lines, "\n") .. "\n")
io.stdout:flush()
os.exit(failed and 1 or 0)
