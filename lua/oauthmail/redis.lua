-- oauthmail.redis — a small Redis client: what the Redis token store, the
-- shared governor and the outbox need (commands, pipelines, scripts by
-- EVALSHA, streams), no more. RESP is parsed by the socket-free engine in
-- csrc/resp.c; bytes travel over oauthmail.conn (TLS verified for rediss://),
-- and every wait goes through the one waiter, so a client works the same in
-- a plain script, under oauthmail.run and on every Lua version.
--
-- A client holds a few connections (one per concurrent caller, up to
-- max_connections); a call takes an idle one or opens one (AUTH, SELECT),
-- and a connection that failed is closed, never reused. See docs/redis.md.
local core = require "oauthmail.core"
local conn = require "oauthmail.conn"
local errors = require "oauthmail.errors"
local wait = require "oauthmail.wait"

local resp = core.resp
local M = {}
M.null = resp.null

local Client = {}
Client.__index = Client

local unpack = table.unpack or unpack
local function unpack_cmd(t) return unpack(t, 1, #t) end

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- redis.parse_url("redis[s]://[user[:password]@]host[:port][/db]") -> fields | nil, message
-- The message never quotes the URL: it may hold the password.
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "the Redis URL must be a string" end
  local scheme, rest = url:match("^(rediss?)://(.*)$")
  if not scheme then return nil, "the Redis URL must start with redis:// or rediss://" end
  local auth, hostpart = rest:match("^(.*)@([^@]*)$")
  if not auth then hostpart = rest end
  local r = { tls = scheme == "rediss" }
  if auth then
    local user, pass = auth:match("^([^:]*):(.*)$")
    if user then
      r.username = user ~= "" and unescape(user) or nil
      r.password = unescape(pass)
    else
      r.password = unescape(auth)   -- redis://secret@host, as redis-cli reads it
    end
  end
  local hostport, db = hostpart:match("^([^/]*)/?(.*)$")
  local host, port = hostport:match("^%[(.+)%]:?(%d*)$")
  if not host then host, port = hostport:match("^([^:]*):?(%d*)$") end
  if not host or host == "" then return nil, "the Redis URL names no host" end
  r.host = host
  r.port = port ~= "" and tonumber(port) or 6379
  if r.port < 1 or r.port > 65535 then return nil, "the Redis URL's port is out of range" end
  if db ~= "" then
    if not db:match("^%d+$") then return nil, "the Redis URL's database must be a number" end
    r.db = tonumber(db)
  end
  return r
end

local FIELDS = {
  url = "string", host = "string", port = "number", tls = "boolean", username = "string", password = "string",
  db = "number", timeout = "number", connect_timeout = "number", ca_file = "string", ca_path = "string",
  verify = "boolean", servername = "string", client_cert = "string", client_key = "string",
  max_connections = "number", protocol = "number",
}
M.FIELDS = FIELDS

-- redis.new{url= | host=, port=, tls=, username=, password=, db=, timeout=5,
--   ca_file=, ca_path=, verify=true, servername=, client_cert=, client_key=,
--   max_connections=16, protocol=2} -> client. Nothing is connected yet.
function M.new(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("redis.new: expected a URL or a table of options", 2) end
  for k, v in pairs(opts) do
    if FIELDS[k] == nil then error("redis.new: unknown option '" .. tostring(k) .. "'", 2) end
    if type(v) ~= FIELDS[k] then error("redis.new: '" .. k .. "' must be a " .. FIELDS[k], 2) end
  end
  local cfg = {}
  if opts.url then
    local u, why = M.parse_url(opts.url)
    if not u then error("redis.new: " .. why, 2) end
    for k, v in pairs(u) do cfg[k] = v end
  end
  for k, v in pairs(opts) do if k ~= "url" then cfg[k] = v end end
  cfg.host = cfg.host or "127.0.0.1"
  cfg.port = cfg.port or 6379
  cfg.timeout = cfg.timeout or 5
  if cfg.protocol and cfg.protocol ~= 2 and cfg.protocol ~= 3 then error("redis.new: 'protocol' must be 2 or 3", 2) end
  return setmetatable({
    cfg = cfg,
    name = cfg.host .. ":" .. cfg.port,
    idle = {},
    open = 0,
    max = cfg.max_connections or 16,
    freed = wait.cond(),
    shas = {},
    round_trips = 0,   -- replies waited for (a pipeline counts once): for bench/ and tests
  }, Client)
end

function Client:describe()
  return "redis" .. (self.cfg.tls and "s" or "") .. "://" .. self.name .. (self.cfg.db and ("/" .. self.cfg.db) or "")
end

-- ------------------------------------------------------------ one connection

local function fail(self, message, fields)
  fields = fields or {}
  return errors.fail(fields.kind or "network", "redis " .. self.name .. ": " .. message, fields)
end

-- Read replies until n values came; a server error reply is a value too
-- ({ err = error }), so a pipeline's other replies are not lost.
local function read_replies(self, c, n, deadline)
  local out, got = {}, 0
  while got < n do
    local ok, v, kind = c.eng:next()
    if ok == nil then c.broken = true return fail(self, v.message, { reason = "protocol" }) end
    if ok then
      if kind ~= "push" then
        got = got + 1
        if kind == "error" then
          local code = v.message:match("^(%u+)") or "ERR"
          out[got] = { err = errors.new("store", "redis " .. self.name .. ": " .. v.message,
            { reason = "redis", redis_error = code }) }
        else
          if v == resp.null then v = nil end
          out[got] = { value = v }
        end
      end
    else
      local data, err = c.sock:receive_some(65536, deadline)
      if not data then
        c.broken = true
        if err.reason == "timeout" then
          err.message = string.format("redis %s: no reply within %g s", self.name, self.cfg.timeout)
        else
          err.message = "redis " .. self.name .. ": " .. err.message
        end
        return nil, err
      end
      local fed, ferr = c.eng:feed(data)
      if not fed then c.broken = true return nil, ferr end
    end
  end
  self.round_trips = self.round_trips + 1
  return out
end

local function exchange(self, c, cmds, deadline)
  local parts = {}
  for i, cmd in ipairs(cmds) do parts[i] = resp.encode(cmd) end
  local ok, err = c.sock:send(table.concat(parts), deadline)
  if not ok then
    c.broken = true
    err.message = "redis " .. self.name .. ": " .. err.message
    return nil, err
  end
  return read_replies(self, c, #cmds, deadline)
end

local function close_conn(c)
  if c.sock then c.sock:close() end
  if c.eng then c.eng:close() end
  c.sock = nil
end

-- Connect, AUTH, SELECT (or HELLO 3 with AUTH). Errors name the server and
-- the user, never the password.
local function dial(self, deadline)
  local cfg = self.cfg
  local sock, err = conn.connect {
    host = cfg.host, port = cfg.port, tls = cfg.tls and "implicit" or "none",
    timeout = math.max(0.001, deadline - wait.now()), ca_file = cfg.ca_file, ca_path = cfg.ca_path,
    verify = cfg.verify, servername = cfg.servername, client_cert = cfg.client_cert, client_key = cfg.client_key,
  }
  if not sock then
    return nil, errors.new(err.kind, "cannot connect to redis " .. self.name .. ": " .. err.message,
      { reason = err.reason })
  end
  sock:settimeout(cfg.timeout)
  local c = { sock = sock, eng = resp.engine() }
  local cmds = {}
  if cfg.protocol == 3 then
    local hello = { "HELLO", "3" }
    if cfg.password then
      hello[3], hello[4], hello[5] = "AUTH", cfg.username or "default", cfg.password
    end
    cmds[#cmds + 1] = hello
  elseif cfg.password then
    cmds[#cmds + 1] = cfg.username and { "AUTH", cfg.username, cfg.password } or { "AUTH", cfg.password }
  end
  if cfg.db and cfg.db ~= 0 then cmds[#cmds + 1] = { "SELECT", cfg.db } end
  if #cmds > 0 then
    local out, xerr = exchange(self, c, cmds, deadline)
    if not out then close_conn(c) return nil, xerr end
    for i, r in ipairs(out) do
      if r.err then
        close_conn(c)
        local e = r.err
        local first = cmds[i][1]
        if first == "AUTH" or (first == "HELLO" and cfg.password) or e.redis_error == "NOAUTH"
          or e.redis_error == "WRONGPASS" then
          return fail(self, string.format("authentication as %s refused (%s); check the user name and password",
            cfg.username or "default", e.redis_error), { kind = "auth", reason = "auth", redis_error = e.redis_error })
        end
        return nil, e
      end
    end
  end
  return c
end

-- Take a connection: an idle one, a new one, or wait for one to be freed.
function Client:take(deadline)
  while true do
    local c = table.remove(self.idle)
    if c then return c end
    if self.open < self.max then
      self.open = self.open + 1
      local nc, err = dial(self, deadline)
      if not nc then self.open = self.open - 1 return nil, err end
      return nc
    end
    if not self.freed:wait(deadline) and wait.now() >= deadline then
      return fail(self, string.format("all %d connections busy for %g s", self.max, self.cfg.timeout),
        { reason = "timeout" })
    end
  end
end

function Client:give(c)
  if c.broken or self.closed then
    close_conn(c)
    self.open = self.open - 1
  else
    self.idle[#self.idle + 1] = c
  end
  self.freed:signal()
end

-- client:pipeline{ {cmd...}, ... } -> list of { value = v } | { err = e }, or nil, err
-- when the exchange itself failed (the commands may or may not have run).
function Client:pipeline(cmds)
  if self.closed then error("redis client used after close", 2) end
  local deadline = wait.now() + self.cfg.timeout
  local c, err = self:take(deadline)
  if not c then return nil, err end
  local ok, out, xerr = wait.pcall(exchange, self, c, cmds, deadline)
  if not ok then c.broken = true self:give(c) error(out, 0) end
  self:give(c)
  return out, xerr
end

-- client:call(name, ...) -> value (nil for a null reply) | nil, err
-- A server error reply is an error of kind "store" with redis_error = its code.
function Client:call(...)
  local out, err = self:pipeline { { ... } }
  if not out then return nil, err end
  if out[1].err then return nil, out[1].err end
  return out[1].value
end

-- client:eval(script, keys, args) -> value | nil, err: EVALSHA with the
-- script's digest (SCRIPT LOAD once per client); a server that lost its
-- script cache (restarted, SCRIPT FLUSH) gets the script again.
function Client:eval(script, keys, args)
  local function cmd(verb, body)
    local t = { verb, body, #keys }
    for _, k in ipairs(keys) do t[#t + 1] = k end
    for _, a in ipairs(args or {}) do t[#t + 1] = a end
    return t
  end
  local sha = self.shas[script]
  if sha then
    local v, err = self:call(unpack_cmd(cmd("EVALSHA", sha)))
    if v ~= nil or not err then return v end
    if err.redis_error ~= "NOSCRIPT" then return nil, err end
  end
  local out, err = self:pipeline { { "SCRIPT", "LOAD", script }, cmd("EVAL", script) }
  if not out then return nil, err end
  if out[1].value then self.shas[script] = out[1].value end
  if out[2].err then return nil, out[2].err end
  return out[2].value
end

-- client:close(): every idle connection closed; busy ones when given back.
function Client:close()
  self.closed = true
  for _, c in ipairs(self.idle) do close_conn(c) self.open = self.open - 1 end
  self.idle = {}
end

M.Client = Client
-- redis.client_options(where, spec) -> the options redis.new takes, from a
-- store's, governor's or outbox's spec: the connection fields as given, and
-- password_env read now (raises, naming `where`, when it is not set).
local CLIENT_FIELDS = { "url", "timeout", "ca_file", "ca_path", "verify", "servername", "client_cert", "client_key",
  "username", "password" }
function M.client_options(where, spec)
  local ropts = {}
  for _, k in ipairs(CLIENT_FIELDS) do ropts[k] = spec[k] end
  if spec.password_env then
    local pw = os.getenv(spec.password_env)
    if not pw or pw == "" then
      error(where .. ": environment variable " .. spec.password_env .. " (the Redis password) is not set", 3)
    end
    ropts.password = pw
  end
  return ropts
end

return M
