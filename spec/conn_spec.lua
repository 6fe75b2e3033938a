-- spec/conn_spec.lua — the TCP/TLS connection primitive against openssl
-- s_server and the project's own listener, with a PKI made by the test.
local conn = require "oauthmail.conn"
local errors = require "oauthmail.errors"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"

-- openssl s_server in reverse-echo mode ("-rev"): each line comes back reversed.
local function s_server(c, extra)
  local port = h.free_port()
  local proc = h.spawn(string.format("openssl s_server -rev -accept 127.0.0.1:%d -cert %s -key %s %s",
    port, c.cert, c.key, extra or ""), { ready = "(ACCEPT)" })
  return proc, port
end

local function peer(mode)
  local c = certs.get()
  local proc = h.spawn(string.format("%s %s/spec/support/tls_peer.lua %s %s %s", h.lua_bin, h.root, mode,
    c.server.cert, c.server.key), { ready = "PORT (%d+)" })
  return proc, tonumber(proc.match[1])
end

local function expect_error(kind, reason, pattern, ok, err)
  assert.is_nil(ok)
  assert.is_true(errors.is(err), "expected an error value, got " .. tostring(err))
  assert.are.equal(kind, err.kind, tostring(err))
  assert.are.equal(reason, err.reason, tostring(err))
  if pattern then assert.matches(pattern, err.message) end
  return err
end

describe("oauthmail.conn", function()
  local c
  setup(function() c = certs.get() end)
  after_each(function() h.stop_all() end)

  describe("TLS client", function()
    it("connects to a server whose chain is trusted and reports the certificate", function()
      local _, port = s_server(c.server)
      local s = assert(conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca, timeout = 5 })
      assert.is_true(s:is_tls())
      assert(s:send("hello\n"))
      assert.are.equal("olleh", s:receive_line())
      local info = s:tls_info()
      assert.matches("^TLSv1%.[23]$", info.protocol)
      assert.is_string(info.cipher)
      assert.are.equal("localhost", info.servername)  -- SNI was sent
      local pc = s:peer_certificate()
      assert.are.equal("CN=localhost", pc.subject)
      assert.are.equal("CN=oauthmail test CA", pc.issuer)
      assert.same({ "DNS:localhost", "IP:127.0.0.1", "IP:::1" }, pc.sans)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", pc.not_after)
      local ok, fp = h.exec("openssl x509 -noout -fingerprint -sha256 -in " .. c.server.cert)
      assert(ok, fp)
      assert.are.equal(fp:match("=([%x:]+)"), pc.fingerprint_sha256)
      s:close()
      s:close()  -- idempotent
      assert.has_error(function() s:send("x") end, "attempt to use a closed connection")
    end)

    it("verifies an IP address against the IP SANs", function()
      local _, port = s_server(c.server)
      local s = assert(conn.connect { host = "127.0.0.1", port = port, tls = "implicit", ca_file = c.ca })
      assert.is_nil(s:tls_info().servername)  -- no SNI for an address
      s:close()
    end)

    it("refuses a self-signed certificate", function()
      local _, port = s_server(c.selfsigned)
      expect_error("tls", "verify", "certificate is not trusted: self%-signed certificate %(CN=localhost%)",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca })
    end)

    it("refuses a certificate issued by a CA it does not trust", function()
      local _, port = s_server(c.server)
      expect_error("tls", "verify", "issuer is not in the trusted CA store",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.selfsigned.cert })
    end)

    it("refuses a certificate for another host name", function()
      local _, port = s_server(c.wronghost)
      expect_error("tls", "verify", "host name mismatch: certificate is for mail%.example%.org, not 'localhost'",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca })
    end)

    it("refuses an expired certificate and says when it expired", function()
      local _, port = s_server(c.expired)
      expect_error("tls", "verify", "certificate has expired %(notAfter 2026%-01%-01%)",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca })
    end)

    it("refuses a server that offers only TLS 1.1 unless min_tls allows it", function()
      local _, port = s_server(c.server, "-tls1_1 -cipher DEFAULT@SECLEVEL=0")
      expect_error("tls", "protocol", "does not support an allowed TLS version",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca })
      -- the server really speaks TLS 1.1: the same connection works when explicitly allowed
      local s = assert(conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca,
                                      min_tls = "1.0", ciphers = "DEFAULT@SECLEVEL=0" })
      assert.are.equal("TLSv1.1", s:tls_info().protocol)
      s:close()
    end)

    it("refuses a server that offers only TLS 1.0", function()
      local _, port = s_server(c.server, "-tls1 -cipher DEFAULT@SECLEVEL=0")
      expect_error("tls", "protocol", nil,
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca })
    end)

    it("skips verification only when verify=false is given", function()
      local _, port = s_server(c.selfsigned)
      expect_error("tls", "verify", nil, conn.connect { host = "localhost", port = port, tls = "implicit" })
      local s = assert(conn.connect { host = "localhost", port = port, tls = "implicit", verify = false })
      assert(s:send("abc\n"))
      assert.are.equal("cba", s:receive_line())
      s:close()
    end)

    it("presents a client certificate when given one", function()
      local proc, port = s_server(c.server, "-Verify 1 -CAfile " .. c.ca)
      local s = assert(conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca,
                                      client_cert = c.client.cert, client_key = c.client.key })
      assert(s:send("ping\n"))
      assert.are.equal("gnip", s:receive_line())
      s:close()
      assert.matches("oauthmail test client", proc.output())
    end)

    it("reports a bad client key file clearly", function()
      local _, port = s_server(c.server)
      expect_error("tls", "certificate", "cannot load private key '.*selfsigned%.key'",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca,
                       client_cert = c.client.cert, client_key = c.selfsigned.key })
    end)

    it("says so when the port speaks plain text", function()
      local _, port = peer("starttls")  -- greets with "220 ready" in plain text
      expect_error("tls", "handshake", "did not answer with TLS .*plain%-text or STARTTLS port",
        conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca, timeout = 5 })
    end)
  end)

  describe("STARTTLS", function()
    it("upgrades a plain connection in the middle of a conversation", function()
      local proc, port = peer("starttls")
      local s = assert(conn.connect { host = "localhost", port = port, tls = "none", timeout = 5 })
      assert.are.equal("220 ready", s:receive_line())
      assert(s:send("EHLO me\r\n"))
      assert.are.equal("250 EHLO me", s:receive_line())
      assert.is_nil(s:tls_info())
      assert(s:send("STARTTLS\r\n"))
      assert.are.equal("220 go", s:receive_line())
      assert(s:starttls { servername = "localhost", ca_file = c.ca })
      assert.is_true(s:is_tls())
      assert(s:send("EHLO again\r\n"))
      assert.are.equal("250 EHLO again", s:receive_line())
      local st, err = s:starttls { servername = "localhost", ca_file = c.ca }
      expect_error("tls", "state", "already encrypted", st, err)
      assert(s:send("QUIT\r\n"))
      assert.are.equal("221 bye", s:receive_line())
      s:close()
      local deadline = h.now() + 5
      while proc.alive() and h.now() < deadline do h.sleep(0.05) end
      assert.matches("server starttls: true", proc.output())
    end)

    it("refuses plain-text bytes that arrive before the handshake (injection)", function()
      local _, port = peer("inject")
      local s = assert(conn.connect { host = "localhost", port = port, tls = "none", timeout = 5 })
      assert.are.equal("220 ready", s:receive_line())
      assert(s:send("STARTTLS\r\n"))
      assert.are.equal("220 go", s:receive_line())
      h.sleep(0.2)  -- let the injected line arrive
      local ok, err = s:starttls { servername = "localhost", ca_file = c.ca }
      expect_error("tls", "injection", "sent data after its STARTTLS reply", ok, err)
      s:close()
    end)

    it("verifies the certificate presented after STARTTLS", function()
      local _, port = peer("starttls")
      local s = assert(conn.connect { host = "127.0.0.1", port = port, tls = "none", timeout = 5 })
      assert.are.equal("220 ready", s:receive_line())
      assert(s:send("STARTTLS\r\n"))
      assert.are.equal("220 go", s:receive_line())
      expect_error("tls", "verify", "host name mismatch: certificate is for localhost, 127%.0%.0%.1, ::1, not 'mail%.example%.org'",
        s:starttls { servername = "mail.example.org", ca_file = c.ca })
    end)
  end)

  describe("reading", function()
    local l, client, server
    before_each(function()
      l = assert(conn.listen { host = "127.0.0.1", port = 0 })
      client = assert(conn.connect { host = "127.0.0.1", port = l:port(), timeout = 2 })
      server = assert(l:accept(2))
    end)
    after_each(function()
      client:close()
      server:close()
      l:close()
    end)

    it("splits lines on CRLF (and bare LF) across writes", function()
      assert(server:send("one\r\ntw"))
      assert.are.equal("one", client:receive_line())
      assert(server:send("o\nthree\r\n"))
      assert.are.equal("two", client:receive_line())
      assert.are.equal("three", client:receive_line())
    end)

    it("refuses a line over the limit without reading it all", function()
      assert(server:send(string.rep("x", 100) .. "\r\n"))
      local err = expect_error("network", "too_long", "exceeds 64 bytes", client:receive_line(64))
      assert.is_nil(err.partial)
      -- a limit that fits reads the same line
      assert(server:send(string.rep("y", 50) .. "\r\n"))
      local l2 = client:receive_line(70000)
      assert.is_true(#l2 >= 50)
    end)

    it("does not grow without bound on an endless line", function()
      local chunk = string.rep("z", 65536)
      for _ = 1, 20 do assert(server:send(chunk)) end  -- 1.3 MB without a newline
      expect_error("network", "too_long", "exceeds 8192 bytes", client:receive_line())
    end)

    it("reports a close in the middle of a line with what arrived", function()
      assert(server:send("250 partial"))
      server:close()
      local err = expect_error("network", "closed", "in the middle of a line %(11 bytes received%)", client:receive_line())
      assert.are.equal("250 partial", err.partial)
    end)

    it("reports a clean close", function()
      server:close()
      expect_error("network", "closed", "connection closed by 127%.0%.0%.1:%d+$", client:receive_line())
    end)

    it("receives exact byte counts and whatever is available", function()
      assert(server:send("abcdefgh"))
      assert.are.equal("abc", client:receive(3))
      assert.are.equal("defgh", client:receive_some(100))
      assert(server:send("12"))
      server:close()
      local err = expect_error("network", "closed", "in the middle of a read", client:receive(5))
      assert.are.equal("12", err.partial)
    end)

    it("times out a silent server within the deadline", function()
      client:settimeout(0.5)
      local t0 = h.now()
      local err = expect_error("network", "timeout", "timed out after 0%.5 s waiting for data", client:receive_line())
      local elapsed = h.now() - t0
      assert.is_true(elapsed >= 0.45 and elapsed < 2, "elapsed " .. elapsed)
      assert.matches("network error: timed out", tostring(err))
    end)

    it("sends large buffers whole", function()
      local big = string.rep("0123456789abcdef", 65536)  -- 1 MiB, more than the socket buffers
      local proc = h.spawn(string.format("%s -e %s", h.lua_bin, h.quote(
        "local c=require'oauthmail.conn' local s=assert(c.connect{host='127.0.0.1',port=" .. l:port() ..
        "}) local d=assert(s:receive(1048576)) print('GOT', #d, d:sub(-16))")), { lifetime = 60 })
      local s2 = assert(l:accept(5))
      assert(s2:send(big))
      s2:close()
      local deadline = h.now() + 10
      while not proc.output():match("GOT") and h.now() < deadline do h.sleep(0.05) end
      assert.matches("GOT\t1048576\t0123456789abcdef", proc.output())
    end)
  end)

  describe("connecting", function()
    it("reports a refused connection", function()
      local port = h.free_port()
      expect_error("network", "refused", "connection refused by 127%.0%.0%.1:" .. port,
        conn.connect { host = "127.0.0.1", port = port })
    end)

    it("reports a host that does not resolve", function()
      expect_error("network", "dns", "cannot resolve host 'nonexistent%.invalid'",
        conn.connect { host = "nonexistent.invalid", port = 25, timeout = 5 })
    end)

    it("tells a resolver that failed (EAI_AGAIN, may heal) from a name that does not exist", function()
      -- a private resolv.conf in a mount namespace names a resolver that is
      -- not there: glibc answers "Temporary failure in name resolution"
      local d = h.tmpdir()
      h.write_file(d .. "/resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
      h.write_file(d .. "/probe.lua", [[
        local conn = require "oauthmail.conn"
        local _, err = conn.connect { host = "smtp.example.test", port = 25, timeout = 5 }
        print("REASON " .. tostring(err and err.reason) .. " " .. tostring(err and err.message))
      ]])
      local ok, out = h.exec(string.format("unshare -m sh -c %s",
        h.quote(string.format("mount --bind %s/resolv.conf /etc/resolv.conf && %s %s/probe.lua", d, h.lua_bin, d))))
      if not ok and out:match("unshare") then pending("no mount namespaces here: " .. out) return end
      assert(ok, out)
      assert.matches("REASON dns_temporary cannot resolve host 'smtp%.example%.test'", out)
    end)

    it("times out a TLS handshake with a server that never answers", function()
      local l = assert(conn.listen { host = "127.0.0.1", port = 0 })  -- accepts in the kernel, never speaks
      local t0 = h.now()
      expect_error("network", "timeout", "timed out after 0%.5 s in the TLS handshake",
        conn.connect { host = "127.0.0.1", port = l:port(), tls = "implicit", timeout = 0.5 })
      local elapsed = h.now() - t0
      assert.is_true(elapsed >= 0.45 and elapsed < 2, "elapsed " .. elapsed)
      l:close()
    end)

    it("speaks IPv6 on ::1 when the machine has it", function()
      local l = conn.listen { host = "::1", port = 0 }
      if not l then pending("no IPv6 loopback here") return end
      local s = assert(conn.connect { host = "::1", port = l:port() })
      local srv = assert(l:accept(2))
      assert(s:send("v6\r\n"))
      assert.are.equal("v6", srv:receive_line())
      assert.matches("%[::1%]", tostring(s))
      s:close() srv:close() l:close()
    end)

    it("does not let one black-holed address use up the deadline", function()
      -- A name with an IPv6 and an IPv4 address (a private /etc/hosts in a mount
      -- namespace). A listener whose accept queue is full drops SYNs: a black
      -- hole. Whichever address comes first, the other must get its share.
      local d = h.tmpdir()
      h.write_file(d .. "/hosts", "127.0.0.1 localhost\n::1 dualstack.test\n127.0.0.1 dualstack.test\n")
      h.write_file(d .. "/probe.lua", [[
        local conn = require "oauthmail.conn"
        local core = require "oauthmail.core"
        if not conn.listen { host = "::1", port = 0 } then print("NOV6") return end
        for _, hole in ipairs { "::1", "127.0.0.1" } do
          local open = hole == "::1" and "127.0.0.1" or "::1"
          local lh = assert(conn.listen { host = hole, port = 0, backlog = 0 })
          local port = lh:port()
          local lo = assert(conn.listen { host = open, port = port })
          local filler = {}
          for i = 1, 3 do filler[i] = conn.connect { host = hole, port = port, timeout = 0.3 } end
          assert(not filler[3], "the accept queue should be full")
          local t0 = core.monotime()
          local s, err = conn.connect { host = "dualstack.test", port = port, timeout = 3 }
          print(hole, s and "connected" or tostring(err), string.format("%.1f", core.monotime() - t0))
          if s then s:close() end
        end
      ]])
      local ok, out = h.exec(string.format("unshare -m sh -c %s",
        h.quote(string.format("mount --bind %s/hosts /etc/hosts && %s %s/probe.lua", d, h.lua_bin, d))))
      if not ok and out:match("unshare") then pending("no mount namespaces here: " .. out) return end
      if out:match("NOV6") then pending("no IPv6 loopback here") return end
      assert(ok, out)
      assert.matches("::1\tconnected", out)
      assert.matches("127%.0%.0%.1\tconnected", out)
    end)

    it("refuses timeouts that are not finite positive numbers", function()
      assert.has_error(function() conn.connect { host = "x", port = 1, timeout = 0 / 0 } end)
      assert.has_error(function() conn.connect { host = "x", port = 1, timeout = math.huge } end)
      assert.has_error(function() conn.connect { host = "x", port = 1, timeout = -1 } end)
      local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
      assert.has_error(function() l:accept(0 / 0) end)
      assert.has_error(function() l:settimeout(0) end)
      local s = assert(conn.connect { host = "127.0.0.1", port = l:port() })
      assert.has_error(function() s:settimeout(1e300) end)
      s:close() l:close()
    end)

    it("reads options raw, so no __index function can run under C", function()
      local proxy = setmetatable({}, { __index = function(_, k)
        if k == "host" then return "127.0.0." .. tostring(1) end  -- a fresh string each time
        if k == "port" then return 1 end
      end })
      assert.has_error(function() conn.connect(proxy) end, "option 'host' is required")
    end)

    it("raises on programmer errors", function()
      assert.has_error(function() conn.connect { port = 25 } end, "option 'host' is required")
      assert.has_error(function() conn.connect { host = "x", port = "25" } end, "option 'port': expected a number, got string")
      assert.has_error(function() conn.connect { host = "x", port = 25, tls = "starttls" } end)
      expect_error("config", "option", "min_tls", conn.connect { host = "x", port = 25, tls = "implicit", min_tls = "9" })
    end)
  end)

  describe("listener", function()
    it("serves TLS with a given certificate and key", function()
      local proc, port = peer("implicit")
      local s = assert(conn.connect { host = "localhost", port = port, tls = "implicit", ca_file = c.ca, timeout = 5 })
      assert(s:send("hi\r\n"))
      assert.are.equal("250 hi", s:receive_line())
      assert(s:send("HALF\r\n"))
      local err = expect_error("network", "closed", "in the middle of a line", s:receive_line())
      assert.are.equal("250 half", err.partial)
      s:close()
      assert.is_truthy(proc)
    end)

    it("times out an accept with nobody connecting", function()
      local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
      expect_error("network", "timeout", "waiting for a connection", l:accept(0.2))
      l:close()
      l:close()
    end)

    it("reports a port in use", function()
      local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
      expect_error("network", "in_use", "Address already in use", conn.listen { host = "127.0.0.1", port = l:port() })
      l:close()
    end)

    it("refuses server-side TLS without a key", function()
      expect_error("config", "option", "needs both cert and key",
        conn.listen { host = "127.0.0.1", port = 0, tls = { cert = c.server.cert } })
    end)
  end)
end)
