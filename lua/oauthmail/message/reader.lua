-- oauthmail.message.reader — the message object: a list of segments
-- (strings, base64-encoded files or data, a raw file body) whose size is
-- known without building it, read in bounded chunks, identically on every
-- m:reader() call.
local encode = require "oauthmail.message.encode"
local errors = require "oauthmail.errors"
local common = require "oauthmail.message.common"
local CHUNK, strip_path = common.CHUNK, common.strip_path

local M = {}

-- ------------------------------------------------------------ the object

local Message = {}
Message.__index = Message

-- A message that is one string.
local function new_text(text)
  return setmetatable({ _text = text, _size = #text, needs_smtputf8 = false, has_8bit = false }, Message)
end

-- A message that is a few strings in a row, kept apart: a batch of messages
-- made from one text shares its header section and body, and only the
-- lines that differ (Date, Message-ID) are new for each.
local function new_parts(parts, envelope, message_id, smtputf8, eight)
  local size = 0
  for i = 1, #parts do size = size + #parts[i] end
  return setmetatable({ _parts = parts, _size = size, needs_smtputf8 = smtputf8 or false,
    has_8bit = eight or false, envelope = envelope, message_id = message_id }, Message)
end

-- The strings a message is made of, in order, when it is all in memory
-- (no file, nothing to encode), else nil: what a pipelined batch writes.
local function parts_of(msg)
  if msg._parts then return msg._parts end
  if msg._text then return { msg._text } end
end

-- (a message that is one string keeps it as _text, not a list of one)
-- Segments: strings; {b64 = true, data = s | path = p, size = n, field = f};
-- {raw = true, path = p, offset = o, size = n}. Adjacent strings are merged.
local function new_message(segs)
  local merged, buf
  local all_strings = true
  for i = 1, #segs do
    if type(segs[i]) ~= "string" then all_strings = false break end
  end
  if all_strings then
    -- text only (raw text, most composed mail): one string, no merging
    return new_text(table.concat(segs))
  end
  merged, buf = {}, {}
  for i = 1, #segs do
    local s = segs[i]
    if type(s) == "string" then
      buf[#buf + 1] = s
    else
      if #buf > 0 then merged[#merged + 1] = table.concat(buf); buf = {} end
      merged[#merged + 1] = s
    end
  end
  if #buf > 0 then merged[#merged + 1] = table.concat(buf) end
  local size = 0
  for i = 1, #merged do
    local s = merged[i]
    if type(s) == "string" then size = size + #s
    elseif s.b64 then size = size + encode.b64_size(s.size)
    else size = size + s.size end
  end
  return setmetatable({ _segs = merged, _size = size, needs_smtputf8 = false, has_8bit = false }, Message)
end

-- A raw body from a file, line breaks made CRLF and a final CRLF ensured,
-- as a chunk function. The carried CR keeps a CRLF split by a chunk edge whole.
local function raw_body_stream(f)
  local carry, last, done = "", "", false
  return function()
    while not done do
      local c, err = f:read(CHUNK)
      if c == nil and err then return nil, err end
      local out
      if c == nil then
        done = true
        out = encode.crlf(carry)
        if out == "" and last ~= "" and last ~= "\n" then out = "\r\n" end
      else
        local s = carry .. c
        carry = ""
        if s:sub(-1) == "\r" then carry, s = "\r", s:sub(1, -2) end
        out = encode.crlf(s)
      end
      if out ~= "" then
        last = out:sub(-1)
        return out
      end
    end
    return nil
  end
end

local function file_failure(seg, text)
  return errors.new("config", seg.field .. ": " .. text, { field = seg.field, reason = "reader" })
end

local function changed(seg)
  return file_failure(seg, "'" .. seg.path .. "' changed after the message was made (its size differs)")
end


-- m:reader() -> function returning the next chunk, nil at the end, or
-- nil, err if a file cannot be read or changed since the message was made
-- (then every later call returns the same nil, err). Files are opened on
-- first use and closed at their end or on failure.
function Message:reader()
  local segs = self._segs or self._parts or { self._text }
  local i, pos, f, got, stream = 1, 1, nil, 0, nil
  local failed
  local function fail(err)
    if f then f:close(); f = nil end
    failed = err
    return nil, err
  end
  local function next_seg()
    if f then f:close(); f = nil end
    i, pos, got, stream = i + 1, 1, 0, nil
  end
  return function()
    if failed then return nil, failed end
    while true do
      local s = segs[i]
      if s == nil then return nil end
      if type(s) == "string" then
        if pos > #s then
          next_seg()
        else
          local c = s:sub(pos, pos + CHUNK - 1)
          pos = pos + CHUNK
          return c
        end
      elseif s.b64 and s.data then
        local raw = s.data:sub(pos, pos + encode.B64_CHUNK - 1)
        if raw == "" then
          next_seg()
        else
          local sep = pos > 1 and "\r\n" or ""
          pos = pos + encode.B64_CHUNK
          return sep .. encode.b64_lines(raw)
        end
      else
        if not f then
          local msg
          f, msg = io.open(s.path, "rb")
          if not f then return fail(file_failure(s, "cannot open '" .. s.path .. "': " .. strip_path(msg, s.path))) end
          if s.raw then
            local ok, serr = f:seek("set", s.offset)
            if not ok then return fail(file_failure(s, "cannot read '" .. s.path .. "': " .. tostring(serr))) end
            stream = raw_body_stream(f)
          end
        end
        local c, rerr
        if s.raw then
          c, rerr = stream()
        else
          c, rerr = f:read(encode.B64_CHUNK)
        end
        if c == nil and rerr then return fail(file_failure(s, "cannot read '" .. s.path .. "': " .. tostring(rerr))) end
        if c == nil then
          if got ~= s.size then return fail(changed(s)) end
          next_seg()
        else
          local before = got
          got = got + #c
          if not s.raw then c = (before > 0 and "\r\n" or "") .. encode.b64_lines(c) end
          if got > s.size then return fail(changed(s)) end
          return c
        end
      end
    end
  end
end

-- m:size() -> exact octets of the message (what the readers produce).
function Message:size()
  return self._size
end

-- m:tostring() -> the whole message | nil, err. Also reads any object
-- shaped like a message (a reader() method) to the end.
function Message:tostring()
  if self._text then return self._text end
  if self._parts then return table.concat(self._parts) end
  local segs = self._segs
  -- held in memory as one string (raw text, a message without files)
  if segs and #segs == 1 and type(segs[1]) == "string" then return segs[1] end
  local parts, read = {}, self:reader()
  while true do
    local c, err = read()
    if c == nil then
      if err then return nil, err end
      return table.concat(parts)
    end
    parts[#parts + 1] = c
  end
end

M.Message, M.new, M.raw_body_stream = Message, new_message, raw_body_stream
M.parts, M.parts_of = new_parts, parts_of

return M
