-- fuzz/resp.lua — the driver of the resp target: the input is what a hostile
-- Redis server sends. Byte 1 chooses the limits (small ones reach the limit
-- paths); the rest is fed in pieces split at each 0xFF byte. Findings
-- (raised): a raise from feed/next, a value of a type the engine never
-- makes, a value nested deeper than max_depth, an aggregate over
-- max_elements, a string over max_bulk, parsing going on after an error, or
-- the same bytes giving other values when fed whole.
local core = require "oauthmail.core"
local resp = core.resp

local function check(v, depth, lim)
  assert(depth <= lim.max_depth + 1, "a value nested deeper than max_depth")
  local t = type(v)
  if t == "string" then
    assert(#v <= math.max(lim.max_bulk, lim.max_line), "a string over the limits")
  elseif t == "table" then
    local n = 0
    for k, x in pairs(v) do
      n = n + 1
      if not resp.is_error(v) then check(k, depth + 1, lim) end
      check(x, depth + 1, lim)
    end
    assert(n <= 2 * lim.max_elements + 1, "an aggregate over max_elements")
  elseif t == "userdata" then
    assert(v == resp.null, "a userdata that is not resp.null")
  else
    assert(t == "number" or t == "boolean", "unexpected " .. t)
  end
end

local function run(lim, pieces)
  local e = resp.engine(lim)
  local out, broken = {}, false
  for _, p in ipairs(pieces) do
    local ok = e:feed(p)
    if not ok then broken = true break end
    while true do
      local r, v, kind = e:next()
      if r == nil then broken = true break end
      if not r then break end
      check(v, 0, lim)
      assert(kind == nil or kind == "error" or kind == "push", "odd kind")
      out[#out + 1] = v
    end
    if broken then
      assert(e:next() == nil, "the engine parsed on after an error")
      break
    end
  end
  e:close()
  return out, broken
end

-- a structural fingerprint, so split and whole feeds can be compared
local function shape(v)
  local t = type(v)
  if t ~= "table" then return t .. ":" .. tostring(v == resp.null and "null" or (t == "number" and (v ~= v and "nan" or v)) or v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = shape(k) .. "=" .. shape(v[k]) end
  table.sort(keys)
  return "{" .. table.concat(keys, ",") .. "}"
end

return function(data)
  if #data < 1 then return end
  local f = data:byte(1)
  local small = f % 2 == 1
  local lim = {
    max_depth = small and 3 or 16, max_bulk = small and 64 or 16777216,
    max_elements = small and 8 or 1000000, max_line = small and 32 or 65536, max_buffer = small and 512 or 67108864,
  }
  local body = data:sub(2)
  local pieces = {}
  for p in (body .. "\255"):gmatch("([^\255]*)\255") do pieces[#pieces + 1] = p end
  local split, broken1 = run(lim, pieces)
  local whole, broken2 = run(lim, { (body:gsub("\255", "")) })
  if not broken1 and not broken2 then
    assert(#split == #whole, "split and whole feeds gave a different number of values")
    for i = 1, #split do assert(shape(split[i]) == shape(whole[i]), "split and whole feeds differ") end
  end
end
