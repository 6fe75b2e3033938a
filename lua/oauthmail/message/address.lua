-- oauthmail.message.address — mailbox parsing and rendering: one address
-- ("user@x", "Name <user@x>", "\"Doe, J\" <user@x>"), address lists as found
-- in raw headers (quotes, comments, groups), and header items for folding.
local encode = require "oauthmail.message.encode"

local M = {}

-- RFC 5322 atext, plus UTF-8 bytes (RFC 6532) which the caller may refuse.
local ATEXT = "[%w!#%$%%&'%*%+/=%?%^_`{|}~%-\128-\255]"
local NOT_ATEXT = "[^%w!#%$%%&'%*%+/=%?%^_`{|}~%-\128-\255]"

local function dot_atom(s)
  if s == "" or s:find("^%.") or s:find("%.$") or s:find("..", 1, true) then return false end
  return not s:gsub("%.", ""):find(NOT_ATEXT)
end

-- check(addr) -> true, has_utf8 | nil, reason  (a bare addr-spec)
function M.check(addr)
  if addr:find("[\r\n]") then return nil, "address contains a line break" end
  -- no control byte anywhere, escaped in a quoted local part or inside a
  -- domain literal included: the address goes into headers and the envelope
  if addr:find("[%z\1-\31\127]") then return nil, "address contains a control character" end
  -- "<" and ">" even inside a quoted local part: an SMTP envelope cannot
  -- carry them (the engine refuses them) and readers split at them
  if addr:find("[<>]") then return nil, "'" .. addr .. "' contains '<' or '>'" end
  if addr == "" then return nil, "address is empty" end
  if #addr > 254 then return nil, "address is longer than 254 octets" end
  if not encode.valid_utf8(addr) then return nil, "address is not valid UTF-8" end
  local at = addr:find("@[^@]*$")
  if not at or at == 1 or at == #addr then
    return nil, "'" .. addr .. "' is not an address of the form user@domain"
  end
  local lp, dom = addr:sub(1, at - 1), addr:sub(at + 1)
  local quoted = lp:match('^"(.*)"$')
  if quoted then
    if quoted:gsub("\\.", ""):find('[%z\1-\31\127"\\]') then
      return nil, "'" .. addr .. "' has an invalid quoted local part"
    end
  elseif not dot_atom(lp) then
    return nil, "'" .. addr .. "' has an invalid local part"
  end
  if not dom:find("^%[[^%[%]\\%s]+%]$") then
    for label in (dom .. "."):gmatch("([^.]*)%.") do
      if label == "" or label:find("[^%w%-\128-\255]") or label:find("^%-") or label:find("%-$") then
        return nil, "'" .. addr .. "' has an invalid domain"
      end
    end
  end
  return true, lp:find("[\128-\255]") ~= nil or dom:find("[\128-\255]") ~= nil, lp:find("[\128-\255]") ~= nil
end

-- White space as %s sees it: HT, LF, VT, FF, CR, SP.
local function is_space(b) return b == 32 or (b >= 9 and b <= 13) end

-- Trimming and splitting scan each byte once: header values reach 1 MB, and
-- the patterns "%s+$" and "^(.-)%s*<" retry from every position (64 KB of
-- white space once took 32 s).
local function trim(s)
  local i = s:find("%S")
  if not i then return "" end
  local j = #s
  while is_space(s:byte(j)) do j = j - 1 end
  return s:sub(i, j)
end

-- "Name <addr>" -> the position of the "<" that opens the final <addr>
-- (no "<" or ">" inside it), or nil. s is trimmed.
local function angle_start(s)
  local n = #s
  if s:byte(n) ~= 62 then return nil end          -- ">"
  for k = n - 1, 1, -1 do
    local b = s:byte(k)
    if b == 60 then return k end                  -- "<"
    if b == 62 then return nil end
  end
  return nil
end

-- parse(s) -> {name=, address=} | nil, reason
function M.parse(s)
  local br = s:find("[\r\n]")
  s = trim(s)
  if br then
    -- "Name <addr>" with the break before the "<": it is in the name
    local lt = angle_start(s)
    if lt and not s:find("[\r\n]", lt) then return nil, "display name contains a line break" end
    return nil, "address contains a line break"
  end
  local name, addr
  local lt = angle_start(s)
  if not lt then
    addr = s
  else
    name, addr = trim(s:sub(1, lt - 1)), s:sub(lt + 1, -2)
    local q = name:match('^"(.*)"$')
    if q then name = q:gsub("\\(.)", "%1") end
    if name == "" then name = nil end
  end
  local ok, why = M.check(addr)
  if not ok then return nil, why end
  if name and not encode.valid_utf8(name) then return nil, "display name is not valid UTF-8" end
  if name and name:find("[%z\1-\8\11-\31\127]") then return nil, "display name contains a control character" end
  return { name = name, address = addr }
end

-- Split an address-list header value into mailbox strings: commas inside
-- quotes, comments and angle brackets do not count; comments are dropped;
-- group names ("Team: a@x, b@x;") are dropped with their punctuation.
function M.split_list(s)
  -- jumps from one special character to the next (a 1 MB header is read in
  -- runs, not byte by byte); outside quotes and comments a backslash is an
  -- ordinary character, as before
  local out, cur = {}, {}
  local angle = false
  local function push()
    local m = trim(table.concat(cur))
    if m ~= "" then out[#out + 1] = m end
    cur = {}
  end
  local i, n = 1, #s
  while i <= n do
    local j = s:find('[",;:()<>%[%]]', i)
    if not j then
      cur[#cur + 1] = s:sub(i)
      break
    end
    if j > i then cur[#cur + 1] = s:sub(i, j - 1) end
    local c = s:sub(j, j)
    i = j + 1
    if c == '"' then
      -- a quoted string, kept with its escapes; it ends at the next
      -- unescaped quote or at the end of the text
      local start = j
      while true do
        local k = s:find('["\\]', i)
        if not k then i = n + 1 break end
        if s:byte(k) == 92 then
          i = k + 2
        else
          i = k + 1
          break
        end
      end
      cur[#cur + 1] = s:sub(start, i - 1)
    elseif c == "(" then
      -- a comment (nested, with escapes) is dropped
      local depth = 1
      while depth > 0 do
        local k = s:find("[()\\]", i)
        if not k then i = n + 1 break end
        local b = s:byte(k)
        if b == 92 then i = k + 2
        else
          depth = depth + (b == 40 and 1 or -1)
          i = k + 1
        end
      end
    elseif c == "<" or c == "[" then
      angle = true
      cur[#cur + 1] = c
    elseif c == ">" or c == "]" then
      angle = false
      cur[#cur + 1] = c
    elseif (c == "," or c == ";") and not angle then
      push()
    elseif c == ":" and not angle then
      cur = {}   -- what came before was a group name
    else
      cur[#cur + 1] = c
    end
  end
  push()
  return out
end

-- Header items for one mailbox: the display name (literal, quoted or as
-- encoded-words) and the address, ready for encode.fold.
function M.items(mb, used)
  local items = {}
  local name = mb.name
  if name and name ~= "" then
    local literal
    if not encode.needs_encoding(name) then
      if not name:gsub(" ", ""):find(NOT_ATEXT) and not name:find("^ ") and not name:find(" $")
        and not name:find("  ", 1, true) then
        literal = {}
        for w in name:gmatch("%S+") do literal[#literal + 1] = w end
      else
        literal = { '"' .. name:gsub('[\\"]', "\\%0") .. '"' }
      end
      for i = 1, #literal do
        if #literal[i] > 76 then literal = nil break end
      end
    end
    if literal then
      for i = 1, #literal do items[#items + 1] = { " ", literal[i] } end
    else
      local ws = encode.encoded_words(name, used)
      for i = 1, #ws do items[#items + 1] = { " ", ws[i] } end
    end
    items[#items + 1] = { " ", "<" .. mb.address .. ">" }
  else
    items[1] = { " ", mb.address }
  end
  return items
end

-- A folded "Name: a, b, c" field from a list of mailboxes.
function M.field(hname, list)
  local items = {}
  for i = 1, #list do
    local its = M.items(list[i], i == 1 and #hname + 2 or 0)
    if i < #list then its[#its][2] = its[#its][2] .. "," end
    for j = 1, #its do items[#items + 1] = its[j] end
  end
  return encode.fold(hname, items)
end

M.ATEXT = ATEXT

return M
