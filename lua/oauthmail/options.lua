-- oauthmail.options — the one way option tables are checked: each module
-- declares its fields (a type, or a check of its own) and gets the same
-- words for the same mistakes. A problem is a value first (problem());
-- check() raises it as the argument error a public function gives.
local closest = require("oauthmail.names").closest

local M = {}

-- options.callable(v): a function, or a table whose metatable has __call.
function M.callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end

-- options.finite(v): a number that is neither NaN nor infinite.
function M.finite(v)
  return type(v) == "number" and v == v and v > -math.huge and v < math.huge
end

-- options.seconds_text(s) -> "30 s", "0.25 s": a duration for a message.
function M.seconds_text(s)
  if s == math.floor(s) then return string.format("%d s", s) end
  return string.format("%.3g s", s)
end

-- options.whole(v): a finite number without a fraction.
function M.whole(v)
  return M.finite(v) and v == math.floor(v)
end

-- An access token travels in an AUTH line and an Authorization header: it
-- must be visible ASCII (RFC 6750's b64token and every opaque token in use
-- fit) and of a size a server takes. Entra's are about 2-3 KB.
M.MAX_ACCESS_TOKEN = 16384

-- options.access_token_problem(s) -> nil when s can be sent, else why not
-- (the why never quotes the token). The token endpoint checks what arrives,
-- the token manager what a store hands back.
function M.access_token_problem(s)
  if type(s) ~= "string" or s == "" then return "is missing" end
  if #s > M.MAX_ACCESS_TOKEN then
    return string.format("is %d bytes long (at most %d are accepted)", #s, M.MAX_ACCESS_TOKEN)
  end
  if s:find("[^\33-\126]") then return "contains a byte that is not visible ASCII (a control character or space)" end
  return nil
end

local function type_ok(v, spec)
  for want in spec:gmatch("[^|]+") do
    if want == "callable" then
      if M.callable(v) then return true end
    elseif type(v) == want then
      return true
    end
  end
  return false
end

local function article(spec)
  local words = {}
  for want in spec:gmatch("[^|]+") do
    words[#words + 1] = (want == "callable" and "function") or want
  end
  return "a " .. table.concat(words, " or a ")
end

-- options.problem(opts, schema [, strict]) -> nil | field, text
-- schema: field name -> a type ("string", "number", "boolean", "table",
-- "callable", or several joined by "|"), or a function(v) -> nil | text for
-- a present value. strict: a field the schema does not name is a problem
-- too, with the closest known name suggested.
function M.problem(opts, schema, strict)
  if strict then
    for k in pairs(opts) do
      if type(k) ~= "string" or schema[k] == nil then
        local near = type(k) == "string" and closest(k, schema)
        return tostring(k), "is not an option" .. (near and (" (did you mean '" .. near .. "'?)") or "")
      end
    end
  end
  local names = {}
  for k in pairs(schema) do names[#names + 1] = k end
  table.sort(names)   -- the same first problem every time
  for _, k in ipairs(names) do
    local v, spec = opts[k], schema[k]
    if v ~= nil then
      if type(spec) == "function" then
        local text = spec(v)
        if text then return k, text end
      elseif not type_ok(v, spec) then
        return k, "must be " .. article(spec)
      end
    end
  end
  return nil
end

-- options.check(where, opts, schema [, level [, strict]]): raises
-- "where: 'field' text" for the first problem (level as for error, counted
-- from the caller of check).
function M.check(where, opts, schema, level, strict)
  local field, text = M.problem(opts, schema, strict)
  if field then error(string.format("%s: '%s' %s", where, field, text), (level or 1) + 1) end
end

return M
