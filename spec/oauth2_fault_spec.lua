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
    -- this layer owns the retries: it says how many and how long, and marks
    -- the error so the mailer does not retry on top of it
    assert.equal(3, err.attempts)
    assert.equal("token", err.stage)
    assert.is_number(err.elapsed)
    assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
  end)

  it("tries a host name that does not exist once, and says so", function()
    local s = sleeper()
    local tok, err = oauth2.client_credentials(cfg { sleep = s, token_endpoint = "https://nonexistent.invalid/token",
      retry = { attempts = 3, max_wait = 30 } })
    assert.is_nil(tok)
    assert.equal("network", err.kind)
    assert.equal("dns", err.reason)
    assert.is_false(err.retryable)
    assert.equal(1, err.attempts)
    assert.same({}, s.waits)
    assert.matches("cannot resolve nonexistent%.invalid", err.message)
    assert.matches("%(1 attempt in %d+%.%d s%)$", err.message)
    assert.truthy(err.hint:find("host name", 1, true), err.hint)
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

  -- Review findings: each test below failed before its fix.
  describe("browser flow on a noisy loopback port", function()
    local conn = require "oauthmail.conn"
    local opened = {}

    after_each(function()
      for _, c in ipairs(opened) do c:close() end
      opened = {}
    end)

    -- The state and listener port of an authorization URL.
    local function redirect_of(url)
      local q = endpoint.parse_query(url:match("%?(.*)$"))
      return q.state, tonumber(q.redirect_uri:match("^http://127%.0%.0%.1:(%d+)/"))
    end

    -- A client of the loopback listener. The listener is already bound when
    -- open_url runs, so connections and requests made here wait in the
    -- kernel's queue until the flow accepts them, in this order.
    local function connect(port, data)
      local c = assert(conn.connect { host = "127.0.0.1", port = port, tls = "none", timeout = 10 })
      opened[#opened + 1] = c
      if data then assert(c:send(data)) end
      return c
    end

    local function answer(c)
      local chunks = {}
      while true do
        local s = c:receive_some(65536)
        if not s then break end
        chunks[#chunks + 1] = s
      end
      return table.concat(chunks)
    end

    local function get(code, state)
      return "GET /?code=" .. code .. "&state=" .. state .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    end

    local function browser_cfg(extra)
      local t = cfg { authorization_endpoint = stub.url .. "/authorize", wait_timeout = 20 }
      for k, v in pairs(extra or {}) do t[k] = v end
      return t
    end

    it("ignores a silent preconnect, garbage and a cut-off request, then takes the real redirect", function()
      local trace = h.trace_collector()
      local CODE, CUT = "real-authorization-code-000111", "cut-off-authorization-code-999"
      local real
      stub.queue("/token", { { json = TOKEN } })
      local tok, err = oauth2.authorization_code(browser_cfg {
        trace = trace,
        open_url = function(url)
          local state, port = redirect_of(url)
          connect(port):close()                        -- a preconnect that closes without a word
          connect(port, "hello\r\n")                   -- not HTTP
          connect(port, "GET /?code=" .. CUT .. "&state=" .. state):close() -- cut mid-line
          real = connect(port, get(CODE, state))
        end,
      })
      assert.is_nil(err)
      assert.equal(TOKEN.access_token, tok.access_token)
      local reqs = stub.requests("/token")
      assert.equal(1, #reqs)
      assert.equal(CODE, reqs[1].form.code)
      local page = answer(real)
      assert.truthy(page:find("^HTTP/1%.1 200"))
      assert.truthy(page:find("Signed in", 1, true))
      h.assert_no_secrets(trace.text(), { CODE, CUT, reqs[1].form.code_verifier, SECRET, TOKEN.access_token })
    end)

    it("never shows a cut-off redirect's code, even when the wait ends in a timeout", function()
      local trace = h.trace_collector()
      local CUT = "cut-off-authorization-code-888"
      local tok, err = oauth2.authorization_code(browser_cfg {
        trace = trace, wait_timeout = 2,
        open_url = function(url)
          local state, port = redirect_of(url)
          connect(port, "GET /?code=" .. CUT .. "&state=" .. state):close()
        end,
      })
      assert.is_nil(tok)
      assert.equal("timeout", err.reason)
      assert.equal(0, #stub.requests("/token"))
      h.assert_no_secrets(trace.text() .. tostring(err), { CUT })
    end)

    it("answers 400 to a redirect with another state and keeps waiting for the real one", function()
      local trace = h.trace_collector()
      local CODE, FORGED = "real-authorization-code-000222", "forged-authorization-code-0333"
      local forged, real
      stub.queue("/token", { { json = TOKEN } })
      local tok, err = oauth2.authorization_code(browser_cfg {
        trace = trace,
        open_url = function(url)
          local state, port = redirect_of(url)
          forged = connect(port, get(FORGED, "not-" .. state))
          real = connect(port, get(CODE, state))
        end,
      })
      assert.is_nil(err)
      assert.equal(TOKEN.access_token, tok.access_token)
      local reqs = stub.requests("/token")
      assert.equal(1, #reqs)
      assert.equal(CODE, reqs[1].form.code)
      assert.truthy(answer(forged):find("^HTTP/1%.1 400"))
      assert.truthy(answer(real):find("^HTTP/1%.1 200"))
      h.assert_no_secrets(trace.text(), { CODE, FORGED, reqs[1].form.code_verifier })
    end)

    it("names the mismatched redirect when the wait ends after one, with no token request", function()
      local forged
      local t0 = h.now()
      local tok, err = oauth2.authorization_code(browser_cfg {
        wait_timeout = 2,
        open_url = function(url)
          local state, port = redirect_of(url)
          forged = connect(port, get("forged-authorization-code-0444", "not-" .. state))
        end,
      })
      assert.is_nil(tok)
      assert.equal("oauth", err.kind)
      assert.equal("state_mismatch", err.reason)
      assert.truthy(answer(forged):find("^HTTP/1%.1 400"))
      assert.equal(0, #stub.requests("/token"))
      assert.is_true(h.now() - t0 < 20)
      h.assert_no_secrets(tostring(err), { "forged-authorization-code-0444" })
    end)

    it("does not send a single-use code again after the reply was lost", function()
      local s = sleeper()
      stub.queue("/token", { { close = true }, { json = TOKEN } })
      local tok, err = oauth2.authorization_code(browser_cfg {
        sleep = s,
        open_url = function(url)
          local state, port = redirect_of(url)
          connect(port, get("lost-reply-authorization-code-5", state))
        end,
      })
      assert.is_nil(tok)
      assert.equal("network", err.kind)
      assert.is_false(err.retryable)
      assert.truthy(err.hint:find("sign in again", 1, true))
      assert.same({}, s.waits)
      assert.equal(1, #stub.requests("/token"))
    end)

    it("still retries the code exchange when the connection was refused (nothing was sent)", function()
      local s = sleeper()
      local tok, err = oauth2.authorization_code(browser_cfg {
        sleep = s, token_endpoint = "https://127.0.0.1:" .. h.free_port() .. "/token",
        open_url = function(url)
          local state, port = redirect_of(url)
          connect(port, get("refused-authorization-code-66", state))
        end,
      })
      assert.is_nil(tok)
      assert.equal("refused", err.reason)
      assert.same({ 1, 2 }, s.waits)
    end)

    it("masks the code and the client secret when the server echoes them in error_description", function()
      local CODE = "short-code"  -- too short for the opaque-run mask: only known-value masking catches it
      stub.queue("/token", { { status = 400, json = { error = "invalid_grant",
        error_description = "code " .. CODE .. " is not valid for client secret " .. SECRET .. " (AADSTS70000)" } } })
      local tok, err = oauth2.authorization_code(browser_cfg {
        open_url = function(url)
          local state, port = redirect_of(url)
          connect(port, get(CODE, state))
        end,
      })
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
      assert.equal("AADSTS70000", err.provider_code)
      assert.truthy(err.message:find("is not valid for client secret", 1, true))
      h.assert_no_secrets(tostring(err), { CODE, SECRET })
    end)
  end)

  it("masks known secrets in a quoted non-JSON error body", function()
    stub.queue("/token", { { status = 400, headers = { ["Content-Type"] = "text/plain" },
      body = "refresh token rt-short1 refused; secret was " .. SECRET } })
    local tok, err = oauth2.refresh(cfg(), "rt-short1")
    assert.is_nil(tok)
    assert.truthy(err.message:find("not JSON", 1, true))
    h.assert_no_secrets(tostring(err), { "rt-short1", SECRET })
  end)

  it("masks the client secret and the refresh token echoed in error_description (client_secret_post)", function()
    local RT = "echoed-refresh-token-77"
    stub.queue("/token", { { status = 401, json = { error = "invalid_client",
      error_description = "bad client_secret: " .. SECRET .. ", refresh_token=" .. RT .. ", basic " .. crypto.b64encode(SECRET) } } })
    local tok, err = oauth2.refresh(cfg { client_auth = "client_secret_post" }, RT)
    assert.is_nil(tok)
    assert.equal("invalid_client", err.oauth_error)
    h.assert_no_secrets(tostring(err), { RT, SECRET })
  end)

  -- Issue 12, defect 3: a server that echoes what it was given (in
  -- error_description, an HTML page, a plain-text body, trace_id) must not
  -- get any secret of the exchange into the trace or the error, whatever
  -- the encoding: raw, form-encoded, percent-encoded, base64, base64url.
  describe("a server echoing the request's secrets", function()
    local ODD = "s3cr+t/with space&more=x"   -- every encoding differs
    local RT = "refresh-token-echo-8899/+="
    local crypto_mod = require "oauthmail.crypto"

    local function form_enc(v)
      return (v:gsub("[^%w%*%-%._ ]", function(c) return string.format("%%%02X", c:byte()) end):gsub(" ", "+"))
    end
    local function echo_all(values)
      local parts = {}
      for _, v in ipairs(values) do
        for _, f in ipairs(h.secret_forms(v)) do parts[#parts + 1] = "[" .. f .. "]" end
      end
      return table.concat(parts, " ")
    end

    local function check(trace, err, values)
      local text = trace.text() .. "\n" .. tostring(err) .. "\n"
      for k, v in pairs(err) do text = text .. tostring(k) .. "=" .. tostring(v) .. "\n" end
      h.assert_no_secrets(text, values)
      -- no line of the trace can be forged by the echo
      for _, ev in ipairs(trace.events) do
        if ev.text then assert.is_nil(ev.text:find("[\r\n]"), ev.text) end
      end
    end

    for _, auth in ipairs { "client_secret_basic", "client_secret_post" } do
      for _, shape in ipairs { "json", "html", "text" } do
        it("masks them by value (" .. auth .. ", " .. shape .. " body)", function()
          local trace = h.trace_collector()
          local basic = crypto_mod.b64encode(form_enc("fault-client") .. ":" .. form_enc(ODD))
          -- the Basic credential is a secret of the exchange only when it was sent
          local values = auth == "client_secret_basic" and { ODD, RT, basic } or { ODD, RT }
          local echo = echo_all(values) .. " Basic " .. basic .. "\r\n* forged trace line"
          local resp
          if shape == "json" then
            resp = { status = 400, json = { error = "invalid_grant", error_description = "you sent " .. echo,
              trace_id = RT, correlation_id = "id\r\n" .. ODD } }
          elseif shape == "html" then
            resp = { status = 400, headers = { ["Content-Type"] = "text/html" },
              body = "<html><body><p>bad request " .. echo .. "</p></body></html>" }
          else
            resp = { status = 400, headers = { ["Content-Type"] = "text/plain" }, body = "bad: " .. echo }
          end
          stub.queue("/token", { resp })
          local tok, err = oauth2.refresh(cfg { client_secret = ODD, client_auth = auth, trace = trace }, RT)
          assert.is_nil(tok)
          assert.equal("oauth", err.kind)
          assert.equal(1, #stub.requests("/token"))
          check(trace, err, values)
          assert.is_nil(err.trace_id)          -- a secret is no identifier
          assert.is_nil(err.correlation_id)    -- neither is a line break
        end)
      end
    end

    it("keeps a well-formed trace_id and correlation_id, and bounds a huge description", function()
      stub.queue("/token", { { status = 400, json = { error = "invalid_client", error_description = string.rep("y", 100000),
        trace_id = "0a1b2c3d-0000-4000-8000-00000000abcd", correlation_id = "11112222-3333-4444-5555-666677778888" } } })
      local tok, err = oauth2.client_credentials(cfg())
      assert.is_nil(tok)
      assert.equal("0a1b2c3d-0000-4000-8000-00000000abcd", err.trace_id)
      assert.equal("11112222-3333-4444-5555-666677778888", err.correlation_id)
      assert.truthy(#err.message < 1100, #err.message)
    end)

    it("masks an echoed authorization code and PKCE verifier", function()
      local trace = h.trace_collector()
      local CODE, VERIFIER = "echoed-authorization-code-42", "v-" .. string.rep("k", 50)
      stub.queue("/token", { { status = 400, headers = { ["Content-Type"] = "text/plain" },
        body = "code " .. echo_all { CODE, VERIFIER } } })
      local c = cfg { trace = trace }
      local doc, err = endpoint.call(c, c.token_endpoint, { { "grant_type", "authorization_code" }, { "code", CODE },
        { "redirect_uri", "http://127.0.0.1:9/cb" }, { "code_verifier", VERIFIER } }, { single_use = true })
      assert.is_nil(doc)
      assert.equal(1, #stub.requests("/token"))
      check(trace, err, { CODE, VERIFIER, SECRET })
    end)

  end)

  describe("device flow numbers", function()
    local function device_cfg(s, extra)
      local info = {}
      local t = cfg { device_authorization_endpoint = stub.url .. "/devauth", sleep = s, client_auth = "none",
        on_device_code = function(i) info.last = i end }
      for k, v in pairs(extra or {}) do t[k] = v end
      return t, info
    end
    local DEV = '"device_code":"dc-0001-abcdefghij","user_code":"UCUC-1234","verification_uri":"https://v.example/device"'

    it("refuses interval NaN without sleeping", function()
      local s = sleeper()
      stub.queue("/devauth", { { body = "{" .. DEV .. ',"interval":NaN,"expires_in":900}' } })
      local tok, err = oauth2.device_code((device_cfg(s)))
      assert.is_nil(tok)
      assert.equal("malformed", err.reason)
      assert.same({}, s.waits)
      assert.equal(0, #stub.requests("/token"))
    end)

    it("refuses expires_in Infinity without polling", function()
      local s = sleeper()
      stub.queue("/devauth", { { body = "{" .. DEV .. ',"interval":1,"expires_in":Infinity}' } })
      local tok, err = oauth2.device_code((device_cfg(s)))
      assert.is_nil(tok)
      assert.equal("malformed", err.reason)
      assert.same({}, s.waits)
    end)

    it("refuses a non-numeric interval", function()
      local s = sleeper()
      stub.queue("/devauth", { { body = "{" .. DEV .. ',"interval":"soon","expires_in":900}' } })
      local tok, err = oauth2.device_code((device_cfg(s)))
      assert.is_nil(tok)
      assert.equal("oauth", err.kind)
      assert.equal("malformed", err.reason)
      assert.truthy(err.message:find("interval", 1, true))
      assert.same({}, s.waits)
    end)

    it("clamps huge interval and expires_in to 600 s and 1800 s", function()
      local s = sleeper()
      stub.queue("/devauth", { { body = "{" .. DEV .. ',"interval":1e999,"expires_in":1e12}' } })
      stub.queue("/token", { { status = 400, json = { error = "authorization_pending" } },
        { status = 400, json = { error = "access_denied" } } })
      local c, info = device_cfg(s)
      local tok, err = oauth2.device_code(c)
      assert.is_nil(tok)
      assert.equal("access_denied", err.oauth_error)
      assert.same({ 600, 600 }, s.waits)
      assert.equal(1800, info.last.expires_in)
    end)

    it("prints whole seconds as integers in the expiry message", function()
      local s = sleeper()
      stub.queue("/devauth", { { json = { device_code = "dc-0002-abcdefghij", user_code = "U",
        verification_uri = "https://v.example/device", interval = 5, expires_in = 3 } } })
      local tok, err = oauth2.device_code((device_cfg(s)))
      assert.is_nil(tok)
      assert.equal("timeout", err.reason)
      assert.truthy(err.message:find("after 3 s", 1, true), err.message)
    end)
  end)

  it("refuses a token answer whose expires_in is NaN", function()
    stub.queue("/token", { { body = '{"access_token":"nan-access-token-0123456789","expires_in":NaN}' } })
    local tok, err = oauth2.client_credentials(cfg())
    assert.is_nil(tok)
    assert.equal("malformed", err.reason)
    h.assert_no_secrets(tostring(err), { "nan-access-token-0123456789" })
  end)

  it("clamps a huge token expires_in to one day", function()
    stub.queue("/token", { { body = '{"access_token":"big-access-token-0123456789","expires_in":1e999}' } })
    local tok, err = oauth2.client_credentials(cfg())
    assert.is_nil(err)
    assert.is_true(tok.expires_at <= os.time() + 86400 + 5)
    assert.is_true(tok.expires_at >= os.time() + 86400 - 60)
  end)

  it("clamps a Retry-After too large to be a number", function()
    local s = sleeper()
    stub.queue("/token", { { status = 429, headers = { ["Retry-After"] = string.rep("9", 400) }, json = { error = "throttled" } } })
    local tok, err = oauth2.client_credentials(cfg { sleep = s })
    assert.is_nil(tok)
    assert.equal(86400, err.retry_after)
    assert.same({}, s.waits)
    assert.truthy(err.message:find("wait 86400 s", 1, true), err.message)
  end)

  it("prints retry waits as whole seconds on every Lua version", function()
    local s = sleeper()
    stub.queue("/token", { { status = 503, json = { error = "temporarily_unavailable" } } })
    local tok, err = oauth2.client_credentials(cfg { sleep = s, retry = { attempts = 3, max_wait = 0.5 } })
    assert.is_nil(tok)
    assert.truthy(err.message:find("wait 1 s, over the retry budget of 0.5 s", 1, true), err.message)
  end)

  it("takes no provider code from a non-integer error_codes entry instead of raising", function()
    for _, v in ipairs { 70008.5, 1e300 } do
      stub.queue("/token", { { status = 400, json = { error = "invalid_grant", error_description = "expired",
        error_codes = { v } } } })
      local tok, err = oauth2.client_credentials(cfg())
      assert.is_nil(tok)
      assert.equal("invalid_grant", err.oauth_error)
      assert.is_nil(err.provider_code)
    end
  end)

  it("treats any 2xx revocation answer as success, whatever its body (RFC 7009 2.2)", function()
    stub.queue("/revoke", { { status = 200, headers = { ["Content-Type"] = "text/plain" }, body = "OK" } })
    local ok, err = oauth2.revoke(cfg { revocation_endpoint = stub.url .. "/revoke" }, "some-refresh-token-1", "refresh_token")
    assert.is_nil(err)
    assert.is_true(ok)
    assert.equal("some-refresh-token-1", stub.requests("/revoke")[1].form.token)
  end)

  it("addresses client assertions to the token endpoint, also for device authorization and revocation", function()
    local keys = oidc.make_client_cert(h.tmpdir(), "fo-jwt")
    local c = cfg { client_auth = "private_key_jwt", client_certificate = { cert = keys.cert, key = keys.key },
      device_authorization_endpoint = stub.url .. "/devauth", revocation_endpoint = stub.url .. "/revoke",
      on_device_code = function() end, sleep = sleeper() }
    stub.queue("/devauth", { { status = 401, json = { error = "invalid_client" } } })
    stub.queue("/revoke", { { status = 200, body = "" } })
    local tok, derr = oauth2.device_code(c)
    assert.is_nil(tok)
    assert.equal("invalid_client", derr.oauth_error)
    assert.is_true(oauth2.revoke(c, "some-refresh-token-2"))
    for _, path in ipairs { "/devauth", "/revoke" } do
      local _, claims = crypto.jwt_decode(stub.requests(path)[1].form.client_assertion)
      assert.equal(stub.url .. "/token", claims.aud)
    end
  end)

  it("leaves the form encoding to one function (RFC 6749 appendix B)", function()
    assert.equal("grant_type=password&username=a%40b", endpoint.form { { "grant_type", "password" }, { "username", "a@b" } })
  end)
end)
