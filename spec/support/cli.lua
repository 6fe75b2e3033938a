-- spec/support/cli.lua — run the `oauthmail` command as a user or a tool
-- would: a separate process with its own environment, stdin from a file, no
-- terminal, stdout and stderr kept apart. Also writes profile files and a
-- wrapper script so msmtp and git send-email can call `oauthmail` by path.
local h = require "spec.support.helpers"

local M = {}

local build = os.getenv("OAUTHMAIL_BUILD") or ("build/" .. h.lua_version)
M.lua_path = h.root .. "/lua/?.lua;" .. h.root .. "/lua/?/init.lua;;"
M.lua_cpath = h.root .. "/" .. build .. "/?.so;;"

-- A value as Lua source (strings, numbers, booleans, nested tables).
local function lua_source(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "string" then return string.format("%q", v) end
  if t == "number" or t == "boolean" then return tostring(v) end
  if t ~= "table" then error("cannot write a " .. t .. " into a profile") end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for _, k in ipairs(keys) do
    local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or ("[" .. lua_source(k) .. "]")
    parts[#parts + 1] = indent .. "  " .. key .. " = " .. lua_source(v[k], indent .. "  ") .. ","
  end
  return "{\n" .. table.concat(parts, "\n") .. "\n" .. indent .. "}"
end
M.lua_source = lua_source

-- A fresh home for one test: HOME, XDG folders, a profiles folder and a bin
-- folder holding the `oauthmail` wrapper. Returns env (a table) and paths.
function M.home()
  local dir = h.tmpdir()
  local home = {
    dir = dir, profiles = dir .. "/profiles", state = dir .. "/state", config = dir .. "/config",
    bin = dir .. "/bin",
  }
  h.exec("mkdir -p " .. h.quote(home.profiles) .. " " .. h.quote(home.bin) .. " " .. h.quote(home.config))
  home.env = {
    HOME = dir, XDG_STATE_HOME = home.state, XDG_CONFIG_HOME = home.config,
    OAUTHMAIL_PROFILE_PATH = home.profiles, LUA_PATH = M.lua_path, LUA_CPATH = M.lua_cpath,
    OAUTHMAIL_TTY = "0",
  }
  -- what msmtp's passwordeval and git's --sendmail-cmd run
  home.oauthmail = home.bin .. "/oauthmail"
  -- (under the sanitizer run only the Lua that loads the core gets its runtimes)
  local san = ""
  for _, k in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
    if os.getenv(k) then san = san .. " " .. k .. "=" .. h.quote(os.getenv(k)) end
  end
  h.write_file(home.oauthmail, "#!/bin/sh\nLUA_PATH=" .. h.quote(M.lua_path) .. " LUA_CPATH=" .. h.quote(M.lua_cpath)
    .. san .. " exec " .. h.quote(h.lua_bin) .. " " .. h.quote(h.root .. "/bin/oauthmail") .. " \"$@\"\n", "755")
  function home.profile(name, t)
    return h.write_file(home.profiles .. "/" .. name .. ".lua", "return " .. lua_source(t) .. "\n")
  end
  return home
end

local function env_prefix(env)
  local keys = {}
  for k in pairs(env or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. h.quote(env[k]) end
  return table.concat(parts, " ")
end
M.env_prefix = env_prefix

-- cli.run(home, argv_list, {stdin=string, env={}, program=path}) -> {rc=, out=, err=}
-- (program: a Lua script run instead of bin/oauthmail, with the same arguments)
-- No terminal anywhere: stdin is a file (or /dev/null), stdout and stderr files,
-- and setsid takes away the controlling terminal as cron does.
function M.run(home, argv, o)
  o = o or {}
  local dir = h.tmpdir()
  local inp = dir .. "/stdin"
  h.write_file(inp, o.stdin or "")
  local env = {}
  for k, v in pairs(home.env) do env[k] = v end
  for k, v in pairs(o.env or {}) do env[k] = v end
  -- the sanitizer run preloads its runtimes into the Lua that loads the core
  for _, k in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do env[k] = env[k] or os.getenv(k) end
  local args = {}
  for i, a in ipairs(argv) do args[i] = h.quote(a) end
  local cmd = string.format("cd %s && env -i PATH=%s %s setsid %s %s %s <%s >%s/out 2>%s/err; echo $? >%s/rc",
    h.quote(dir), h.quote(os.getenv("PATH") or "/usr/bin:/bin"), env_prefix(env), h.lua_bin,
    h.quote(o.program or (h.root .. "/bin/oauthmail")), table.concat(args, " "), h.quote(inp), h.quote(dir), h.quote(dir),
    h.quote(dir))
  h.exec(cmd)
  return { rc = tonumber(h.read_file(dir .. "/rc")), out = h.read_file(dir .. "/out") or "",
    err = h.read_file(dir .. "/err") or "" }
end

-- One HTTP/1.1 exchange with Connection: close (chromedriver refuses 1.0):
-- cli.http11(port, method, path, body_table) -> status, decoded JSON (or text)
function M.http11(port, method, path, body)
  local cjson = require "cjson"
  local conn = require "oauthmail.conn"
  local c = assert(conn.connect { host = "127.0.0.1", port = port, timeout = 60 })
  local text = body and cjson.encode(body) or ""
  assert(c:send(string.format("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
    .. "Content-Length: %d\r\nConnection: close\r\n\r\n%s", method, path, port, #text, text)))
  -- read until the body is complete (chromedriver keeps the connection open)
  local raw = ""
  for _ = 1, 100000 do
    local d = c:receive_some(65536)
    if not d then break end
    raw = raw .. d
    local hd, got = raw:match("^(.-)\r\n\r\n(.*)$")
    local len = hd and tonumber(hd:lower():match("content%-length:%s*(%d+)"))
    if len and #got >= len then break end
    if hd and hd:lower():find("transfer%-encoding:%s*chunked") and got:find("\r\n0\r\n\r\n$") then break end
  end
  c:close()
  local head, rest = raw:match("^(.-)\r\n\r\n(.*)$")
  if not head then return nil, raw end
  if head:lower():find("transfer%-encoding:%s*chunked") then
    local out, pos = {}, 1
    while true do
      local size, after = rest:match("^(%x+)[^\r\n]*\r\n()", pos)
      size = size and tonumber(size, 16)
      if not size or size == 0 then break end
      out[#out + 1] = rest:sub(after, after + size - 1)
      pos = after + size + 2
    end
    rest = table.concat(out)
  end
  local ok, doc = pcall(cjson.decode, rest)
  return tonumber(head:match("^HTTP/1%.%d (%d+)")), ok and doc or rest
end

-- cli.spawn(home, argv, {ready=pattern, env={}, fifo=true}) -> proc: the
-- command in the background (for login, which waits for a person). proc.wait()
-- -> exit code (bounded); proc.feed(text) writes to its stdin when fifo=true.
function M.spawn(home, argv, o)
  o = o or {}
  local dir = h.tmpdir()
  local env = {}
  for k, v in pairs(home.env) do env[k] = v end
  for k, v in pairs(o.env or {}) do env[k] = v end
  for _, k in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do env[k] = env[k] or os.getenv(k) end
  local args = {}
  for i, a in ipairs(argv) do args[i] = h.quote(a) end
  local stdin = "/dev/null"
  if o.fifo then
    stdin = dir .. "/stdin"
    assert(h.exec("mkfifo " .. h.quote(stdin)))
  end
  local inner = string.format("cd %s && env -i PATH=%s %s %s %s %s <%s; echo \"EXIT=$?\"", h.quote(dir),
    h.quote(os.getenv("PATH") or "/usr/bin:/bin"), env_prefix(env), h.lua_bin, h.quote(h.root .. "/bin/oauthmail"),
    table.concat(args, " "), h.quote(stdin))
  -- a FIFO is opened read-write, so the shell does not wait for a writer
  if o.fifo then inner = inner:gsub(" <(%S+); echo", " <>%1; echo") end
  local proc = h.spawn("sh -c " .. h.quote(inner), { ready = o.ready, timeout = o.timeout or 60, lifetime = 300 })
  function proc.feed(text)
    local f = assert(io.open(stdin, "w"))
    f:write(text)
    f:close()
  end
  function proc.wait(timeout)
    local deadline = h.now() + (timeout or 60)
    repeat
      local code = proc.output():match("EXIT=(%d+)")
      if code then return tonumber(code) end
      h.sleep(0.1)
    until h.now() > deadline
    proc.stop()
    error("oauthmail did not finish:\n" .. proc.output())
  end
  return proc
end

return M
