-- oauthmail.redact — take secrets out of protocol text before anyone sees
-- it: HTTP headers, form-encoded and JSON bodies, URLs. Used by the HTTP
-- trace, and reusable by any other trace (SMTP, errors, logs).
-- Redaction keeps the shape (field names, auth scheme) so a trace still
-- explains what happened; only values are replaced by MASK.
local url = require "oauthmail.url"

local M = {}

M.MASK = "<redacted>"

-- Field names (form keys, JSON keys, URL query/fragment keys) whose values
-- are secrets. Lower-case; callers may add their own.
M.FIELDS = {
  client_secret = true, client_assertion = true, code = true, code_verifier = true,
  refresh_token = true, access_token = true, id_token = true, password = true,
  device_code = true, assertion = true, token = true, subject_token = true,
  actor_token = true, id_token_hint = true, logout_token = true, passphrase = true,
  authorization = true, client_key = true, private_key = true,
  ["proxy-authorization"] = true, cookie = true, ["set-cookie"] = true,
}

-- Headers whose whole value is a credential.
local SECRET_HEADERS = {
  cookie = true, ["set-cookie"] = true, ["x-api-key"] = true, ["api-key"] = true,
  ["ocp-apim-subscription-key"] = true,
}
-- Headers that carry "scheme credentials": keep the scheme.
local AUTH_HEADERS = { authorization = true, ["proxy-authorization"] = true }
-- Headers that carry URLs (a redirect may carry ?code= or #access_token=).
local URL_HEADERS = { location = true, ["content-location"] = true, refresh = true }

local unescape = url.decode

local function is_secret_name(name)
  return M.FIELDS[name:lower()] == true
end

-- redact.header(name, value) -> value with credentials replaced
function M.header(name, value)
  local n = tostring(name):lower()
  if AUTH_HEADERS[n] then
    local scheme = value:match("^%s*([%w!#$%%&'*+.^_`|~-]+)%s+%S")
    return scheme and (scheme .. " " .. M.MASK) or M.MASK
  end
  if SECRET_HEADERS[n] then return M.MASK end
  if URL_HEADERS[n] then return M.url(value) end
  return value
end

-- redact.header_line("Name: value") -> the same line, redacted
function M.header_line(line)
  local name, sep, value = line:match("^([^:%s]+)(:%s*)(.*)$")
  if not name then return line end
  return name .. sep .. M.header(name, value)
end

local KEY_DELIM = "[&;?#=%s\"']"

-- redact.form("a=1&client_secret=x") -> "a=1&client_secret=<redacted>"
-- Linear in the length of s (traces can hold 64 KiB per event): each "=" is
-- looked at once, and the key before it is found by scanning back no further
-- than the previous match.
function M.form(s)
  if type(s) ~= "string" then return s end
  local out, pos = {}, 1
  while true do
    local eq = s:find("=", pos, true)
    if not eq then break end
    local ks = eq
    while ks > pos and not s:sub(ks - 1, ks - 1):find(KEY_DELIM) do ks = ks - 1 end
    -- Only a secret's value is searched for its end, so "a=a=a=..." stays linear.
    local vend = ks < eq and is_secret_name(unescape(s:sub(ks, eq - 1))) and (s:find('[&;%s"]', eq + 1) or #s + 1)
    if vend and vend > eq + 1 then
      out[#out + 1] = s:sub(pos, eq) .. M.MASK
      pos = vend
    else
      out[#out + 1] = s:sub(pos, eq)
      pos = eq + 1
    end
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

-- redact.url(u): secrets in the query and the fragment (implicit-flow
-- replies put tokens there), and a password in the user-info part. Works on
-- partial URLs ("/cb?code=..") too.
function M.url(u)
  if type(u) ~= "string" then return u end
  u = u:gsub("^(%a[%w+.-]*://[^/@:]*:)[^/@]*@", "%1" .. M.MASK .. "@")
  local base, query, frag = u:match("^([^?#]*)(%??[^#]*)(#?.*)$")
  return base .. M.form(query) .. M.form(frag)
end

-- Index of the quote that closes the JSON string opened at `q`, or nil.
local function string_end(s, q)
  local i = q + 1
  while true do
    local j = s:find('["\\]', i)
    if not j then return nil end
    if s:sub(j, j) == '"' then return j end
    i = j + 2
  end
end

local function json_unescape(k)
  if not k:find("\\", 1, true) then return k end
  return (k:gsub("\\u00(%x%x)", function(x) return string.char(tonumber(x, 16)) end):gsub("\\(.)", "%1"))
end

-- redact.json(s): values of secret keys, at any depth. A scanner rather than
-- a parser, so truncated or malformed JSON (a trace cut at its bound, a
-- broken provider reply) is still redacted; an unterminated secret value is
-- masked to the end of the text.
function M.json(s)
  if type(s) ~= "string" then return s end
  local out, pos = {}, 1
  while true do
    local q = s:find('"', pos, true)
    if not q then break end
    local e = string_end(s, q)
    if not e then break end
    local after = s:match("^%s*:%s*()", e + 1)
    if after and s:sub(after, after) == '"' and is_secret_name(json_unescape(s:sub(q + 1, e - 1))) then
      local ve = string_end(s, after)
      out[#out + 1] = s:sub(pos, after) .. M.MASK .. '"'
      if not ve then pos = #s + 1 break end
      pos = ve + 1
    else
      out[#out + 1] = s:sub(pos, e)
      pos = e + 1
    end
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

-- redact.body(s): JSON and form redaction both, whatever the declared
-- content type: a mislabelled token response, or a JSON reply that quotes a
-- form, must not leak.
function M.body(s)
  if type(s) ~= "string" then return s end
  return M.form(M.json(s))
end

-- Header names that may be quoted in free text ("authorization:" also finds
-- "proxy-authorization:", "cookie:" also "set-cookie:"), lower-case.
local TEXT_HEADERS = { "authorization:", "cookie:" }

-- "Authorization: Bearer x" / "cookie: sid=x" anywhere in a text (libcurl's
-- HTTP/2 lines, a log line quoting a request): the value up to the end of
-- the line or a closing quote/bracket goes through M.header. Linear: each
-- name's next occurrence is searched once per step forward.
local function mask_header_mentions(s)
  local low, out, pos, nextpos = s:lower(), {}, 1, {}
  while true do
    local best, bname
    for _, name in ipairs(TEXT_HEADERS) do
      local at = nextpos[name]
      if at == nil or (at and at < pos) then
        at = low:find(name, pos, true) or false
        nextpos[name] = at
      end
      if at and (not best or at < best) then best, bname = at, name end
    end
    if not best then break end
    local vs = s:match("^[ \t]*()", best + #bname)
    local ve = (s:find("[\r\n\"'%]]", vs) or #s + 1) - 1
    local value = s:sub(vs, ve)
    out[#out + 1] = s:sub(pos, vs - 1)
    if value:find("%S") then
      out[#out + 1] = M.header(bname:sub(1, -2), value)
    else
      out[#out + 1] = value
    end
    pos = ve + 1
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

local function anycase(word)
  return (word:gsub("%a", function(c) return "[" .. c:upper() .. c:lower() .. "]" end))
end
-- RFC 6750 b64token / RFC 7617 token68 after the scheme name.
local SCHEME_PATTERNS = {}
for i, scheme in ipairs { "bearer", "basic" } do
  SCHEME_PATTERNS[i] = "(" .. anycase(scheme) .. "%s+)([%w%-%._~%+/]+)(=*)()"
end

-- "Bearer <token>" / "Basic <credentials>" anywhere. Left alone: an
-- auth-param ('Bearer realm="x"', 'Bearer error=invalid_token') and a plain
-- lower-case word ("Basic authentication", "Bearer token"), which no issued
-- token or base64 credential looks like in practice.
local function mask_scheme_credentials(s)
  for _, pat in ipairs(SCHEME_PATTERNS) do
    local src = s
    s = src:gsub(pat, function(pre, tok, eqs, after)
      local nextc = src:sub(after, after)
      if #eqs == 1 and nextc ~= "" and not nextc:find("[%s,;]") then return nil end
      if eqs == "" and tok:find("^%l+$") then return nil end
      return pre .. M.MASK
    end)
  end
  return s
end

-- ------------------------------------------------------------ by value

local function replace_plain(s, needle, rep)
  local out, pos = {}, 1
  while true do
    local i, j = s:find(needle, pos, true)
    if not i then break end
    out[#out + 1] = s:sub(pos, i - 1)
    out[#out + 1] = rep
    pos = j + 1
  end
  if pos == 1 then return s end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

-- Values shorter than this would mangle ordinary words and are no secret.
M.MIN_SECRET = 4

-- redact.forms(v) -> the ways a secret value is written on the wire and in
-- replies: as is, form-encoded (+ for space, and %20), fully percent-encoded,
-- base64 and base64url (without padding).
function M.forms(v)
  local b64 = require("oauthmail.crypto").b64encode(v)
  local out, seen = {}, {}
  for _, f in ipairs {
    v, url.form_component(v), url.percent(v),
    b64, (b64:gsub("=+$", "")), (b64:gsub("+", "-"):gsub("/", "_"):gsub("=+$", "")),
  } do
    if not seen[f] and #f >= M.MIN_SECRET then seen[f], out[#out + 1] = true, f end
  end
  -- longest first, so a form that contains another is masked whole
  table.sort(out, function(a, b) return #a > #b end)
  return out
end

-- The forms of every value of one secrets list, in order, worked out once
-- per list (a session masks each of its trace lines with the same list); a
-- list whose values changed since is worked out again. Weak keys: a cache
-- entry goes with its list and never outlives the session holding it.
local forms_cache = setmetatable({}, { __mode = "k" })

local function forms_of(secrets)
  local c = forms_cache[secrets]
  if c then
    local n = 0
    for i, v in ipairs(secrets) do
      if c.values[i] ~= v then c = nil break end
      n = i
    end
    if c and n == #c.values then return c.forms end
  end
  local values, forms = {}, {}
  for i, v in ipairs(secrets) do
    values[i] = v
    if type(v) == "string" and #v >= M.MIN_SECRET then
      for _, f in ipairs(M.forms(v)) do forms[#forms + 1] = f end
    end
  end
  forms_cache[secrets] = { values = values, forms = forms }
  return forms
end

-- redact.values(s, secrets): every value in the list `secrets` masked
-- wherever it appears in s, in any of redact.forms' encodings.
function M.values(s, secrets)
  if type(s) ~= "string" or type(secrets) ~= "table" then return s end
  for _, f in ipairs(forms_of(secrets)) do s = replace_plain(s, f, M.MASK) end
  return s
end

-- redact.escape(s): control bytes written as \r, \n, \xNN (tab kept), so
-- text a server sent can never start a line of its own in a trace.
local ESCAPES = { ["\r"] = "\\r", ["\n"] = "\\n" }
function M.escape(s)
  if type(s) ~= "string" or not s:find("[%z\1-\8\10-\31\127]") then return s end
  return (s:gsub("[%z\1-\8\10-\31\127]", function(c)
    return ESCAPES[c] or string.format("\\x%02X", c:byte())
  end))
end

-- redact.trace_text(s, secrets): what goes into a trace line of unknown
-- content: the listed secrets by value, then the key and header rules of
-- redact.text, then control bytes escaped.
function M.trace_text(s, secrets)
  if type(s) ~= "string" then return s end
  return M.escape(M.text(M.values(s, secrets)))
end

-- redact.text(s): free text of unknown origin (log lines, error bodies,
-- libcurl's informational lines): form and JSON secrets, credential headers
-- quoted in the text, and scheme credentials ("Bearer ...", "Basic ...").
function M.text(s)
  if type(s) ~= "string" then return s end
  return mask_scheme_credentials(mask_header_mentions(M.body(s)))
end

return M
