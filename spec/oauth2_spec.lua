-- spec/oauth2_spec.lua — every OAuth2 flow against the real oidc-provider
-- (spec/peers/oidc.mjs) on loopback over HTTPS: client credentials (basic,
-- post, private_key_jwt PS256/RS256), authorization code + PKCE with the
-- loopback redirect and the manual paste mode, device code, refresh with
-- rotation, revocation, discovery; and the failure paths, several of them
-- through canned answers the harness injects (429/503/slow_down/malformed).
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local oauth2 = require "oauthmail.oauth2"
local endpoint = require "oauthmail.oauth2.endpoint"

local RESOURCE = "urn:oauthmail:test:mail"

local function query_of(url) return endpoint.parse_query(url:match("%?(.*)$") or "") end

local function near_now(expires_at, lifetime)
  local now = os.time()
  return expires_at >= now + lifetime - 60 and expires_at <= now + lifetime + 5
end

-- The requests that received injected answers, decoded.
local function recorded(srv, path)
  local out = {}
  for _, r in ipairs(srv.stats().injected_requests) do
    if r.path == path then
      out[#out + 1] = { headers = r.headers, form = endpoint.parse_query(r.body), body = r.body }
    end
  end
  return out
end

local function sleeper()
  local waits = {}
  local s = setmetatable({ waits = waits }, { __call = function(self, secs)
    waits[#waits + 1] = secs
    if self.hook then self.hook(#waits, secs) end
  end })
  return s
end

describe("oauth2 against oidc-provider", function()
  local srv

  setup(function()
    srv = oidc.start()
  end)

  teardown(function()
    if srv then srv.stop() end
    h.stop_all()
  end)

  describe("client_credentials", function()
    it("authenticates with client_secret_basic, form-urlencoding id and secret first", function()
      local trace = h.trace_collector()
      local tok, err = oauth2.client_credentials(srv.cfg("cc-basic", { trace = trace }))
      assert.is_nil(err)
      assert.equal("Bearer", tok.token_type)
      assert.equal("mail.send", tok.scope)
      assert.is_true(near_now(tok.expires_at, 3600))
      assert.matches("^%d+$", tostring(tok.expires_at))  -- whole epoch seconds, no "1.7e9" or ".0"
      local _, claims = crypto.jwt_decode(tok.access_token)
      assert.equal(RESOURCE, claims.aud)
      assert.equal("cc-basic", claims.client_id)
      assert.truthy(trace.text():find("token", 1, true))
      h.assert_no_secrets(trace.text(), { srv.secrets.basic, tok.access_token })
    end)

    it("authenticates with client_secret_post", function()
      local trace = h.trace_collector()
      local tok, err = oauth2.client_credentials(srv.cfg("cc-post", { trace = trace }))
      assert.is_nil(err)
      local _, claims = crypto.jwt_decode(tok.access_token)
      assert.equal("cc-post", claims.client_id)
      h.assert_no_secrets(trace.text(), { srv.secrets.post, tok.access_token })
    end)

    for _, alg in ipairs { "PS256", "RS256" } do
      it("authenticates with private_key_jwt signed " .. alg, function()
        local trace = h.trace_collector()
        local cfg = srv.cfg("cc-jwt", { trace = trace })
        cfg.client_certificate.alg = alg
        local tok, err = oauth2.client_credentials(cfg)
        assert.is_nil(err)
        local _, claims = crypto.jwt_decode(tok.access_token)
        assert.equal("cc-jwt", claims.client_id)
        h.assert_no_secrets(trace.text(), { tok.access_token })
      end)
    end

    it("builds the RFC 7523 client assertion: aud, iss, sub, unique jti, short exp, x5t and x5t#S256", function()
      local trace = h.trace_collector()
      local tok = { access_token = "injected-access-token-0001", expires_in = 120, token_type = "Bearer" }
      srv.inject("/cc-token", { { body = tok }, { body = tok } })
      local cfg = srv.cfg("cc-jwt", { token_endpoint = srv.issuer .. "/cc-token", trace = trace })
      assert(oauth2.client_credentials(cfg))
      assert(oauth2.client_credentials(cfg))
      local reqs = recorded(srv, "/cc-token")
      assert.equal(2, #reqs)
      local cert = h.read_file(srv.keys.jwt.cert)
      local jtis = {}
      for _, r in ipairs(reqs) do
        assert.equal("client_credentials", r.form.grant_type)
        assert.equal("urn:ietf:params:oauth:client-assertion-type:jwt-bearer", r.form.client_assertion_type)
        local header, claims = crypto.jwt_decode(r.form.client_assertion)
        assert.equal("PS256", header.alg)
        assert.equal(crypto.x5t_s256(cert), header["x5t#S256"])
        assert.equal(crypto.x5t(cert), header.x5t)
        assert.equal(srv.issuer .. "/cc-token", claims.aud)
        assert.equal("cc-jwt", claims.iss)
        assert.equal("cc-jwt", claims.sub)
        assert.is_true(claims.exp - claims.iat <= 600 and claims.exp > claims.iat)
        assert.is_true(claims.nbf <= claims.iat + 1)
        assert.is_nil(jtis[claims.jti])
        jtis[claims.jti] = true
        h.assert_no_secrets(trace.text(), { r.form.client_assertion })
      end
      h.assert_no_secrets(trace.text(), { tok.access_token })
    end)

    it("reports a wrong secret as invalid_client, not retryable, without the secret", function()
      local trace = h.trace_collector()
      local before = srv.stats().token_requests
      local tok, err = oauth2.client_credentials(srv.cfg("cc-basic", { client_secret = "wrong-secret-123", trace = trace }))
      assert.is_nil(tok)
      assert.is_true(errors.is(err))
      assert.equal("oauth", err.kind)
      assert.equal("invalid_client", err.oauth_error)
      assert.equal(401, err.status)
      assert.is_false(err.retryable)
      assert.equal(before + 1, srv.stats().token_requests) -- not retried
      h.assert_no_secrets(trace.text() .. tostring(err), { "wrong-secret-123", srv.secrets.basic })
    end)

    it("reports an assertion signed with the wrong key as invalid_client", function()
      local cfg = srv.cfg("cc-jwt")
      cfg.client_certificate = { cert = srv.keys.wrong.cert, key = srv.keys.wrong.key }
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(tok)
      assert.equal("invalid_client", err.oauth_error)
      assert.is_false(err.retryable)
    end)

    -- RFC 8705: the per-machine credential an administrator can revoke is a TLS client certificate
    it("authenticates with tls_client_auth: a CA-issued client certificate whose subject is registered", function()
      local trace = h.trace_collector()
      local cfg = srv.cfg("cc-mtls", { client_auth = "tls_client_auth", scope = "mail.send", trace = trace,
        client_certificate = { cert = srv.keys.mtls_ca.cert, key = srv.keys.mtls_ca.key } })
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(err)
      local _, claims = crypto.jwt_decode(tok.access_token)
      assert.equal("cc-mtls", claims.client_id)
      local text = trace.text()
      assert.truthy(text:find("client_id=cc-mtls", 1, true), text)
      assert.is_nil(text:find("client_secret", 1, true))
      assert.is_nil(text:find("client_assertion", 1, true))
      h.assert_no_secrets(text, { tok.access_token })
    end)

    it("refuses tls_client_auth with a certificate the CA did not issue, and without a certificate", function()
      local cfg = srv.cfg("cc-mtls", { client_auth = "tls_client_auth", scope = "mail.send",
        client_certificate = { cert = srv.keys.mtls_self.cert, key = srv.keys.mtls_self.key } })
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(tok)
      assert.equal("invalid_client", err.oauth_error)
      assert.is_false(err.retryable)
      local before = srv.stats().token_requests
      tok, err = oauth2.client_credentials(srv.cfg("cc-mtls", { client_auth = "tls_client_auth", scope = "mail.send" }))
      assert.is_nil(tok)
      assert.equal("config", err.kind)
      assert.truthy(err.message:find("TLS client certificate", 1, true), err.message)
      assert.equal(before, srv.stats().token_requests)   -- refused before any request
    end)

    it("authenticates with self_signed_tls_client_auth: the registered certificate only", function()
      local cfg = srv.cfg("cc-mtls-self", { client_auth = "self_signed_tls_client_auth", scope = "mail.send",
        client_certificate = { cert = srv.keys.mtls_self.cert, key = srv.keys.mtls_self.key } })
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(err)
      local _, claims = crypto.jwt_decode(tok.access_token)
      assert.equal("cc-mtls-self", claims.client_id)
      cfg.client_certificate = { cert = srv.keys.wrong.cert, key = srv.keys.wrong.key }
      tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(tok)
      assert.equal("invalid_client", err.oauth_error)
    end)

    it("returns a config error for an unreadable client key", function()
      local cfg = srv.cfg("cc-jwt")
      cfg.client_certificate = { key = "/nonexistent/key.pem" }
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(tok)
      assert.equal("config", err.kind)
    end)

    it("fills the endpoints from discovery when only issuer is given", function()
      local cfg = srv.cfg("cc-post")
      cfg.token_endpoint = nil
      local tok, err = oauth2.client_credentials(cfg)
      assert.is_nil(err)
      assert.truthy(tok.access_token)
    end)

    it("raises on bad arguments", function()
      assert.has_error(function() oauth2.client_credentials("cc-basic") end)
      assert.has_error(function() oauth2.client_credentials({ client_id = 42 }) end)
      assert.has_error(function() oauth2.client_credentials({ client_id = "x", scope = 7 }) end)
    end)
  end)

  describe("authorization_code", function()
    it("runs PKCE S256 with a loopback redirect and exchanges the code", function()
      local trace = h.trace_collector()
      local before = srv.stats().token_requests
      local seen
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        trace = trace, wait_timeout = 30,
        open_url = function(url) seen = url srv.browse(url) end,
      }))
      assert.is_nil(err)
      local q = query_of(seen)
      assert.equal("code", q.response_type)
      assert.equal("native", q.client_id)
      assert.equal("S256", q.code_challenge_method)
      assert.truthy(q.redirect_uri:match("^http://127%.0%.0%.1:%d+/$"))
      assert.equal("openid offline_access", q.scope)
      assert.is_true(#q.state >= 16)
      assert.is_true(#q.nonce >= 16)
      assert.truthy(tok.refresh_token)
      local _, idc = crypto.jwt_decode(tok.id_token)
      assert.equal(q.nonce, idc.nonce)
      assert.equal("testuser", idc.sub)
      assert.equal(before + 1, srv.stats().token_requests)
      local browsed = srv.wait_browse()
      assert.equal(200, browsed.delivered)
      assert.truthy(browsed.page:find("Signed in", 1, true))
      local code = query_of(browsed.location).code
      h.assert_no_secrets(trace.text(), { code, tok.access_token, tok.refresh_token, tok.id_token })
    end)

    it("sends the verifier that matches the challenge, the code and the redirect_uri", function()
      local trace = h.trace_collector()
      local seen
      srv.inject("/token", { { body = { access_token = "injected-access-token-0002", token_type = "Bearer" } } })
      local tok, err = oauth2.authorization_code(srv.cfg("web", {
        trace = trace, wait_timeout = 30, redirect_uri = "http://127.0.0.1/",
        open_url = function(url) seen = url srv.browse(url) end,
      }))
      assert.is_nil(err)
      assert.is_true(near_now(tok.expires_at, 3600)) -- no expires_in: one hour assumed
      local req = recorded(srv, "/token")
      req = req[#req]
      local q = query_of(seen)
      assert.equal("authorization_code", req.form.grant_type)
      assert.equal(q.redirect_uri, req.form.redirect_uri)
      assert.equal(q.code_challenge, crypto.b64url_encode(crypto.sha256(req.form.code_verifier)))
      assert.equal(srv.secrets.web, req.form.client_secret)
      local code = query_of(srv.wait_browse().location).code
      assert.equal(code, req.form.code)
      h.assert_no_secrets(trace.text(), { code, req.form.code_verifier, srv.secrets.web, tok.access_token })
    end)

    it("launches browser_command detached and listens on a configured path", function()
      local cmd = "node " .. h.quote(h.peers .. "/oidc.mjs") .. " --open " .. h.quote(srv.issuer) .. " " .. h.quote(srv.ca)
      local prompt
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        browser_command = cmd, redirect_path = "/callback", wait_timeout = 30,
        on_prompt = function(_, url) prompt = url end,
      }))
      assert.is_nil(err)
      assert.truthy(tok.access_token)
      assert.truthy(query_of(prompt).redirect_uri:match("^http://127%.0%.0%.1:%d+/callback$"))
    end)

    it("takes the pasted redirect URL in manual mode", function()
      local trace = h.trace_collector()
      local url, pasted
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        manual = true, trace = trace,
        on_prompt = function(_, u) url = u end,
        read_line = function()
          pasted = srv.browse(url, "approve", false).location
          return "  " .. pasted .. "\n"
        end,
      }))
      assert.is_nil(err)
      assert.equal("http://127.0.0.1/", query_of(url).redirect_uri)
      assert.truthy(tok.refresh_token)
      h.assert_no_secrets(trace.text(), { query_of(pasted).code, tok.access_token, tok.refresh_token })
    end)

    it("answers 400 to a redirect whose state does not match and makes no token request (loopback)", function()
      local before = srv.stats().token_requests
      -- The flow keeps waiting after a mismatched redirect (any local page
      -- could send one); the wait then ends naming the mismatch.
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        wait_timeout = 6,
        open_url = function(url) srv.browse((url:gsub("([?&]state=)[^&]+", "%1forged-state-value"))) end,
      }))
      assert.is_nil(tok)
      assert.equal("oauth", err.kind)
      assert.equal("state_mismatch", err.reason)
      local browsed = srv.wait_browse()
      assert.equal(400, browsed.delivered)
      assert.truthy(browsed.page:find("Sign-in failed", 1, true))
      assert.equal(before, srv.stats().token_requests)
    end)

    it("refuses a pasted URL whose state does not match (manual)", function()
      local before = srv.stats().token_requests
      local url
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        manual = true,
        on_prompt = function(_, u) url = u end,
        read_line = function()
          return (srv.browse(url, "approve", false).location:gsub("([?&]state=)[^&]+", "%1other"))
        end,
      }))
      assert.is_nil(tok)
      assert.equal("state_mismatch", err.reason)
      assert.equal(before, srv.stats().token_requests)
    end)

    it("reports access_denied from the redirect without a token request", function()
      local before = srv.stats().token_requests
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        wait_timeout = 30, open_url = function(url) srv.browse(url, "deny") end,
      }))
      assert.is_nil(tok)
      assert.equal("access_denied", err.oauth_error)
      assert.equal("End-User aborted interaction", err.message)
      assert.truthy(err.hint)
      assert.equal(before, srv.stats().token_requests)
    end)

    it("fails with invalid_grant when a code is used twice", function()
      local first
      local cfg = srv.cfg("native", { manual = true })
      local url
      cfg.on_prompt = function(_, u) url = u end
      cfg.read_line = function() first = srv.browse(url, "approve", false).location return first end
      assert(oauth2.authorization_code(cfg))
      -- A second sign-in fed the first (already redeemed) code under its own state.
      cfg.read_line = function()
        return (first:gsub("([?&]state=)[^&]+", "%1" .. query_of(url).state))
      end
      local tok, err = oauth2.authorization_code(cfg)
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
      assert.is_false(err.retryable)
    end)

    it("fails with invalid_grant when the code has expired before the exchange", function()
      -- a provider of its own whose codes live one second
      local short = oidc.start { code_ttl = 1 }
      local ok, err_or_tok = pcall(function()
        local cfg = short.cfg("native", { manual = true })
        local url
        cfg.on_prompt = function(_, u) url = u end
        cfg.read_line = function()
          local redirect = short.browse(url, "approve", false).location
          h.sleep(2.5)  -- the person pastes the URL too late
          return redirect
        end
        return { oauth2.authorization_code(cfg) }
      end)
      short.stop()
      assert(ok, err_or_tok)
      local tok, err = err_or_tok[1], err_or_tok[2]
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
      assert.is_false(err.retryable)
    end)

    it("fails with invalid_grant when the verifier does not match the challenge", function()
      local other = crypto.b64url_encode(crypto.sha256("some-other-verifier-not-ours-0123456789abcdef"))
      local tok, err = oauth2.authorization_code(srv.cfg("native", {
        wait_timeout = 30,
        open_url = function(url) srv.browse((url:gsub("([?&]code_challenge=)[^&]+", "%1" .. other))) end,
      }))
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
    end)

    it("gives up after wait_timeout when no redirect comes", function()
      local t0 = h.now()
      local tok, err = oauth2.authorization_code(srv.cfg("native", { wait_timeout = 1, open_url = function() end }))
      assert.is_nil(tok)
      assert.equal("timeout", err.reason)
      assert.is_true(h.now() - t0 < 20)
    end)

    it("refuses a non-loopback redirect_uri outside manual mode", function()
      local tok, err = oauth2.authorization_code(srv.cfg("native", { redirect_uri = "https://app.example/cb" }))
      assert.is_nil(tok)
      assert.equal("config", err.kind)
    end)
  end)

  describe("device_code", function()
    local function device_cfg(extra)
      local s = sleeper()
      local info
      local cfg = srv.cfg("device", extra)
      cfg.sleep = s
      cfg.on_device_code = function(i) info = i end
      return cfg, s, function() return info end
    end

    it("shows the code, polls while pending and returns the token once approved", function()
      local trace = h.trace_collector()
      local cfg, s, info = device_cfg({ trace = trace })
      s.hook = function(n) if n == 2 then assert.is_true(srv.device(info().user_code).approved) end end
      local tok, err = oauth2.device_code(cfg)
      assert.is_nil(err)
      assert.same({ 5, 5 }, s.waits) -- default interval; first poll was pending
      assert.equal(srv.issuer .. "/device", info().verification_uri)
      assert.truthy(info().verification_uri_complete:find(info().user_code, 1, true))
      assert.equal(600, info().expires_in)
      assert.truthy(tok.refresh_token)
      h.assert_no_secrets(trace.text(), { tok.access_token, tok.refresh_token })
    end)

    it("adds 5 s to the interval on slow_down", function()
      local cfg, s, info = device_cfg()
      srv.inject("/token", { { status = 400, body = { error = "slow_down" } } })
      s.hook = function(n) if n == 2 then srv.device(info().user_code) end end
      local tok, err = oauth2.device_code(cfg)
      assert.is_nil(err)
      assert.truthy(tok.access_token)
      assert.same({ 5, 10 }, s.waits)
    end)

    it("stops with a clear error when the user denies", function()
      local cfg, s, info = device_cfg()
      s.hook = function(n) if n == 1 then srv.device(info().user_code, "deny") end end
      local tok, err = oauth2.device_code(cfg)
      assert.is_nil(tok)
      assert.equal("access_denied", err.oauth_error)
      assert.truthy(err.message:find("denied", 1, true))
      assert.equal(1, #s.waits)
    end)

    it("stops on expired_token", function()
      local cfg = device_cfg()
      srv.inject("/token", { { status = 400, body = { error = "expired_token" } } })
      local tok, err = oauth2.device_code(cfg)
      assert.is_nil(tok)
      assert.equal("expired_token", err.oauth_error)
      assert.truthy(err.message:find("expired", 1, true))
    end)

    it("stops at the deadline the server gave (expires_in)", function()
      local cfg = device_cfg()
      cfg.sleep = function(s) h.sleep(s) end
      srv.inject("/device/auth", { { body = { device_code = "fake-device-code-1", user_code = "ABCD-EFGH",
        verification_uri = srv.issuer .. "/device", expires_in = 2, interval = 1 } } })
      local pending = { status = 400, body = { error = "authorization_pending" } }
      srv.inject("/token", { pending, pending, pending })
      local t0 = h.now()
      local tok, err = oauth2.device_code(cfg)
      srv.inject("/token", {}, true)
      assert.is_nil(tok)
      assert.equal("timeout", err.reason)
      assert.equal("expired_token", err.oauth_error)
      assert.is_true(h.now() - t0 < 20)
    end)
  end)

  describe("refresh and revocation", function()
    local function sign_in()
      local url
      local cfg = srv.cfg("native", { manual = true })
      cfg.on_prompt = function(_, u) url = u end
      cfg.read_line = function() return srv.browse(url, "approve", false).location end
      return assert(oauth2.authorization_code(cfg)), cfg
    end

    it("rotates the refresh token; the old one is then refused", function()
      local trace = h.trace_collector()
      local tok, cfg = sign_in()
      cfg.trace = trace
      local new, err = oauth2.refresh(cfg, tok.refresh_token)
      assert.is_nil(err)
      assert.truthy(new.refresh_token)
      assert.not_equal(tok.refresh_token, new.refresh_token)
      assert.not_equal(tok.access_token, new.access_token)
      local again, err2 = oauth2.refresh(cfg, tok.refresh_token)
      assert.is_nil(again)
      assert.equal("invalid_grant", err2.oauth_error)
      assert.is_false(err2.retryable)
      h.assert_no_secrets(trace.text() .. tostring(err2), { tok.refresh_token, new.refresh_token, new.access_token })
    end)

    it("always sends scope and keeps the old refresh token when none comes back", function()
      srv.inject("/token", { { body = { access_token = "injected-access-token-0003", expires_in = 60 } } })
      local new, err = oauth2.refresh(srv.cfg("native"), "old-refresh-token-xyz")
      assert.is_nil(err)
      assert.equal("old-refresh-token-xyz", new.refresh_token)
      assert.is_true(near_now(new.expires_at, 60))
      local req = recorded(srv, "/token")
      req = req[#req]
      assert.equal("refresh_token", req.form.grant_type)
      assert.equal("old-refresh-token-xyz", req.form.refresh_token)
      assert.equal("openid offline_access", req.form.scope)
      assert.equal("native", req.form.client_id)
    end)

    it("revokes a refresh token (RFC 7009); it then fails with invalid_grant", function()
      local trace = h.trace_collector()
      local tok, cfg = sign_in()
      cfg.trace = trace
      assert.is_true(oauth2.revoke(cfg, tok.refresh_token, "refresh_token"))
      local again, err = oauth2.refresh(cfg, tok.refresh_token)
      assert.is_nil(again)
      assert.equal("invalid_grant", err.oauth_error)
      h.assert_no_secrets(trace.text(), { tok.refresh_token })
    end)

    it("raises on a bad token_type_hint", function()
      assert.has_error(function() oauth2.revoke(srv.cfg("native"), "tok", "id_token") end)
    end)
  end)

  describe("discovery", function()
    it("reads the issuer's metadata once per process", function()
      local doc, err = oauth2.discover(srv.issuer, { ca_file = srv.ca })
      assert.is_nil(err)
      assert.equal(srv.issuer .. "/token", doc.token_endpoint)
      assert.equal(srv.issuer .. "/device/auth", doc.device_authorization_endpoint)
      assert.equal(doc, oauth2.discover(srv.issuer .. "/", { ca_file = srv.ca }))
    end)

    it("refuses a document that names another issuer", function()
      srv.inject("/other/.well-known/openid-configuration", { { body = { issuer = srv.issuer, token_endpoint = "x" } } })
      local doc, err = oauth2.discover(srv.issuer .. "/other", { ca_file = srv.ca })
      assert.is_nil(doc)
      assert.equal("issuer_mismatch", err.reason)
    end)

    it("never serves a document fetched without verification to a verifying caller", function()
      require("oauthmail.oauth2.discovery").clear_cache()
      local unverified, uerr = oauth2.discover(srv.issuer, { verify = false })
      assert.is_nil(uerr)
      assert.equal(srv.issuer .. "/token", unverified.token_endpoint)
      -- The test CA is not in the system store: a verifying fetch must fail.
      local doc, err = oauth2.discover(srv.issuer)
      assert.is_nil(doc)
      assert.equal("tls", err.kind)
      local verified = assert(oauth2.discover(srv.issuer, { ca_file = srv.ca }))
      assert.equal(verified, oauth2.discover(srv.issuer .. "/", { ca_file = srv.ca }))
      assert.not_equal(unverified, verified)
    end)

    it("fills token_endpoint from the issuer for the device flow", function()
      local s = sleeper()
      local info
      local cfg = srv.cfg("device", { sleep = s, on_device_code = function(i) info = i end })
      cfg.token_endpoint = nil
      s.hook = function(n) if n == 1 then assert.is_true(srv.device(info.user_code).approved) end end
      local tok, err = oauth2.device_code(cfg)
      assert.is_nil(err)
      assert.truthy(tok.access_token)
    end)

    it("fills token_endpoint from the issuer for the browser flow", function()
      local url
      local cfg = srv.cfg("native", { manual = true, on_prompt = function(_, u) url = u end })
      cfg.token_endpoint = nil
      cfg.read_line = function() return srv.browse(url, "approve", false).location end
      local tok, err = oauth2.authorization_code(cfg)
      assert.is_nil(err)
      assert.truthy(tok.access_token)
    end)
  end)

  describe("password grant (legacy)", function()
    it("is refused unless allow_password_grant is set, with no request made", function()
      local before = srv.stats().token_requests
      local tok, err = oauth2.password(srv.cfg("cc-basic", { username = "testuser", password = "test-password" }))
      assert.is_nil(tok)
      assert.equal("config", err.kind)
      assert.truthy(err.hint)
      assert.equal(before, srv.stats().token_requests)
    end)
  end)

  describe("errors and retries", function()
    it("decodes a Microsoft-style error answer", function()
      srv.inject("/token", { { status = 401, body = {
        error = "invalid_client",
        error_description = "AADSTS7000215: Invalid client secret provided. Trace ID: t-1",
        error_codes = { 7000215 }, trace_id = "trace-123", correlation_id = "corr-456",
      } } })
      local tok, err = oauth2.client_credentials(srv.cfg("cc-post"))
      assert.is_nil(tok)
      assert.equal("AADSTS7000215", err.provider_code)
      assert.equal("trace-123", err.trace_id)
      assert.equal("corr-456", err.correlation_id)
      assert.equal(401, err.status)
      assert.is_false(err.retryable)
      assert.truthy(tostring(err):find("AADSTS7000215", 1, true))
    end)

    it("takes the provider code from error_codes when the description lacks it", function()
      srv.inject("/token", { { status = 400, body = { error = "invalid_grant", error_description = "expired", error_codes = { 70008 } } } })
      local _, err = oauth2.client_credentials(srv.cfg("cc-post"))
      assert.equal("AADSTS70008", err.provider_code)
    end)

    it("honours Retry-After on 429 and signs a fresh client assertion for the retry", function()
      local s = sleeper()
      local trace = h.trace_collector()
      local before = #recorded(srv, "/token")
      srv.inject("/token", {
        { status = 429, headers = { ["Retry-After"] = "2" }, body = { error = "too_many_requests" } },
        { body = { access_token = "injected-access-token-0005", expires_in = 60 } },
      })
      local tok, err = oauth2.client_credentials(srv.cfg("cc-jwt", { sleep = s, trace = trace }))
      assert.is_nil(err)
      assert.equal("injected-access-token-0005", tok.access_token)
      assert.same({ 2 }, s.waits)
      local reqs = recorded(srv, "/token")
      assert.equal(before + 2, #reqs)
      local a1, a2 = reqs[#reqs - 1].form.client_assertion, reqs[#reqs].form.client_assertion
      local _, c1 = crypto.jwt_decode(a1)
      local _, c2 = crypto.jwt_decode(a2)
      assert.not_equal(c1.jti, c2.jti)
      h.assert_no_secrets(trace.text(), { a1, a2, tok.access_token })
    end)
  end)

  describe("run and interactive", function()
    it("dispatches on cfg.grant", function()
      local tok, err = oauth2.run(srv.cfg("cc-basic", { grant = "client_credentials" }))
      assert.is_nil(err)
      assert.truthy(tok.access_token)
      local bad, berr = oauth2.run(srv.cfg("cc-basic", { grant = "implicit" }))
      assert.is_nil(bad)
      assert.equal("config", berr.kind)
    end)

    it("knows which grants need a person", function()
      assert.is_true(oauth2.interactive("authorization_code"))
      assert.is_true(oauth2.interactive("device_code"))
      assert.is_false(oauth2.interactive("client_credentials"))
      assert.is_false(oauth2.interactive("jwt_bearer"))
    end)
  end)
end)

describe("oauth2 helpers", function()
  it("parses Retry-After in seconds and as an HTTP date", function()
    assert.equal(7, endpoint.retry_after("7"))
    assert.equal(30, endpoint.retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111747))
    assert.equal(0, endpoint.retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784111800))
    assert.is_nil(endpoint.retry_after("soon"))
  end)

  it("form-urlencodes per RFC 6749 appendix B", function()
    assert.equal("a+b%3Ac%2Bd%25e%2F%26%3D%7E._-*", endpoint.urlencode("a b:c+d%e/&=~._-*"))
  end)
end)
