-- oauthmail.outbox — a durable queue of messages to send, and the worker
-- that sends them. Two back ends behind one interface:
--   { kind = "spool", path = DIR }   a maildir-style directory on this machine
--                                    (oauthmail.outbox.spool)
--   { kind = "redis", url = ... }    a Redis stream that workers on many
--                                    machines consume as a group
--                                    (oauthmail.outbox.redis)
-- A back end offers enqueue, claim, delivered, done, retry, list, drop,
-- count and close. The worker records each delivered message's id before
-- it acknowledges the entry, so an entry delivered again after a crash is
-- skipped; a duplicate remains possible only when a worker dies between the
-- server's 2xx and that record (the worker measures that window).
-- See docs/outbox.md.
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local wait = require "oauthmail.wait"

local M = {}

local KINDS = { spool = "oauthmail.outbox.spool", redis = "oauthmail.outbox.redis" }

-- outbox.open(spec) -> outbox: spec is a table with kind, or a string:
-- "redis://..."/"rediss://..." or a directory path.
function M.open(spec)
  if type(spec) == "string" then
    if spec:match("^rediss?://") then spec = { kind = "redis", url = spec } else spec = { kind = "spool", path = spec } end
  end
  if type(spec) ~= "table" then error("outbox.open: expected a table with 'kind' or a URL/path string", 2) end
  local mod = KINDS[spec.kind]
  if not mod then error("outbox.open: unknown kind '" .. tostring(spec.kind) .. "' (spool or redis)", 2) end
  local ok, ob = pcall(require(mod).new, spec)
  if not ok then error((tostring(ob):gsub("^[^:]*:%d+: ", "")), 2) end
  return ob
end

-- A message as queued: the send table, checked to survive the trip through
-- JSON (no functions, no attachment data that is not text).
function M.encode_entry(id, message, attempts, last_error)
  if type(message) ~= "table" then error("outbox: a message must be a table (what mailer:send takes)", 3) end
  local text = cjson.encode { id = id, message = message, attempts = attempts or 0, last_error = last_error,
    queued_at = os.time() }
  if not text then error("outbox: the message cannot be queued (it holds a function or binary data)", 3) end
  return text
end

function M.decode_entry(text)
  local e = cjson.decode(text or "")
  if type(e) ~= "table" or type(e.id) ~= "string" or type(e.message) ~= "table" then return nil end
  e.attempts = tonumber(e.attempts) or 0
  return e
end

-- outbox.hopeless(err): a send error that no later attempt can change (the
-- message itself is refused: a bad address, a line too long, a 5xx)
function M.hopeless(err)
  return type(err) == "table" and (err.retryable == false or err.kind == "config")
end

-- A queue id: sorted by the second it was made in, then by the order this
-- process made them; unique across processes and machines.
local seq, proc = 0, nil
function M.new_id()
  seq = seq + 1
  proc = proc or crypto.hex(crypto.random(6))
  return string.format("%010d-%s-%08d", os.time(), proc, seq)
end

-- ------------------------------------------------------------ the worker

local Worker = {}
Worker.__index = Worker

-- outbox.worker{outbox=, mailer=, batch=10, consumer=, idle=0.2, idle_close=5, trace=fn} -> worker
-- idle_close: after that many seconds with nothing to send, the mailer's
-- idle sessions are closed (their connection slots given back) until work comes.
function M.worker(o)
  if type(o) ~= "table" or type(o.outbox) ~= "table" or type(o.mailer) ~= "table" then
    error("outbox.worker: expected {outbox=, mailer=}", 2)
  end
  return setmetatable({
    outbox = o.outbox, mailer = o.mailer, batch = o.batch or 10, idle = o.idle or 0.2,
    idle_close = o.idle_close or 5,
    consumer = o.consumer or ("worker-" .. crypto.hex(crypto.random(4))), trace = o.trace,
    stats = { sent = 0, skipped = 0, retried = 0, dead = 0, window_max = 0, window_sum = 0 },
  }, Worker)
end

local function emit(self, ev)
  if self.trace then pcall(self.trace, ev) end
end

-- One claimed entry: skipped if already delivered, else sent, then recorded
-- and acknowledged, or handed back for a retry / the dead letters.
function Worker:handle(item, delivered)
  local ob, st = self.outbox, self.stats
  if delivered then
    local ok, err = ob:done(item)
    if not ok then return nil, err end
    st.skipped = st.skipped + 1
    emit(self, { event = "skipped", id = item.id })
    return true
  end
  local receipt, serr = self.mailer:send(item.message)
  if receipt then
    local t0 = wait.now()
    local ok, err = ob:done(item)
    local window = wait.now() - t0
    if window > st.window_max then st.window_max = window end
    st.window_sum = st.window_sum + window
    if not ok then return nil, err end
    st.sent = st.sent + 1
    emit(self, { event = "sent", id = item.id, message_id = receipt.message_id })
    return true
  end
  local fate, err = ob:retry(item, serr)
  if not fate then return nil, err end
  if fate == "dead" then st.dead = st.dead + 1 else st.retried = st.retried + 1 end
  emit(self, { event = fate, id = item.id, attempts = item.attempts + 1, kind = serr.kind, code = serr.code })
  return true
end

-- worker:step() -> number of entries handled | nil, err
function Worker:step()
  local items, err = self.outbox:claim(self.batch, self.consumer)
  if not items then return nil, err end
  if #items == 0 then return 0 end
  local done, derr = self.outbox:delivered(items)
  if not done then return nil, derr end
  for _, item in ipairs(items) do
    local ok, herr = self:handle(item, done[item.id])
    if not ok then return nil, herr end
  end
  return #items
end

-- worker:run{until_empty=true, max_time=, stop=fn} -> stats | nil, err
-- until_empty: return once nothing is queued or in flight (a dead worker's
-- entries are taken over when their lease ends); otherwise run until stop()
-- returns true or max_time passes.
function Worker:run(opts)
  opts = opts or {}
  local deadline = opts.max_time and (wait.now() + opts.max_time)
  local quiet_since = nil
  while true do
    if opts.stop and opts.stop() then break end
    if deadline and wait.now() >= deadline then break end
    local n, err = self:step()
    if not n then return nil, err end
    if n > 0 then quiet_since = nil end
    if n == 0 then
      quiet_since = quiet_since or wait.now()
      if self.mailer.close_idle and wait.now() - quiet_since >= self.idle_close then
        if self.mailer:close_idle() > 0 then emit(self, { event = "idle_close" }) end
      end
      if opts.until_empty then
        local left, cerr = self.outbox:count()
        if not left then return nil, cerr end
        if left == 0 then break end
      end
      wait.sleep(self.idle)
    end
  end
  local st = self.stats
  local handled = st.sent + st.skipped
  st.window_mean = handled > 0 and st.window_sum / math.max(st.sent, 1) or 0
  return st
end

M.Worker = Worker
return M
