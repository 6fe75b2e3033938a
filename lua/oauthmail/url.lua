-- oauthmail.url — how the library writes and reads URL and form text, and
-- which hosts count as this machine: one copy of each rule for the HTTP
-- client, the OAuth endpoints, the SMTP session and redaction.
local M = {}

local function hex(c) return string.format("%%%02X", c:byte()) end

-- url.percent(s): everything but RFC 3986 unreserved characters percent-encoded.
function M.percent(s)
  return (tostring(s):gsub("[^%w%-%._~]", hex))
end

-- url.form_component(s): application/x-www-form-urlencoded (RFC 6749
-- appendix B, the HTML form serializer): ALPHA / DIGIT / "*-._" as is, space
-- as "+", the rest percent-encoded.
function M.form_component(s)
  return (tostring(s):gsub("[^%w%*%-%._ ]", hex):gsub(" ", "+"))
end

-- url.decode(s): "+" is a space, %XX a byte.
function M.decode(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- url.form(list): an ordered list of {name, value} pairs (nil values
-- skipped) as a form body; the same list always gives the same bytes.
function M.form(list)
  local out = {}
  for _, p in ipairs(list) do
    if p[2] ~= nil then out[#out + 1] = M.form_component(p[1]) .. "=" .. M.form_component(p[2]) end
  end
  return table.concat(out, "&")
end

-- url.parse_query("a=1&b=x+y") -> {a="1", b="x y"}: the first value of a
-- repeated name wins; "&" and ";" separate.
function M.parse_query(q)
  local t = {}
  for part in tostring(q):gmatch("[^&;]+") do
    local k, v = part:match("^([^=]*)=?(.*)$")
    if k and k ~= "" then
      k = M.decode(k)
      if t[k] == nil then t[k] = M.decode(v) end
    end
  end
  return t
end

-- url.is_loopback(host): this machine by name or literal — "localhost",
-- 127.0.0.0/8, ::1 (bare or bracketed). Nothing that needs DNS to decide.
function M.is_loopback(host)
  host = tostring(host):lower()
  if host == "localhost" or host == "::1" or host == "[::1]" then return true end
  local a, b, c, d = host:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    return a == 127 and b <= 255 and c <= 255 and d <= 255
  end
  return false
end

return M
