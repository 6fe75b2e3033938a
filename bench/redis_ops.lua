-- bench/redis_ops.lua — the Redis side of bench/outbox_throughput:
--   lua bench/redis_ops.lua store URL N     store:load of a cached token (sealed and clear), ops/s
--   lua bench/redis_ops.lua enqueue URL PREFIX N   N messages into an outbox, msgs/s and round trips
local store = require "oauthmail.store"
local outbox = require "oauthmail.outbox"
local wait = require "oauthmail.wait"

local mode, url = arg[1], arg[2]
if mode == "store" then
  local n = tonumber(arg[3])
  local key = '["https://login.example","client","noreply@example.org","mail.send"]'
  local rec = { access_token = string.rep("a", 1500), refresh_token = string.rep("r", 400), token_type = "Bearer",
    expires_at = os.time() + 3600 }
  local keyfile = os.tmpname()
  local f = assert(io.open(keyfile, "wb")) f:write(string.rep("ab", 32)) f:close()
  os.execute("chmod 600 " .. keyfile)
  for _, sealed in ipairs { false, true } do
    local s = store.new { kind = "redis", url = url, prefix = "bench:",
      encryption = sealed and { key_file = keyfile } or nil }
    assert(s:save(key, rec))
    assert(s:load(key))
    local rt0 = s.client.round_trips
    local t0 = wait.now()
    for _ = 1, n do assert(s:load(key)) end
    local dt = wait.now() - t0
    io.stdout:write(string.format("store get (%s): %d in %.3f s = %.0f/s, %.1f us each, %.2f round trips each\n",
      sealed and "sealed, AES-256-GCM" or "clear", n, dt, n / dt, dt / n * 1e6, (s.client.round_trips - rt0) / n))
  end
  os.remove(keyfile)
elseif mode == "enqueue" then
  local prefix, n = arg[3], tonumber(arg[4])
  local ob = outbox.open { kind = "redis", url = url, prefix = prefix }
  local body = "From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench\r\n\r\n" .. string.rep(string.rep("x", 78) .. "\r\n", 13)
  local t0 = wait.now()
  for _ = 1, n do assert(ob:enqueue { raw = body, to = "sink@example.org" }) end
  local dt = wait.now() - t0
  io.stdout:write(string.format("enqueue: %d in %.3f s = %.0f msgs/s, %.2f round trips each\n", n, dt, n / dt,
    ob.client.round_trips / n))
end
