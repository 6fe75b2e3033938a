-- oauthmail.trace — traces as JSON Lines: one object per event with a
-- timestamp (`ts`, RFC 3339 UTC with milliseconds), one discriminator (`type`:
-- "smtp" and "http" for protocol lines, else "token", "oauth2", "mailer",
-- "policy", "cli", "doctor"), the profile, and the event's own fields. The
-- events arrive already redacted from the library; this module only reshapes,
-- writes, reads back and filters them. See docs/cli.md, "Traces".
local cjson = require("cjson.safe").new()

local M = {}

-- Wall-clock seconds with the fraction (clock_gettime through oauthmail.sys).
local function now() return require("oauthmail.sys").time() end

local function timestamp(t)
  local whole = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", whole) .. string.format(".%03dZ", math.floor((t - whole) * 1000))
end
M.timestamp = timestamp

-- Only plain data goes out: strings, numbers, booleans, and tables of them.
local function plain(v, depth)
  local t = type(v)
  if t == "string" or t == "boolean" then return v end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return tostring(v) end
    return v
  end
  if t == "table" and depth < 4 then
    local out, n = {}, 0
    for k, x in pairs(v) do
      if type(k) == "string" or type(k) == "number" then
        local p = plain(x, depth + 1)
        if p ~= nil then out[k] = p n = n + 1 end
      end
    end
    if n > 0 then return out end
  end
  return nil
end

-- trace.record(ev, profile [, t]) -> the JSON object for one library event.
function M.record(ev, profile, t)
  local rec = {}
  for k, v in pairs(ev) do
    if type(k) == "string" then rec[k] = plain(v, 1) end
  end
  local kind
  if ev.proto then
    kind = ev.proto
    rec.proto = nil
  elseif ev.type then
    kind = ev.type
  elseif ev.kind == "oauth2" then
    kind = "oauth2"
    rec.kind = nil
  else
    kind = "mailer"
  end
  rec.type = kind
  rec.ts = timestamp(t or now())
  rec.profile = profile or ev.profile
  return rec
end

-- trace.encode(rec) -> one line of JSON (no newline), keys in a stable order:
-- ts, type, profile first, the rest sorted.
function M.encode(rec)
  local keys = {}
  for k in pairs(rec) do
    if k ~= "ts" and k ~= "type" and k ~= "profile" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs { "ts", "type", "profile" } do
    if rec[k] ~= nil then parts[#parts + 1] = cjson.encode(k) .. ":" .. cjson.encode(rec[k]) end
  end
  for _, k in ipairs(keys) do
    local v = cjson.encode(rec[k])
    if v then parts[#parts + 1] = cjson.encode(k) .. ":" .. v end
  end
  return ((("{" .. table.concat(parts, ",") .. "}"):gsub("\\/", "/")))
end

-- trace.writer(path, profile [, clock]) -> function(ev) appending one line
-- per event, or nil, err. A new file is made 0600 before anything is
-- written to it (the events are redacted, but they still say who mails whom).
function M.writer(path, profile, clock)
  local fs = require("oauthmail.sys").fs
  local st, serr = fs.stat(path)
  if not st and serr and serr.reason == "missing" then
    local ok, werr = fs.atomic_write(path, "", 384)
    if not ok then return nil, werr end
  end
  local f, err = io.open(path, "a")
  if not f then return nil, err end
  f:setvbuf("line")
  local w = {}
  function w.event(ev, prof)
    local line = M.encode(M.record(ev, prof or profile, clock and clock() or nil))
    f:write(line, "\n")
  end
  function w.close() f:close() end
  return w
end

-- trace.decode(line) -> record | nil
function M.decode(line)
  local rec = cjson.decode(line)
  if type(rec) ~= "table" then return nil end
  return rec
end

-- RFC 3339 (as written here) -> epoch seconds, or nil.
function M.parse_time(s)
  if type(s) ~= "string" then return nil end
  local y, mo, d, hh, mm, ss = s:match("^(%d%d%d%d)-(%d%d)-(%d%d)[T ](%d%d):(%d%d):?(%d*)")
  if not y then
    y, mo, d = s:match("^(%d%d%d%d)-(%d%d)-(%d%d)$")
    if not y then return nil end
    hh, mm, ss = 0, 0, 0
  end
  local frac = s:match("^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d(%.%d+)") or ""
  -- days from the civil date (proleptic Gregorian), UTC, no os.time/time zone
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + (tonumber(ss) or 0) + (tonumber(frac) or 0)
end

-- A readable line: time, profile, type, then the protocol text or the fields.
local ARROWS = { C = "C:", S = "S:", send = ">", recv = "<", info = "*" }
function M.format(rec)
  local head = string.format("%s %-10s %-7s", tostring(rec.ts or "-"), tostring(rec.profile or "-"),
    tostring(rec.type or "?"))
  if rec.dir ~= nil and rec.text ~= nil then
    return head .. " " .. (ARROWS[rec.dir] or tostring(rec.dir)) .. " " .. tostring(rec.text)
  end
  local keys = {}
  for k in pairs(rec) do
    if k ~= "ts" and k ~= "type" and k ~= "profile" and k ~= "event" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  local parts = { rec.event and tostring(rec.event) or nil }
  for _, k in ipairs(keys) do
    local v = rec[k]
    if type(v) == "table" then
      v = cjson.encode(v)
    elseif type(v) == "number" and v == math.floor(v) and v > -1e15 and v < 1e15 then
      v = string.format("%d", v)
    end
    parts[#parts + 1] = k .. "=" .. tostring(v)
  end
  return head .. " " .. table.concat(parts, " ")
end

-- trace.filter{types={set}, profile=, since=, ["until"]=} -> predicate(rec)
function M.filter(f)
  return function(rec)
    if f.types and not f.types[rec.type] then return false end
    if f.profile and rec.profile ~= f.profile then return false end
    if f.since or f["until"] then
      local t = M.parse_time(rec.ts)
      if not t then return false end
      if f.since and t < f.since then return false end
      if f["until"] and t > f["until"] then return false end
    end
    return true
  end
end

return M
