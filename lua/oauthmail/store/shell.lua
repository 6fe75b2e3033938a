-- oauthmail.store.shell — runs the external commands that key sources and the
-- command store rely on, with bounded output and an exit status on every Lua
-- version (5.1's pipe close does not report one, so the shell prints it).
-- Nothing a command prints is ever put into an error message: it may be a secret.
local M = {}

local MAX_OUTPUT = 1024 * 1024

function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function env_prefix(env)
  local parts = {}
  for k, v in pairs(env or {}) do
    assert(tostring(k):match("^[%a_][%w_]*$"), "bad environment variable name")
    parts[#parts + 1] = k .. "=" .. M.quote(v) .. "; export " .. k .. "; "
  end
  table.sort(parts)
  return table.concat(parts)
end

-- capture(cmd, env) -> output, exit code | nil, "reason"
function M.capture(cmd, env)
  local f = io.popen(env_prefix(env) .. "(" .. cmd .. ") </dev/null; printf '\\n__oauthmail_rc=%d\\n' $?")
  if not f then return nil, "cannot start the command" end
  local chunks, total = {}, 0
  while true do
    local chunk = f:read(8192)
    if not chunk then break end
    total = total + #chunk
    if total > MAX_OUTPUT then
      f:close()
      return nil, "the command printed more than " .. MAX_OUTPUT .. " bytes"
    end
    chunks[#chunks + 1] = chunk
  end
  f:close()
  local out = table.concat(chunks)
  local body, rc = out:match("^(.-)\n__oauthmail_rc=(%d+)\n?$")
  if not body then return nil, "the command's exit status is unknown" end
  return body, tonumber(rc)
end

-- feed(cmd, input, env) -> exit code | nil, "reason": input goes to the command's stdin.
function M.feed(cmd, input, env)
  local status = os.tmpname()
  local f = io.popen(env_prefix(env) .. "(" .. cmd .. ") >/dev/null; echo $? > " .. M.quote(status), "w")
  if not f then os.remove(status) return nil, "cannot start the command" end
  f:write(input)
  f:close()
  local sf = io.open(status, "rb")
  local rc = sf and tonumber(sf:read("*a"):match("%d+"))
  if sf then sf:close() end
  os.remove(status)
  if not rc then return nil, "the command's exit status is unknown" end
  return rc
end

return M
