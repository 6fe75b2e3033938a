-- spec/redis_spec.lua — oauthmail.redis: the RESP engine (csrc/resp.c) without
-- a socket, then the client against a real redis-server on loopback (plain,
-- ACL user, TLS with the test's own CA), its failure paths and its scripts.
local h = require "spec.support.helpers"
local rsupport = require "spec.support.redis"
local core = require "oauthmail.core"
local resp = core.resp

local function all(eng)
  local out = {}
  while true do
    local ok, v, kind = eng:next()
    if not ok then return out, ok, v end
    out[#out + 1] = { v = v, kind = kind }
  end
end

describe("RESP engine", function()
  it("encodes commands as arrays of bulk strings (integers without a decimal point)", function()
    assert.equals("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n", resp.encode { "SET", "k", 12 })
    assert.equals("*2\r\n$4\r\nECHO\r\n$4\r\na\r\nb\r\n", resp.encode { "ECHO", "a\r\nb" })
    assert.equals("*2\r\n$4\r\nINCR\r\n$3\r\n1.5\r\n", resp.encode { "INCR", 1.5 })
    assert.has_error(function() resp.encode { "SET", {} } end)
    assert.has_error(function() resp.encode { "SET", 0 / 0 } end)
    assert.has_error(function() resp.encode {} end)
  end)

  it("parses every RESP2 and RESP3 type, fed one byte at a time", function()
    local input = "+OK\r\n-ERR wrong\r\n:-42\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n*3\r\n$0\r\n\r\n:1\r\n*1\r\n+x\r\n"
      .. "_\r\n#t\r\n#f\r\n,3.25\r\n,inf\r\n(123456789012345678901234567890\r\n!9\r\nSYNTAX no\r\n"
      .. "=8\r\ntxt:abcd\r\n%2\r\n+a\r\n:1\r\n+b\r\n*0\r\n~2\r\n+p\r\n+q\r\n>2\r\n+message\r\n+hi\r\n"
      .. "|1\r\n+ttl\r\n:3\r\n+after-attribute\r\n"
    local e = resp.engine()
    local got = {}
    for i = 1, #input do
      assert.is_true(e:feed(input:sub(i, i)))
      for _, r in ipairs((all(e))) do got[#got + 1] = r end
    end
    assert.equals(0, e:pending())
    local function v(i) return got[i].v end
    assert.equals("OK", v(1))
    assert.is_true(resp.is_error(v(2)))
    assert.equals("ERR wrong", v(2).message)
    assert.equals("error", got[2].kind)
    assert.equals(-42, v(3))
    assert.equals("he\r\no", v(4))
    assert.equals(resp.null, v(5))
    assert.equals(resp.null, v(6))
    assert.same({ "", 1, { "x" } }, v(7))
    assert.equals(resp.null, v(8))
    assert.is_true(v(9))
    assert.is_false(v(10))
    assert.equals(3.25, v(11))
    assert.equals(math.huge, v(12))
    assert.equals("123456789012345678901234567890", v(13))
    assert.equals("SYNTAX no", v(14).message)
    assert.equals("error", got[14].kind)
    assert.equals("abcd", v(15))
    assert.same({ a = 1, b = {} }, v(16))
    assert.same({ "p", "q" }, v(17))
    assert.same({ "message", "hi" }, v(18))
    assert.equals("push", got[18].kind)
    assert.equals("after-attribute", v(19))
    assert.equals(19, #got)
  end)

  it("takes an empty feed, before any data and after (found by fuzz/resp: memcpy to a NULL buffer)", function()
    local e = resp.engine()
    assert.is_true(e:feed(""))
    assert.is_false(e:next())
    e:feed("+OK\r\n")
    assert.is_true(e:feed(""))
    local ok, v = e:next()
    assert.is_true(ok)
    assert.equals("OK", v)
  end)

  it("keeps 64-bit integers exact where Lua has integers", function()
    local e = resp.engine()
    e:feed(":9223372036854775807\r\n:-9223372036854775808\r\n")
    local _, a = e:next()
    local _, b = e:next()
    if math.type then
      assert.equals(math.maxinteger, a)
      assert.equals(math.mininteger, b)
    else
      assert.equals(2 ^ 63, a)
    end
  end)

  local function refuses(input, pattern, opts)
    local e = resp.engine(opts)
    local ok, err = e:feed(input)
    if ok then ok, err = e:next() end
    assert.is_nil(ok, "accepted: " .. input:sub(1, 40))
    assert.equals("network", err.kind)
    assert.equals("protocol", err.reason)
    assert.matches(pattern, err.message)
    -- broken for good: later bytes are not parsed as if nothing happened
    local ok2 = e:feed("+OK\r\n")
    if ok2 then ok2 = e:next() end
    assert.is_nil(ok2)
  end

  it("refuses malformed replies with a clear protocol error", function()
    refuses("?what\r\n", "unknown reply type byte %(0x3f%)")
    refuses(":12a\r\n", "malformed integer")
    refuses(":99999999999999999999\r\n", "malformed integer")
    refuses(":\r\n", "malformed integer")
    refuses("$-2\r\n", "malformed bulk string length")
    refuses("$3\r\nabcd\r\n", "not followed by CRLF")
    refuses("+OK\rX\n", "bare CR")
    refuses("+OK\nX", "bare LF")
    refuses("#x\r\n", "malformed boolean")
    refuses(",1.0x\r\n", "malformed double")
    refuses("=2\r\nab\r\n", "malformed verbatim")
    refuses("=6\r\ntxtxab\r\n", "malformed verbatim")
    refuses("%-1\r\n", "malformed aggregate length")
    refuses("_x\r\n", "malformed null")
    refuses("\r\n", "empty reply")
  end)

  it("bounds depth, bulk length, element count, line length and buffered bytes", function()
    refuses(string.rep("*1\r\n", 20) .. ":1\r\n", "nested deeper than 16 levels")
    refuses(string.rep("*1\r\n", 5) .. ":1\r\n", "nested deeper than 4", { max_depth = 4 })
    refuses("$1000\r\n", "1000 bytes, over 100 %(max_bulk%)", { max_bulk = 100 })
    refuses("*1000000000\r\n", "over 1000000 %(max_elements%)")
    refuses("+" .. string.rep("a", 100), "longer than 64 bytes %(max_line%)", { max_line = 64 })
    refuses(string.rep("x", 200), "larger than 128 bytes", { max_buffer = 128 })
    -- a huge declared length is refused before any byte of it arrives
    refuses("$99999999999\r\n", "over 16777216 %(max_bulk%)")
    -- a partial value at the limits is only "more, please"
    local e = resp.engine { max_line = 64 }
    e:feed("+" .. string.rep("a", 60))
    assert.is_false(e:next())
  end)

  it("a value in a map keyed by NaN is dropped, not raised", function()
    local e = resp.engine()
    e:feed("%2\r\n,nan\r\n:1\r\n+k\r\n:2\r\n")
    local ok, m = e:next()
    assert.is_true(ok)
    assert.same({ k = 2 }, m)
  end)

  it("is closed once and refuses use after close", function()
    local e = resp.engine()
    e:close()
    e:close()
    assert.has_error(function() e:feed("+OK\r\n") end, "resp engine: used after close")
  end)
end)

local it_redis = rsupport.available() and it or pending

describe("oauthmail.redis client", function()
  local redis = require "oauthmail.redis"
  local plain, acl, tls

  setup(function()
    if not rsupport.available() then return end
    plain = rsupport.start()
    acl = rsupport.start { user = "mailer", password = "Redis-secret-pw-1" }
    tls = rsupport.start { tls = true, user = "mailer", password = "Redis-secret-pw-2" }
  end)
  teardown(function()
    for _, s in ipairs { plain, acl, tls } do if s then s.stop() end end
  end)

  it("parses URLs without ever quoting them in errors", function()
    local u = assert(redis.parse_url("rediss://al%40ice:p%3Ass@redis.example:6380/3"))
    assert.same({ tls = true, username = "al@ice", password = "p:ss", host = "redis.example", port = 6380, db = 3 }, u)
    assert.same({ tls = false, host = "::1", port = 6379, password = "pw" }, assert(redis.parse_url("redis://pw@[::1]")))
    local none, why = redis.parse_url("http://u:TopSecret@h")
    assert.is_nil(none)
    assert.not_matches("TopSecret", why)
    assert.has_error(function() redis.new { url = "redis://h:99999" } end)
    assert.has_error(function() redis.new { host = "h", passwrd = "x" } end, "redis.new: unknown option 'passwrd'")
  end)

  it_redis("runs commands, pipelines, nulls and server errors", function()
    local c = redis.new { url = plain.url }
    assert.equals("OK", c:call("SET", "k1", "v1"))
    assert.equals("v1", c:call("GET", "k1"))
    assert.is_nil(c:call("GET", "missing"))
    local none, err = c:call("INCR", "k1")
    assert.is_nil(none)
    assert.equals("store", err.kind)
    assert.equals("ERR", err.redis_error)
    assert.matches("not an integer", err.message)
    local rt = c.round_trips
    local out = assert(c:pipeline { { "SET", "n", 1 }, { "INCR", "n" }, { "LPUSH", "n", "x" }, { "MGET", "n", "nope" } })
    assert.equals("OK", out[1].value)
    assert.equals(2, out[2].value)
    assert.equals("WRONGTYPE", out[3].err.redis_error)
    assert.same({ "2", redis.null }, out[4].value)
    assert.equals(rt + 1, c.round_trips)   -- one pipeline, one round trip
    c:close()
  end)

  it_redis("authenticates as an ACL user and selects a database", function()
    local c = redis.new { url = acl.url .. "/2" }
    assert.equals("OK", c:call("SET", "in-db-2", "yes"))
    assert.matches("yes", acl.cli("-n 2 GET in-db-2"))
    assert.equals("", (acl.cli("-n 0 GET in-db-2"):gsub("%s", "")))
    c:close()
  end)

  it_redis("speaks RESP3 when asked (HELLO 3 with the ACL user): maps arrive as tables", function()
    local c = redis.new { url = acl.url, protocol = 3 }
    assert.equals(1, c:call("HSET", "h3", "field", "value"))
    assert.same({ field = "value" }, c:call("HGETALL", "h3"))
    local c2 = redis.new { url = acl.url }   -- RESP2: the same reply as a flat array
    assert.same({ "field", "value" }, c2:call("HGETALL", "h3"))
    local bad = redis.new { port = acl.port, username = "mailer", password = "Wrong-pw-3", protocol = 3 }
    local none, err = bad:call("PING")
    assert.is_nil(none)
    assert.equals("auth", err.kind)
    h.assert_no_secrets(tostring(err), { "Wrong-pw-3" })
  end)

  it_redis("a wrong password is an auth error that names the user, never the password", function()
    local c = redis.new { port = acl.port, username = "mailer", password = "Wrong-pw-777" }
    local none, err = c:call("PING")
    assert.is_nil(none)
    assert.equals("auth", err.kind)
    assert.equals("WRONGPASS", err.redis_error)
    assert.matches("authentication as mailer refused", err.message)
    h.assert_no_secrets(tostring(err), { "Wrong-pw-777", "Redis-secret-pw-1" })
    local c2 = redis.new { port = acl.port }
    local none2, err2 = c2:call("GET", "x")
    assert.is_nil(none2)
    assert.equals("NOAUTH", err2.redis_error)
  end)

  it_redis("speaks TLS with the server verified (rediss://), and refuses an unknown CA", function()
    local c = redis.new { url = tls.url, ca_file = tls.certs.ca }
    assert.equals("PONG", c:call("PING"))
    c:close()
    local bad = redis.new { url = tls.url }   -- the system store does not know the test CA
    local none, err = bad:call("PING")
    assert.is_nil(none)
    assert.equals("tls", err.kind)
    assert.matches("cannot connect to redis 127.0.0.1:" .. tls.port, err.message, 1, true)
    h.assert_no_secrets(tostring(err), { "Redis-secret-pw-2" })
    local plain_to_tls = redis.new { port = tls.port, password = "x", timeout = 2 }
    assert.is_nil((plain_to_tls:call("PING")))
  end)

  it_redis("runs scripts by EVALSHA, loading them once and again after SCRIPT FLUSH", function()
    local c = redis.new { url = plain.url }
    local script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    assert.equals(5, c:eval(script, { "cnt" }, { 5 }))
    local rt = c.round_trips
    assert.equals(10, c:eval(script, { "cnt" }, { 5 }))
    assert.equals(rt + 1, c.round_trips)   -- steady state: one round trip
    plain.cli("SCRIPT FLUSH")
    assert.equals(15, c:eval(script, { "cnt" }, { 5 }))
    local none, err = c:eval("return redis.error_reply('MYERR custom')", {}, {})
    assert.is_nil(none)
    assert.equals("MYERR", err.redis_error)
  end)

  it("reports a Redis that is down, and one that never answers, as network errors in bounded time", function()
    local c = redis.new { port = h.free_port(), timeout = 2 }
    local none, err = c:call("PING")
    assert.is_nil(none)
    assert.equals("network", err.kind)
    assert.matches("cannot connect to redis 127.0.0.1", err.message)
    local conn = require "oauthmail.conn"
    local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
    local mute = redis.new { port = l:port(), timeout = 0.5 }
    local t0 = h.now()
    local none2, err2 = mute:call("PING")
    assert.is_nil(none2)
    assert.equals("timeout", err2.reason)
    assert.matches("no reply within 0.5 s", err2.message)
    assert.is_true(h.now() - t0 < 3)
    l:close()
  end)

  it_redis("reconnects after the server restarts (the failed call errs, the next works)", function()
    local srv = rsupport.start()
    local c = redis.new { url = srv.url, timeout = 2 }
    assert.equals("PONG", c:call("PING"))
    srv.restart()
    local ok = c:call("PING")
    if not ok then ok = c:call("PING") end
    assert.equals("PONG", ok)
    srv.stop()
  end)

  it_redis("serves many coroutines of the built-in loop, one connection each at most", function()
    local oauthmail_loop = require "oauthmail.loop"
    local c = redis.new { url = plain.url, max_connections = 4 }
    local results = {}
    oauthmail_loop.run(function()
      for i = 1, 40 do
        oauthmail_loop.spawn(function()
          results[i] = c:call("INCR", "loop-counter")
        end)
      end
    end)
    assert.equals(40, #results)
    assert.equals("40", c:call("GET", "loop-counter"))
    assert.is_true(c.open <= 4)
  end)
end)
