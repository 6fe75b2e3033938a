-- oauthmail.sandbox — a Microsoft-shaped token service and an Exchange-shaped
-- SMTP submission server in one Lua process on the project's own listener,
-- for demos and fault tests without Node or a tenant. Faults are switched on
-- from the command line and over a small control API; delivered messages go
-- to a maildir; it writes a ready profile for itself. Its listeners and
-- connections are tasks of oauthmail's built-in loop (sandbox/serve.lua):
-- sb:run() runs that loop, sb:serve() adds the tasks to a loop the caller
-- runs. See docs/cli.md.
local cjson = require("cjson.safe").new()
local conn = require "oauthmail.conn"
local loop = require "oauthmail.loop"
local serve = require "oauthmail.sandbox.serve"
local wait = require "oauthmail.wait"
local idp_mod = require "oauthmail.sandbox.idp"
local smtp_mod = require "oauthmail.sandbox.smtp"
local crypto = require "oauthmail.crypto"

local M = {}

-- One-shot faults: {stage = "connect"|"auth"|"mail"|"rcpt"|"data"|"token", code=, enhanced=, text=, times=}
local Faults = {}
Faults.__index = Faults

function M.faults() return setmetatable({ list = {}, used = {} }, Faults) end

function Faults:add(f) self.list[#self.list + 1] = f end
function Faults:clear() self.list = {} end
function Faults:take(stage)
  for i, f in ipairs(self.list) do
    if f.stage == stage then
      if (f.times or 1) > 1 then f.times = f.times - 1 else table.remove(self.list, i) end
      local code = tonumber(f.code)
      self.used[#self.used + 1] = stage .. ":" .. (code and string.format("%d", code) or tostring(f.error or ""))
      return f
    end
  end
  return nil
end

-- "auth:535:5.7.139[:text][*N]" -> fault table
function M.parse_fault(s)
  local spec, times = s:match("^(.-)%*(%d+)$")
  spec = spec or s
  local stage, code, enhanced, text = spec:match("^(%a+):?(%d*):?([%d%.]*):?(.*)$")
  if not stage then return nil end
  return { stage = stage, code = tonumber(code), enhanced = enhanced ~= "" and enhanced or nil,
    text = text ~= "" and text or nil, times = tonumber(times) }
end

local function write(path, text, mode)
  local fs = require("oauthmail.sys").fs
  return fs.atomic_write(path, text, mode or 420)
end

local function sh(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- A self-signed certificate for 127.0.0.1 and localhost, made with the
-- openssl command (the core has no certificate writer).
local function make_cert(dir)
  local cert, key = dir .. "/sandbox.crt", dir .. "/sandbox.key"
  local f = io.open(cert, "rb")
  if f then f:close() return cert, key end
  local ok = os.execute("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 "
    .. "-subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " .. sh(key)
    .. " -out " .. sh(cert) .. " >/dev/null 2>&1")
  if ok == true or ok == 0 then return cert, key end
  return nil
end

-- An RSA key and certificate for the certificate client (what a tenant
-- uploads to its app registration), and its public key for verification.
local function make_client_cert(dir)
  local key, cert, pub = dir .. "/client.key", dir .. "/client.crt", dir .. "/client.pub"
  local f = io.open(pub, "rb")
  if f then f:close() return cert, key, pub end
  local ok = os.execute("openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=oauthmail-sandbox-client "
    .. "-keyout " .. sh(key) .. " -out " .. sh(cert) .. " >/dev/null 2>&1 && openssl x509 -in " .. sh(cert)
    .. " -pubkey -noout >" .. sh(pub))
  if ok == true or ok == 0 then return cert, key, pub end
  return nil
end

-- sandbox.new{dir=, port=0, idp_port=0, control_port=0, tls=true, user=, google_user=,
--   token_lifetime=3600, device_delay=1, faults={...}} -> sandbox | nil, err
function M.new(o)
  o = o or {}
  local dir = assert(o.dir, "sandbox.new: dir is required")
  os.execute("mkdir -p " .. sh(dir))
  local self = { dir = dir, faults = M.faults(), stats = {} }
  for _, f in ipairs(o.faults or {}) do self.faults:add(f) end
  local tls
  if o.tls ~= false then
    local cert, key = o.cert, o.key
    if not cert then cert, key = make_cert(dir) end
    if cert then tls = { cert = cert, key = key } end
  end
  self.tls = tls
  local err
  self.idp_l, err = conn.listen { host = "127.0.0.1", port = o.idp_port or 0 }
  if not self.idp_l then return nil, err end
  self.smtp_l, err = conn.listen { host = "127.0.0.1", port = o.port or 0 }
  if not self.smtp_l then return nil, err end
  self.control_l, err = conn.listen { host = "127.0.0.1", port = o.control_port or 0 }
  if not self.control_l then return nil, err end
  self.issuer = "http://127.0.0.1:" .. self.idp_l:port()
  self.user = o.user or "noreply@contoso.test"
  self.google_user = o.google_user or "sender@gmail.test"
  self.client_id = "00000000-0000-0000-0000-0000000000aa"
  self.client_secret = "sandbox-secret-" .. crypto.b64url_encode(crypto.random(12))
  self.public_client = "00000000-0000-0000-0000-0000000000bb"
  self.cert_client = "00000000-0000-0000-0000-0000000000cc"
  local ccert, ckey, cpub = make_client_cert(dir)
  if ccert then self.client_cert = { cert = ccert, key = ckey, pub = cpub } end
  self.mailboxes = {
    [self.user:lower()] = { kind = "microsoft", smtp_auth = true, quota = o.quota },
    [self.google_user:lower()] = { kind = "google" },
    ["disabled@contoso.test"] = { kind = "microsoft", smtp_auth = false },
  }
  self.idp = idp_mod.new { issuer = self.issuer, tenant = "contoso.test", default_user = self.user,
    clients = { [self.client_id] = { secret = self.client_secret }, [self.public_client] = {},
      [self.cert_client] = self.client_cert and { pubkey = self.client_cert.pub } or nil },
    dir = dir,
    token_lifetime = o.token_lifetime, device_delay = o.device_delay, stats = self.stats, faults = self.faults }
  self.smtp = smtp_mod.new { idp = self.idp, mailboxes = self.mailboxes, tls = tls, maildir = dir .. "/maildir",
    faults = self.faults, stats = self.stats }
  return setmetatable(self, { __index = M })
end

local function json(status, doc)
  return { status = status, body = (cjson.encode(doc):gsub("\\/", "/")), type = "application/json" }
end

-- The control API (plain HTTP on 127.0.0.1): POST /faults {faults=[...]},
-- DELETE /faults, GET /stats, POST /mailboxes {address, smtp_auth, quota, kind}, POST /stop.
function M.control(self, req)
  local doc = cjson.decode(req.body ~= "" and req.body or "{}") or {}
  if req.path == "/faults" and req.method == "POST" then
    for _, f in ipairs(doc.faults or {}) do self.faults:add(f) end
    return json(200, { queued = #self.faults.list })
  elseif req.path == "/faults" and req.method == "DELETE" then
    self.faults:clear()
    return json(200, {})
  elseif req.path == "/stats" then
    local s = {}
    for k, v in pairs(self.stats) do s[k] = v end
    s.pending_faults, s.faults_used = #self.faults.list, self.faults.used
    return json(200, s)
  elseif req.path == "/mailboxes" and req.method == "POST" and type(doc.address) == "string" then
    self.mailboxes[doc.address:lower()] = { kind = doc.kind or "microsoft", smtp_auth = doc.smtp_auth ~= false,
      quota = doc.quota }
    return json(200, {})
  elseif req.path == "/stop" and req.method == "POST" then
    local res = json(200, {})
    res.after = function() M.stop(self) end   -- once the answer is out
    return res
  end
  return json(404, { error = "unknown control route" })
end

-- The profile for this sandbox's Microsoft-shaped mailbox (app-only or delegated).
function M.profile(self, kind)
  local p = {
    name = "sandbox" .. (kind and ("-" .. kind) or ""),
    provider = "microsoft", tenant = "contoso.test", user = self.user,
    token_endpoint = self.issuer .. "/token", authorization_endpoint = self.issuer .. "/authorize",
    device_authorization_endpoint = self.issuer .. "/devicecode", revocation_endpoint = self.issuer .. "/revoke",
    smtp = { host = "127.0.0.1", port = self.smtp_l:port(), tls = self.tls and "starttls" or "none",
      ca_file = self.tls and self.tls.cert or nil, allow_plaintext_auth = not self.tls or nil },
    store = { kind = "file", path = self.dir .. "/tokens" .. (kind and ("-" .. kind) or "") .. ".json" },
  }
  if kind == "device" then
    p.flow, p.client_id = "device_code", self.public_client
  elseif kind == "cert" then
    p.flow, p.client_id = "client_credentials", self.cert_client
    p.client_certificate = { cert = self.client_cert.cert, key = self.client_cert.key }
  else
    p.flow, p.client_id, p.client_secret = "client_credentials", self.client_id, self.client_secret
  end
  return p
end

local function lua_source(v, indent)
  indent = indent or ""
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) ~= "table" then return tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = indent .. "  " .. k .. " = " .. lua_source(v[k], indent .. "  ") .. "," end
  return "{\n" .. table.concat(out, "\n") .. "\n" .. indent .. "}"
end

-- Write sandbox.lua, sandbox-device.lua and (with the openssl command)
-- sandbox-cert.lua profiles into dir; returns their paths.
function M.write_profiles(self)
  local paths = {}
  for _, kind in ipairs { false, "device", self.client_cert and "cert" or nil } do
    local path = self.dir .. "/sandbox" .. (kind and ("-" .. kind) or "") .. ".lua"
    assert(write(path, "-- written by oauthmail sandbox\nreturn " .. lua_source(M.profile(self, kind or nil)) .. "\n", 384))
    paths[#paths + 1] = path
  end
  return paths[1], paths[2], paths[3]
end

-- ------------------------------------------------------------ serving

-- How often run(until_fn) asks until_fn, and how long stop() gives the
-- conversations in progress before run() ends them.
local UNTIL_TICK = 0.05
local GRACE = 1
local STOPPED = setmetatable({}, { __tostring = function() return "oauthmail.sandbox: stopped" end })

-- sb:serve(): the sandbox's tasks - one accepting on each listener, then one
-- per connection - join the running oauthmail.run (or the next one), so a
-- process can host the sandbox and a mailer sending to it in one loop. Serve
-- until sb:stop() (or POST /stop on the control port): the listeners stop
-- accepting at once; conversations in progress end with their clients (QUIT,
-- a close) or after their idle timeout (SMTP 120 s, HTTP 30 s).
function M.serve(self)
  if self.state and not self.state.stopping then error("sandbox:serve: already serving", 2) end
  local st = serve.state()
  self.state = st
  serve.listen(st, self.idp_l, idp_mod.http_handler(function(req) return self.idp:route(req) end))
  serve.listen(st, self.smtp_l, function(c) return self.smtp:session(c) end)
  serve.listen(st, self.control_l, idp_mod.http_handler(function(req) return M.control(self, req) end))
end

-- sb:stop(): stop accepting; wakes whoever waits in run().
function M.stop(self)
  local st = self.state
  if not st or st.stopping then return end
  st.stopping = true
  st.idle:signal()
  for _, l in ipairs { self.idp_l, self.smtp_l, self.control_l } do serve.wake(l) end
end

-- sb:run([until_fn]): run oauthmail's loop with the sandbox's tasks until
-- sb:stop() (POST /stop) or until until_fn() returns true; until_fn is asked
-- at the start and then every UNTIL_TICK seconds (a timer: no socket is
-- polled). Conversations still open GRACE seconds after the stop are closed.
-- Not inside oauthmail.run: there, use sb:serve().
function M.run(self, until_fn)
  if loop.running() then error("sandbox:run: already inside oauthmail.run (use sb:serve() there)", 2) end
  local ok, err = pcall(loop.run, function()
    M.serve(self)
    local st = self.state
    while not st.stopping do
      if until_fn and until_fn() then M.stop(self) break end
      st.idle:wait(wait.now() + (until_fn and UNTIL_TICK or 3600))
    end
    local deadline = wait.now() + GRACE
    while st.live > 0 and wait.now() < deadline do st.idle:wait(deadline) end
    if st.live > 0 then error(STOPPED, 0) end   -- ends the loop and the tasks left in it
  end)
  local st = self.state
  if st then
    for c in pairs(st.open) do c:close() end
    st.open = {}
  end
  if not ok and err ~= STOPPED then error(err, 0) end
end

-- sb:close(): stop, and close the listeners.
function M.close(self)
  M.stop(self)
  for _, l in ipairs { self.idp_l, self.smtp_l, self.control_l } do pcall(l.close, l) end
end

return M
