-- oauthmail.message.encode — the byte-level encodings a message needs:
-- UTF-8 checks, quoted-printable and base64 bodies, RFC 2047 encoded-words,
-- header folding and RFC 2231 parameters. Pure functions over strings.
local crypto = require "oauthmail.crypto"

local M = {}

local MAX_LINE = 78       -- RFC 5322 2.1.1: SHOULD
local HARD_LINE = 998     -- RFC 5322 2.1.1: MUST
local QP_LINE = 76        -- RFC 2045 6.7 (5)
local WORD_MAX = 75       -- RFC 2047 2: an encoded-word is at most 75 chars
local WORD_OVERHEAD = #"=?UTF-8?Q??="

M.MAX_LINE, M.HARD_LINE = MAX_LINE, HARD_LINE

-- ------------------------------------------------------------------ UTF-8

-- Length of the UTF-8 sequence starting at byte i, or nil if it is not a
-- well-formed one (overlongs, surrogates and code points above U+10FFFF too).
local function utf8_len(s, i)
  local c = s:byte(i)
  if c < 0x80 then return 1 end
  local n
  local lo, hi = 0x80, 0xBF
  if c >= 0xC2 and c <= 0xDF then n = 2
  elseif c == 0xE0 then n, lo = 3, 0xA0
  elseif c == 0xED then n, hi = 3, 0x9F
  elseif c >= 0xE1 and c <= 0xEF then n = 3
  elseif c == 0xF0 then n, lo = 4, 0x90
  elseif c >= 0xF1 and c <= 0xF3 then n = 4
  elseif c == 0xF4 then n, hi = 4, 0x8F
  else return nil end
  local b = s:byte(i + 1)
  if not b or b < lo or b > hi then return nil end
  for k = i + 2, i + n - 1 do
    b = s:byte(k)
    if not b or b < 0x80 or b > 0xBF then return nil end
  end
  return n
end

-- encode.has_8bit(s) -> does s hold a byte above 127? One anchored run over
-- the 7-bit bytes: about three times faster than searching for the first
-- 8-bit one, which tries the class again at every position.
local function has_8bit(s)
  return not s:find("^[^\128-\255]*$")
end
M.has_8bit = has_8bit

function M.valid_utf8(s)
  if not has_8bit(s) then return true end
  local i, n = 1, #s
  while i <= n do
    local p = s:find("[\128-\255]", i)
    if not p then return true end
    local len = utf8_len(s, p)
    if not len then return false end
    i = p + len
  end
  return true
end

-- The characters of s (already known to be valid UTF-8) as a list of strings.
local function chars(s)
  local t, i, n = {}, 1, #s
  while i <= n do
    local len = utf8_len(s, i) or 1
    t[#t + 1] = s:sub(i, i + len - 1)
    i = i + len
  end
  return t
end

-- ------------------------------------------------------------ line breaks

-- encode.crlf_longest(s) -> the text with CRLF line breaks, and the length
-- of its longest line when s had CRLF already (nil when it was converted).
-- Most text handed to the mailer is CRLF already: one pass over the LFs
-- (plain finds) checks that and measures the lines, and a count of CRs
-- rules out a lone one; the three substitutions run only otherwise.
function M.crlf_longest(s)
  local pos, longest, lf = 1, 0, 0
  while true do
    local i = s:find("\n", pos, true)
    if not i then
      if #s - pos + 1 > longest then longest = #s - pos + 1 end
      break
    end
    if i == 1 or s:byte(i - 1) ~= 13 then longest = nil break end
    if i - pos - 1 > longest then longest = i - pos - 1 end
    lf = lf + 1
    pos = i + 1
  end
  if longest then
    -- as many CRs as LFs (each LF has one before it): no lone CR. Counted
    -- with plain finds, one per line; a gsub copied the whole text
    local cr, at = 0, 1
    while cr <= lf do
      at = s:find("\r", at, true)
      if not at then break end
      cr, at = cr + 1, at + 1
    end
    if cr == lf then return s, longest end
  end
  return (s:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")), nil
end

-- Every line break form (CRLF, LF, lone CR) becomes CRLF.
function M.crlf(s)
  return (M.crlf_longest(s))
end

-- Longest line of a CRLF text, in octets (without the CRLF).
function M.longest_line(s)
  local max, pos = 0, 1
  while true do
    local e = s:find("\r\n", pos, true)
    local len = (e or #s + 1) - pos
    if len > max then max = len end
    if not e then return max end
    pos = e + 2
  end
end

-- ------------------------------------------------------- quoted-printable

local QP_SAFE = {}
for c = 33, 126 do QP_SAFE[c] = true end
QP_SAFE[61] = nil   -- "="

-- One line: every output line, soft-break "=" included, fits in 76
-- columns; an =XX escape is never split. White space is encoded only at the
-- end of the hard line: before a soft break it is followed by "=".
local function qp_line(line, out)
  local n = #line
  local cur, len = {}, 0
  for i = 1, n do
    local c = line:byte(i)
    local t
    if QP_SAFE[c] or ((c == 32 or c == 9) and i < n) then
      t = string.char(c)
    else
      t = string.format("=%02X", c)
    end
    local room = (i == n) and QP_LINE or QP_LINE - 1
    if len + #t > room then
      cur[#cur + 1] = "="
      out[#out + 1] = table.concat(cur)
      cur, len = {}, 0
    end
    cur[#cur + 1] = t
    len = len + #t
  end
  out[#out + 1] = table.concat(cur)
end

-- Quoted-printable (RFC 2045 6.7) of a CRLF text; line breaks stay hard breaks.
function M.qp(s)
  local out, pos = {}, 1
  while true do
    local e = s:find("\r\n", pos, true)
    qp_line(s:sub(pos, (e or #s + 1) - 1), out)
    if not e then break end
    pos = e + 2
  end
  return table.concat(out, "\r\n")
end

-- ----------------------------------------------------------------- base64

M.B64_CHUNK = 57 * 960   -- raw bytes per streamed chunk: 960 full lines

local LINE76 = string.rep(".", 76)

-- base64 in lines of 76 characters joined by CRLF, no CRLF at the end.
function M.b64_lines(raw)
  local b = crypto.b64encode(raw)
  local s = b:gsub(LINE76, "%0\r\n")
  if s:sub(-2) == "\r\n" then s = s:sub(1, -3) end
  return s
end

-- Octets of M.b64_lines for n raw bytes.
function M.b64_size(n)
  if n == 0 then return 0 end
  local chars_ = 4 * math.ceil(n / 3)
  local lines = math.ceil(chars_ / 76)
  return chars_ + 2 * (lines - 1)
end

-- ------------------------------------------------------- RFC 2047 words

-- Characters that stand for themselves in a "Q" encoded-word: the narrow set
-- of RFC 2047 5 (3), so the same word is valid in a phrase and in text.
local Q_SAFE = {}
for c in ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"):gmatch(".") do
  Q_SAFE[c] = true
end

local function q_char(ch)
  if ch == " " then return "_" end
  if Q_SAFE[ch] then return ch end
  return (ch:gsub(".", function(b) return string.format("=%02X", b:byte()) end))
end

-- Split s into encoded-words; the first is at most `first` chars long, the
-- others at most 75. A character is never split across two words.
local function words(s, first)
  local cs = chars(s)
  local qlen = 0
  for i = 1, #cs do qlen = qlen + #q_char(cs[i]) end
  local b = 4 * math.ceil(#s / 3) < qlen
  local out, cur, limit = {}, {}, first - WORD_OVERHEAD
  local raw = 0
  local function flush()
    if b then
      out[#out + 1] = "=?UTF-8?B?" .. crypto.b64encode(table.concat(cur)) .. "?="
    else
      out[#out + 1] = "=?UTF-8?Q?" .. table.concat(cur) .. "?="
    end
    cur, raw, limit = {}, 0, WORD_MAX - WORD_OVERHEAD
  end
  for i = 1, #cs do
    local piece = b and cs[i] or q_char(cs[i])
    local grow = b and 4 * math.ceil((raw + #piece) / 3) or raw + #piece
    if grow > limit and #cur > 0 then flush() end
    cur[#cur + 1] = piece
    raw = raw + #piece
  end
  if #cur > 0 then flush() end
  return out
end

local function first_budget(used)
  local room = MAX_LINE - used
  if room > WORD_MAX then return WORD_MAX end
  if room < WORD_OVERHEAD + 8 then return WORD_OVERHEAD + 8 end
  return room
end

-- Encoded-words for a display name or text (always encodes).
function M.encoded_words(s, used)
  return words(s, first_budget(used or 0))
end

-- ----------------------------------------------------------------- folding

-- Fold a header whose value is a list of items {sep, text}: the line may be
-- broken before any item's separator (which must be white space, or "" for
-- items that need a space inserted). Returns the full field without CRLF,
-- or nil if some line would still exceed 998 octets.
function M.fold(name, items)
  local lines, cur = {}, name .. ":"
  for i = 1, #items do
    local sep, text = items[i][1], items[i][2]
    if sep == "" then sep = " " end
    if #cur + #sep + #text > MAX_LINE and i > 1 then
      lines[#lines + 1] = cur
      cur = sep .. text
    else
      cur = cur .. sep .. text
    end
  end
  lines[#lines + 1] = cur
  for i = 1, #lines do
    if #lines[i] > HARD_LINE then return nil end
  end
  return table.concat(lines, "\r\n")
end

-- Does an unstructured value need encoded-words? Non-ASCII, controls, and
-- literal text that a reader would take for an encoded-word.
local function needs_encoding(s)
  return s:find("[%z\1-\8\10-\31\127-\255]") ~= nil or s:find("=?", 1, true) ~= nil
end
M.needs_encoding = needs_encoding

-- Items for unstructured text: words with the exact white space before
-- them (trailing white space stays with the last word).
local function text_items(s)
  local items, pos, n = {}, 1, #s
  while pos <= n do
    local ws, we = s:find("^[ \t]*", pos)
    local ts, te = s:find("^[^ \t]+", we + 1)
    if not ts then
      if #items > 0 then
        items[#items][2] = items[#items][2] .. s:sub(ws, we)
      else
        items[1] = { "", s:sub(ws, we) }
      end
      break
    end
    items[#items + 1] = { s:sub(ws, we), s:sub(ts, te) }
    pos = te + 1
  end
  return items
end

-- The value of an unstructured header as a folded field "Name: value"
-- (no CRLF at the end): literal when it can be, encoded-words otherwise.
-- Readers drop the one space after the colon, so a value's own leading
-- white space is written after that space, not in its place.
-- Leading white space beyond the one space after the colon is dropped by
-- common readers (Python's email), so such a value is written as encoded
-- words, which carry it exactly.
function M.unstructured(name, s)
  if not needs_encoding(s) and not s:find("^[ \t]") then
    local items = text_items(s)
    if items[1] then items[1][1] = " " .. items[1][1] end
    local field = M.fold(name, items)
    if field then return field end
  end
  local ws = words(s, first_budget(#name + 2))
  local items = {}
  for i = 1, #ws do items[i] = { " ", ws[i] } end
  return M.fold(name, items)
end

-- message.encode_header(s [, used]): RFC 2047 form of an unstructured value,
-- folded with CRLF SP for a line whose first `used` columns are taken by
-- "Name: " (default 0). ASCII text without "=?" comes back folded only.
function M.encode_header(s, used)
  used = used or 0
  local pad = string.rep("x", used > 2 and used - 2 or 0)
  local field = M.unstructured(pad, s)
  return (field:sub(#pad + 3))
end

-- --------------------------------------------------- RFC 2045/2231 params

local TSPECIAL = "[%z\1-\32\127-\255()<>@,;:\\\"/%[%]?=]"

-- A parameter value: bare token, or quoted string.
function M.param_value(v)
  if v ~= "" and not v:find(TSPECIAL) then return v end
  return '"' .. v:gsub('[\\"]', "\\%0") .. '"'
end

local ATTR_SAFE = "[^%w!#%$&%+%-%.%^_`|~]"

local function pct(s)
  return (s:gsub(ATTR_SAFE, function(c) return string.format("%%%02X", c:byte()) end))
end

-- Parameter items for name=value. A value that is ASCII and short is one
-- item; any other gets the RFC 2231 form name*=UTF-8''... (continued as
-- name*0*=, name*1*= when long) and then an ASCII fallback name="..." with
-- "_" for each non-ASCII character, shortened when long. The extended form
-- comes first: parsers that take the first "name" (Python's) then get it.
-- ASCII values that common parsers misread in the plain form also take
-- the RFC 2231 form: "=?" (read as an RFC 2047 word even inside quotes),
-- "*" and "'" (the RFC 2231 syntax itself: Python cut "a*b.txt" to "a"),
-- "%", and the backslash and quote that need escapes in a quoted string.
local function plain_form_misread(v)
  return v:find("=?", 1, true) ~= nil or v:find("[*'%%\\\"]") ~= nil
end

function M.param_items(pname, v)
  local simple = pname .. "=" .. M.param_value(v) .. ";"
  if not v:find("[\128-\255]") and #simple <= MAX_LINE - 1 and not plain_form_misread(v) then
    return { { " ", simple } }
  end
  local cs = chars(v)
  local fallback = {}
  for i = 1, #cs do fallback[i] = #cs[i] > 1 and "_" or cs[i] end
  -- the fallback must not look like an encoded word either
  fallback = table.concat(fallback):gsub("=%?", "=_"):gsub("[*'%%\\\"]", "_")
  if #fallback > 60 then fallback = fallback:sub(1, 40) .. "~" .. fallback:sub(-19) end
  local items = {}
  local enc = {}
  for i = 1, #cs do enc[i] = pct(cs[i]) end
  local whole = pname .. "*=UTF-8''" .. table.concat(enc) .. ";"
  if #whole <= MAX_LINE - 1 then
    items[#items + 1] = { " ", whole }
    items[#items + 1] = { " ", pname .. "=" .. M.param_value(fallback) .. ";" }
    return items
  end
  local k, cur = 0, {}
  local head = pname .. "*0*=UTF-8''"
  local len = #head
  local function flush()
    items[#items + 1] = { " ", head .. table.concat(cur) .. ";" }
    k = k + 1
    head = pname .. "*" .. k .. "*="
    cur, len = {}, #head
  end
  for i = 1, #enc do
    if len + #enc[i] > MAX_LINE - 2 and #cur > 0 then flush() end
    cur[#cur + 1] = enc[i]
    len = len + #enc[i]
  end
  flush()
  items[#items + 1] = { " ", pname .. "=" .. M.param_value(fallback) .. ";" }
  return items
end

-- A folded "Name: value; p1=v1; p2=v2" field from ordered params {{name, value}}.
function M.param_field(name, value, params)
  local items = { { " ", value .. (#params > 0 and ";" or "") } }
  for i = 1, #params do
    local pi = M.param_items(params[i][1], params[i][2])
    for j = 1, #pi do items[#items + 1] = pi[j] end
  end
  local last = items[#items]
  if #params > 0 then last[2] = last[2]:gsub(";$", "") end
  return M.fold(name, items)
end

return M
