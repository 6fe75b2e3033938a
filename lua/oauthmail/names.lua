-- oauthmail.names — "did you mean …?" for misspelt keys. Profiles and stores
-- both refuse unknown keys, because a typo silently ignored can mean a token
-- written in clear text or a limit not applied; this picks the hint.
local M = {}

-- Levenshtein distance between two strings (short keys only).
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end
M.distance = distance

-- names.closest(key, set) -> the key of `set` nearest to `key` (case folded),
-- or nil when none is close enough to be a plausible typo.
function M.closest(key, set)
  local best, bestd
  for k in pairs(set) do
    if type(k) == "string" then
      local d = distance(key:lower(), k:lower())
      if not bestd or d < bestd or (d == bestd and k < best) then best, bestd = k, d end
    end
  end
  if best and bestd <= math.max(2, math.floor(#key / 3)) then return best end
  return nil
end

return M
