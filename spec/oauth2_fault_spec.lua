-- spec/oauth2_fault_spec.lua — the OAuth2 flows against the fault-injecting
-- HTTPS stub (spec/peers/fault_http.mjs): bounded retries on 429/503 with
-- Retry-After, malformed answers, a server that never answers, and the grants
-- oidc-provider does not implement (jwt_bearer, password), whose request
-- shape the stub records.
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local crypto = require "oauthmail.crypto"
local oauth2 = require "oauthmail.oauth2"
local endpoint = require "oauthmail.oauth2.endpoint"
local cjson = require "cjson"

local SECRET = "fault-client-secret-42"
local TOKEN = { access_token = "fault-access-token-0123456789", token_type = "Bearer", expires_in = 600 }

local function sleeper()
  local waits = {}
  return setmetatable({ waits = waits }, { __call = function(_, s) waits[#waits + 1] = s end })
end

describe("oauth2 against the fault stub", function()
  local stub

  setup(function()
    stub = oidc.start_fault()
  end)

  teardown(function()
    if stub then stub.stop() end
    h.stop_all()
  end)

  before_each(function()
    stub.reset()
  end)

  local function cfg(extra)
    local t = {
      client_id = "fault-client", client_secret = SECRET, scope = "https://outlook.office365.com/.default",
      token_endpoint = stub.url .. "/token", ca_file = stub.ca, timeout = 5,
    }
    for k, v in pairs(extra or {}) do t[k] = v end
    return t
  end

  it("waits as Retry-After says on 429, then succeeds", function()
    local s = sleeper()
    local trace = h.trace_collector()
    stub.queue("/token", { { status = 429, headers = { ["Retry-After"] = "3" }, json = { error = "throttled" } },
      { json = TOKEN } })
    local tok, err = oauth2.client_credentials(cfg { sleep = s, trace = trace })
    assert.is_nil(err)
    assert.equal(TOKEN.access_token, tok.access_token)
    assert.same({ 3 }, s.waits)
    assert.equal(2, #stub.requests("/token"))
    h.assert_no_secrets(trace.text(), { SECRET, TOKEN.access_token })
  end)

  it("retries a 503 whose Retry-After is an HTTP date, then succeeds", function()
    local s = sleeper()
    local date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 3)
    stub.queue("/token", { { status = 503, headers = { ["Retry-After"] = date }, body = "<html>busy</html>" },
      { json = TOKEN } })
    local tok, err = oauth2.client_credentials(cfg { sleep = s })
    assert.is_nil(err)
    assert.truthy(tok.access_token)
    assert.equal(1, #s.waits)
    assert.is_true(s.waits[1] >= 1 and s.waits[1] <= 4)
  end)

  it("backs off on a 503 without Retry-After and stops after the configured attempts", function()
    local s = sleeper()
    local busy = { status = 503, json = { error = "temporarily_unavailable" } }
    stub.queue("/token", { busy, busy, busy })
    local tok, err = oauth2.client_credentials(cfg { sleep = s, retry = { attempts = 3, max_wait = 30 } })
    assert.is_nil(tok)
    assert.equal("oauth", err.kind)
    assert.equal(503, err.status)
    assert.is_true(err.retryable)
    assert.same({ 1, 2 }, s.waits)
    assert.equal(3, #stub.requests("/token"))
  end)

  it("does not wait past max_wait", function()
    local s = sleeper()
    stub.queue("/token", { { status = 429, headers = { ["Retry-After"] = "120" }, json = { error = "throttled" } } })
    local tok, err = oauth2.client_credentials(cfg { sleep = s, retry = { attempts = 3, max_wait = 30 } })
    assert.is_nil(tok)
    assert.equal(429, err.status)
    assert.equal(120, err.retry_after)
    assert.truthy(err.message:find("retry budget", 1, true))
    assert.same({}, s.waits)
    assert.equal(1, #stub.requests("/token"))
  end)

  it("does not retry invalid_grant", function()
    local s = sleeper()
    stub.queue("/token", { { status = 400, json = { error = "invalid_grant", error_description = "AADSTS70008: expired" } } })
    local tok, err = oauth2.refresh(cfg { sleep = s }, "refresh-token-abcdef")
    assert.is_nil(tok)
    assert.equal("invalid_grant", err.oauth_error)
    assert.equal("AADSTS70008", err.provider_code)
    assert.is_false(err.retryable)
    assert.same({}, s.waits)
  end)

  it("reports malformed JSON clearly, quoting a redacted, truncated body", function()
    local body = '{"access_token": "leakyleakyleakyleakyleaky0123", "expires_in": ' .. string.rep(" ", 500)
    stub.queue("/token", { { status = 200, headers = { ["Content-Type"] = "application/json" }, body = body } })
    local tok, err = oauth2.client_credentials(cfg())
    assert.is_nil(tok)
    assert.equal("malformed", err.reason)
    assert.truthy(err.message:find("not JSON", 1, true))
    assert.truthy(err.message:find("expires_in", 1, true))
    assert.is_true(#err.message < 400)
    h.assert_no_secrets(tostring(err), { "leakyleakyleakyleakyleaky0123" })
  end)

  it("times out on a server that never answers, as a retryable network error", function()
    local s = sleeper()
    local t0 = h.now()
    local tok, err = oauth2.client_credentials(cfg {
      token_endpoint = stub.url .. "/hang", timeout = 1, sleep = s, retry = { attempts = 2 },
    })
    assert.is_nil(tok)
    assert.equal("network", err.kind)
    assert.is_true(err.retryable)
    assert.same({ 1 }, s.waits)
    assert.equal(2, #stub.requests("/hang"))
    assert.is_true(h.now() - t0 < 30)
  end)

  it("sends the password grant with username, password, scope and basic client auth", function()
    local trace = h.trace_collector()
    stub.queue("/token", { { json = TOKEN } })
    local tok, err = oauth2.run(cfg {
      grant = "password", allow_password_grant = true, username = "user@contoso.test",
      password = "pass word&=1+x", trace = trace,
    })
    assert.is_nil(err)
    assert.equal(TOKEN.access_token, tok.access_token)
    local req = stub.requests("/token")[1]
    assert.equal("password", req.form.grant_type)
    assert.equal("user@contoso.test", req.form.username)
    assert.equal("pass word&=1+x", req.form.password)
    assert.equal("https://outlook.office365.com/.default", req.form.scope)
    assert.is_nil(req.form.client_secret)
    local basic = crypto.b64decode(req.headers.authorization:match("^Basic (.+)$"))
    assert.equal("fault-client:" .. SECRET, basic)
    h.assert_no_secrets(trace.text(), { "pass word&=1+x", SECRET, TOKEN.access_token })
  end)

  it("refuses the password grant unless allowed, before any request", function()
    local tok, err = oauth2.run(cfg { grant = "password", username = "u", password = "p" })
    assert.is_nil(tok)
    assert.equal("config", err.kind)
    assert.equal("password_grant", err.reason)
    assert.equal(0, #stub.requests("/token"))
  end)

  describe("jwt_bearer", function()
    local function service_account()
      local dir = h.tmpdir()
      local keys = oidc.make_client_cert(dir, "sa")
      local path = h.write_file(dir .. "/sa.json", cjson.encode {
        type = "service_account", client_email = "mailer@project.iam.gserviceaccount.com",
        private_key_id = "sa-key-id-1", private_key = h.read_file(keys.key),
        token_uri = stub.url .. "/google-token",
      })
      return path, keys
    end

    it("sends an RS256 assertion with Google's claims, verifiable with the public key", function()
      local trace = h.trace_collector()
      local path, keys = service_account()
      stub.queue("/google-token", { { json = { access_token = "ya29.fault-google-token", expires_in = 3599, token_type = "Bearer" } } })
      local tok, err = oauth2.run { grant = "jwt_bearer", service_account_file = path, ca_file = stub.ca,
        scope = { "https://mail.google.com/" }, subject = "user@example.test", trace = trace }
      assert.is_nil(err)
      assert.equal("ya29.fault-google-token", tok.access_token)
      local req = stub.requests("/google-token")[1]
      assert.equal("urn:ietf:params:oauth:grant-type:jwt-bearer", req.form.grant_type)
      assert.is_nil(req.headers.authorization)
      local assertion = req.form.assertion
      local header, claims = crypto.jwt_decode(assertion)
      assert.equal("RS256", header.alg)
      assert.equal("sa-key-id-1", header.kid)
      assert.equal("mailer@project.iam.gserviceaccount.com", claims.iss)
      assert.equal("https://mail.google.com/", claims.scope)
      assert.equal(stub.url .. "/google-token", claims.aud)
      assert.equal("user@example.test", claims.sub)
      assert.is_true(claims.exp - claims.iat <= 3600 and claims.exp > claims.iat)
      -- the signature checks out with openssl, independently of our crypto
      local dir = h.tmpdir()
      local input, sig = assertion:match("^([^.]+%.[^.]+)%.([^.]+)$")
      h.write_file(dir .. "/input", input)
      h.write_file(dir .. "/sig", crypto.b64url_decode(sig))
      local ok, out = h.exec("openssl dgst -sha256 -verify " .. keys.pub .. " -signature " .. dir .. "/sig " .. dir .. "/input")
      assert.is_true(ok, out)
      h.assert_no_secrets(trace.text(), { assertion, tok.access_token })
    end)

    it("passes an invalid_grant answer through as an oauth error", function()
      local path = service_account()
      stub.queue("/google-token", { { status = 400, json = { error = "invalid_grant", error_description = "Invalid JWT Signature." } } })
      local tok, err = oauth2.jwt_bearer { service_account_file = path, ca_file = stub.ca, scope = "https://mail.google.com/" }
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
      assert.equal("Invalid JWT Signature.", err.message)
    end)

    it("returns a config error for a missing or malformed key file", function()
      local _, e1 = oauth2.jwt_bearer { service_account_file = "/nonexistent.json" }
      assert.equal("config", e1.kind)
      local bad = h.write_file(h.tmpdir() .. "/bad.json", "{\"client_email\": 1}")
      local _, e2 = oauth2.jwt_bearer { service_account_file = bad }
      assert.equal("config", e2.kind)
    end)
  end)

  it("leaves the form encoding to one function (RFC 6749 appendix B)", function()
    assert.equal("grant_type=password&username=a%40b", endpoint.form { { "grant_type", "password" }, { "username", "a@b" } })
  end)
end)
