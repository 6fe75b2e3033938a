-- oauthmail.message.compose — a message from a table: addresses, subject,
-- text, html, attachments, inline parts and custom headers, as MIME.
local encode = require "oauthmail.message.encode"
local address = require "oauthmail.message.address"
local types = require "oauthmail.message.types"
local reader = require "oauthmail.message.reader"
local common = require "oauthmail.message.common"
local bad, usage = common.bad, common.usage
local no_breaks, utf8_text, basename = common.no_breaks, common.utf8_text, common.basename
local strip_path = common.strip_path
local rfc5322_date, id_source = common.rfc5322_date, common.id_source
local guess_type, new_message = types.guess, reader.new

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
  if opts.ids ~= nil and type(opts.ids) ~= "function" then usage("compose", "opts.ids must be a function") end
  local smtputf8 = opts.smtputf8 == true
  local state = { utf8 = false }
  local ids = id_source(opts.boundary_seed, opts.ids)

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


return compose
