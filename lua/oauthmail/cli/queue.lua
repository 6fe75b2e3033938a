-- oauthmail queue — the outbox from the command line: list what waits (and
-- the dead letters), run it once, flush it (dead letters back in, then run),
-- drop an entry. The outbox is --outbox (a directory: the local spool, or a
-- redis:// URL), by default the profile's spool under the state directory.
-- See docs/outbox.md.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { outbox = { arg = true }, json = {} }
M.HELP = [[
usage: oauthmail queue list|run|flush|drop [ID...] [--profile NAME] [--outbox DIR|URL] [--json]
  list   the queued messages and the dead letters
  run    send each queued message once (failures stay queued for the next run)
  flush  put the dead letters back in the queue, then run
  drop   remove the messages with these ids
--outbox: a spool directory or a redis:// / rediss:// URL; by default
$XDG_STATE_HOME/oauthmail/PROFILE.outbox (a spool).
]]

-- The outbox of --outbox, or the profile's default spool.
function M.open(ctx, opts, need_profile)
  local spec = opts.outbox
  local p, err
  if need_profile or not spec then
    p, err = ctx:load_profile()
    if not p then return nil, err end
  end
  if not spec then spec = common.state_dir() .. "/" .. tostring(ctx.profile_name):gsub("[^%w._@%-]", "_") .. ".outbox" end
  local ok, ob = pcall(require("oauthmail.outbox").open, spec)
  if not ok then return nil, require("oauthmail.errors").new("config", tostring(ob)) end
  return ob, p
end

local function subject_of(m)
  if type(m.subject) == "string" then return m.subject end
  if type(m.raw) == "string" then return m.raw:match("\n[Ss]ubject:%s*([^\r\n]*)") or m.raw:match("^[Ss]ubject:%s*([^\r\n]*)") end
  return ""
end

local function to_of(m)
  local to = m.to
  if type(to) == "table" then return table.concat(to, ",") end
  return tostring(to or "")
end

-- Send with the profile's mailer: each entry once (run), or until empty.
function M.deliver(ctx, ob, p, wopts)
  local mailer, err = require("oauthmail").new(p)
  if not mailer then return nil, err end
  local w = require("oauthmail.outbox").worker { outbox = ob, mailer = mailer, batch = wopts.batch,
    trace = function(ev) ctx:event { type = "outbox", event = ev.event, id = ev.id, attempts = ev.attempts } end }
  local st, rerr = w:run(wopts)
  mailer:close()
  return st, rerr
end

function M.run(ctx, opts, pos)
  local verb = pos[1]
  if verb ~= "list" and verb ~= "run" and verb ~= "flush" and verb ~= "drop" then
    io.stderr:write("oauthmail queue: say list, run, flush or drop\n", M.HELP)
    return common.EX.USAGE
  end
  local ob, p = M.open(ctx, opts, verb == "run" or verb == "flush")
  if not ob then common.report(p) return common.exit_code(p) end
  if verb == "list" then
    local list, err = ob:list()
    if not list then common.report(err) return common.exit_code(err) end
    local cjson = require "cjson"
    for _, e in ipairs(list) do
      if opts.json then
        io.stdout:write(cjson.encode { id = e.id, dead = e.dead, attempts = e.attempts, to = to_of(e.message or {}),
          subject = subject_of(e.message or {}), last_error = e.last_error }, "\n")
      else
        io.stdout:write(string.format("%s  %s  %d attempt(s)  to %s  %s%s\n", e.id, e.dead and "dead  " or "queued",
          e.attempts or 0, to_of(e.message or {}), subject_of(e.message or {}),
          e.last_error and ("  (" .. e.last_error .. ")") or ""))
      end
    end
    ctx:say("%d message(s)", #list)
    return 0
  elseif verb == "drop" then
    if #pos < 2 then io.stderr:write("oauthmail queue drop: which ids?\n") return common.EX.USAGE end
    for i = 2, #pos do
      local ok, err = ob:drop(pos[i])
      if not ok then common.report(err) return common.exit_code(err) end
    end
    ctx:say("dropped %d message(s)", #pos - 1)
    return 0
  end
  if verb == "flush" and ob.revive then
    local n, err = ob:revive()
    if not n then common.report(err) return common.exit_code(err) end
    if n > 0 then ctx:say("%d dead letter(s) back in the queue", n) end
  end
  local st, err = M.deliver(ctx, ob, p, { until_empty = true })
  ob:close()
  if not st then common.report(err) return common.exit_code(err) end
  ctx:say("sent %d, skipped %d (delivered before), kept %d for later, %d dead", st.sent, st.skipped, st.retried, st.dead)
  if st.retried > 0 then return common.EX.TEMPFAIL end
  return 0
end

return M
