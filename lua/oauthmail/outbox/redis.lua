-- oauthmail.outbox.redis — the outbox as a Redis stream consumed by a group
-- of workers: XADD to enqueue; XREADGROUP hands each entry to one worker;
-- an entry a worker has not acknowledged within `lease` seconds (it died,
-- or its send failed and waits for a retry) is taken over with XAUTOCLAIM;
-- the delivered record (SET done:<id>) goes before XACK/XDEL in one
-- pipeline; after `attempts` failed sends the entry goes to the dead-letter
-- stream with its last error. See docs/outbox.md.
local errors = require "oauthmail.errors"
local outbox = require "oauthmail.outbox"
local redis = require "oauthmail.redis"

local M = {}
M.__index = M

local FIELDS = {
  kind = "string", url = "string", prefix = "string", group = "string", lease = "number", attempts = "number",
  keep_done = "number", timeout = "number", ca_file = "string", ca_path = "string", verify = "boolean",
  servername = "string", client_cert = "string", client_key = "string", username = "string", password = "string",
  password_env = "string", client = "table",
}

-- outbox.redis.new{url=, prefix="oauthmail:", group="workers", lease=60, attempts=5, keep_done=7 days, ...}
function M.new(opts)
  require("oauthmail.store").check_options("outbox.redis", opts, FIELDS, 2)
  local ropts = redis.client_options("outbox.redis", opts)
  if not opts.url and not opts.client then error("outbox.redis: 'url' is required", 2) end
  local prefix = (opts.prefix or "oauthmail:") .. "outbox"
  return setmetatable({
    client = opts.client or redis.new(ropts),
    stream = prefix, dead = prefix .. ":dead", tries = prefix .. ":attempts", done_prefix = prefix .. ":done:",
    group = opts.group or "workers",
    lease_ms = math.floor((opts.lease or 60) * 1000),
    max_attempts = opts.attempts or 5,
    keep_done_ms = math.floor((opts.keep_done or 7 * 86400) * 1000),
  }, M)
end

function M:describe() return "outbox " .. self.stream .. " on " .. self.client:describe() end

local function lift(self, err)
  return errors.fail("store", self:describe() .. ": " .. tostring(err.message):gsub("^redis [^:]*: ", ""),
    { reason = err.reason or err.kind, redis_error = err.redis_error })
end

function M:ensure_group()
  if self.grouped then return true end
  local _, err = self.client:call("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
  if err and err.redis_error ~= "BUSYGROUP" then return lift(self, err) end
  self.grouped = true
  return true
end

-- outbox:enqueue(message) -> id | nil, err (one round trip)
function M:enqueue(message)
  local id = outbox.new_id()
  local text = outbox.encode_entry(id, message)
  local _, err = self.client:call("XADD", self.stream, "*", "e", text)
  if err then return lift(self, err) end
  return id
end

local function entries_of(self, list, out)
  for _, ent in ipairs(list or {}) do
    if type(ent) == "table" and type(ent[2]) == "table" then
      local f = ent[2]
      local text
      for i = 1, #f, 2 do if f[i] == "e" then text = f[i + 1] end end
      local e = outbox.decode_entry(text)
      if e then
        e.handle = ent[1]
        out[#out + 1] = e
      else
        -- an entry that is not ours: acknowledged and dropped, never retried forever
        self.client:pipeline { { "XACK", self.stream, self.group, ent[1] }, { "XDEL", self.stream, ent[1] } }
      end
    end
  end
end

-- outbox:claim(n, consumer) -> entries: first those whose lease ended
-- (dead workers', failed sends'), then new ones; one round trip.
function M:claim(n, consumer)
  local ok, gerr = self:ensure_group()
  if not ok then return nil, gerr end
  local out, err = self.client:pipeline {
    { "XAUTOCLAIM", self.stream, self.group, consumer, self.lease_ms, "0-0", "COUNT", n },
    { "XREADGROUP", "GROUP", self.group, consumer, "COUNT", n, "STREAMS", self.stream, ">" },
  }
  if not out then return lift(self, err) end
  if out[1].err then return lift(self, out[1].err) end
  if out[2].err then return lift(self, out[2].err) end
  local items = {}
  entries_of(self, out[1].value and out[1].value[2], items)
  local r = out[2].value
  if type(r) == "table" and r[1] then entries_of(self, r[1][2], items) end
  -- attempts of reclaimed entries
  if #items > 0 then
    local cmd = { "HMGET", self.tries }
    for _, e in ipairs(items) do cmd[#cmd + 1] = e.id end
    local t = self.client:call((table.unpack or unpack)(cmd))
    if type(t) == "table" then
      for i, e in ipairs(items) do
        local a = tonumber(t[i] ~= redis.null and t[i] or nil)
        if a then e.attempts = a end
      end
    end
  end
  return items
end

-- outbox:delivered(entries) -> set of ids already delivered (one round trip)
function M:delivered(items)
  local cmds = {}
  for i, e in ipairs(items) do cmds[i] = { "EXISTS", self.done_prefix .. e.id } end
  local out, err = self.client:pipeline(cmds)
  if not out then return lift(self, err) end
  local set = {}
  for i, e in ipairs(items) do if out[i].value == 1 then set[e.id] = true end end
  return set
end

-- outbox:done(entry): the delivered record first, then the acknowledgement,
-- in one pipeline (Redis runs them in order).
function M:done(e)
  local out, err = self.client:pipeline {
    { "SET", self.done_prefix .. e.id, "1", "PX", self.keep_done_ms },
    { "XACK", self.stream, self.group, e.handle },
    { "XDEL", self.stream, e.handle },
    { "HDEL", self.tries, e.id },
  }
  if not out then return lift(self, err) end
  for _, r in ipairs(out) do if r.err then return lift(self, r.err) end end
  return true
end

-- outbox:retry(entry, err) -> "retry" | "dead": the entry stays pending and
-- is taken over when its lease ends, or goes to the dead letters.
function M:retry(e, why)
  local attempts = e.attempts + 1
  local final = attempts >= self.max_attempts or outbox.hopeless(why)
  if not final then
    local _, err = self.client:call("HSET", self.tries, e.id, attempts)
    if err then return lift(self, err) end
    return "retry"
  end
  local text = outbox.encode_entry(e.id, e.message, attempts, tostring(why and why.message or why))
  local out, err = self.client:pipeline {
    { "XADD", self.dead, "*", "e", text },
    { "XACK", self.stream, self.group, e.handle },
    { "XDEL", self.stream, e.handle },
    { "HDEL", self.tries, e.id },
  }
  if not out then return lift(self, err) end
  return "dead"
end

-- outbox:count() -> entries queued or in flight
function M:count()
  local n, err = self.client:call("XLEN", self.stream)
  if err then return lift(self, err) end
  return n
end

-- outbox:list([max]) -> { {id=, message=, attempts=, handle=, dead=bool} } queued, in flight and dead
function M:list(max)
  local out, err = self.client:pipeline {
    { "XRANGE", self.stream, "-", "+", "COUNT", max or 1000 },
    { "XRANGE", self.dead, "-", "+", "COUNT", max or 1000 },
  }
  if not out then return lift(self, err) end
  local items, dead = {}, {}
  entries_of(self, out[1].value, items)
  entries_of(self, out[2].value, dead)
  for _, d in ipairs(dead) do d.dead = true items[#items + 1] = d end
  return items
end

-- outbox:drop(id) -> true | nil, err: removes a queued or dead entry
function M:drop(id)
  local list, err = self:list(100000)
  if not list then return nil, err end
  for _, e in ipairs(list) do
    if e.id == id then
      local s = e.dead and self.dead or self.stream
      local out, perr = self.client:pipeline { { "XACK", self.stream, self.group, e.handle }, { "XDEL", s, e.handle } }
      if not out then return lift(self, perr) end
      return true
    end
  end
  return errors.fail("store", "no queued message with id " .. id, { reason = "missing" })
end

-- outbox:revive() -> n: the dead letters back in the stream, attempts reset
function M:revive()
  local list, err = self.client:call("XRANGE", self.dead, "-", "+", "COUNT", 100000)
  if err then return lift(self, err) end
  local dead = {}
  entries_of(self, list, dead)
  for _, e in ipairs(dead) do
    local out, perr = self.client:pipeline {
      { "XADD", self.stream, "*", "e", outbox.encode_entry(e.id, e.message, 0) },
      { "XDEL", self.dead, e.handle },
    }
    if not out then return lift(self, perr) end
  end
  return #dead
end

function M:close() self.client:close() end

return M
