-- oauthmail.pool — the mailer's authenticated sessions, shared by every
-- coroutine that sends through it. Up to the mailbox's connection limit
-- (the governor's, lowered by 432 4.3.2) sessions are kept; a message takes
-- an idle one, or opens one while under the limit, or waits (through
-- oauthmail.wait) for one to come back. A session whose token has entered
-- the margin finishes the transaction it is in and is then replaced by a
-- fresh connection with a fresh token. Opening holds a governor slot, given
-- back on every path that does not keep the session (a raise included).
local errors = require "oauthmail.errors"
local policy_mod = require "oauthmail.policy"
local wait = require "oauthmail.wait"

local M = {}
local Pool = {}
Pool.__index = Pool

-- pool.new{transport=, governor=, policy=, clock=, margin_for=fn(tok), token=fn() -> tok|nil,err,
--   invalidate=fn(tok), trace=fn(ev), explain=fn(err) -> err, max_wait=}
function M.new(o)
  local self = setmetatable({}, Pool)
  for k, v in pairs(o) do self[k] = v end
  self.entries = {}   -- {s=, busy=, sent=, expires=, margin=}
  self.opening = 0
  self.freed = wait.cond()
  self.max_wait = o.max_wait or 120
  return self
end

-- The sessions this mailer may hold now: the governor's connection limit
-- (lowered by 432 4.3.2), one when none is set.
function Pool:limit()
  return self.governor.connections or 1
end

function Pool:_usable(e)
  if not self.transport:usable(e.s) then return false end
  if not self.policy.reuse and e.sent > 0 then return false end
  if e.sent >= self.policy.max_messages_per_session then return false end
  if e.expires and e.expires - self.clock() < e.margin then return false end
  return true
end

local function remove(list, x)
  for i = #list, 1, -1 do
    if list[i] == x then table.remove(list, i) return end
  end
end

-- Close a session the pool no longer keeps, and give its slot back.
function Pool:_drop(e, reason)
  if e.dropped then return end
  e.dropped = true
  remove(self.entries, e)
  self.trace { event = "session_closed", reason = reason }
  local ok = errors.pcall(self.transport.close, self.transport, e.s)
  if not ok then self.transport:abandon(e.s) end
  self.governor:release()
  self.freed:signal()
end

-- Connect and authenticate. On a refused authentication the token is
-- invalidated, refreshed once, and tried once more. Returns s, tok | nil, err;
-- self.half is the session to close when it does not return one.
function Pool:_connect_auth(tok)
  local t = self.transport
  local s, err = t:connect()
  if not s then return nil, self.explain(err) end
  self.half[1] = s
  local ok
  ok, err = t:authenticate(s, tok)
  if not ok and self.policy.reauth and policy_mod.classify(err) == "reauth" then
    self.trace { event = "reauth", code = err.code, enhanced = err.enhanced }
    self.invalidate(tok)
    local terr
    tok, terr = self.token()
    if not tok then return nil, terr end
    if not t:usable(s) then
      t:close(s)
      s, err = t:connect()
      if not s then return nil, self.explain(err) end
      self.half[1] = s
    end
    ok, err = t:authenticate(s, tok)
  end
  if not ok then return nil, self.explain(err) end
  return s, tok
end

function Pool:_open(slot_held)
  local tok, err = self.token()
  if not tok then
    if slot_held then self.governor:release() end
    return nil, err
  end
  if not slot_held then
    local ok
    ok, err = self.governor:acquire()
    if not ok then return nil, err end
  end
  local half = {}
  self.half = half
  local done, s, tok2 = errors.pcall(self._connect_auth, self, tok)
  if not done or not s then
    if half[1] then errors.pcall(self.transport.close, self.transport, half[1]) end
    self.governor:release()
    if not done then error(s, 0) end
    return nil, tok2
  end
  tok = tok2
  local margin = tok.expires_at and self.margin_for(tok) or 0
  self.trace { event = "session_open", host = self.host }
  return { s = s, busy = false, sent = 0, expires = tok.expires_at, margin = margin }
end

-- pool:acquire() -> entry (its session in entry.s) | nil, err
function Pool:acquire()
  local deadline = wait.now() + self.max_wait
  while true do
    -- idle sessions that may not serve again, any over a lowered limit, and
    -- as many as a shared governor found slots lost (leases that ran out), go
    local lost = self.governor.lost_count and self.governor:lost_count() or 0
    for i = #self.entries, 1, -1 do
      local e = self.entries[i]
      if e and not e.busy then
        if lost > 0 then
          self:_drop(e, "lease_lost")
          lost = lost - 1
        elseif not self:_usable(e) then
          self:_drop(e, self.transport:usable(e.s) and "renew" or "broken")
        elseif #self.entries + self.opening > self:limit() then
          self:_drop(e, "throttle")
        end
      end
    end
    for _, e in ipairs(self.entries) do
      if not e.busy then
        e.busy = true
        return e
      end
    end
    -- a governor shared with other processes is asked without waiting, so
    -- that while they hold the mailbox's connections, a session of ours
    -- coming back is taken instead (waiting inside acquire while our own
    -- idle sessions hold slots would deadlock the processes until a lease ran out)
    local slot, retry = nil, nil
    if #self.entries + self.opening < self:limit() and self.governor.try_acquire then
      local gerr
      slot, gerr, retry = self.governor:try_acquire()
      if slot == nil then return nil, gerr end
      if slot and #self.entries + self.opening >= self:limit() then
        -- another coroutine of ours opened one while we asked
        self.governor:release()
        slot = "again"
      end
    end
    if slot == "again" then   -- luacheck: ignore 542
      -- look at the idle sessions again
    elseif slot == false then
      if wait.now() >= deadline then
        return errors.fail("policy", string.format("all %d connections to this mailbox stayed in use for %g s",
          self:limit(), self.max_wait), { reason = "rate_limit", limit = "connections", retryable = true })
      end
      local d = math.min(deadline, wait.now() + retry)
      if not self.freed:wait(d) and wait.now() < d then wait.sleep(d - wait.now()) end
    elseif #self.entries + self.opening < self:limit() then
      self.opening = self.opening + 1
      local ok, e, err = errors.pcall(self._open, self, slot)
      self.opening = self.opening - 1
      if not ok then
        self.freed:signal()
        error(e, 0)
      end
      if not e then
        self.freed:signal()
        return nil, err
      end
      e.busy = true
      self.entries[#self.entries + 1] = e
      return e
    elseif not self.freed:wait(deadline) then
      return errors.fail("policy", string.format("all %d sessions of this mailer stayed busy for %g s",
        self:limit(), self.max_wait), { reason = "rate_limit", limit = "connections", retryable = true })
    end
  end
end

-- pool:release(entry, drop_reason): back to the pool, or closed when
-- drop_reason is given or the session may not serve again.
function Pool:release(e, reason)
  if e.dropped then return end
  e.busy = false
  if self.closed then reason = reason or "close" end
  if reason then
    self:_drop(e, reason)
  elseif not self.transport:usable(e.s) then
    self:_drop(e, "broken")
  end
  self.freed:signal()
end

-- pool:close_idle() -> n: QUIT the idle sessions, giving back their slots;
-- the pool stays open and opens new ones when needed.
function Pool:close_idle()
  local n = 0
  for i = #self.entries, 1, -1 do
    local e = self.entries[i]
    if not e.busy then
      self:_drop(e, "idle")
      n = n + 1
    end
  end
  return n
end

-- pool:close(): QUIT every idle session; busy ones are closed when released.
function Pool:close()
  for i = #self.entries, 1, -1 do
    local e = self.entries[i]
    if not e.busy then self:_drop(e, "close") end
  end
  self.closed = true
end

-- pool:abandon(): close every socket at once, no network I/O, slots given back.
function Pool:abandon()
  for _, e in ipairs(self.entries) do
    self.transport:abandon(e.s)
    self.governor:release()
  end
  self.entries = {}
end

function Pool:count()
  local busy = 0
  for _, e in ipairs(self.entries) do if e.busy then busy = busy + 1 end end
  return #self.entries, busy
end

return M
