-- spec/openresty_spec.lua — oauthmail inside nginx (Debian's
-- libnginx-mod-http-lua on OpenResty's LuaJIT): SMTP over nginx's cosockets
-- (oauthmail.transport.cosocket), the rest through oauthmail.wait.ngx. nginx
-- is started by the test on loopback (not as a service) and stopped by pid;
-- while one request sends mail through a server that answers slowly, a
-- second request is answered first.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local smtp_peers = require "spec.support.smtp_peers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"

local MODULES = "/usr/lib/nginx/modules"
local have_nginx = io.open(MODULES .. "/ngx_http_lua_module.so") ~= nil and io.open("/usr/sbin/nginx") ~= nil
local it_ngx = have_nginx and it or function(name)
  pending(name .. " (needs nginx-core and libnginx-mod-http-lua)")
end

local TOKEN = "openresty-spec-token-0123456789"
local USER = "alice@example.org"

-- nginx runs LuaJIT: the core module is built for it (build/jit)
local function jit_build()
  -- a plain build whatever this suite runs under (make asan passes SANITIZE
  -- and CFLAGS down through MAKEFLAGS; nginx itself is not instrumented)
  local ok, out = h.exec("env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL -u LD_PRELOAD make -s -C " .. h.quote(h.root)
    .. " LUA_VERSION=jit BUILD=build/jit SANITIZE= TESTING= CFLAGS='-O2 -g'")
  assert(ok, out)
  return h.root .. "/build/jit"
end

local function start_nginx(ca, handlers)
  local dir = h.tmpdir()
  local port = h.free_port()
  local lines = {
    "load_module " .. MODULES .. "/ndk_http_module.so;",
    "load_module " .. MODULES .. "/ngx_http_lua_module.so;",
    "daemon off;", "master_process off;", "worker_processes 1;",
    "error_log " .. dir .. "/error.log info;", "pid " .. dir .. "/nginx.pid;",
    "events { worker_connections 64; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. dir .. "/body; proxy_temp_path " .. dir .. "/proxy;",
    "  fastcgi_temp_path " .. dir .. "/fcgi; uwsgi_temp_path " .. dir .. "/uwsgi; scgi_temp_path " .. dir .. "/scgi;",
    "  lua_package_path '" .. h.root .. "/lua/?.lua;" .. h.root .. "/lua/?/init.lua;" .. h.root .. "/?.lua;;';",
    "  lua_package_cpath '" .. jit_build() .. "/?.so;;';",
    ca and "  lua_ssl_trusted_certificate " .. ca .. "; lua_ssl_verify_depth 3;" or "",
    "  server {",
    "    listen 127.0.0.1:" .. port .. ";",
  }
  for path, code in pairs(handlers) do
    lines[#lines + 1] = "    location = " .. path .. " { default_type text/plain; content_by_lua_block {\n" .. code .. "\n} }"
  end
  lines[#lines + 1] = "  }"
  lines[#lines + 1] = "}"
  h.write_file(dir .. "/nginx.conf", table.concat(lines, "\n") .. "\n")
  local proc = h.spawn("/usr/sbin/nginx -p " .. h.quote(dir) .. " -c " .. h.quote(dir .. "/nginx.conf"), {})
  h.wait_port(port, "127.0.0.1", 30)
  proc.port = port
  proc.dir = dir
  return proc
end

-- Start two requests on two connections: the slow one first. Returns both
-- answers with the order in which they arrived.
local function two_requests(port, slow, fast)
  local conn = require "oauthmail.conn"
  local a = assert(conn.connect { host = "127.0.0.1", port = port, timeout = 60 })
  assert(a:send("GET " .. slow .. " HTTP/1.0\r\nHost: x\r\n\r\n"))
  h.sleep(0.3)   -- the slow request is under way
  local b = assert(conn.connect { host = "127.0.0.1", port = port, timeout = 60 })
  assert(b:send("GET " .. fast .. " HTTP/1.0\r\nHost: x\r\n\r\n"))
  local function body(c)
    local parts = {}
    while true do
      local s, err = c:receive_some(65536)
      if not s then assert(err.reason == "closed", tostring(err)) break end
      parts[#parts + 1] = s
    end
    c:close()
    return (table.concat(parts):match("\r\n\r\n(.*)$"))
  end
  local fast_body = body(b)
  local slow_body = body(a)
  return cjson.decode(slow_body), cjson.decode(fast_body)
end

local PING = [[ngx.update_time() ngx.say(require("cjson").encode { at = ngx.now() })]]

describe("oauthmail under OpenResty (nginx + lua-nginx-module)", function()
  after_each(function() h.stop_all() end)

  it_ngx("sends mail over cosockets while a second request is answered first", function()
    local peer = smtp_peers.node_smtp { token = TOKEN, data_delay_ms = 1500 }
    local send = string.format([[
      local oauthmail = require "oauthmail"
      require("oauthmail.wait").use(require "oauthmail.wait.ngx")
      local store = { load = function() return { access_token = %q, token_type = "Bearer", expires_at = os.time() + 3600 } end,
        save = function() return true end, lock = function() return function() return true end end }
      local mailer = assert(oauthmail.new {
        name = "nginx", provider = "generic", token_endpoint = "https://127.0.0.1:9/token", flow = "client_credentials",
        client_id = "unused", client_secret = "unused", user = %q, store = store,
        smtp = { host = "127.0.0.1", port = %d, tls = "starttls", servername = "localhost", timeout = 20,
                 connect = require("oauthmail.transport.cosocket").connect },
      })
      local r, err = mailer:send { raw = "From: %s\r\nTo: ops@example.org\r\nSubject: nginx\r\n\r\nfrom nginx\r\n",
        to = "ops@example.org" }
      mailer:close()
      ngx.update_time()
      ngx.say(require("cjson").encode { at = ngx.now(), code = r and r.reply.code, err = err and tostring(err) })
    ]], TOKEN, USER, peer.port, USER)
    local nginx = start_nginx(peer.ca, { ["/send"] = send, ["/ping"] = PING })
    local slow, fast = two_requests(nginx.port, "/send", "/ping")
    assert.equals(250, slow.code, tostring(slow.err))
    assert.truthy(fast.at < slow.at, "ping answered at " .. fast.at .. ", the send ended at " .. slow.at)
    assert.equals(1, #peer.messages())
    assert.equals("from nginx\r\n", peer.messages()[1].data:match("\r\n\r\n(.*)$"))
    nginx.stop()
  end)

  it_ngx("gets a token from a slow oidc-provider through oauthmail.wait.ngx without holding the worker", function()
    local srv = oidc.start()
    local sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
    assert.equals(200, (srv.request("POST", "/test/slow", { path = "/token", ms = 1500 })))
    local send = string.format([[
      local oauthmail = require "oauthmail"
      require("oauthmail.wait").use(require "oauthmail.wait.ngx")
      local token_at
      local mailer = assert(oauthmail.new {
        name = "nginx", provider = "generic", issuer = %q, token_endpoint = %q,
        flow = "client_credentials", client_id = "cc-post", client_secret = %q,
        client_auth = "client_secret_post", scope = "mail.send", ca_file = %q, user = %q,
        on_token = function() ngx.update_time() token_at = ngx.now() end,
        smtp = { host = "127.0.0.1", port = %d, tls = "starttls", servername = "localhost", timeout = 20,
                 connect = require("oauthmail.transport.cosocket").connect },
      })
      local r, err = mailer:send { raw = "From: %s\r\nTo: ops@example.org\r\nSubject: nginx\r\n\r\nhi\r\n", to = "ops@example.org" }
      mailer:close()
      ngx.say(require("cjson").encode { at = ngx.now(), token_at = token_at, code = r and r.reply.code,
        err = err and tostring(err) })
    ]], srv.issuer, srv.token_endpoint, srv.secrets.post, srv.ca, USER, sb.port, USER)
    local nginx = start_nginx(sb.ca, { ["/send"] = send, ["/ping"] = PING })
    local before = srv.stats().token_requests
    local slow, fast = two_requests(nginx.port, "/send", "/ping")
    assert.equals(250, slow.code, tostring(slow.err))
    -- answered while the token request was still in flight
    assert.truthy(fast.at < slow.token_at, "ping answered at " .. fast.at .. ", the token came at " .. slow.token_at)
    assert.equals(1, srv.stats().token_requests - before)
    assert.equals(1, #sb.messages())
    local log = h.read_file(nginx.dir .. "/error.log") or ""
    h.assert_no_secrets(log, { srv.secrets.post })
    nginx.stop()
  end)

  -- nginx reaps every child in its SIGCHLD handler (waitpid(-1)), so the
  -- store learns a command's exit status from the shell, not from waitpid.
  it_ngx("runs a command store's slow commands without holding the worker, with their exit status", function()
    local dir = h.tmpdir()
    local handler = string.format([[
      require("oauthmail.wait").use(require "oauthmail.wait.ngx")
      local store = require("oauthmail.store").command {
        get = "sleep 0.8; cat %s/$OAUTHMAIL_STORE_KEY_ID", put = "sleep 0.8; cat > %s/$OAUTHMAIL_STORE_KEY_ID",
        lock_dir = %q }
      local record = { access_token = "nginx-cmd-secret-0123456789", token_type = "Bearer", expires_at = 1900000000 }
      local saved, serr = store:save("acct", record)
      local got, gerr = store:load("acct")
      local failing = require("oauthmail.store").command { get = "sleep 0.2; exit 3", put = "true", lock_dir = %q }
      local _, ferr = failing:load("acct")
      ngx.update_time()
      ngx.say(require("cjson").encode { at = ngx.now(), saved = saved, serr = serr and tostring(serr),
        same = got and got.access_token == record.access_token, gerr = gerr and tostring(gerr),
        ferr = ferr and ferr.message })
    ]], h.quote(dir), h.quote(dir), dir, dir)
    local nginx = start_nginx(nil, { ["/store"] = handler, ["/ping"] = PING })
    local slow, fast = two_requests(nginx.port, "/store", "/ping")
    assert.is_true(slow.saved, tostring(slow.serr))
    assert.is_true(slow.same, tostring(slow.gerr))
    assert.equals("command store: get command exited with status 3", slow.ferr)
    assert.truthy(fast.at < slow.at, "ping answered at " .. fast.at .. ", the store calls ended at " .. slow.at)
    h.assert_no_secrets(h.read_file(nginx.dir .. "/error.log") or "", { "nginx-cmd-secret-0123456789" })
    nginx.stop()
  end)
end)
