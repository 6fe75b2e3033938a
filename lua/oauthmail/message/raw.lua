-- oauthmail.message.raw — a message from raw RFC 5322 text or a file
-- (sendmail-style): the header section parsed and checked, the envelope
-- taken from it or from the caller, the body streamed from the file.
local encode = require "oauthmail.message.encode"
local address = require "oauthmail.message.address"
local reader = require "oauthmail.message.reader"
local common = require "oauthmail.message.common"
local bad, usage = common.bad, common.usage
local CHUNK, strip_path = common.CHUNK, common.strip_path
local rfc5322_date, id_source = common.rfc5322_date, common.id_source
local MAX_RAW_HEADER = common.MAX_RAW_HEADER
local new_message, new_parts = reader.new, reader.parts
local raw_body_stream = reader.raw_body_stream


-- The header section of a file: read in chunks until the blank line, never
-- more than MAX_RAW_HEADER. Returns header text, byte offset of the body.
local function read_raw_header(f, path)
  local buf = ""
  while true do
    local s, e = buf:find("^\r?\n")
    if not s then s, e = buf:find("\r?\n\r?\n") end
    if s then return buf:sub(1, s - 1), e end
    if #buf > MAX_RAW_HEADER then
      bad("path", "'" .. path .. "' has no end of headers in its first MB: not an RFC 5322 message", "raw")
    end
    local c, err = f:read(CHUNK)
    if c == nil then
      if err then bad("path", "cannot read '" .. path .. "': " .. tostring(err), "open") end
      return buf, nil
    end
    buf = buf .. c
  end
end

-- RFC 5322 2.1.1: no line over 998 octets. state = {line=, len=} carries a
-- line across chunks (CRLF is never split: the streams carry a lone CR);
-- returns the number of the first line that is too long, or nil.
local function long_line(state, c)
  local pos = 1
  while true do
    local s = c:find("\r\n", pos, true)
    state.len = state.len + (s or (#c + 1)) - pos
    if state.len > encode.HARD_LINE then return state.line end
    if not s then return nil end
    state.line, state.len, pos = state.line + 1, 0, s + 2
  end
end

local function too_long_body(n)
  bad("message", "line " .. n .. " of the body is longer than " .. encode.HARD_LINE
    .. " octets (RFC 5322 2.1.1); encode it (quoted-printable or base64) first", "too_long")
end

-- Header fields of a CRLF header section: {name=, lines={...}, value=unfolded}.
local function parse_fields(head)
  local fields = {}
  local n = 0
  for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
    n = n + 1
    if #line > encode.HARD_LINE then
      bad("message", "line " .. n .. " of the header section is longer than " .. encode.HARD_LINE
        .. " octets (RFC 5322 2.1.1)", "too_long")
    end
    local mbox = n == 1 and line:find("^From ")   -- an mbox separator, not a field
    if not mbox and line:find("^[ \t]") and #fields > 0 then
      local fl = fields[#fields]
      fl.lines[#fl.lines + 1] = line
      fl.value = fl.value .. line
    elseif not mbox then
      local name, value = line:match("^([!-9;-~]+)[ \t]*:(.*)$")
      if not name then
        bad("message", "line " .. n .. " of the header section is not a header field", "raw")
      end
      fields[#fields + 1] = { name = name, lower = name:lower(), lines = { line }, value = value }
    end
  end
  return fields
end

-- What address texts and address-list header values read as, by their
-- exact text: a batch from one sender, or to one list, parses each once.
-- Only what parsed is kept (a bad one is read again, and raises again);
-- the lists are only read by their users. Emptied when full.
local KNOWN_MAX = 256
local known = { one = {}, list = {}, n = 0 }

local function remember(kind, text, v)
  if known.n >= KNOWN_MAX then known.one, known.list, known.n = {}, {}, 0 end
  known[kind][text] = v
  known.n = known.n + 1
  return v
end

-- One address text: its address, parsed once per text.
local function envelope_one(f, text)
  local a = known.one[text]
  if not a then
    local mb, why = address.parse(text)
    if not mb then bad(f, why, "address") end
    a = remember("one", text, mb.address)
  end
  return a
end

local function envelope_list(field, v)
  local one = type(v) == "string"
  if not one and type(v) ~= "table" then usage("from_raw", field .. " must be an address or a list") end
  local out = {}
  for i = 1, one and 1 or #v do
    local f = (not one and #v > 1) and (field .. "[" .. i .. "]") or field
    local text = one and v or v[i]
    if type(text) ~= "string" then usage("from_raw", f .. " must be a string") end
    out[#out + 1] = envelope_one(f, text)
  end
  return out
end

local ADDRESS_HEADERS = {
  from = true, sender = true, ["reply-to"] = true, to = true, cc = true, bcc = true,
  ["resent-from"] = true, ["resent-sender"] = true, ["resent-to"] = true, ["resent-cc"] = true, ["resent-bcc"] = true,
}

local function header_addresses(fl)
  local out = known.list[fl.value]
  if out then return out end
  out = {}
  for _, s in ipairs(address.split_list(fl.value)) do
    local mb, why = address.parse(s)
    if not mb then bad(fl.name .. " header", why, "address") end
    out[#out + 1] = mb.address
  end
  return remember("list", fl.value, out)
end

-- The reading of a text or a file that does not depend on the options:
-- {head=, body=, raw_seg=, eight=, first= (the first field of each name),
-- rcpt_fields= (To/Cc/Bcc), kept= (the header lines without Bcc)}.
local function read_source(src)
  local head, body, raw_seg, eight
  if type(src) == "string" then
    local t, longest = encode.crlf_longest(src)
    -- header and body are one text here: one look for 8-bit bytes
    eight = encode.has_8bit(t)
    local s, e = t:find("\r\n\r\n", 1, true)
    if t:sub(1, 2) == "\r\n" then
      head, body = "", t:sub(3)
    elseif s then
      head, body = t:sub(1, s - 1), t:sub(e + 1)
    else
      head, body = t:gsub("\r\n$", ""), ""
    end
    if body ~= "" and body:sub(-2) ~= "\r\n" then body = body .. "\r\n" end
    -- no line of the text is too long: nothing to look for in the body
    if not longest or longest > encode.HARD_LINE then
      local n = long_line({ line = 1, len = 0 }, body)
      if n then too_long_body(n) end
    end
  elseif type(src) == "table" and type(src.path) == "string" then
    local path = src.path
    local f, msg = io.open(path, "rb")
    if not f then bad("path", "cannot open '" .. path .. "': " .. strip_path(msg, path), "open") end
    local ok, h_or_err, off = pcall(read_raw_header, f, path)
    if not ok then f:close(); error(h_or_err, 0) end
    head = encode.crlf(h_or_err)
    if off then
      -- measure the body as the reader will produce it: size and 8-bit use
      local ok2, serr = f:seek("set", off)
      if not ok2 then f:close(); bad("path", "cannot read '" .. path .. "': " .. tostring(serr), "open") end
      local stream, size, eight_body = raw_body_stream(f), 0, false
      local lines = { line = 1, len = 0 }
      while true do
        local c, rerr = stream()
        if c == nil then
          if rerr then f:close(); bad("path", "cannot read '" .. path .. "': " .. tostring(rerr), "open") end
          break
        end
        size = size + #c
        eight_body = eight_body or encode.has_8bit(c)
        local n = long_line(lines, c)
        if n then f:close(); too_long_body(n) end
      end
      raw_seg = { raw = true, path = path, offset = off, size = size, field = "path", eight = eight_body }
    end
    f:close()
    body = ""
  else
    usage("from_raw", "expected the message text or {path=}")
  end
  if head == "" then bad("message", "the message has no header section", "raw") end
  if not encode.valid_utf8(head) then bad("message", "the header section is not valid UTF-8", "utf8") end

  local fields = parse_fields(head)
  local first = {}
  local rcpt_fields = {}
  local kept = {}
  for _, fl in ipairs(fields) do
    if not first[fl.lower] then first[fl.lower] = fl end
    if fl.lower == "to" or fl.lower == "cc" or fl.lower == "bcc" then rcpt_fields[#rcpt_fields + 1] = fl end
    -- every address header is held to the same rules, whether or not it
    -- feeds the envelope (a Reply-To once carried NUL and ESC through)
    if ADDRESS_HEADERS[fl.lower] then header_addresses(fl) end
    if fl.lower ~= "bcc" then
      for _, l in ipairs(fl.lines) do kept[#kept + 1] = l .. "\r\n" end
    end
  end
  return { head = head, body = body, raw_seg = raw_seg, eight = eight, first = first, rcpt_fields = rcpt_fields,
    kept = table.concat(kept), head_utf8 = encode.has_8bit(head) }
end

-- The last text read, and its reading: a list that repeats one text (the
-- same message to many recipients, one by one) reads it once. Only a text
-- that read without a failure is kept; what comes from it is never changed.
local last_text, last_reading

-- The host part of a sender for new Message-IDs ("localhost" if none):
-- the last sender's is kept, a batch has one.
local last_sender, last_host
local function sender_host(from)
  if from ~= last_sender then
    last_sender, last_host = from, from:match("@([%w%.%-]+)$") or "localhost"
  end
  return last_host
end

local function from_raw(src, opts)
  if opts ~= nil and type(opts) ~= "table" then usage("from_raw", "options must be a table") end
  opts = opts or {}
  if opts.ids ~= nil and type(opts.ids) ~= "function" then usage("from_raw", "opts.ids must be a function") end
  local r
  if type(src) == "string" and src == last_text then
    r = last_reading
  else
    r = read_source(src)
    if type(src) == "string" then last_text, last_reading = src, r end
  end
  local body, raw_seg, first, rcpt_fields = r.body, r.raw_seg, r.first, r.rcpt_fields


  local env_from
  if type(opts.from) == "string" then
    env_from = envelope_one("from", opts.from)
  elseif opts.from ~= nil then
    env_from = envelope_list("from", opts.from)
    if #env_from ~= 1 then bad("from", "exactly one sender is required", "missing") end
    env_from = env_from[1]
  else
    local fl = first.sender or first.from
    if not fl then bad("from", "no sender: give opts.from or a From header", "missing") end
    local list = header_addresses(fl)
    if #list == 0 then bad("from", "no sender: the " .. fl.name .. " header has no address", "missing") end
    env_from = list[1]
    if first.sender == nil and #list > 1 then
      bad("from", "the From header has several addresses and there is no Sender header: give opts.from", "missing")
    end
  end
  local rcpt
  if type(opts.to) == "string" then
    rcpt = { envelope_one("to", opts.to) }
  elseif opts.to ~= nil then
    rcpt = envelope_list("to", opts.to)
  else
    rcpt = {}
    for _, fl in ipairs(rcpt_fields) do
      for _, a in ipairs(header_addresses(fl)) do rcpt[#rcpt + 1] = a end
    end
  end
  -- one recipient needs no look for doubles (envelope_list made a new list;
  -- a header's list is remembered, so it is copied)
  local to
  if #rcpt == 1 and opts.to ~= nil then
    to = rcpt
  else
    local seen = {}
    to = {}
    for _, a in ipairs(rcpt) do
      if not seen[a:lower()] then seen[a:lower()] = true; to[#to + 1] = a end
    end
  end
  if #to == 0 then bad("to", "no recipients: give opts.to or To/Cc/Bcc headers", "missing") end

  local mid, date_line, new_mid = nil, "", false
  if first["message-id"] then
    mid = first["message-id"].value:match("<([^<>]*)>") or first["message-id"].value:gsub("^%s+", ""):gsub("%s+$", "")
  end
  if not first.date then
    local now = opts.now
    if now ~= nil and type(now) ~= "number" then usage("from_raw", "opts.now must be a number") end
    date_line = "Date: " .. rfc5322_date(now or os.time()) .. "\r\n"
  end
  if not mid then
    local host = opts.hostname
    if host ~= nil and (type(host) ~= "string" or not host:find("^[%w%.%-]+$")) then
      bad("opts.hostname", "is not a host name", "hostname")
    end
    host = host or sender_host(env_from)
    mid = id_source(opts.boundary_seed, opts.ids)(16) .. "@" .. host
    new_mid = true
  end

  local utf8 = r.head_utf8 or env_from:find("[\128-\255]") ~= nil
  for _, a in ipairs(to) do utf8 = utf8 or a:find("[\128-\255]") ~= nil end
  local eight = r.eight
  if eight == nil then eight = (raw_seg ~= nil and raw_seg.eight) or r.head_utf8 end
  local envelope = { from = env_from, to = to }
  if raw_seg then
    local m = new_message { r.kept, date_line, new_mid and ("Message-ID: <" .. mid .. ">\r\n") or "", "\r\n", raw_seg }
    m.envelope, m.message_id, m.needs_smtputf8, m.has_8bit = envelope, mid, utf8, eight
    return m
  end
  -- the text's own parts, shared by every message made from it, and the
  -- lines added between them (made in one concatenation); the object is
  -- made whole at once (a table that grows is made twice)
  local parts
  if new_mid then
    parts = { r.kept, date_line .. "Message-ID: <" .. mid .. ">\r\n\r\n", body }
  else
    parts = { r.kept, date_line .. "\r\n", body }
  end
  return new_parts(parts, envelope, mid, utf8, eight)
end


return from_raw
