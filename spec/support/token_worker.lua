-- spec/support/token_worker.lua — a child process for the token manager's
-- concurrency and crash tests: builds a manager on a file store, waits for a
-- start signal, calls get() (from N coroutines if asked) and prints
-- "TOKEN <access token>" or "ERROR <message>" per call.
--
-- Environment (all set by spec/tokens_spec.lua):
--   OM_STORE        token file path          OM_WORKER_KEY  store key (hex), optional
--   OM_ENDPOINT     token endpoint URL       OM_CA          CA file for it
--   OM_CLIENT_ID    client id                OM_CLIENT_SECRET  client secret
--   OM_GO_FILE      wait (bounded) until this file exists before starting
--   OM_COROUTINES   number of coroutines calling get() (default 1)
--   OM_CLIENT       "oauth2" (oauthmail.oauth2) or "mini" (a minimal client over
--                   oauthmail.conn, used while oauthmail.http is unavailable)
--   OAUTHMAIL_FAULT after_token | before_save | during_save | after_save:
--                   TEST HOOK, the process ends with status 77 (86 during_save) there.
local core = require "oauthmail.core"
local tokens = require "oauthmail.tokens"
local store = require "oauthmail.store"
local filestore = require "oauthmail.store.file"

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local fault = env("OAUTHMAIL_FAULT")
if fault == "during_save" then
  filestore._test_fault = "during_save"
elseif fault then
  tokens._test_fault = function(point)
    if point == fault then
      io.stdout:write("FAULT " .. point .. "\n")
      io.stdout:flush()
      os.exit(77)
    end
  end
end

-- A minimal token client (HTTP/1.0 over oauthmail.conn with TLS): enough for
-- the counting endpoint, so these tests do not wait for oauthmail.http.
local function mini_oauth2()
  local cjson = require "cjson.safe"
  local h = require "spec.support.helpers"
  local errors = require "oauthmail.errors"
  local function form(t)
    local parts = {}
    for k, v in pairs(t) do
      parts[#parts + 1] = k .. "=" .. tostring(v):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end)
    end
    return table.concat(parts, "&")
  end
  local function post(cfg, fields)
    local host, port, path = cfg.token_endpoint:match("^https://([^:/]+):(%d+)(/.*)$")
    fields.client_id, fields.client_secret = cfg.client_id, cfg.client_secret
    local status, text = h.http_exchange { host = host, port = tonumber(port), ca_file = cfg.ca_file, timeout = 20,
      method = "POST", path = path, content_type = "application/x-www-form-urlencoded", body = form(fields) }
    if not status then return nil, text end
    local doc = cjson.decode(text)
    if status ~= 200 or type(doc) ~= "table" or not doc.access_token then
      local code = type(doc) == "table" and doc.error or nil
      return errors.fail("oauth", "token endpoint answered " .. tostring(status) .. " " .. tostring(code),
        { oauth_error = code, code = status })
    end
    return {
      access_token = doc.access_token, token_type = doc.token_type, scope = doc.scope,
      refresh_token = doc.refresh_token, expires_at = os.time() + (doc.expires_in or 3600),
    }
  end
  return {
    interactive = function() return false end,
    refresh = function(cfg, rt) return post(cfg, { grant_type = "refresh_token", refresh_token = rt }) end,
    run = function(cfg) return post(cfg, { grant_type = "client_credentials", scope = "mail.send" }) end,
  }
end

local api = env("OM_CLIENT", "oauth2") == "mini" and mini_oauth2() or require "oauthmail.oauth2"
local n = tonumber(env("OM_COROUTINES", "1"))
if n > 1 then
  -- let the coroutines interleave inside the request, as they would with a
  -- coroutine-aware HTTP client
  local inner = api
  api = {
    interactive = inner.interactive,
    refresh = function(...) coroutine.yield("request") return inner.refresh(...) end,
    run = function(...) coroutine.yield("request") return inner.run(...) end,
  }
end

local encryption = env("OM_WORKER_KEY") and { key_env = "OM_WORKER_KEY" } or nil
local manager = tokens.new {
  flow = {
    grant = "client_credentials", token_endpoint = assert(env("OM_ENDPOINT")), ca_file = env("OM_CA"),
    client_id = env("OM_CLIENT_ID", "worker-client"), client_secret = env("OM_CLIENT_SECRET", "worker-secret-0000"),
    client_auth = "client_secret_post", scope = "mail.send", timeout = 20,
  },
  store = store.file { path = assert(env("OM_STORE")), encryption = encryption, lock_timeout = 60 },
  oauth2 = api,
  profile = "worker",
}

local go = env("OM_GO_FILE")
if go then
  local deadline = core.monotime() + 30
  while not io.open(go, "rb") do
    if core.monotime() > deadline then print("ERROR start signal never came") os.exit(3) end
    core.sleep(0.002)
  end
end

local function report(tok, err)
  if tok then io.stdout:write("TOKEN " .. tok.access_token .. "\n")
  else io.stdout:write("ERROR " .. tostring(err):gsub("\n", " ") .. "\n") end
end

local cos = {}
for i = 1, n do cos[i] = coroutine.create(function() return manager:get() end) end
local failed = false
for _ = 1, 100000 do
  local alive = 0
  for _, co in ipairs(cos) do
    if coroutine.status(co) == "suspended" then
      local ok, a, b = coroutine.resume(co)
      if not ok then report(nil, a) failed = true
      elseif coroutine.status(co) == "dead" then
        report(a, b)
        if not a then failed = true end
      else alive = alive + 1 end
    end
  end
  if alive == 0 then break end
end
io.stdout:flush()
os.exit(failed and 1 or 0)
