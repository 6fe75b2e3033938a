-- fuzz/jwt.lua — the driver of the jwt target. crypto.jwt_decode must never
-- raise on a string, must return two JSON objects (string keys, finite
-- numbers) or nil and an oauth/decode error, and its error text must not
-- echo the token: it is printable ASCII without '~', so any input byte
-- outside that set that shows up there came from the token.
local crypto = require "oauthmail.crypto"

local function check_value(v, depth)
  local t = type(v)
  if t == "number" then
    assert(v == v and v ~= math.huge and v ~= -math.huge, "a claim is NaN or infinite")
  elseif t == "table" then
    assert(depth < 2000, "nesting deeper than cjson allows")
    for k, x in pairs(v) do
      check_value(k, depth + 1)
      check_value(x, depth + 1)
    end
  else
    assert(t == "string" or t == "boolean" or t == "userdata", "unexpected " .. t .. " in claims")
  end
end

local function check_object(o, what)
  assert(type(o) == "table", what .. " is not a table")
  for k in pairs(o) do assert(type(k) == "string", what .. " has a non-string key: not a JSON object") end
  check_value(o, 0)
end

return function(token)
  local header, claims = crypto.jwt_decode(token)
  if header then
    check_object(header, "header")
    check_object(claims, "claims")
    return
  end
  local err = claims
  assert(type(err) == "table", "no error value")
  assert(err.kind == "oauth" and err.reason == "decode", "wrong error kind/reason: " .. tostring(err.kind))
  local msg = err.message
  assert(type(msg) == "string" and #msg > 0, "error without a message")
  assert(not msg:find("[^\32-\125]"), "error message carries bytes the token brought: " .. msg)
end
