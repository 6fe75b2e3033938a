-- spec/http_spec.lua — oauthmail.http against a real HTTPS server on
-- loopback (spec/peers/fault_http.mjs, node's https module) using the test
-- CA; plus oauthmail.redact on its own.
local http = require "oauthmail.http"
local redact = require "oauthmail.redact"
local errors = require "oauthmail.errors"
local crypto = require "oauthmail.crypto"
local cjson = require "cjson"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"

local function expect_err(kind, reason, ok, err)
  assert.is_nil(ok)
  assert.is_true(errors.is(err), "expected an error value, got " .. tostring(err))
  assert.are.equal(kind, err.kind, tostring(err))
  assert.are.equal(reason, err.reason, tostring(err))
  return err
end

local function start_stub(cert, extra)
  local p = h.spawn("node fault_http.mjs --cert " .. h.quote(cert.cert) .. " --key " .. h.quote(cert.key) ..
    " " .. (extra or ""), { cwd = h.peers, ready = "listening on port (%d+)" })
  return p, "https://127.0.0.1:" .. p.match[1]
end

local function status_kb(field)
  local s = h.read_file("/proc/self/status")
  return tonumber(s:match(field .. ":%s*(%d+)"))
end

describe("oauthmail.http", function()
  local c, stub, base, ca

  setup(function()
    c = certs.get()
    ca = c.ca
    stub, base = start_stub(c.server, "--ca " .. h.quote(c.ca) .. " --request-cert")
  end)

  teardown(function() h.stop_all() end)

  before_each(function()
    assert(http.request { method = "DELETE", url = base .. "/_scenario", ca_file = ca })
    assert(http.request { method = "DELETE", url = base .. "/_requests", ca_file = ca })
  end)

  local function scenario(path, responses, repeat_last)
    local r = assert(http.request { url = base .. "/_scenario", ca_file = ca,
      headers = { ["Content-Type"] = "application/json" },
      body = cjson.encode { path = path, responses = responses, repeat_last = repeat_last } })
    assert.are.equal(200, r.status, r.body)
  end

  local function received()
    local r = assert(http.request { url = base .. "/_requests", ca_file = ca })
    return cjson.decode(r.body)
  end

  describe("requests", function()
    it("GET with custom headers", function()
      local r = assert(http.request { url = base .. "/echo?x=1", ca_file = ca,
        headers = { ["X-Test"] = "yes", Accept = "application/json", ["X-Empty"] = "" } })
      assert.are.equal(200, r.status)
      assert.matches("^application/json", r.headers["content-type"])
      local e = cjson.decode(r.body)
      assert.are.equal("GET", e.method)
      assert.are.equal("1", e.query.x)
      assert.are.equal("yes", e.headers["x-test"])
      assert.are.equal("", e.headers["x-empty"])
      assert.are.equal("application/json", e.headers.accept)
      assert.is_nil(e.headers.expect)
      assert.are.equal("", e.body)
    end)

    it("POST form: application/x-www-form-urlencoded, keys sorted, RFC 6749 encoding", function()
      local r = assert(http.request { url = base .. "/echo", ca_file = ca,
        form = { scope = "https://outlook.office.com/SMTP.Send offline_access", client_id = "a&b=c", b = "+/~" } })
      local e = cjson.decode(r.body)
      assert.are.equal("POST", e.method)
      assert.are.equal("application/x-www-form-urlencoded", e.headers["content-type"])
      assert.are.equal("b=%2B%2F%7E&client_id=a%26b%3Dc&scope=https%3A%2F%2Foutlook.office.com%2FSMTP.Send+offline_access", e.body)
    end)

    it("POST JSON and other methods", function()
      local doc = cjson.encode { message = { subject = "hi" }, saveToSentItems = false }
      local r = assert(http.request { url = base .. "/echo", ca_file = ca, body = doc,
        headers = { ["Content-Type"] = "application/json", Authorization = "Bearer abc.def" } })
      local e = cjson.decode(r.body)
      assert.are.equal("POST", e.method)
      assert.are.equal(doc, e.body)
      assert.are.equal("application/json", e.headers["content-type"])
      assert.are.equal("Bearer abc.def", e.headers.authorization)
      for _, m in ipairs({ "DELETE", "PUT", "PATCH" }) do
        e = cjson.decode(assert(http.request { url = base .. "/echo", ca_file = ca, method = m, body = "x" }).body)
        assert.are.equal(m, e.method)
        assert.are.equal("x", e.body)
      end
      local head = assert(http.request { url = base .. "/echo", ca_file = ca, method = "HEAD" })
      assert.are.equal(200, head.status)
      assert.are.equal("", head.body)
    end)

    it("presents a client certificate when the server asks for one", function()
      local r = assert(http.request { url = base .. "/clientcert", ca_file = ca,
        client_cert = c.client.cert, client_key = c.client.key })
      assert.are.equal(200, r.status, r.body)
      assert.are.equal("oauthmail test client", cjson.decode(r.body).subject)
      r = assert(http.request { url = base .. "/clientcert", ca_file = ca })
      assert.are.equal(401, r.status)
    end)

    it("a server that requires a client certificate refuses a client without one", function()
      local _, rbase = start_stub(c.server, "--ca " .. h.quote(c.ca) .. " --require-cert")
      local no, err = http.request { url = rbase .. "/echo", ca_file = ca }
      expect_err("tls", "client_cert", no, err)
      assert.matches("requires a client certificate", err.message)
      local r = assert(http.request { url = rbase .. "/echo", ca_file = ca,
        client_cert = c.client.cert, client_key = c.client.key })
      assert.are.equal(200, r.status)
    end)

    it("a client key that cannot be read is a config error", function()
      local no, err = http.request { url = base .. "/clientcert", ca_file = ca,
        client_cert = c.client.cert, client_key = "/nonexistent/client.key" }
      expect_err("config", "client_cert", no, err)
    end)

    it("does not follow redirects unless asked", function()
      local r = assert(http.request { url = base .. "/redirect?to=/echo", ca_file = ca })
      assert.are.equal(302, r.status)
      assert.are.equal("/echo", r.headers.location)
      r = assert(http.request { url = base .. "/redirect?to=/echo", ca_file = ca, follow_redirects = true })
      assert.are.equal(200, r.status)
      assert.are.equal("/echo", cjson.decode(r.body).path)
      assert.matches("/echo$", r.url)
    end)

    it("never follows an https redirect down to plain http", function()
      local no, err = http.request { url = base .. "/redirect?to=" .. http.url_encode("http://127.0.0.1:1/x"),
        ca_file = ca, follow_redirects = true }
      assert.is_nil(no)
      assert.are.equal("config", err.kind, tostring(err))
    end)
  end)

  describe("HTTP error statuses are responses", function()
    it("429 with Retry-After (queued scenario), then 200", function()
      scenario("/token", {
        { status = 429, headers = { ["Retry-After"] = "3" }, json = { error = "temporarily_unavailable" } },
        { status = 200, json = { ok = true } },
      })
      local r = assert(http.request { url = base .. "/token", ca_file = ca, form = { grant_type = "x" } })
      assert.are.equal(429, r.status)
      assert.are.equal("3", r.headers["retry-after"])
      assert.are.equal("temporarily_unavailable", cjson.decode(r.body).error)
      r = assert(http.request { url = base .. "/token", ca_file = ca, form = { grant_type = "x" } })
      assert.are.equal(200, r.status)
      r = assert(http.request { url = base .. "/token", ca_file = ca })
      assert.are.equal(404, r.status)
    end)

    it("503 (built-in route and ?scenario=)", function()
      local r = assert(http.request { url = base .. "/status/503?retry_after=10", ca_file = ca })
      assert.are.equal(503, r.status)
      assert.are.equal("10", r.headers["retry-after"])
      assert.are.equal("status 503", r.body)
      local spec = cjson.encode { status = 503, body = "busy", headers = { ["X-Ms-Diag"] = "d1" } }
      r = assert(http.request { url = base .. "/anything?scenario=" .. http.url_encode(spec), ca_file = ca })
      assert.are.equal(503, r.status)
      assert.are.equal("busy", r.body)
      assert.are.equal("d1", r.headers["x-ms-diag"])
    end)

    it("returns a malformed JSON body as-is", function()
      local broken = '{"access_token": "abc'
      scenario("/token", { { status = 200, headers = { ["Content-Type"] = "application/json" }, body = broken } })
      local r = assert(http.request { url = base .. "/token", ca_file = ca, form = {} })
      assert.are.equal(200, r.status)
      assert.are.equal(broken, r.body)
    end)
  end)

  describe("bounds", function()
    local function big_body_test(query)
      local before = status_kb("VmRSS")
      h.write_file("/proc/self/clear_refs", "5")  -- resets the peak RSS (VmHWM)
      local t0 = h.now()
      local no, err = http.request { url = base .. "/big?mb=50" .. query, ca_file = ca, timeout = 60 }
      expect_err("http", "too_large", no, err)
      assert.are.equal("response body exceeds max_body (1048576 bytes)", err.message)
      local peak = status_kb("VmHWM")
      assert.is_true(peak - before < 20 * 1024, "peak memory grew by " .. (peak - before) .. " kB")
      assert.is_true(h.now() - t0 < 30, "the transfer was not aborted early")
    end

    it("aborts a 50 MB chunked body as soon as max_body is passed, with bounded memory", function()
      big_body_test("")
      local deadline = h.now() + 10
      local sent
      repeat
        sent = tonumber(stub.output():match("client went away after (%d+) bytes"))
        if not sent then h.sleep(0.05) end
      until sent or h.now() > deadline
      assert.is_not_nil(sent, "the server never saw the client leave")
      assert.is_true(sent < 40 * 1024 * 1024, "server sent " .. tostring(sent) .. " bytes")
    end)

    it("refuses a declared Content-Length over max_body", function()
      big_body_test("&length=1")
    end)

    it("honours a custom max_body", function()
      expect_err("http", "too_large", http.request { url = base .. "/echo", ca_file = ca, max_body = 10 })
      assert(http.request { url = base .. "/echo", ca_file = ca, max_body = 100000 })
    end)

    it("a server that never answers gives a timeout within the deadline", function()
      local t0 = h.now()
      local no, err = http.request { url = base .. "/hang", ca_file = ca, timeout = 1 }
      expect_err("network", "timeout", no, err)
      assert.matches("timed out after 1 s", err.message)
      assert.is_true(h.now() - t0 < 5, "took " .. (h.now() - t0) .. " s")
    end)

    it("a connection closed without a response is 'closed'", function()
      expect_err("network", "closed", http.request { url = base .. "/close", ca_file = ca })
    end)

    it("connection refused", function()
      local port = h.free_port()
      local no, err = http.request { url = "https://127.0.0.1:" .. port .. "/", ca_file = ca, timeout = 5 }
      expect_err("network", "refused", no, err)
    end)

    it("unresolvable host", function()
      local no, err = http.request { url = "https://nonexistent.invalid/token", timeout = 10 }
      expect_err("network", "dns", no, err)
      assert.matches("nonexistent.invalid", err.message)
    end)
  end)

  describe("TLS verification", function()
    it("refuses an untrusted (self-signed) server, accepts it only with verify=false", function()
      local _, sbase = start_stub(c.selfsigned)
      local no, err = http.request { url = sbase .. "/echo", ca_file = ca }
      expect_err("tls", "verify", no, err)
      assert.matches("certificate not trusted", err.message)
      assert.matches("self%-signed", err.message)
      local r = assert(http.request { url = sbase .. "/echo", verify = false })
      assert.are.equal(200, r.status)
    end)

    it("refuses a server whose CA is not trusted (system store only)", function()
      local no, err = http.request { url = base .. "/echo" }
      expect_err("tls", "verify", no, err)
      assert.matches("not in the trusted CA list", err.message)
    end)

    it("refuses an expired certificate and a host name mismatch", function()
      local _, ebase = start_stub(c.expired)
      local no, err = http.request { url = ebase .. "/echo", ca_file = ca }
      expect_err("tls", "verify", no, err)
      assert.matches("expired", err.message)
      local _, wbase = start_stub(c.wronghost)
      no, err = http.request { url = wbase .. "/echo", ca_file = ca }
      expect_err("tls", "verify", no, err)
      assert.matches("host name mismatch", err.message)
    end)

    it("refuses plain http:// except to loopback (or when allowed)", function()
      local no, err = http.request { url = "http://login.example.com/token" }
      expect_err("config", "insecure", no, err)
      local p = h.spawn("node fault_http.mjs --plain", { cwd = h.peers, ready = "listening on port (%d+)" })
      local r = assert(http.request { url = "http://127.0.0.1:" .. p.match[1] .. "/echo" })
      assert.are.equal(200, r.status)
      expect_err("config", "url", http.request { url = "ftp://127.0.0.1/x" })
      expect_err("config", "url", http.request { url = "not a url" })
    end)
  end)

  describe("proxies", function()
    local function child(code)
      return h.exec("env -u no_proxy -u NO_PROXY https_proxy=http://127.0.0.1:" .. h.free_port() ..
        " " .. h.lua_bin .. " -e " .. h.quote(code))
    end

    it("uses the environment's proxy, and proxy=false bypasses it", function()
      local code = [[
        local http = require "oauthmail.http"
        local r, err = http.request { url = %q, ca_file = %q, timeout = 5, proxy = %s }
        io.write(r and ("status=" .. r.status) or ("err=" .. err.kind .. "/" .. tostring(err.reason)))
      ]]
      local _, out = child(code:format(base .. "/echo", ca, "nil"))
      assert.matches("err=network/refused", out)
      _, out = child(code:format(base .. "/echo", ca, "false"))
      assert.matches("status=200", out)
    end)

    it("an explicit proxy that is down fails the request", function()
      expect_err("network", "refused", http.request { url = base .. "/echo", ca_file = ca, timeout = 5,
        proxy = "http://127.0.0.1:" .. h.free_port() })
    end)
  end)

  describe("trace", function()
    it("shows the exchange with every secret redacted", function()
      local function secret(tag) return tag .. "-" .. crypto.hex(crypto.random(12)) end
      local cs, code, verifier = secret("cs"), secret("code"), secret("verifier")
      local at, rt, idt = secret("at"), secret("rt"), secret("idt")
      local basic = crypto.b64encode("client-id:" .. cs)
      scenario("/token", { { status = 200, json = { access_token = at, refresh_token = rt, id_token = idt,
                                                    token_type = "Bearer", expires_in = 3599 } } })
      local trace = h.trace_collector()
      local r = assert(http.request { url = base .. "/token?code=" .. code, ca_file = ca, trace = trace,
        headers = { Authorization = "Basic " .. basic },
        form = { grant_type = "authorization_code", client_secret = cs, code = code, code_verifier = verifier,
                 redirect_uri = "http://localhost/cb" } })
      assert.are.equal(200, r.status)
      assert.are.equal(at, cjson.decode(r.body).access_token)
      local text = trace.text()
      h.assert_no_secrets(text, { cs, code, verifier, at, rt, idt, basic })
      -- The trace still tells the story: request line, scheme, non-secret fields, response.
      assert.matches("dir=send proto=http text=POST /token%?code=<redacted> HTTP/1%.1", text)
      assert.matches("Authorization: Basic <redacted>", text, 1, true)
      assert.matches("client_secret=<redacted>&code=<redacted>&code_verifier=<redacted>&grant_type=authorization_code", text)
      assert.matches("dir=recv proto=http text=HTTP/1%.1 200", text)
      assert.matches('"token_type":"Bearer"', text, 1, true)
      assert.matches('"access_token":"<redacted>"', text, 1, true)
      for _, ev in ipairs(trace.events) do
        assert.are.equal("http", ev.proto)
        assert.is_true(ev.dir == "send" or ev.dir == "recv" or ev.dir == "info")
      end
      -- Redaction is for the trace only: the server got the real values.
      local got = received()
      assert.matches("client_secret=" .. cs, got[#got].body, 1, true)
      assert.are.equal("Basic " .. basic, got[#got].headers.authorization)
    end)

    it("traces failed requests too, still redacted", function()
      local trace = h.trace_collector()
      local cs = "cs-" .. crypto.hex(crypto.random(12))
      local no, err = http.request { url = base .. "/hang", ca_file = ca, timeout = 1, trace = trace,
        form = { client_secret = cs } }
      expect_err("network", "timeout", no, err)
      local text = trace.text()
      assert.matches("POST /hang", text, 1, true)
      assert.matches("client_secret=<redacted>", text, 1, true)
      h.assert_no_secrets(text, { cs })
    end)

    it("bounds what it keeps of large bodies", function()
      local trace = h.trace_collector()
      local r = assert(http.request { url = base .. "/big?mb=2", ca_file = ca, max_body = 4 * 1024 * 1024, trace = trace })
      assert.are.equal(2 * 1024 * 1024, #r.body)
      local body_ev
      for _, ev in ipairs(trace.events) do
        if ev.dir == "recv" and ev.text:sub(1, 3) == "xxx" then body_ev = ev end
      end
      assert.is_not_nil(body_ev)
      assert.is_true(#body_ev.text < 70 * 1024, "trace kept " .. #body_ev.text .. " bytes")
      assert.matches("%[%.%.%. 2031616 more bytes%]$", body_ev.text)
      h.assert_no_secrets(trace.text(), {})
    end)

    it("counts dropped events as integers (no \"3.0 trace events dropped\" on 5.3+)", function()
      local many = {}
      for i = 1, 2100 do many["X-H" .. i] = "v" end
      scenario("/many", { { status = 200, headers = many, body = "ok" } }, true)
      local url = base .. "/many"
      local trace = h.trace_collector()
      assert(http.request { url = url, ca_file = ca, trace = trace })
      local text = trace.text()
      assert.matches("text=%d+ trace events dropped %(limit reached%)", text)
      assert.is_nil(text:find("%d%.0 trace events dropped"), "float count in the trace")
      -- the raw events, as the core hands them over
      local resp, events = http.perform { url = url, ca_file = ca, trace = true }
      assert.are.equal(200, resp.status)
      assert.is_true(events.dropped > 0)
      if math.type then
        assert.are.equal("integer", math.type(events.dropped))
        assert.are.equal("integer", math.type(events[1].omitted))
      end
    end)

    it("a trace function that raises becomes an error value after the transfer", function()
      local no, err = http.request { url = base .. "/echo", ca_file = ca, trace = function() error("boom") end }
      expect_err("config", "trace", no, err)
      assert.matches("boom", err.message)
    end)
  end)

  describe("over HTTP/2", function()
    local h2stub, h2base

    setup(function() h2stub, h2base = start_stub(c.server, "--h2") end)
    teardown(function() if h2stub then h2stub.stop() end end)

    -- libcurl lists every HTTP/2 request header as an informational line
    -- ("h2h3 [authorization: Basic ...]"), outside header_out.
    it("keeps Basic and Bearer credentials, cookies and form secrets out of the trace", function()
      local function secret(tag) return tag .. "-" .. crypto.hex(crypto.random(12)) end
      local cs, at, code, sid = secret("cs"), secret("at"), secret("code"), secret("sid")
      local basic = crypto.b64encode("client-id:" .. cs)
      for _, auth in ipairs { "Basic " .. basic, "Bearer " .. at } do
        local trace = h.trace_collector()
        local r = assert(http.request { url = h2base .. "/echo?code=" .. code, ca_file = ca, trace = trace,
          headers = { Authorization = auth, Cookie = "sid=" .. sid }, form = { client_secret = cs } })
        assert.are.equal(200, r.status)
        local echo = cjson.decode(r.body)
        assert.are.equal("2.0", echo.http_version)
        assert.are.equal(auth, echo.headers.authorization)
        local text = trace.text()
        h.assert_no_secrets(text, { cs, at, code, sid, basic })
        -- The HTTP/2 header lines stay in the trace, redacted like header_out.
        assert.matches("%[authorization: " .. auth:match("^%a+") .. " <redacted>%]", text)
        assert.matches("%[cookie: <redacted>%]", text)
        assert.matches("%[:path: /echo%?code=<redacted>%]", text)
        assert.matches("%[:method: POST%]", text)
      end
    end)
  end)

  describe("arguments", function()
    it("raises on programmer errors", function()
      assert.has_error(function() http.request() end)
      assert.has_error(function() http.request { } end)
      assert.has_error(function() http.request { url = base, timeout = "5" } end)
      assert.has_error(function() http.request { url = base, tiemout = 5 } end)
      assert.has_error(function() http.request { url = base, headers = { ["X-A"] = "a\r\nX-B: b" } } end)
      assert.has_error(function() http.request { url = base, headers = { ["Bad Name"] = "x" } } end)
      assert.has_error(function() http.request { url = base, body = "x", form = {} } end)
      assert.has_error(function() http.request { url = base, proxy = true } end)
    end)
  end)
end)

describe("oauthmail.http form helpers", function()
  it("form_encode sorts keys and encodes like RFC 6749 appendix B", function()
    assert.are.equal("a=1&b=x+y&c=%C3%A9%26%3D", http.form_encode { c = "é&=", b = "x y", a = 1 })
    assert.are.equal("", http.form_encode {})
    assert.has_error(function() http.form_encode { a = {} } end)
  end)

  it("form_decode reverses it", function()
    assert.are.same({ a = "1", b = "x y", c = "é&=" }, http.form_decode("a=1&b=x+y&c=%C3%A9%26%3D"))
  end)
end)

describe("oauthmail.redact", function()
  it("values() masks a list's values as they are now, whatever it masked with that list before", function()
    local secrets = { "first-secret-value" }
    assert.are.equal("a <redacted> b", redact.values("a first-secret-value b", secrets))
    -- the same list, changed: its forms are worked out again, never reused
    secrets[1] = "second-secret-value"
    assert.are.equal("x <redacted> first-secret-value", redact.values("x second-secret-value first-secret-value", secrets))
    secrets[2] = "third-secret-value"
    assert.are.equal("<redacted> <redacted>", redact.values("second-secret-value dGhpcmQtc2VjcmV0LXZhbHVl", secrets))
    secrets[2] = nil
    assert.are.equal("<redacted> third-secret-value", redact.values("second-secret-value third-secret-value", secrets))
    assert.are.equal("s", redact.values("s", nil))
  end)

  it("keeps the scheme of Authorization headers", function()
    assert.are.equal("Basic <redacted>", redact.header("Authorization", "Basic dXNlcjpwYXNz"))
    assert.are.equal("Bearer <redacted>", redact.header("authorization", "Bearer eyJ0eXAi.x.y"))
    assert.are.equal("<redacted>", redact.header("Authorization", "justatoken"))
    assert.are.equal("<redacted>", redact.header("Cookie", "sid=1"))
    assert.are.equal("text/html", redact.header("Content-Type", "text/html"))
    assert.are.equal("Proxy-Authorization: Basic <redacted>", redact.header_line("Proxy-Authorization: Basic abc"))
    assert.are.equal("Location: https://app/cb?code=<redacted>&state=s1",
      redact.header_line("Location: https://app/cb?code=SplxlOBeZQQYbYS6WxSbIA&state=s1"))
  end)

  it("redacts form fields, keeping the others", function()
    assert.are.equal("grant_type=refresh_token&refresh_token=<redacted>&client_id=abc&client_secret=<redacted>",
      redact.form("grant_type=refresh_token&refresh_token=0.AX&client_id=abc&client_secret=x%2By"))
    assert.are.equal("assertion=<redacted>&grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
      redact.form("assertion=eyJ.eyJ.sig&grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"))
    assert.are.equal("password=<redacted>&username=u", redact.form("password=p%40ss&username=u"))
    assert.are.equal("Code=<redacted>", redact.form("Code=abc"))
  end)

  it("redacts JSON values at any depth, even when truncated or escaped", function()
    assert.are.equal('{"access_token":"<redacted>","token_type":"Bearer","x":{"refresh_token" : "<redacted>"}}',
      redact.json('{"access_token":"ey\\"J","token_type":"Bearer","x":{"refresh_token" : "0.AX"}}'))
    assert.are.equal('{"id_token":"<redacted>"', redact.json('{"id_token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIi'))
    assert.are.equal('{"device_code":"<redacted>","user_code":"ABCD-EFGH","expires_in":900}',
      redact.json('{"device_code":"GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS","user_code":"ABCD-EFGH","expires_in":900}'))
    assert.are.equal('{"acc\\u0065ss_token":"<redacted>"}', redact.json('{"acc\\u0065ss_token":"tok"}'))
    assert.are.equal('{"error":"invalid_grant","code":7}', redact.json('{"error":"invalid_grant","code":7}'))
  end)

  it("redacts URLs: query, fragment, user-info password", function()
    assert.are.equal("https://u:<redacted>@h/cb?state=1&code=<redacted>#access_token=<redacted>&token_type=Bearer",
      redact.url("https://u:pw@h/cb?state=1&code=c0de#access_token=t0k&token_type=Bearer"))
    assert.are.equal("/token", redact.url("/token"))
  end)

  it("stays linear on hostile input (a trace event can hold 64 KiB)", function()
    local t0 = h.now()
    for _, s in ipairs({ string.rep("x", 1e6), string.rep("a=", 5e5), string.rep('"', 1e6),
                         string.rep('"a":', 2e5), string.rep("code=", 2e5), "X: " .. string.rep(" ", 1e6) .. "a",
                         string.rep("Bearer ", 2e5), string.rep("authorization: cookie:", 1e5),
                         string.rep("Basic a=b ", 1e5), "cookie:" .. string.rep("authorization:x", 1e5) }) do
      redact.body(s)
      redact.text(s)
      redact.url(s)
      redact.header_line(s)
    end
    assert.is_true(h.now() - t0 < 20, "redaction took " .. (h.now() - t0) .. " s")
  end)

  it("text() masks credential headers and scheme credentials quoted in free text", function()
    assert.are.equal("h2h3 [authorization: Basic <redacted>]", redact.text("h2h3 [authorization: Basic Q0xJRU5UOlNFQ1JFVA==]"))
    assert.are.equal("[HTTP/2] [1] [proxy-authorization: Bearer <redacted>]",
      redact.text("[HTTP/2] [1] [proxy-authorization: Bearer eyJ0.eyJ1.c2ln]"))
    assert.are.equal("> Cookie: <redacted>\nSet-Cookie: <redacted>", redact.text("> Cookie: sid=abc; x=1\nSet-Cookie: t=zz; Path=/"))
    assert.are.equal('{"hdr":"Authorization: Bearer <redacted>"}', redact.text('{"hdr":"Authorization: Bearer tok-1"}'))
    assert.are.equal("sent Bearer <redacted> to graph", redact.text("sent Bearer EwBwA8l6BAAU.x_y-z~1+2/3= to graph"))
    assert.are.equal("basic <redacted>, then", redact.text("basic dXNlcjpwYXNz, then"))
    -- Words and auth-params are not credentials.
    assert.are.equal("Basic authentication failed; Bearer token expired",
      redact.text("Basic authentication failed; Bearer token expired"))
    assert.are.equal('WWW-Authenticate: Bearer realm="x", error="invalid_token"',
      redact.text('WWW-Authenticate: Bearer realm="x", error="invalid_token"'))
    assert.are.equal('"token_type":"Bearer"', redact.text('"token_type":"Bearer"'))
  end)

  it("body() redacts whatever the declared type", function()
    assert.are.equal("code=<redacted>", redact.body("code=abc"))
    assert.are.equal('{"password":"<redacted>"}', redact.body('{"password":"pw"}'))
    assert.are.equal('{"body":"client_secret=<redacted>&x=1"}', redact.body('{"body":"client_secret=s&x=1"}'))
  end)
end)
