-- examples/lua_sandbox_demo.lua — what `bin/demo --lua` runs: the Lua sandbox
-- (`oauthmail sandbox`, a Microsoft-shaped token service and an Exchange-
-- shaped SMTP server, no Node) starts as a child process; a mailer made from
-- the profile it writes gets an app-only token, survives one refused AUTH
-- (535 5.7.3 once: the token is refreshed and AUTH tried again), sends a
-- composed message; the redacted transcript and the delivered message are
-- printed. Needs no input; stops the sandbox at the end (POST /stop).
local oauthmail = require "oauthmail"
local conn = require "oauthmail.conn"

local function say(...) io.stdout:write(string.format(...), "\n") io.stdout:flush() end
local function rule(title) say("\n== %s %s", title, string.rep("=", math.max(0, 66 - #title))) end

local lua = os.getenv("OAUTHMAIL_LUA") or "lua5.4"
local root = os.getenv("OAUTHMAIL_ROOT") or "."
local dir = assert(io.popen("mktemp -d /tmp/oauthmail-demo.XXXXXX")):read("*l")

-- one control request to the sandbox (plain HTTP on loopback)
local function control(port, method, path, body)
  local c = assert(conn.connect { host = "127.0.0.1", port = port, timeout = 10 })
  body = body or ""
  c:send(string.format("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s", method, path, #body, body))
  local out = {}
  while true do
    local s = c:receive_some()
    if not s then break end
    out[#out + 1] = s
  end
  c:close()
  return table.concat(out)
end

local control_port
local ok, err = pcall(function()
  rule("starting the Lua sandbox")
  local log = dir .. "/sandbox.out"
  os.execute(string.format("timeout -s KILL 120 %s %s/bin/oauthmail sandbox --dir %s --fault auth:535:5.7.3 >%s 2>&1 &",
    lua, root, dir, log))
  local ready
  for _ = 1, 200 do
    local f = io.open(log)
    local text = f and f:read("*a") or ""
    if f then f:close() end
    ready = text:match("SANDBOX READY[^\n]*")
    if ready then
      say("%s", (text:gsub("try:[^\n]*\n", "")))
      break
    end
    require("oauthmail.core").sleep(0.05)
  end
  assert(ready, "the sandbox did not start")
  control_port = tonumber(ready:match("control=(%d+)"))

  local transcript = {}
  local profile = dofile(dir .. "/sandbox.lua")
  profile.name = "demo-tenant"
  profile.trace = function(ev) transcript[#transcript + 1] = oauthmail.format_event(ev) end

  rule("sending")
  local mailer = assert(oauthmail.new(profile))
  local receipt, serr = mailer:send {
    to = { "ops@example.org" }, subject = "Nightly report from the oauthmail demo",
    text = "Everything went fine.\nThis message travelled over STARTTLS with an OAuth2 bearer token.\n",
  }
  mailer:close()
  if not receipt then error(tostring(serr), 0) end
  say("receipt: message_id=%s attempts=%d reply=%d %s", receipt.message_id, receipt.attempts,
    receipt.reply.code, receipt.reply.enhanced or "")

  rule("redacted transcript")
  for _, line in ipairs(transcript) do
    if not line:match("^smtp %* state ") and not (line:match("^http %* ") and not line:match("HTTP/")) then
      say("  %s", line)
    end
  end

  rule("delivered (" .. dir .. "/maildir/new)")
  local f = assert(io.open(dir .. "/maildir/new/0001.eml", "rb"))
  say("%s", (f:read("*a"):gsub("\r\n", "\n")))
  f:close()
  local all = table.concat(transcript, "\n")
  assert(not all:find(profile.client_secret, 1, true), "client secret leaked into the transcript")
end)

if control_port then pcall(control, control_port, "POST", "/stop") end
os.execute("rm -rf '" .. dir .. "'")
if not ok then
  io.stderr:write("demo failed: ", tostring(err), "\n")
  os.exit(1)
end
say("\ndemo finished: one message delivered; sandbox stopped.")
