-- oauthmail worker — send what an outbox holds with the profile's mailer
-- (its pool, its governor: shared with every other worker when the profile
-- sets limits.shared), until stopped, or until the outbox is empty (--once).
-- Several workers on several machines consume one Redis outbox together.
-- See docs/outbox.md.
local common = require "oauthmail.cli.common"
local queue = require "oauthmail.cli.queue"

local M = {}

M.OPTIONS = { outbox = { arg = true }, once = {}, max_time = { arg = true }, batch = { arg = true } }
M.HELP = [[
usage: oauthmail worker --profile NAME [--outbox DIR|URL] [--once] [--max-time SECONDS] [--batch N]
Sends what the outbox holds until stopped (SIGTERM), until it is empty (--once), or for
--max-time seconds. --outbox: a spool directory or a redis:// / rediss:// URL (default: the
profile's spool under $XDG_STATE_HOME/oauthmail).
]]

local function number(v, name)
  if v == nil then return nil end
  local n = tonumber(v)
  if not n or n <= 0 then return nil, "--" .. name .. " must be a positive number" end
  return n
end

function M.run(ctx, opts)
  local max_time, err = number(opts.max_time, "max-time")
  if err then io.stderr:write("oauthmail worker: ", err, "\n") return common.EX.USAGE end
  local batch
  batch, err = number(opts.batch, "batch")
  if err then io.stderr:write("oauthmail worker: ", err, "\n") return common.EX.USAGE end
  local ob, p = queue.open(ctx, opts, true)
  if not ob then common.report(p) return common.exit_code(p) end
  local st, rerr = queue.deliver(ctx, ob, p, { until_empty = opts.once and true or nil, max_time = max_time,
    batch = batch })
  ob:close()
  if not st then common.report(rerr) return common.exit_code(rerr) end
  ctx:say("sent %d, skipped %d (delivered before), retried %d, %d dead", st.sent, st.skipped, st.retried, st.dead)
  return 0
end

return M
