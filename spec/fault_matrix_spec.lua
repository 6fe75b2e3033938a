-- spec/fault_matrix_spec.lua — the fault matrix of issue 12, counted at the
-- server: every fault is made to happen by a real peer on loopback (the
-- sandbox, a real smtp-server with fault switches; the real oidc-provider;
-- fault_http.mjs as a misbehaving token endpoint; child processes that crash
-- or are killed), the mail goes through the public API (oauthmail.new,
-- mailer:send), and each row checks two things: how many copies of the
-- message the server delivered (0 lost; a duplicate only where SMTP cannot
-- tell, and the row says so) and the error the user sees (kind, code,
-- retryable, message). The rows are printed as a table at the end of the run
-- (and written to $OAUTHMAIL_MATRIX_OUT when set); docs/faults.md holds them.
local oauthmail = require "oauthmail"
local cjson = require "cjson"
local h = require "spec.support.helpers"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"
local smtp_peers = require "spec.support.smtp_peers"

local USER = "noreply@contoso.test"
local TTL = 4   -- lifetime of the oidc-provider's access tokens: several expire during this spec

-- ------------------------------------------------------------ the matrix

local rows = {}

local function short(s, n)
  s = tostring(s or ""):gsub("[\r\n]+", " ")
  if #s > n then s = s:sub(1, n - 3) .. "..." end
  return s
end

local function seen(r, err)
  if r then return string.format("receipt, attempts=%d", r.attempts) end
  return string.format("%s %s retryable=%s: %s", tostring(err.kind), tostring(err.code or "-"),
    tostring(err.retryable), short(err.message, 170))
end

-- record(fault, peer, delivered, r, err [, note])
local function record(fault, peer, delivered, r, err, note)
  rows[#rows + 1] = { fault = fault, peer = peer, delivered = delivered, seen = seen(r, err), note = note or "" }
end

local function print_matrix()
  if #rows == 0 then return end
  local out = { "", "fault matrix (deliveries counted at the server):", "",
    "| fault | peer | delivered | the user sees | note |", "|---|---|---|---|---|" }
  for _, r in ipairs(rows) do
    out[#out + 1] = string.format("| %s | %s | %d | %s | %s |", r.fault, r.peer, r.delivered,
      r.seen:gsub("|", "/"), r.note)
  end
  local text = table.concat(out, "\n") .. "\n"
  io.stdout:write(text)
  local path = os.getenv("OAUTHMAIL_MATRIX_OUT")
  if path and path ~= "" then h.write_file(path, text) end
end

-- ------------------------------------------------------------ messages

local n = 0
local function message(tag)
  n = n + 1
  local id = string.format("fm-%s-%d@contoso.test", tag, n)
  return id, "From: " .. USER .. "\r\nTo: ops@example.org\r\nSubject: fault " .. tag .. "\r\nMessage-ID: <" .. id
    .. ">\r\n\r\n" .. string.rep("a line of the fault matrix body\r\n", 200)
end

describe("fault matrix", function()
  local srv, sb, fh

  setup(function()
    srv = oidc.start { access_ttl = TTL }
    sb = sandbox.start { user = USER, jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
    fh = oidc.start_fault()
  end)

  teardown(function()
    print_matrix()
    if fh then fh.stop() end
    if sb then sb.stop() end
    if srv then srv.stop() end
  end)

  before_each(function()
    sb.clear()
    fh.reset()
  end)

  local function count(id)
    local k = 0
    for _, m in ipairs(sb.messages()) do if m.message_id == id then k = k + 1 end end
    return k
  end

  -- Tokens from the oidc-provider (client credentials), mail to the sandbox;
  -- three SMTP attempts with short real back-off.
  local function profile(extra)
    local p = {
      name = "matrix", provider = "generic", issuer = srv.issuer, token_endpoint = srv.token_endpoint,
      flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
      client_auth = "client_secret_post", scope = "mail.send", ca_file = srv.ca, user = USER,
      smtp = sb.smtp(), policy = { attempts = 3, backoff_base = 0.1, jitter = 0 },
    }
    for k, v in pairs(extra or {}) do p[k] = v end
    return p
  end

  local function send(p, tag)
    local mailer = assert(oauthmail.new(p))
    local id, raw = message(tag)
    local t0 = h.now()
    local r, err = mailer:send { raw = raw, to = "ops@example.org" }
    local elapsed = h.now() - t0
    if not r then
      -- a failed send keeps no broken session and no connection slot
      assert.is_false(mailer:stats().session_open)
      assert.equals(0, mailer.governor.open)
    end
    mailer:close()
    assert.equals(0, mailer.governor.open)
    return id, r, err, elapsed
  end

  -- ---------------------------------------------------------- SMTP faults

  -- Each SMTP fault once (the client recovers, one copy) and on every
  -- attempt (the client gives up with the server's reply, no copy).
  local SMTP_FAULTS = {
    { name = "421 at the greeting", fault = { stage = "connect", code = 421, enhanced = "4.3.2",
      text = "Service not available, closing transmission channel" }, code = 421, kind = "smtp" },
    -- pipelined, the server's 421 to MAIL comes before it closes: the 421
    -- is reported, not the closed connection met reading the RCPT reply
    { name = "421 after MAIL FROM", fault = { stage = "mail", code = 421, enhanced = "4.3.2",
      text = "Service not available, closing transmission channel" }, code = 421, kind = "smtp" },
    { name = "421 after the data", fault = { stage = "data", code = 421, enhanced = "4.3.2",
      text = "Service not available, closing transmission channel" }, code = 421, kind = "smtp" },
    { name = "connection dropped during the data", fault = { stage = "data", action = "drop" },
      kind = "network" },
    { name = "432 4.3.2 (too many connections)", fault = { stage = "mail", code = 432, enhanced = "4.3.2",
      text = "STOREDRV.ClientSubmit; sender thread limit exceeded" }, code = 432, kind = "smtp" },
  }

  for _, case in ipairs(SMTP_FAULTS) do
    it(case.name .. " once: sent again, delivered once", function()
      sb.faults { case.fault }
      local id, r, err = send(profile(), "once")
      record(case.name .. " (once)", "sandbox (smtp-server)", count(id), r, err)
      assert.is_nil(err)
      assert.equals(2, r.attempts)
      assert.equals(1, count(id))
    end)

    it(case.name .. " on every attempt: gives up after 3 attempts, delivered 0", function()
      local f = {}
      for k, v in pairs(case.fault) do f[k] = v end
      f.times = 3
      sb.faults { f }
      local id, r, err = send(profile(), "always")
      record(case.name .. " (every attempt)", "sandbox (smtp-server)", count(id), r, err, case.note)
      assert.is_nil(r)
      assert.equals(case.kind, err.kind)
      assert.equals(case.code, err.code)
      assert.is_true(err.retryable)
      assert.equals(3, err.attempts)
      assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
      assert.equals(0, count(id))
      assert.equals(0, sb.stats().pending_faults)   -- every attempt reached the server
    end)
  end

  it("connection dropped after the server stored the message, before the client read the 250: "
    .. "a duplicate SMTP cannot avoid", function()
    sb.faults { { stage = "data", action = "drop_before_ok" } }
    local id, r, err = send(profile(), "lost250")
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    -- RFC 1047: the client saw its data go out and no reply; resending is the
    -- only choice that loses nothing, so the server holds two copies
    assert.equals(2, count(id))
    record("connection dropped after the final 250, before the client reads it", "sandbox (smtp-server)",
      count(id), r, err, "duplicate: SMTP cannot tell a lost reply from a lost message (RFC 1047)")
  end)

  it("no final reply within the client's data_timeout although the server stored the message: sent again, "
    .. "a duplicate", function()
    sb.faults { { stage = "data", action = "stall_after_store" } }
    local id, r, err = send(profile { smtp = sb.smtp { timeout = 1, data_timeout = 1 } }, "slow250")
    record("no final reply within smtp.data_timeout (1 s here; 600 s by default, RFC 5321 4.5.3.2.6), "
      .. "the server stored the message", "sandbox (smtp-server)", count(id), r, err,
      "duplicate: RFC 5321 6.1 prefers a duplicate to a loss; the error says after_data")
    assert.is_nil(err)
    assert.equals(2, r.attempts)
    assert.equals(2, count(id))
  end)

  it("the same on every attempt: one copy per attempt, and a network error", function()
    sb.faults { { stage = "data", action = "drop_before_ok", times = 3 } }
    local id, r, err = send(profile(), "lost250x3")
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.is_true(err.retryable)
    assert.equals(3, err.attempts)
    assert.equals(3, count(id))
    record("connection dropped after the final 250 (every attempt)", "sandbox (smtp-server)", count(id), r, err,
      "3 copies: each attempt was delivered and its reply lost")
  end)

  it("the SMTP server process dies (SIGKILL) during the data: nothing delivered, a network error", function()
    local tok = "fm-peer-token-3e8a0c6d17"
    local peer = smtp_peers.node_smtp { token = tok, user = USER, auth = { "XOAUTH2" }, crash_in_data = true }
    local ok, e = pcall(function()
      local status = h.http_json({ port = fh.port, ca_file = fh.ca }, "POST", "/_scenario",
        { path = "/token", responses = { { status = 200, json = { access_token = tok, expires_in = 3600 } } },
          repeat_last = true })
      assert.equals(200, status)
      local trace = h.trace_collector()
      local id, r, err = send(profile { token_endpoint = fh.url .. "/token", client_id = "fm-client",
        client_secret = "fm-secret-9d1c5e27", trace = trace,
        smtp = { host = "127.0.0.1", port = peer.port, ca_file = peer.ca, timeout = 10 } }, "srvdead")
      local delivered = 0
      for _, m in ipairs(peer.messages()) do
        if m.data and m.data:find("<" .. id .. ">", 1, true) then delivered = delivered + 1 end
      end
      record("the SMTP server process dies (SIGKILL) during the data", "smtp.mjs (smtp-server)", delivered, r, err,
        "the server is gone: the reconnects are refused")
      assert.is_nil(r)
      assert.equals("network", err.kind)
      assert.equals("refused", err.reason)
      assert.is_true(err.retryable)
      assert.equals(3, err.attempts)
      assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
      assert.equals(0, delivered)
      assert.is_false(peer.alive())
      h.assert_no_secrets(trace.text(), { tok, "fm-secret-9d1c5e27" })
    end)
    peer.stop()
    assert(ok, e)
  end)

  it("Dovecot cannot check tokens (its introspection endpoint is down): 454 4.7.0 on every AUTH, "
    .. "nothing delivered", function()
    if not smtp_peers.have_dovecot() then pending("Dovecot is not installed") return end
    local tok = "fm-dovecot-token-5c0e9b4a72"
    local dv = smtp_peers.dovecot { token = tok, user = USER }
    local ok, e = pcall(function()
      local status = h.http_json({ port = fh.port, ca_file = fh.ca }, "POST", "/_scenario",
        { path = "/token", responses = { { status = 200, json = { access_token = tok, expires_in = 3600 } } },
          repeat_last = true })
      assert.equals(200, status)
      local p = profile { token_endpoint = fh.url .. "/token", client_id = "fm-client",
        client_secret = "fm-secret-9d1c5e27", smtp = { host = "127.0.0.1", port = dv.port, ca_file = dv.ca, timeout = 20 } }
      -- first the path works: one message through Dovecot to its relay
      local id1, r1, err1 = send(p, "dovecot-ok")
      assert.is_nil(err1)
      assert.equals(1, r1.attempts)
      local function delivered(id)
        local k = 0
        for _, m in ipairs(dv.sink.messages()) do
          if m.data and m.data:find("<" .. id .. ">", 1, true) then k = k + 1 end
        end
        return k
      end
      assert.equals(1, delivered(id1))
      -- the process behind Dovecot's passdb oauth2 (introspection) and relay goes away
      dv.sink.stop()
      local trace = h.trace_collector()
      p.trace = trace
      local id, r, err = send(p, "dovecot-454")
      record("Dovecot's token check unavailable (AUTH answered 454 4.7.0)", "Dovecot submission", delivered(id),
        r, err, "each attempt waits for Dovecot's own timeout")
      assert.is_nil(r)
      assert.equals("auth", err.kind)
      assert.equals(454, err.code)
      assert.equals("4.7.0", err.enhanced)
      assert.is_true(err.retryable)
      assert.equals(3, err.attempts)
      assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
      assert.equals(0, delivered(id))
      h.assert_no_secrets(trace.text(), { tok, "fm-secret-9d1c5e27" })
    end)
    dv.stop()
    assert(ok, e)
  end)

  it("an SMTP host name that does not exist is tried once, and says so", function()
    local trace = h.trace_collector()
    local id, r, err, elapsed = send(profile { trace = trace,
      smtp = sb.smtp { host = "nonexistent.invalid" } }, "nxsmtp")
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.equals("dns", err.reason)
    assert.is_false(err.retryable)
    assert.equals(1, err.attempts)
    assert.matches("cannot resolve host 'nonexistent%.invalid'", err.message)
    assert.matches("%(1 attempt in %d+%.%d s%)$", err.message)
    assert.is_true(elapsed < 30, elapsed)
    local failed = 0
    for _, ev in ipairs(trace.events) do if ev.event == "attempt_failed" then failed = failed + 1 end end
    assert.equals(1, failed)
    assert.equals(0, count(id))
    record("SMTP host name does not exist", "(resolver)", count(id), r, err)
  end)

  -- ---------------------------------------------------------- tokens

  it("a token that expires mid-batch: new sessions with fresh tokens, each message once", function()
    local before = sb.stats()
    local trace = h.trace_collector()
    local got = {}
    local mailer = assert(oauthmail.new(profile { trace = trace,
      on_token = function(tok) got[#got + 1] = tok.access_token end }))
    local ids, receipts = {}, {}
    for i = 1, 5 do
      local id, raw = message("batch")
      ids[i] = id
      receipts[i] = assert(mailer:send { raw = raw, to = "ops@example.org" })
      h.sleep(1)   -- 5 s of batch: each 4 s token is used for half its life
    end
    mailer:close()
    local after = sb.stats()
    local labels = {}
    for i, id in ipairs(ids) do
      assert.equals(1, count(id))
      assert.equals(1, receipts[i].attempts)
    end
    for _, m in ipairs(sb.messages()) do
      for _, id in ipairs(ids) do if m.message_id == id then labels[m.token] = true end end
    end
    local distinct = 0
    for _ in pairs(labels) do distinct = distinct + 1 end
    assert.is_true(#got >= 2, "tokens fetched: " .. #got)
    assert.is_true(distinct >= 2, "distinct tokens at the server: " .. distinct)
    assert.equals(0, after.auth_failed - before.auth_failed)   -- never an expired token at the server
    local secrets = { srv.secrets.post }
    for _, t in ipairs(got) do secrets[#secrets + 1] = t end
    h.assert_no_secrets(trace.text(), secrets)
    rows[#rows + 1] = { fault = "token expires mid-batch (4 s tokens, 5 messages over 5 s)",
      peer = "oidc-provider + sandbox", delivered = #ids,
      seen = string.format("5 receipts, attempts=1 each; %d tokens, %d sessions, 0 refused AUTH", #got,
        after.auth_ok - before.auth_ok),
      note = "each message delivered once" }
  end)

  local function token_doc(tok) return { status = 200, json = { access_token = tok, token_type = "Bearer", expires_in = 3600 } } end

  local function token_case(name, responses, repeat_last, tok, policy)
    local trace = h.trace_collector()
    if tok then sb.tokens { tok } end
    local status = h.http_json({ port = fh.port, ca_file = fh.ca }, "POST", "/_scenario",
      { path = "/token", responses = responses, repeat_last = repeat_last })
    assert.equals(200, status)
    -- token endpoint: fault_http; the sandbox accepts the token it hands out
    local id, r, err, elapsed = send(profile { token_endpoint = fh.url .. "/token", client_id = "fm-client",
      client_secret = "fm-secret-9d1c5e27", trace = trace, policy = policy }, name)
    h.assert_no_secrets(trace.text(), { "fm-secret-9d1c5e27", tok or "fm-secret-9d1c5e27" })
    return id, r, err, elapsed, #fh.requests("/token")
  end

  it("a token that expires mid-batch while the client's clock is 10 s behind: the server refuses it once, "
    .. "the mailer refreshes and re-authenticates, each message once", function()
    local before = sb.stats()
    local base = require("oauthmail.policy").default_clock()
    local got = {}
    local trace = h.trace_collector()
    local mailer = assert(oauthmail.new(profile { trace = trace,
      policy = { attempts = 3, backoff_base = 0.1, jitter = 0, clock = function() return base() - 10 end },
      on_token = function(tok) got[#got + 1] = tok.access_token end }))
    -- the client believes its 4 s token good until 8 s after it really
    -- expired and keeps its session for about 7 s: the next AUTH presents
    -- an expired token, which only the server can tell
    local ids, refused = {}, 0
    local deadline = h.now() + 60
    while (refused == 0 or #ids < 3) and h.now() < deadline do
      local id, raw = message("skew")
      ids[#ids + 1] = id
      local r = assert(mailer:send { raw = raw, to = "ops@example.org" })
      assert.equals(1, r.attempts)
      refused = sb.stats().auth_failed - before.auth_failed
      h.sleep(1)
    end
    mailer:close()
    for _, id in ipairs(ids) do assert.equals(1, count(id)) end
    assert.equals(1, refused)
    assert.is_true(#got >= 2)
    local reauth = {}
    for _, ev in ipairs(trace.events) do
      if ev.event == "reauth" then reauth[#reauth + 1] = ev.code .. " " .. tostring(ev.enhanced) end
    end
    assert.same({ "535 5.7.3" }, reauth)
    local secrets = { srv.secrets.post }
    for _, t in ipairs(got) do secrets[#secrets + 1] = t end
    h.assert_no_secrets(trace.text(), secrets)
    rows[#rows + 1] = { fault = "token expires mid-batch, client clock 10 s behind (the server sees it first)",
      peer = "oidc-provider + sandbox", delivered = #ids,
      seen = string.format("%d receipts, attempts=1 each; 1 AUTH refused (535 5.7.3), refreshed, re-authenticated",
        #ids),
      note = "each message delivered once" }
  end)

  it("429 from the token endpoint once: waits Retry-After, one more request, delivered once", function()
    local id, r, err, _, requests = token_case("t429once", {
      { status = 429, headers = { ["Retry-After"] = "1" }, json = { error = "temporarily_unavailable" } },
      token_doc "fm-token-429-once-5b2e",
    }, false, "fm-token-429-once-5b2e")
    assert.is_nil(err)
    assert.equals(1, r.attempts)
    assert.equals(2, requests)
    assert.equals(1, count(id))
    record("429 from the token endpoint (once, Retry-After: 1)", "fault_http + sandbox", count(id), r, err,
      requests .. " token requests")
  end)

  it("429 from the token endpoint every time: 3 requests (not 15), the error says so", function()
    local id, r, err, elapsed, requests = token_case("t429", {
      { status = 429, headers = { ["Retry-After"] = "1" },
        json = { error = "temporarily_unavailable", error_description = "too many requests" } },
    }, true)
    assert.is_nil(r)
    assert.equals("oauth", err.kind)
    assert.equals(429, err.code)
    assert.is_true(err.retryable)
    assert.equals(3, requests)              -- one retry layer: the endpoint's
    assert.equals(3, err.attempts)
    assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
    assert.is_true(elapsed >= 2 and elapsed < 30, elapsed)   -- two waits of Retry-After: 1
    assert.equals(0, count(id))
    record("429 from the token endpoint (every request)", "fault_http", count(id), r, err,
      requests .. " token requests in " .. string.format("%.1f", elapsed) .. " s")
  end)

  it("503 from the token endpoint once: backs off, delivered once", function()
    local id, r, err, _, requests = token_case("t503once", {
      { status = 503, headers = { ["Content-Type"] = "text/html" }, body = "<html>Service Unavailable</html>" },
      token_doc "fm-token-503-once-c41a",
    }, false, "fm-token-503-once-c41a")
    assert.is_nil(err)
    assert.equals(2, requests)
    assert.equals(1, count(id))
    record("503 from the token endpoint (once)", "fault_http + sandbox", count(id), r, err,
      requests .. " token requests")
  end)

  it("503 from the token endpoint every time: 3 requests, the error names attempts and time", function()
    local id, r, err, elapsed, requests = token_case("t503", {
      { status = 503, headers = { ["Content-Type"] = "text/html" }, body = "<html>Service Unavailable</html>" },
    }, true)
    assert.is_nil(r)
    assert.equals("http", err.kind)
    assert.equals(503, err.code)
    assert.is_true(err.retryable)
    assert.equals(3, requests)
    assert.equals(3, err.attempts)
    assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
    assert.is_true(elapsed >= 3 and elapsed < 30, elapsed)   -- back-off 1 s + 2 s
    assert.equals(0, count(id))
    record("503 from the token endpoint (every request)", "fault_http", count(id), r, err,
      requests .. " token requests in " .. string.format("%.1f", elapsed) .. " s")
  end)

  it("a token endpoint that drops every connection: 3 requests, a network error that says so", function()
    -- the default send policy (5 attempts): before one layer owned the
    -- retries this made 5 x 3 = 15 requests
    local id, r, err, elapsed, requests = token_case("tdown", { { close = true } }, true, nil, {})
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.is_true(err.retryable)
    assert.equals(3, requests)
    assert.equals(3, err.attempts)
    assert.matches("%(3 attempts in %d+%.%d s%)$", err.message)
    assert.is_true(elapsed < 30, elapsed)
    assert.equals(0, count(id))
    record("token endpoint down (connection closed, every request)", "fault_http", count(id), r, err,
      requests .. " token requests in " .. string.format("%.1f", elapsed) .. " s")
  end)

  it("a token endpoint host name that does not exist is tried once", function()
    local trace = h.trace_collector()
    local id, r, err, elapsed = send(profile { trace = trace, token_endpoint = "https://nonexistent.invalid/token" },
      "nxtoken")
    assert.is_nil(r)
    assert.equals("network", err.kind)
    assert.equals("dns", err.reason)
    assert.is_false(err.retryable)
    assert.equals(1, err.attempts)
    assert.matches("%(1 attempt in %d+%.%d s%)$", err.message)
    assert.is_true(elapsed < 30, elapsed)
    local requests = 0
    for _, ev in ipairs(trace.events) do if ev.event == "request" and ev.what then requests = requests + 1 end end
    assert.equals(1, requests)
    assert.equals(0, count(id))
    record("token endpoint host name does not exist", "(resolver)", count(id), r, err, "1 request")
  end)

  -- ---------------------------------------------------------- processes

  local function child_profile(store_path, extra)
    local p = profile { store = { kind = "file", path = store_path } }
    p.policy = { attempts = 3, backoff_base = 0.1, jitter = 0 }
    for k, v in pairs(extra or {}) do p[k] = v end
    local path = h.tmpdir() .. "/profile.json"
    h.write_file(path, cjson.encode(p))
    return path
  end

  local function run_child(prof, id, env)
    local vars = { OM_PROFILE = prof, OM_MESSAGE_ID = id }
    for k, v in pairs(env or {}) do vars[k] = v end
    local prefix = ""
    for k, v in pairs(vars) do prefix = prefix .. k .. "=" .. h.quote(v) .. " " end
    local _, out, rc = h.exec("env " .. prefix .. "timeout -s KILL 60 " .. h.lua_bin .. " "
      .. h.quote(h.root .. "/spec/support/fault_child.lua"))
    return rc, out
  end

  it("a crash while the token file is written: nothing sent by that process, the next one sends once", function()
    local dir = h.tmpdir()
    local store_path = dir .. "/tokens.json"
    local prof = child_profile(store_path)
    -- a first process stores a token
    local first = "fm-store-first@contoso.test"
    local rc, out = run_child(prof, first)
    assert.equals(0, rc, out)
    assert.matches("SENT 1", out)
    local saved = h.read_file(store_path)
    assert.truthy(saved)
    -- the second thinks it expired, fetches a new one and dies half way through saving it
    local id = "fm-store-crash@contoso.test"
    local before = srv.stats().token_requests
    rc, out = run_child(prof, id, { OM_FAULT = "during_save", OM_CLOCK_OFFSET = "7200" })
    assert.equals(86, rc, out)
    assert.not_matches("SENT", out)
    assert.equals(before + 1, srv.stats().token_requests)
    assert.equals(saved, h.read_file(store_path))       -- the old file is untouched
    assert.equals(0, count(id))
    -- the user sends again: the stored token is whole and is used, one copy
    rc, out = run_child(prof, id)
    assert.equals(0, rc, out)
    assert.matches("SENT 1", out)
    assert.equals(1, count(id))
    assert.equals(1, count(first))
    rows[#rows + 1] = { fault = "crash during a token store write (fs hook, _exit(86))",
      peer = "oidc-provider + sandbox", delivered = count(id),
      seen = "process died (status 86), no receipt; token file unchanged; the next process: receipt, attempts=1",
      note = "0 from the crashed process, 1 after the caller sent again" }
  end)

  it("a process killed in the middle of DATA: nothing delivered; sent again, delivered once", function()
    local dir = h.tmpdir()
    local prof = child_profile(dir .. "/tokens.json")
    local id = "fm-killed@contoso.test"
    -- the sandbox stops reading once the body starts, so the child is blocked writing it
    sb.faults { { stage = "data", action = "hold", hold_ms = 3000 } }
    local child = h.spawn(h.lua_bin .. " " .. h.quote(h.root .. "/spec/support/fault_child.lua"), {
      env = { OM_PROFILE = prof, OM_MESSAGE_ID = id, OM_BODY_KB = "8192" }, ready = "STARTED", timeout = 60,
      lifetime = 120 })
    local deadline = h.now() + 30
    local holding = false
    while h.now() < deadline and not holding do
      for _, f in ipairs(sb.stats().faults_used) do if f == "data:hold" then holding = true end end
      if not holding then h.sleep(0.05) end
    end
    assert.is_true(holding, "the child never reached DATA: " .. child.output())
    -- SIGKILL to the Lua process (the child of the `timeout` wrapper spawn started)
    h.exec("pkill -KILL -P " .. child.pid)
    local gone = h.now() + 10
    while child.alive() and h.now() < gone do h.sleep(0.05) end
    child.stop()
    assert.not_matches("SENT", child.output())
    h.sleep(4)   -- the sandbox reads on after hold_ms and sees the connection end
    assert.equals(0, count(id))
    -- no receipt, so the caller sends again
    local rc, out = run_child(prof, id)
    assert.equals(0, rc, out)
    assert.matches("SENT 1", out)
    assert.equals(1, count(id))
    rows[#rows + 1] = { fault = "process killed (SIGKILL) during the data", peer = "sandbox (smtp-server)",
      delivered = count(id), seen = "process died, no receipt; sent again: receipt, attempts=1",
      note = "0 from the killed process (partial data discarded), 1 after the caller sent again" }
  end)
  it("a process killed after the server stored the message, before the 250: one copy, and a second "
    .. "if the caller sends again (SMTP cannot tell)", function()
    local dir = h.tmpdir()
    local prof = child_profile(dir .. "/tokens.json")
    local id = "fm-killed-late@contoso.test"
    sb.faults { { stage = "data", action = "stall_after_store" } }
    local child = h.spawn(h.lua_bin .. " " .. h.quote(h.root .. "/spec/support/fault_child.lua"), {
      env = { OM_PROFILE = prof, OM_MESSAGE_ID = id }, ready = "STARTED", timeout = 60, lifetime = 120 })
    local deadline = h.now() + 30
    while h.now() < deadline and count(id) == 0 do h.sleep(0.05) end
    assert.equals(1, count(id), "the server never stored the message: " .. child.output())
    h.exec("pkill -KILL -P " .. child.pid)
    local gone = h.now() + 10
    while child.alive() and h.now() < gone do h.sleep(0.05) end
    child.stop()
    assert.not_matches("SENT", child.output())
    -- the caller holds no receipt: sending again is its only way not to lose
    -- the message, and the server then holds two copies
    local rc, out = run_child(prof, id)
    assert.equals(0, rc, out)
    assert.matches("SENT 1", out)
    assert.equals(2, count(id))
    rows[#rows + 1] = { fault = "process killed (SIGKILL) after the server stored the message, before the 250",
      peer = "sandbox (smtp-server)", delivered = count(id),
      seen = "process died, no receipt; sent again: receipt, attempts=1",
      note = "duplicate: 1 from the killed process, 1 after the caller sent again (SMTP cannot tell)" }
  end)
end)
