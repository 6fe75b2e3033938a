-- oauthmail.message — RFC 5322 / MIME messages for the mailer: composed from
-- a table (addresses, subject, text, html, attachments, inline parts,
-- headers) or taken from raw text or a file (sendmail-style). A message is a
-- list of segments — strings, base64-encoded files or data, a raw file body —
-- so its size is known without building it and big files are streamed in
-- bounded chunks, identically on every m:reader() call. See docs/message.md.
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local encode = require "oauthmail.message.encode"
local address = require "oauthmail.message.address"

local M = {}

local CHUNK = 64 * 1024              -- string and raw-file bytes per reader chunk
local MAX_RAW_HEADER = 1024 * 1024   -- a header section bigger than this is not mail

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
local function rfc5322_date(now)
  local t = os.date("!*t", math.floor(now))
  return string.format("%s, %02d %s %04d %02d:%02d:%02d +0000",
    DAYS[t.wday], t.day, MONTHS[t.month], t.year, t.hour, t.min, t.sec)
end
M._date = rfc5322_date

-- Random hex for ids and boundaries; deterministic from opts.boundary_seed.
local function id_source(seed)
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

local TYPES = {
  pdf = "application/pdf", zip = "application/zip", gz = "application/gzip",
  tgz = "application/gzip", tar = "application/x-tar", ["7z"] = "application/x-7z-compressed",
  json = "application/json", xml = "application/xml", js = "text/javascript",
  doc = "application/msword", xls = "application/vnd.ms-excel", ppt = "application/vnd.ms-powerpoint",
  docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
  xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
  pptx = "application/vnd.openxmlformats-officedocument.presentationml.presentation",
  odt = "application/vnd.oasis.opendocument.text", ods = "application/vnd.oasis.opendocument.spreadsheet",
  rtf = "application/rtf",
  txt = "text/plain", log = "text/plain", md = "text/markdown", csv = "text/csv",
  html = "text/html", htm = "text/html", css = "text/css", ics = "text/calendar",
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", svg = "image/svg+xml", bmp = "image/bmp", ico = "image/x-icon",
  tif = "image/tiff", tiff = "image/tiff",
  mp3 = "audio/mpeg", wav = "audio/wav", ogg = "audio/ogg", mp4 = "video/mp4", webm = "video/webm",
}
M.content_types = TYPES

local function guess_type(filename)
  local ext = filename and filename:match("%.([%w]+)$")
  return ext and TYPES[ext:lower()] or "application/octet-stream"
end

-- ------------------------------------------------------------ the object

local Message = {}
Message.__index = Message

-- Segments: strings; {b64 = true, data = s | path = p, size = n, field = f};
-- {raw = true, path = p, offset = o, size = n}. Adjacent strings are merged.
local function new_message(segs)
  local merged, buf = {}, {}
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

local function strip_path(msg, path)
  msg = tostring(msg)
  if msg:sub(1, #path + 2) == path .. ": " then return msg:sub(#path + 3) end
  return msg
end

-- m:reader() -> function returning the next chunk, nil at the end, or
-- nil, err if a file cannot be read or changed since the message was made
-- (then every later call returns the same nil, err). Files are opened on
-- first use and closed at their end or on failure.
function Message:reader()
  local segs = self._segs
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

-- m:tostring() -> the whole message | nil, err
function Message:tostring()
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

-- --------------------------------------------------------------- compose

local function address_list(field, v, smtputf8, state)
  if v == nil then return {} end
  local list
  if type(v) == "string" or (type(v) == "table" and (v.address ~= nil or v.name ~= nil)) then
    list = { v }
  elseif type(v) == "table" then
    list = v
  else
    usage("compose", field .. " must be an address or a list of addresses")
  end
  local out = {}
  for i = 1, #list do
    local f = (list == v and type(v) == "table" and v.address == nil) and (field .. "[" .. i .. "]") or field
    local a = list[i]
    local mb, why
    if type(a) == "string" then
      mb, why = address.parse(a)
      if not mb then bad(f, why, "address") end
    elseif type(a) == "table" then
      if type(a.address) ~= "string" then usage("compose", f .. ".address must be a string") end
      if a.name ~= nil and type(a.name) ~= "string" then usage("compose", f .. ".name must be a string") end
      if a.name then
        if a.name:find("[\r\n]") then bad(f, "display name contains a line break", "line_break") end
        if a.name:find("[%z\1-\8\11-\31\127]") then bad(f, "display name contains a control character", "address") end
        utf8_text(f .. ".name", a.name)
      end
      local ok
      ok, why = address.check(a.address)
      if not ok then bad(f, why, "address") end
      mb = { name = a.name ~= "" and a.name or nil, address = a.address }
    else
      usage("compose", f .. " must be a string or {name=, address=}")
    end
    local _, utf8, local_utf8 = address.check(mb.address)
    if local_utf8 and not smtputf8 then
      bad(f, "'" .. mb.address .. "' has a non-ASCII local part: set opts.smtputf8 (the server must offer SMTPUTF8)",
        "smtputf8")
    end
    if utf8 then state.utf8 = true end
    out[#out + 1] = mb
  end
  return out
end

local STRUCTURAL = {
  ["content-type"] = true, ["mime-version"] = true, ["content-transfer-encoding"] = true,
}
local OWN_FIELD = {
  from = "from", to = "to", cc = "cc", ["reply-to"] = "reply_to", subject = "subject",
}

local function custom_headers(hs)
  if hs == nil then return {} end
  if type(hs) ~= "table" then usage("compose", "headers must be a list of {name, value} or a map") end
  local list = {}
  if hs[1] ~= nil then
    for i = 1, #hs do
      local e = hs[i]
      if type(e) ~= "table" then usage("compose", "headers[" .. i .. "] must be {name, value}") end
      list[#list + 1] = { e.name or e[1], e.value or e[2], "headers[" .. i .. "]" }
    end
  else
    local names = {}
    for k in pairs(hs) do names[#names + 1] = k end
    table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(names) do list[#list + 1] = { k, hs[k], "headers." .. tostring(k) } end
  end
  for _, e in ipairs(list) do
    local name, value, field = e[1], e[2], e[3]
    if type(name) ~= "string" then usage("compose", field .. ": the name must be a string") end
    if type(value) == "number" then value = tostring(value); e[2] = value end
    if type(value) ~= "string" then usage("compose", field .. ": the value must be a string") end
    if not name:find("^[!-9;-~]+$") then
      bad(field, "'" .. name:gsub("[\r\n]", "?") .. "' is not a valid header name", "header_name")
    end
    local lname = name:lower()
    if STRUCTURAL[lname] then
      bad(field, name .. " is set by the message structure and cannot be given", "structural")
    elseif lname == "bcc" then
      bad(field, "Bcc is never written into the message: use the bcc field", "bcc")
    elseif OWN_FIELD[lname] then
      bad(field, name .. " is written from the " .. OWN_FIELD[lname] .. " field: use that instead", "own_field")
    end
    if value:find("[\r\n]") then bad(field, "value contains a line break", "line_break") end
    utf8_text(field, value)
  end
  return list
end

local function check_content_type(field, ct)
  if type(ct) ~= "string" then usage("compose", field .. " must be a string") end
  no_breaks(field, ct)
  local t, rest = ct:match("^%s*([%w!#%$&%^_%.%+%-]+/[%w!#%$&%^_%.%+%-]+)%s*(.-)%s*$")
  if t and rest ~= "" then rest = rest:match("^;%s*(.*)$") end
  if not t or not rest or ct:find("[%z\1-\31\127-\255]") then
    bad(field, "'" .. ct .. "' is not an ASCII MIME type (type/subtype[; params])", "content_type")
  end
  local lt = t:lower()
  if lt:find("^multipart/") or lt:find("^message/") then
    bad(field, t .. " cannot be sent as a base64 attachment", "content_type")
  end
  return t, rest
end

local function attachments_of(list, ids, host)
  if list == nil then return {}, {} end
  if type(list) ~= "table" then usage("compose", "attachments must be a list") end
  local att, inl = {}, {}
  for i = 1, #list do
    local field = "attachments[" .. i .. "]"
    local a = list[i]
    if type(a) ~= "table" then usage("compose", field .. " must be a table") end
    if a.path ~= nil and a.data ~= nil then bad(field, "give path or data, not both", "source") end
    if a.path == nil and a.data == nil then bad(field, "path or data is required", "source") end
    local seg = { b64 = true, field = field .. ".path" }
    if a.path ~= nil then
      if type(a.path) ~= "string" then usage("compose", field .. ".path must be a string") end
      no_breaks(field .. ".path", a.path)
      local f, msg = io.open(a.path, "rb")
      if not f then bad(field .. ".path", "cannot open '" .. a.path .. "': " .. strip_path(msg, a.path), "open") end
      local probe, rerr = f:read(0)
      local size = f:seek("end")
      f:close()
      if (probe == nil and rerr) or not size then
        bad(field .. ".path", "cannot read '" .. a.path .. "': " .. tostring(rerr or "not a regular file"), "open")
      end
      seg.path, seg.size = a.path, size
    else
      if type(a.data) ~= "string" then usage("compose", field .. ".data must be a string") end
      seg.data, seg.size = a.data, #a.data
    end
    local filename = a.filename
    if filename == nil and a.path then filename = basename(a.path) end
    if filename ~= nil then
      if type(filename) ~= "string" then usage("compose", field .. ".filename must be a string") end
      if filename:find("[\r\n]") then bad(field .. ".filename", "contains a line break", "line_break") end
      utf8_text(field .. ".filename", filename)
      if filename:find("[%z\1-\31\127]") then bad(field .. ".filename", "contains control characters", "filename") end
    end
    local ctype, cparams
    if a.content_type ~= nil then
      ctype, cparams = check_content_type(field .. ".content_type", a.content_type)
    else
      ctype = guess_type(filename)
    end
    local cid = a.content_id
    if cid ~= nil then
      if type(cid) ~= "string" then usage("compose", field .. ".content_id must be a string") end
      if cid:find("[\r\n]") then bad(field .. ".content_id", "contains a line break", "line_break") end
      cid = cid:match("^<(.*)>$") or cid
      if not cid:find("^[!-;=?-~]+$") or #cid > 250 then
        bad(field .. ".content_id", "'" .. cid .. "' is not a valid Content-ID", "content_id")
      end
    elseif a.inline then
      cid = "part" .. i .. "." .. ids(8) .. "@" .. host
    end
    local params = {}
    -- a name= the caller wrote into content_type wins; a second one would
    -- leave readers to pick either
    local has_name = cparams and (";" .. cparams:lower()):find(";%s*name[%*%d]*%s*=") ~= nil
    if filename and not has_name then params[1] = { "name", filename } end
    local ct_value = ctype .. (cparams and cparams ~= "" and ("; " .. cparams) or "")
    local disp = a.inline and "inline" or "attachment"
    local ct_line = encode.param_field("Content-Type", ct_value, params)
    local cd_line = encode.param_field("Content-Disposition", disp, filename and { { "filename", filename } } or {})
    if not ct_line or not cd_line then
      bad(ct_line and (field .. ".filename") or (field .. ".content_type"), "is too long to fit in a header", "too_long")
    end
    local headers = { ct_line, cd_line }
    if cid then headers[#headers + 1] = "Content-ID: <" .. cid .. ">" end
    headers[#headers + 1] = "Content-Transfer-Encoding: base64"
    local node = { headers = headers, body = { seg } }
    if a.inline then inl[#inl + 1] = node else att[#att + 1] = node end
  end
  return att, inl
end

-- A text/plain or text/html leaf with the encoding its content calls for.
local function text_leaf(subtype, field, s, texts)
  if type(s) ~= "string" then usage("compose", field .. " must be a string") end
  utf8_text(field, s)
  local t = encode.crlf(s)
  local cte, body
  if not t:find("[%z\128-\255]") and encode.longest_line(t) <= encode.HARD_LINE then
    cte, body = "7bit", t
  else
    local q = encode.qp(t)
    if #q <= encode.b64_size(#t) then
      cte, body = "quoted-printable", q
    else
      cte, body = "base64", encode.b64_lines(t)
    end
  end
  if cte == "7bit" then texts[#texts + 1] = body end
  return {
    headers = { "Content-Type: text/" .. subtype .. "; charset=utf-8", "Content-Transfer-Encoding: " .. cte },
    body = { body },
  }
end

local function multipart(subtype, parts, extra)
  return { subtype = subtype, parts = parts, extra = extra }
end

-- Boundaries never occur in QP or base64 output ("=_" is not a valid QP
-- escape, "_" is not base64); a 7bit body is checked explicitly.
local function assign_boundaries(node, ids, texts)
  if not node.parts then return end
  local b
  repeat
    b = "=_om_" .. ids(12)
    local clash = false
    for _, t in ipairs(texts) do
      if t:find(b, 1, true) then clash = true end
    end
  until not clash
  node.boundary = b
  node.headers = {
    encode.param_field("Content-Type", "multipart/" .. node.subtype,
      node.extra and { node.extra, { "boundary", b } } or { { "boundary", b } }),
  }
  for _, p in ipairs(node.parts) do assign_boundaries(p, ids, texts) end
end

local function emit(node, segs)
  for _, hline in ipairs(node.headers) do segs[#segs + 1] = hline .. "\r\n" end
  segs[#segs + 1] = "\r\n"
  if node.parts then
    for i, p in ipairs(node.parts) do
      segs[#segs + 1] = (i > 1 and "\r\n" or "") .. "--" .. node.boundary .. "\r\n"
      emit(p, segs)
    end
    segs[#segs + 1] = "\r\n--" .. node.boundary .. "--"
  else
    for _, s in ipairs(node.body) do segs[#segs + 1] = s end
  end
end

local function ends_with_crlf(segs)
  for i = #segs, 1, -1 do
    local s = segs[i]
    if type(s) ~= "string" then
      if s.size > 0 then return false end
    elseif s ~= "" then
      return s:sub(-2) == "\r\n"
    end
  end
  return true
end

local function compose(tbl, opts)
  if type(tbl) ~= "table" then usage("compose", "expected a message table") end
  if opts ~= nil and type(opts) ~= "table" then usage("compose", "opts must be a table") end
  opts = opts or {}
  local smtputf8 = opts.smtputf8 == true
  local state = { utf8 = false }
  local ids = id_source(opts.boundary_seed)

  if tbl.from == nil then bad("from", "a sender is required", "missing") end
  local from = address_list("from", tbl.from, smtputf8, state)
  if #from ~= 1 then bad("from", "exactly one sender is required", "missing") end
  local reply_to = address_list("reply_to", tbl.reply_to, smtputf8, state)
  local to = address_list("to", tbl.to, smtputf8, state)
  local cc = address_list("cc", tbl.cc, smtputf8, state)
  local bcc = address_list("bcc", tbl.bcc, smtputf8, state)
  if #to + #cc + #bcc == 0 then bad("to", "at least one recipient (to, cc or bcc) is required", "missing") end

  local subject = tbl.subject
  if subject ~= nil then
    if type(subject) ~= "string" then usage("compose", "subject must be a string") end
    if subject:find("[\r\n]") then bad("subject", "contains a line break", "line_break") end
    utf8_text("subject", subject)
  end
  local custom = custom_headers(tbl.headers)

  local host = opts.hostname
  if host ~= nil then
    if type(host) ~= "string" then usage("compose", "opts.hostname must be a string") end
    if not host:find("^[%w%.%-]+$") then bad("opts.hostname", "'" .. host:gsub("[\r\n]", "?") .. "' is not a host name", "hostname") end
  else
    host = from[1].address:match("@([^@]+)$")
    if not host:find("^[%w%.%-]+$") then host = "localhost" end
  end

  local mid = tbl.message_id
  local date
  for _, e in ipairs(custom) do
    local l = e[1]:lower()
    if l == "message-id" then mid = e[2] end
    if l == "date" then date = e[2] end
  end
  if mid ~= nil then
    if type(mid) ~= "string" then usage("compose", "message_id must be a string") end
    if mid:find("[\r\n]") then bad("message_id", "contains a line break", "line_break") end
    mid = mid:match("^%s*<(.*)>%s*$") or mid
    if not mid:find("^[!-;=?-~]+@[!-;=?-~]+$") or #mid > 250 then
      bad("message_id", "'" .. mid:sub(1, 80) .. "' is not id-left@id-right (at most 250 characters)", "message_id")
    end
  else
    mid = ids(16) .. "@" .. host
  end
  local now = opts.now
  if now ~= nil and type(now) ~= "number" then usage("compose", "opts.now must be a number (epoch seconds)") end

  -- body structure
  local texts = {}
  local text_node = tbl.text ~= nil and text_leaf("plain", "text", tbl.text, texts) or nil
  local html_node = tbl.html ~= nil and text_leaf("html", "html", tbl.html, texts) or nil
  local att, inl = attachments_of(tbl.attachments, ids, host)
  if html_node and #inl > 0 then
    local parts = { html_node }
    for _, p in ipairs(inl) do parts[#parts + 1] = p end
    html_node = multipart("related", parts, { "type", "text/html" })
  else
    for _, p in ipairs(inl) do att[#att + 1] = p end
  end
  local main
  if text_node and html_node then
    main = multipart("alternative", { text_node, html_node })
  else
    main = text_node or html_node
  end
  local root
  if #att > 0 then
    local parts = { main }
    for _, p in ipairs(att) do parts[#parts + 1] = p end
    root = multipart("mixed", parts)
  else
    root = main or text_leaf("plain", "text", "", texts)
  end
  assign_boundaries(root, ids, texts)

  -- header section
  local hs = {}
  local function add(field, line)
    if not line then bad(field, "is too long to fit in a header line", "too_long") end
    hs[#hs + 1] = line
  end
  if not date then add("date", "Date: " .. rfc5322_date(now or os.time())) end
  add("from", address.field("From", from))
  if #reply_to > 0 then add("reply_to", address.field("Reply-To", reply_to)) end
  if #to > 0 then add("to", address.field("To", to)) end
  if #cc > 0 then add("cc", address.field("Cc", cc)) end
  if subject ~= nil then add("subject", encode.unstructured("Subject", subject)) end
  local custom_mid = false
  for _, e in ipairs(custom) do
    local l = e[1]:lower()
    if l == "message-id" then
      custom_mid = true
      add(e[3], e[1] .. ": <" .. mid .. ">")
    else
      add(e[3], encode.unstructured(e[1], e[2]))
    end
  end
  if not custom_mid then add("message_id", "Message-ID: <" .. mid .. ">") end
  add("mime", "MIME-Version: 1.0")

  local segs = {}
  for _, hline in ipairs(hs) do segs[#segs + 1] = hline .. "\r\n" end
  emit(root, segs)
  if not ends_with_crlf(segs) then segs[#segs + 1] = "\r\n" end

  local m = new_message(segs)
  local seen, rcpt = {}, {}
  for _, list in ipairs({ to, cc, bcc }) do
    for _, mb in ipairs(list) do
      local k = mb.address:lower()
      if not seen[k] then
        seen[k] = true
        rcpt[#rcpt + 1] = mb.address
      end
    end
  end
  m.envelope = { from = from[1].address, to = rcpt }
  m.message_id = mid
  m.needs_smtputf8 = state.utf8
  m.has_8bit = false
  return m
end

-- message.compose(tbl [, opts]) -> m | nil, err
function M.compose(tbl, opts)
  return guarded(compose, tbl, opts)
end

-- ------------------------------------------------------------- from_raw

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

local function envelope_list(field, v)
  if type(v) == "string" then v = { v } end
  if type(v) ~= "table" then usage("from_raw", field .. " must be an address or a list") end
  local out = {}
  for i = 1, #v do
    local f = #v > 1 and (field .. "[" .. i .. "]") or field
    if type(v[i]) ~= "string" then usage("from_raw", f .. " must be a string") end
    local mb, why = address.parse(v[i])
    if not mb then bad(f, why, "address") end
    out[#out + 1] = mb.address
  end
  return out
end

local ADDRESS_HEADERS = {
  from = true, sender = true, ["reply-to"] = true, to = true, cc = true, bcc = true,
  ["resent-from"] = true, ["resent-sender"] = true, ["resent-to"] = true, ["resent-cc"] = true, ["resent-bcc"] = true,
}

local function header_addresses(fl)
  local out = {}
  for _, s in ipairs(address.split_list(fl.value)) do
    local mb, why = address.parse(s)
    if not mb then bad(fl.name .. " header", why, "address") end
    out[#out + 1] = mb.address
  end
  return out
end

local function from_raw(src, opts)
  if opts ~= nil and type(opts) ~= "table" then usage("from_raw", "options must be a table") end
  opts = opts or {}
  local head, body, raw_seg
  if type(src) == "string" then
    local t = encode.crlf(src)
    local s, e = t:find("\r\n\r\n", 1, true)
    if t:sub(1, 2) == "\r\n" then
      head, body = "", t:sub(3)
    elseif s then
      head, body = t:sub(1, s - 1), t:sub(e + 1)
    else
      head, body = t:gsub("\r\n$", ""), ""
    end
    if body ~= "" and body:sub(-2) ~= "\r\n" then body = body .. "\r\n" end
    local n = long_line({ line = 1, len = 0 }, body)
    if n then too_long_body(n) end
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
      local stream, size, eight = raw_body_stream(f), 0, false
      local lines = { line = 1, len = 0 }
      while true do
        local c, rerr = stream()
        if c == nil then
          if rerr then f:close(); bad("path", "cannot read '" .. path .. "': " .. tostring(rerr), "open") end
          break
        end
        size = size + #c
        eight = eight or c:find("[\128-\255]") ~= nil
        local n = long_line(lines, c)
        if n then f:close(); too_long_body(n) end
      end
      raw_seg = { raw = true, path = path, offset = off, size = size, field = "path", eight = eight }
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
  for _, fl in ipairs(fields) do
    if not first[fl.lower] then first[fl.lower] = fl end
    if fl.lower == "to" or fl.lower == "cc" or fl.lower == "bcc" then rcpt_fields[#rcpt_fields + 1] = fl end
    -- every address header is held to the same rules, whether or not it
    -- feeds the envelope (a Reply-To once carried NUL and ESC through)
    if ADDRESS_HEADERS[fl.lower] then header_addresses(fl) end
  end

  local env_from
  if opts.from ~= nil then
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
  if opts.to ~= nil then
    rcpt = envelope_list("to", opts.to)
  else
    rcpt = {}
    for _, fl in ipairs(rcpt_fields) do
      for _, a in ipairs(header_addresses(fl)) do rcpt[#rcpt + 1] = a end
    end
  end
  local seen, to = {}, {}
  for _, a in ipairs(rcpt) do
    if not seen[a:lower()] then seen[a:lower()] = true; to[#to + 1] = a end
  end
  if #to == 0 then bad("to", "no recipients: give opts.to or To/Cc/Bcc headers", "missing") end

  local ids = id_source(opts.boundary_seed)
  local out = {}
  for _, fl in ipairs(fields) do
    if fl.lower ~= "bcc" then
      for _, l in ipairs(fl.lines) do out[#out + 1] = l .. "\r\n" end
    end
  end
  local mid
  if first["message-id"] then
    mid = first["message-id"].value:match("<([^<>]*)>") or first["message-id"].value:gsub("^%s+", ""):gsub("%s+$", "")
  end
  if not first.date then
    local now = opts.now
    if now ~= nil and type(now) ~= "number" then usage("from_raw", "opts.now must be a number") end
    out[#out + 1] = "Date: " .. rfc5322_date(now or os.time()) .. "\r\n"
  end
  if not mid then
    local host = opts.hostname
    if host ~= nil and (type(host) ~= "string" or not host:find("^[%w%.%-]+$")) then
      bad("opts.hostname", "is not a host name", "hostname")
    end
    host = host or env_from:match("@([%w%.%-]+)$") or "localhost"
    mid = ids(16) .. "@" .. host
    out[#out + 1] = "Message-ID: <" .. mid .. ">\r\n"
  end
  out[#out + 1] = "\r\n"
  if body ~= "" then out[#out + 1] = body end
  if raw_seg then out[#out + 1] = raw_seg end

  local m = new_message(out)
  local utf8 = head:find("[\128-\255]") ~= nil or env_from:find("[\128-\255]") ~= nil
  for _, a in ipairs(to) do utf8 = utf8 or a:find("[\128-\255]") ~= nil end
  m.envelope = { from = env_from, to = to }
  m.message_id = mid
  m.needs_smtputf8 = utf8
  m.has_8bit = body:find("[\128-\255]") ~= nil or (raw_seg ~= nil and raw_seg.eight) or head:find("[\128-\255]") ~= nil
  return m
end

-- message.from_raw(text | {path=} [, {from=, to=, now=, hostname=}]) -> m | nil, err
function M.from_raw(src, opts)
  return guarded(from_raw, src, opts)
end

-- ------------------------------------------------------------- exposed

-- message.parse_address(s) -> {name=, address=} | nil, err
function M.parse_address(s)
  if type(s) ~= "string" then error("message.parse_address: expected a string", 2) end
  local mb, why = address.parse(s)
  if not mb then return errors.fail("config", why, { reason = "address" }) end
  return mb
end

-- message.encode_header(s [, used]) -> RFC 2047 encoded, folded value
function M.encode_header(s, used)
  if type(s) ~= "string" then error("message.encode_header: expected a string", 2) end
  if used ~= nil and type(used) ~= "number" then error("message.encode_header: used must be a number", 2) end
  if s:find("[\r\n]") then return errors.fail("config", "header value contains a line break", { reason = "line_break" }) end
  if not encode.valid_utf8(s) then return errors.fail("config", "header value is not valid UTF-8", { reason = "utf8" }) end
  return encode.encode_header(s, used)
end

M.Message = Message

return M
