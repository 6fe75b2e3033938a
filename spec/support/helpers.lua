-- spec/support/helpers.lua — the test harness: temporary folders, shell
-- commands, real peers started as child processes on loopback (always bounded
-- by a kill timer), free ports, and secret-leak assertions for traces.
local core = require "oauthmail.core"

local M = {}

M.lua_bin = os.getenv("OAUTHMAIL_LUA") or "lua5.4"
M.lua_version = os.getenv("LUA_VERSION") or "5.4"
M.root = os.getenv("OAUTHMAIL_ROOT") or assert(io.popen("pwd")):read("*l")
M.peers = M.root .. "/spec/peers"   -- node_modules for the npm peers live here

function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Run a shell command; returns ok (exit 0), output (stdout+stderr), exit code.
-- Under the sanitizer run the suite's environment preloads ASan; ordinary
-- tools (pkill, openssl, node) must not inherit that: some hang under it.
-- A command that runs the suite's Lua loads the (maybe instrumented) core
-- module, so it keeps the preload.
local UNSAN = "unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS; "
local function runs_lua(cmd)
  return cmd:find(M.lua_bin .. " ", 1, true) ~= nil
end

function M.exec(cmd)
  local f = assert(io.popen((runs_lua(cmd) and "" or UNSAN) .. "(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
  local out = f:read("*a")
  f:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  out = out:gsub("__rc=%d+%s*$", "")
  return rc == 0, out, rc
end

function M.sleep(s) core.sleep(s) end
M.now = core.monotime

function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- The messages of a maildir both sandboxes write (index.jsonl and the
-- files it names), each with its text as data.
function M.maildir_messages(maildir)
  local cjson = require "cjson"
  local out = {}
  for line in (M.read_file(maildir .. "/index.jsonl") or ""):gmatch("[^\n]+") do
    local m = cjson.decode(line)
    m.data = M.read_file(m.file)
    out[#out + 1] = m
  end
  return out
end

function M.write_file(path, data, mode)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  if mode then M.exec("chmod " .. mode .. " " .. M.quote(path)) end
  return path
end

local tmp_root
-- M.cleanup(): remove every folder M.tmpdir made in this process (test CA
-- keys included). bin/busted-run calls it when the run ends, the demo when
-- it is done; later M.tmpdir calls start a fresh root.
function M.cleanup()
  if os.getenv("OAUTHMAIL_KEEP_TMP") == "1" then return end   -- for debugging a failed run
  if tmp_root and tmp_root:find("^/tmp/oauthmail%-spec%.") then
    M.exec("rm -rf " .. M.quote(tmp_root))
  end
  tmp_root = nil
end

-- A fresh temporary folder, removed by M.cleanup when the run ends.
function M.tmpdir()
  if not tmp_root then
    local ok, out = M.exec("mktemp -d /tmp/oauthmail-spec.XXXXXX")
    assert(ok, out)
    tmp_root = out:match("[^\n]+")
  end
  local ok, out = M.exec("mktemp -d " .. M.quote(tmp_root .. "/d.XXXXXX"))
  assert(ok, out)
  return out:match("[^\n]+")
end

-- A port nobody listens on right now (the kernel picks it).
function M.free_port()
  local conn = require "oauthmail.conn"
  local l = assert(conn.listen { host = "127.0.0.1", port = 0 })
  local port = l:port()
  l:close()
  return port
end

local children = {}

-- Start a peer: M.spawn(cmd, {ready = "lua pattern", timeout = 60, cwd = dir, env = {K=V}, lifetime = 900})
-- The command runs under `timeout`, so it dies on its own even if a test crashes.
-- Returns a process {pid, log, output(), stop(), match} once `ready` shows in its output;
-- `match` holds the pattern's captures (e.g. a port the peer printed).
function M.spawn(cmd, opts)
  opts = opts or {}
  local log = opts.log or (M.tmpdir() .. "/peer.log")
  local env = ""
  for k, v in pairs(opts.env or {}) do env = env .. " " .. k .. "=" .. M.quote(v) end
  local keep_san = runs_lua(cmd)
  local line = string.format("%s%senv%s timeout -s KILL %d %s >%s 2>&1 </dev/null & echo $!",
    keep_san and "" or UNSAN, opts.cwd and ("cd " .. M.quote(opts.cwd) .. " && ") or "", env,
    opts.lifetime or 900, cmd, M.quote(log))
  local f = assert(io.popen(line))
  local pid = tonumber(f:read("*l"))
  f:close()
  assert(pid, "could not start: " .. cmd)
  local proc = { pid = pid, log = log, cmd = cmd }
  function proc.output() return M.read_file(log) or "" end
  -- Orphaned peers may linger as zombies where PID 1 does not reap: a zombie is not alive.
  function proc.alive()
    local stat = M.read_file("/proc/" .. pid .. "/stat")
    return stat ~= nil and stat:match("^%d+ %b() (%a)") ~= "Z"
  end
  function proc.stop()
    if proc.stopped then return end
    proc.stopped = true
    M.exec("kill " .. pid .. " 2>/dev/null; pkill -P " .. pid .. " 2>/dev/null")
    for _ = 1, 40 do
      if not proc.alive() then return end
      core.sleep(0.05)
    end
    M.exec("kill -9 " .. pid .. " 2>/dev/null; pkill -9 -P " .. pid .. " 2>/dev/null")
  end
  children[#children + 1] = proc
  if opts.ready then
    -- an upper bound only: peers start in a second or two, but a busy 2-core machine can be slow
    local deadline = core.monotime() + (opts.timeout or 60)
    while true do
      local out = proc.output()
      local caps = { out:match(opts.ready) }
      if #caps > 0 then proc.match = caps break end
      if not proc.alive() then
        error("peer exited before it was ready: " .. cmd .. "\n" .. out, 2)
      end
      if core.monotime() > deadline then
        proc.stop()
        error("peer not ready after " .. (opts.timeout or 60) .. " s: " .. cmd .. "\n" .. out, 2)
      end
      core.sleep(0.05)
    end
  end
  return proc
end

function M.stop_all()
  for i = #children, 1, -1 do children[i].stop() children[i] = nil end
end

-- Wait until something accepts TCP connections on host:port.
function M.wait_port(port, host, timeout)
  local conn = require "oauthmail.conn"
  local deadline = core.monotime() + (timeout or 10)
  repeat
    local c = conn.connect { host = host or "127.0.0.1", port = port, tls = "none", timeout = 1 }
    if c then c:close() return true end
    core.sleep(0.05)
  until core.monotime() > deadline
  error("nothing listens on port " .. port)
end

-- One HTTP/1.0 exchange with a test peer (control routes, token endpoints of
-- stubs): {host="127.0.0.1", port=, ca_file= (then TLS), method="GET", path=,
-- body= (string), content_type=, timeout=10} -> status, body text | nil, err.
function M.http_exchange(o)
  local conn = require "oauthmail.conn"
  local host = o.host or "127.0.0.1"
  local c, err = conn.connect { host = host, port = o.port, tls = o.ca_file and "implicit" or "none",
                                ca_file = o.ca_file, timeout = o.timeout or 10 }
  if not c then return nil, err end
  local body = o.body or ""
  local ok, serr = c:send(string.format("%s %s HTTP/1.0\r\nHost: %s:%d\r\nContent-Type: %s\r\n"
    .. "Content-Length: %d\r\n\r\n%s", o.method or "GET", o.path, host, o.port,
    o.content_type or "application/json", #body, body))
  if not ok then c:close() return nil, serr end
  local chunks = {}
  for _ = 1, 100000 do  -- bounded: 6.5 GB at most, far beyond any peer's answer
    local s, rerr = c:receive_some(65536)
    if not s then
      if rerr.reason ~= "closed" then c:close() return nil, rerr end
      break
    end
    chunks[#chunks + 1] = s
  end
  c:close()
  local raw = table.concat(chunks)
  return tonumber(raw:match("^HTTP/1%.%d (%d+)")), raw:match("\r\n\r\n(.*)$") or ""
end

-- The same with JSON both ways: returns status, decoded body (or its text);
-- raises when the peer cannot be reached (a harness failure, not a test result).
function M.http_json(o, method, path, body)
  local cjson = require "cjson"
  local status, text = M.http_exchange { host = o.host, port = o.port, ca_file = o.ca_file, timeout = o.timeout,
    method = method, path = path, body = body and cjson.encode(body) or nil }
  if not status then error("test peer on port " .. tostring(o.port) .. ": " .. tostring(text), 2) end
  local ok, doc = pcall(cjson.decode, text)
  return status, ok and doc or text
end

-- Every form a secret may take in a trace: itself, base64, base64url, URL-encoded.
local function b64(s)
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, byte = "", x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return alphabet:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

function M.secret_forms(secret)
  local forms = { secret, b64(secret), (b64(secret):gsub("+", "-"):gsub("/", "_"):gsub("=", "")) }
  forms[#forms + 1] = (secret:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
  -- application/x-www-form-urlencoded: "+" for a space
  forms[#forms + 1] = (secret:gsub("[^%w%*%-%._ ]", function(c) return string.format("%%%02X", c:byte()) end)
    :gsub(" ", "+"))
  return forms
end

-- Assert that none of `secrets` (nor their encodings) occurs in `text`.
function M.assert_no_secrets(text, secrets)
  assert(type(text) == "string", "assert_no_secrets: text must be a string")
  for _, secret in ipairs(secrets) do
    assert(#secret >= 6, "assert_no_secrets: secret too short to check reliably: " .. #secret)
    for _, form in ipairs(M.secret_forms(secret)) do
      if text:find(form, 1, true) then
        error("secret leaked into output (form '" .. form:sub(1, 6) .. "...'):\n" .. text, 2)
      end
    end
  end
  return true
end

-- Collect trace events into a list; `trace.text()` joins them for assertions.
function M.trace_collector()
  local events = {}
  local t = setmetatable({ events = events }, { __call = function(_, ev) events[#events + 1] = ev end })
  function t.text()
    local lines = {}
    for _, ev in ipairs(events) do
      local parts = {}
      for k, v in pairs(ev) do parts[#parts + 1] = tostring(k) .. "=" .. tostring(v) end
      table.sort(parts)
      lines[#lines + 1] = table.concat(parts, " ")
    end
    return table.concat(lines, "\n")
  end
  return t
end

return M
