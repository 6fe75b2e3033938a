-- spec/core_spec.lua — what oauthmail.core itself provides: the shared error
-- value, the monotonic clock and sleep (from oauthmail.sys, which loads
-- without OpenSSL).
local core = require "oauthmail.core"
local errors = require "oauthmail.errors"

describe("oauthmail.core", function()
  it("builds on oauthmail.sys, which maps no OpenSSL and no libcurl: core carries the same values", function()
    local h = require "spec.support.helpers"
    local script = h.tmpdir() .. "/maps.lua"
    h.write_file(script, [[
      local function mapped(lib)
        local f = assert(io.open("/proc/self/maps"))
        local text = f:read("*a")
        f:close()
        return text:find(lib, 1, true) ~= nil
      end
      local sys = require "oauthmail.sys"
      require "oauthmail.errors"
      require "oauthmail.fs"
      io.write(tostring(mapped("libssl")), " ", tostring(mapped("libcrypto")), " ", tostring(mapped("libcurl")), " ")
      local core = require "oauthmail.core"
      io.write(tostring(mapped("libssl")), " ", tostring(core.fs == sys.fs and core.poll == sys.poll
        and core.monotime == sys.monotime and core.error_metatable == sys.error_metatable))
    ]])
    local ok, out = h.exec(h.lua_bin .. " " .. h.quote(script))
    assert(ok, out)
    assert.equal("false false false true true", out)
  end)

  it("tells the wall-clock time with its fraction", function()
    local sys = require "oauthmail.sys"
    local t = sys.time()
    assert.is_true(math.abs(t - os.time()) <= 1)
    local seen = {}
    for _ = 1, 50 do
      seen[math.floor(sys.time() * 1000) % 1000] = true
      sys.sleep(0.0013)
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.is_true(n > 10, "milliseconds advance between calls")
  end)

  it("isatty says whether a descriptor is a terminal, without starting a shell", function()
    local sys = require "oauthmail.sys"
    local h = require "spec.support.helpers"
    local script = h.tmpdir() .. "/tty.lua"
    h.write_file(script, [[io.write(tostring(require("oauthmail.sys").isatty(0)), tostring(require("oauthmail.sys").isatty(1)))]])
    local ok, out = h.exec(h.lua_bin .. " " .. h.quote(script) .. " </dev/null")
    assert(ok, out)
    assert.equal("falsefalse", out)
    -- under script(1) stdout is a pseudo-terminal
    ok, out = h.exec("script -qec " .. h.quote(h.lua_bin .. " " .. h.quote(script) .. " </dev/null") .. " /dev/null")
    assert(ok, out)
    assert.matches("falsetrue", out)
    assert.has_error(function() sys.isatty(-1) end)
    assert.has_error(function() sys.isatty("x") end)
  end)

  it("sleeps for the time asked and refuses durations that are not finite", function()
    local t0 = core.monotime()
    core.sleep(0.05)
    assert.is_true(core.monotime() - t0 >= 0.045)
    core.sleep(-1)  -- a negative duration is no sleep at all
    local ok, msg = pcall(core.sleep, 0 / 0)
    assert.is_false(ok)
    assert.matches("duration must be a finite number of seconds", msg)
    assert.has_error(function() core.sleep(math.huge) end)
    assert.has_error(function() core.sleep("soon") end)
  end)

  it("prints a C error fully before oauthmail.errors is loaded, and loading it changes nothing", function()
    local h = require "spec.support.helpers"
    local script = h.tmpdir() .. "/mt.lua"
    h.write_file(script, [[
      local core = require "oauthmail.core"
      local mt = core.error_metatable
      local function keys()
        local t = {}
        for k, v in pairs(mt) do t[#t + 1] = tostring(k) .. "=" .. tostring(v) end
        table.sort(t)
        return table.concat(t, ",")
      end
      local e = setmetatable({ kind = "smtp", message = "m", code = 535, enhanced = "5.7.3", hint = "h" }, mt)
      local before, printed = keys(), tostring(e)
      require "oauthmail.errors"
      io.write(printed, "|", tostring(before == keys()))
    ]])
    local ok, out = h.exec(h.lua_bin .. " " .. h.quote(script))
    assert(ok, out)
    assert.equal("smtp error: m [535 5.7.3]\n  hint: h|true", out)
  end)

  it("shares one error metatable between C and Lua errors", function()
    -- an error made in C (a connect step refused on a closed port)
    local c = core.conn.new { host = "127.0.0.1", port = 1 }
    local r, fd, deadline = c:connect_step()
    while r == "r" or r == "w" do
      core.poll(fd, r, deadline - core.monotime())
      r, fd, deadline = c:connect_step()
    end
    local cerr = fd
    local lerr = errors.new("smtp", "550 no such user", { code = 550, enhanced = "5.1.1", hint = "check the address" })
    assert.is_true(errors.is(cerr))
    assert.is_true(errors.is(lerr))
    assert.are.equal(getmetatable(cerr), getmetatable(lerr))
    assert.are.equal("smtp error: 550 no such user [550 5.1.1]\n  hint: check the address", tostring(lerr))
    assert.matches("^network error: connection refused", tostring(cerr))
    assert.has_error(function() errors.new("nonsense", "x") end)
    local n, e = errors.fail("config", "smtp.port: expected a number, got 'abc'")
    assert.is_nil(n)
    assert.are.equal("config", e.kind)
  end)
end)
