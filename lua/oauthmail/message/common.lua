-- oauthmail.message.common — what the message modules share: the config
-- failure that compose and from_raw raise inside and return at their edge,
-- the RFC 5322 date, random ids, and the small field checks.
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local encode = require "oauthmail.message.encode"

local M = {}

M.CHUNK = 64 * 1024              -- string and raw-file bytes per reader chunk
M.MAX_RAW_HEADER = 1024 * 1024   -- a header section bigger than this is not mail

-- --------------------------------------------------------------- failures

-- Inside compose/from_raw a config problem raises this marker; the public
-- functions turn it back into nil, err once, at their edge.
local Bad = {}

local function bad(field, msg, reason)
  error(setmetatable({ err = errors.new("config", field .. ": " .. msg, { field = field, reason = reason }) }, Bad), 0)
end

local function usage(fn, msg) error("message." .. fn .. ": " .. msg, 0) end

local function guarded(fn, ...)
  local ok, v = pcall(fn, ...)
  if ok then return v end
  if getmetatable(v) == Bad then return nil, v.err end
  error(v, 0)
end

-- ------------------------------------------------------------------ helpers

local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }

-- RFC 5322 3.3 date in UTC; names from tables, never from the C locale.
-- The last second's text is kept: a batch made within a second asks once.
local last_second, last_date
local function rfc5322_date(now)
  now = math.floor(now)
  if now == last_second then return last_date end
  local t = os.date("!*t", now)
  last_date = string.format("%s, %02d %s %04d %02d:%02d:%02d +0000",
    DAYS[t.wday], t.day, MONTHS[t.month], t.year, t.hour, t.min, t.sec)
  last_second = now
  return last_date
end

-- A source of random hex that draws the bytes of `n` ids at a time: one
-- crypto.random call costs about as much as 64 ids' bytes. For one batch
-- (mailer:send_many) only: bytes kept across a fork would give both
-- processes the same ids.
local function id_pool(n)
  local buf, pos = "", 1
  return function(len)
    local want = 2 * len
    if pos + want - 1 > #buf then
      buf, pos = crypto.hex(crypto.random(len * n)), 1
    end
    local s = buf:sub(pos, pos + want - 1)
    pos = pos + want
    return s
  end
end

-- Random hex for ids and boundaries; deterministic from opts.boundary_seed;
-- from `pool` (an id_pool) when given.
local function id_source(seed, pool)
  if seed == nil and pool ~= nil then return pool end
  local n = 0
  return function(len)
    n = n + 1
    if seed ~= nil then
      return crypto.hex(crypto.sha256(tostring(seed) .. ":" .. n)):sub(1, 2 * len)
    end
    return crypto.hex(crypto.random(len))
  end
end

local function no_breaks(field, s)
  if s:find("[\r\n]") then bad(field, "contains a line break", "line_break") end
end

local function utf8_text(field, s)
  if not encode.valid_utf8(s) then bad(field, "is not valid UTF-8", "utf8") end
end

local function basename(path)
  return path:match("([^/\\]+)$") or path
end

-- "cannot open 'x': x: No such file" -> "No such file": io.open's message
-- without the path it repeats.
local function strip_path(msg, path)
  msg = tostring(msg)
  if msg:sub(1, #path + 2) == path .. ": " then return msg:sub(#path + 3) end
  return msg
end

M.bad, M.usage, M.guarded, M.strip_path = bad, usage, guarded, strip_path
M.rfc5322_date, M.id_source, M.id_pool = rfc5322_date, id_source, id_pool
M.no_breaks, M.utf8_text, M.basename = no_breaks, utf8_text, basename

return M
