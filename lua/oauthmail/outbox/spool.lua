-- oauthmail.outbox.spool — the outbox as a directory on this machine,
-- maildir-style (core.spool does the durable steps):
--   tmp/     being written; never read
--   new/     queued, oldest name first
--   cur/     taken by the runner now (moved back to new/ if it died)
--   done/    delivered records, written before the entry leaves cur/
--   failed/  dead letters, with the last error
-- One runner at a time (a lock on the directory); any number of processes
-- may enqueue. See docs/outbox.md.
local core = require "oauthmail.core"
local errors = require "oauthmail.errors"
local fs = require "oauthmail.fs"
local outbox = require "oauthmail.outbox"

local spool = core.spool
local M = {}
M.__index = M

local FIELDS = { kind = "string", path = "string", attempts = "number", lock_timeout = "number" }

-- TEST HOOK (spec/outbox_spec.lua only): "during_put" ends the process half-way through an enqueue.
M._test_fault = nil

function M.new(opts)
  require("oauthmail.store").check_options("outbox.spool", opts, FIELDS, 2)
  if type(opts.path) ~= "string" or opts.path == "" then error("outbox.spool: 'path' must be a directory", 2) end
  local self = setmetatable({ dir = opts.path, max_attempts = opts.attempts or 5,
    lock_timeout = opts.lock_timeout or 0,
    tried = {},   -- entries that failed in this run: the next run retries them
  }, M)
  return self
end

function M:describe() return "outbox spool " .. self.dir end

local function fail(self, err)
  return errors.fail("store", self:describe() .. ": " .. tostring(err.message or err), { reason = err.reason })
end

function M:ensure()
  if self.ready then return true end
  for _, sub in ipairs { "", "/tmp", "/new", "/cur", "/done", "/failed" } do
    local ok, err = fs.mkdir_private(self.dir .. sub)
    if not ok and not (fs.stat(self.dir .. sub)) then return fail(self, err) end
  end
  self.ready = true
  return true
end

-- outbox:enqueue(message) -> id | nil, err: durable when it returns
function M:enqueue(message)
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local id = outbox.new_id()
  local text = outbox.encode_entry(id, message)
  ok, err = spool.put(self.dir, id, text, M._test_fault)
  if not ok then return fail(self, err) end
  return id
end

local function read_entry(path)
  local text = core.fs.read_file(path, 64 * 1024 * 1024)
  return text and outbox.decode_entry(text)
end

-- The runner's lock; entries a dead runner left in cur/ go back to new/.
function M:begin()
  if self.lock then return true end
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local lk, lerr = fs.lock(self.dir .. "/.lock", { timeout = self.lock_timeout })
  if not lk then
    return errors.fail("store", self:describe() .. ": another queue runner is working on it", { reason = "busy",
      cause = lerr and lerr.message })
  end
  self.lock = lk
  for _, name in ipairs(spool.list(self.dir .. "/cur") or {}) do spool.move(self.dir, "cur", "new", name) end
  return true
end

-- outbox:claim(n) -> entries moved from new/ to cur/
function M:claim(n)
  local ok, err = self:begin()
  if not ok then return nil, err end
  local names, lerr = spool.list(self.dir .. "/new")
  if not names then return fail(self, lerr) end
  local items = {}
  for _, name in ipairs(names) do
    if #items >= n then break end
    local moved = not self.tried[name] and spool.move(self.dir, "new", "cur", name)
    if moved then
      local e = read_entry(self.dir .. "/cur/" .. name)
      if e then
        e.handle = name
        items[#items + 1] = e
      else
        spool.move(self.dir, "cur", "failed", name, name .. ".damaged")
      end
    end
  end
  return items
end

function M:delivered(items)
  local set = {}
  for _, e in ipairs(items) do
    if fs.stat(self.dir .. "/done/" .. e.id) then set[e.id] = true end
  end
  return set
end

-- outbox:done(entry): the delivered record, durable, then the entry goes
function M:done(e)
  local ok, err = fs.atomic_write(self.dir .. "/done/" .. e.id, "", 384)
  if not ok then return fail(self, err) end
  os.remove(self.dir .. "/cur/" .. e.handle)
  spool.sync(self.dir .. "/cur")
  os.remove(self.dir .. "/done/" .. e.id)
  return true
end

function M:retry(e, why)
  local attempts = e.attempts + 1
  local final = attempts >= self.max_attempts or outbox.hopeless(why)
  local text = outbox.encode_entry(e.id, e.message, attempts, tostring(why and why.message or why))
  local ok, err = fs.atomic_write(self.dir .. "/cur/" .. e.handle, text, 384)
  if not ok then return fail(self, err) end
  ok, err = spool.move(self.dir, "cur", final and "failed" or "new", e.handle)
  if not ok then return fail(self, err) end
  self.tried[e.handle] = true
  return final and "dead" or "retry"
end

function M:count()
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local n = #(spool.list(self.dir .. "/cur") or {})
  for _, name in ipairs(spool.list(self.dir .. "/new") or {}) do
    if not self.tried[name] then n = n + 1 end
  end
  return n
end

-- outbox:list() -> queued (new, cur) and dead (failed) entries
function M:list()
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local items = {}
  for _, sub in ipairs { "new", "cur", "failed" } do
    for _, name in ipairs(spool.list(self.dir .. "/" .. sub) or {}) do
      local e = read_entry(self.dir .. "/" .. sub .. "/" .. name) or { id = name, damaged = true }
      e.handle, e.dead = name, sub == "failed"
      items[#items + 1] = e
    end
  end
  return items
end

function M:drop(id)
  for _, sub in ipairs { "new", "failed" } do
    if os.remove(self.dir .. "/" .. sub .. "/" .. id) then
      spool.sync(self.dir .. "/" .. sub)
      return true
    end
  end
  return errors.fail("store", "no queued message with id " .. id, { reason = "missing" })
end

-- outbox:revive() -> n: the dead letters back in the queue, attempts reset
function M:revive()
  local ok, err = self:ensure()
  if not ok then return nil, err end
  local n = 0
  for _, name in ipairs(spool.list(self.dir .. "/failed") or {}) do
    local e = read_entry(self.dir .. "/failed/" .. name)
    if e then
      local wrote = fs.atomic_write(self.dir .. "/failed/" .. name, outbox.encode_entry(e.id, e.message, 0), 384)
      if wrote and spool.move(self.dir, "failed", "new", name) then
        self.tried[name] = nil
        n = n + 1
      end
    end
  end
  return n
end

function M:close()
  self.tried = {}
  if self.lock then self.lock:unlock() self.lock = nil end
end

return M
