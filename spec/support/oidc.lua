-- spec/support/oidc.lua — the Lua side of the oidc-provider harness
-- (spec/peers/oidc.mjs): makes the client secrets and keys at run time,
-- starts the provider on loopback over HTTPS with the test CA, and drives its
-- test routes (scripted browser, device approval, canned answers, counters)
-- with plain HTTP/1.0 requests over oauthmail.conn.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"

local M = {}

local function run(cmd)
  local ok, out = h.exec(cmd)
  if not ok then error("command failed: " .. cmd .. "\n" .. out, 2) end
  return out
end

local function random_secret(prefix)
  local f = assert(io.open("/dev/urandom", "rb"))
  local raw = f:read(12)
  f:close()
  return prefix .. raw:gsub(".", function(c) return string.format("%02x", c:byte()) end)
end

-- An RSA key pair and a self-signed certificate for private_key_jwt (what a
-- tenant uploads to its app registration), made fresh for this run.
function M.make_client_cert(dir, name)
  local key, cert, pub = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".crt", dir .. "/" .. name .. ".pub"
  run("openssl req -x509 -newkey rsa:2048 -nodes -keyout " .. key .. " -out " .. cert
    .. " -days 2 -subj '/CN=" .. name .. "' 2>&1")
  run("openssl pkey -in " .. key .. " -pubout -out " .. pub)
  return { key = key, cert = cert, pub = pub }
end

-- One HTTP/1.0 exchange with a test peer's control routes (the provider's
-- /test/*, fault_http's /_scenario); returns status, decoded JSON body.
-- srv needs .port and .ca.
local function request(srv, method, path, body)
  return h.http_json({ port = srv.port, ca_file = srv.ca, timeout = 20 }, method, path, body)
end

M.request = request

-- Start spec/peers/fault_http.mjs over HTTPS with the test CA.
-- Returns {url, port, ca, stop(), queue(path, responses), requests(path)}.
function M.start_fault()
  local c = certs.get()
  local stub = { ca = c.ca }
  stub.proc = h.spawn("node fault_http.mjs --cert " .. h.quote(c.server.cert) .. " --key " .. h.quote(c.server.key), {
    cwd = h.peers, ready = "fault_http listening on port (%d+)", timeout = 30,
  })
  stub.port = tonumber(stub.proc.match[1])
  stub.url = "https://127.0.0.1:" .. stub.port
  function stub.stop() stub.proc.stop() end
  function stub.queue(path, responses)
    local status = request(stub, "POST", "/_scenario", { path = path, responses = responses })
    assert(status == 200, "fault_http refused the scenario")
  end
  function stub.reset()
    request(stub, "DELETE", "/_scenario")
    request(stub, "DELETE", "/_requests")
  end
  -- The requests the stub received for path, with the form body decoded.
  function stub.requests(path)
    local endpoint = require "oauthmail.oauth2.endpoint"
    local _, list = request(stub, "GET", "/_requests")
    local out = {}
    for _, r in ipairs(list) do
      if r.path == path then
        out[#out + 1] = { headers = r.headers, body = r.body, form = endpoint.parse_query(r.body or "") }
      end
    end
    return out
  end
  return stub
end

-- Start the provider with one client per flow. Returns a server table.
-- oidc.start([opts]): opts.code_ttl shortens authorization codes, opts.access_ttl
-- client-credentials access tokens (seconds).
function M.start(opts)
  opts = opts or {}
  local dir = h.tmpdir()
  local c = certs.get()
  local srv = { dir = dir, ca = c.ca, secrets = {}, keys = {} }
  srv.secrets.basic = random_secret("b:s+e c%r/e&t=") -- every character form-urlencoding must handle
  srv.secrets.post = random_secret("post-secret-")
  srv.secrets.web = random_secret("web-secret-")
  srv.keys.jwt = M.make_client_cert(dir, "client-jwt")
  srv.keys.wrong = M.make_client_cert(dir, "client-wrong")
  local none = { grant_types = { "client_credentials" }, response_types = {}, redirect_uris = {} }
  local function cc(t)
    for k, v in pairs(none) do if t[k] == nil then t[k] = v end end
    return t
  end
  srv.keys.mtls_self = M.make_client_cert(dir, "client-mtls-self")
  srv.keys.mtls_ca = c.client   -- signed by the test CA, CN "oauthmail test client"
  local clients = {
    cc { client_id = "cc-mtls", token_endpoint_auth_method = "tls_client_auth",
      tls_client_auth_subject_dn = "CN=oauthmail test client" },
    cc { client_id = "cc-mtls-self", token_endpoint_auth_method = "self_signed_tls_client_auth",
      jwks_cert = { srv.keys.mtls_self.cert } },
    cc { client_id = "cc-basic", client_secret = srv.secrets.basic, token_endpoint_auth_method = "client_secret_basic" },
    cc { client_id = "cc-post", client_secret = srv.secrets.post, token_endpoint_auth_method = "client_secret_post" },
    cc { client_id = "cc-jwt", token_endpoint_auth_method = "private_key_jwt", jwks_pem = { srv.keys.jwt.pub } },
    { client_id = "native", application_type = "native", token_endpoint_auth_method = "none",
      grant_types = { "authorization_code", "refresh_token" }, response_types = { "code" },
      redirect_uris = { "http://127.0.0.1/", "http://127.0.0.1/callback" } },
    { client_id = "web", application_type = "native", client_secret = srv.secrets.web,
      token_endpoint_auth_method = "client_secret_post",
      grant_types = { "authorization_code", "refresh_token" }, response_types = { "code" },
      redirect_uris = { "http://127.0.0.1/" } },
    { client_id = "device", application_type = "native", token_endpoint_auth_method = "none",
      grant_types = { "urn:ietf:params:oauth:grant-type:device_code", "refresh_token" }, response_types = {},
      redirect_uris = {} },
  }
  local conf = dir .. "/oidc.json"
  h.write_file(conf, cjson.encode { cert = c.server.cert, key = c.server.key, ca = c.ca, clients = clients,
                                    code_ttl = opts.code_ttl, access_ttl = opts.access_ttl })
  srv.proc = h.spawn("node " .. h.quote(h.peers .. "/oidc.mjs") .. " " .. h.quote(conf), {
    cwd = h.peers, ready = "OIDC READY (https://127%.0%.0%.1:(%d+))", timeout = 90,  -- node starts slowly on a busy 2-core machine
  })
  srv.issuer = srv.proc.match[1]
  srv.port = tonumber(srv.proc.match[2])
  srv.token_endpoint = srv.issuer .. "/token"

  function srv.stop() srv.proc.stop() end

  -- A flow config for one of the registered clients.
  function srv.cfg(client, extra)
    local t = {
      issuer = srv.issuer, ca_file = srv.ca, timeout = 15, client_id = client,
      token_endpoint = srv.issuer .. "/token",
      authorization_endpoint = srv.issuer .. "/auth",
      device_authorization_endpoint = srv.issuer .. "/device/auth",
      revocation_endpoint = srv.issuer .. "/token/revocation",
    }
    if client == "cc-basic" then
      t.client_secret, t.client_auth, t.scope = srv.secrets.basic, "client_secret_basic", "mail.send"
    elseif client == "cc-post" then
      t.client_secret, t.client_auth, t.scope = srv.secrets.post, "client_secret_post", "mail.send"
    elseif client == "cc-jwt" then
      t.client_auth, t.scope = "private_key_jwt", "mail.send"
      t.client_certificate = { cert = srv.keys.jwt.cert, key = srv.keys.jwt.key }
    elseif client == "web" then
      t.client_secret, t.client_auth, t.scope = srv.secrets.web, "client_secret_post", "openid offline_access"
      t.prompt = "consent"
    else
      t.client_auth, t.scope = "none", "openid offline_access"
      -- OpenID Connect keeps offline_access only when consent is prompted for.
      if client == "native" then t.prompt = "consent" end
    end
    for k, v in pairs(extra or {}) do t[k] = v end
    return t
  end

  function srv.request(method, path, body) return request(srv, method, path, body) end

  -- Play the user's browser for an authorization URL. follow=true: returns at
  -- once and delivers the final redirect to the loopback listener in the
  -- background; follow=false: returns {location=} of that redirect.
  function srv.browse(url, decision, follow)
    local status, doc = request(srv, "POST", "/test/browse", { url = url, decision = decision or "approve", follow = follow ~= false })
    assert(status == 200 or status == 202, "browse failed: " .. tostring(status) .. " " .. cjson.encode(doc))
    return doc
  end

  function srv.device(user_code, decision)
    local status, doc = request(srv, "POST", "/test/device", { user_code = user_code, decision = decision or "approve" })
    assert(status == 200, "device approval failed: " .. tostring(status))
    return doc
  end

  -- The next requests to `path` get these canned answers ({status=, headers=, body=});
  -- clear=true first drops answers still queued for path.
  function srv.inject(path, responses, clear)
    local status = request(srv, "POST", "/test/inject", { path = path, responses = responses, clear = clear or nil })
    assert(status == 200)
  end

  function srv.stats()
    local status, doc = request(srv, "GET", "/test/stats")
    assert(status == 200)
    return doc
  end

  -- Wait (bounded) until the background browser has finished.
  function srv.wait_browse(timeout)
    local deadline = h.now() + (timeout or 15)
    repeat
      local lb = srv.stats().last_browse
      if type(lb) == "table" and not lb.pending then return lb end
      h.sleep(0.05)
    until h.now() > deadline
    error("the scripted browser did not finish")
  end

  return srv
end

return M
