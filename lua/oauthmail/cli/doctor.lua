-- oauthmail doctor — the profile checked step by step (oauthmail.doctor),
-- one line per step with its verdict; the first failure named with its cause
-- and fix. --json for monitoring. Exit 0 only when no step failed.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { json = {}, timeout = { arg = true } }
M.HELP = [[
usage: oauthmail doctor --profile NAME [--json] [--timeout SECONDS] [--trace FILE] [--quiet]
Checks: profile, DNS, TCP, TLS (version, certificate days left), EHLO (AUTH mechanisms, SIZE,
PIPELINING, CHUNKING, SMTPUTF8), token (store, refresh or flow), its claims against what the
server needs, AUTH with it (then RSET and QUIT: no mail is sent), credential life.
Exit 0 when no step failed (warnings allowed), 1 otherwise.
]]

local MARK = { pass = "ok  ", warn = "WARN", fail = "FAIL", skip = "--  " }

function M.run(ctx, opts)
  local p, err = ctx:load_profile()
  if not p then
    if opts.json then
      io.stdout:write(require("cjson").encode { ok = false, steps = { { step = "profile", verdict = "fail",
        detail = err.message, fix = err.hint } } }, "\n")
    else
      common.report(err)
    end
    return 1
  end
  local timeout = opts.timeout and tonumber(opts.timeout)
  if opts.timeout and not (timeout and timeout > 0) then
    io.stderr:write("oauthmail doctor: --timeout wants a number of seconds > 0\n")
    return common.EX.USAGE
  end
  local report = require("oauthmail.doctor").run(p, {
    timeout = timeout,
    trace = ctx.tracer and function(ev) ctx:event(ev) end,
    on_step = function(s)
      ctx:event { type = "doctor", event = "step", step = s.step, verdict = s.verdict, detail = s.detail,
        cause = s.cause, fix = s.fix, code = s.code, enhanced = s.enhanced }
      if not opts.json then
        io.stdout:write(string.format("%s %-11s %s\n", MARK[s.verdict] or s.verdict, s.step, tostring(s.detail or "")))
        if s.verdict ~= "pass" and s.verdict ~= "skip" then
          if s.cause then io.stdout:write("            cause: ", s.cause, "\n") end
          if s.fix then io.stdout:write("            fix:   ", s.fix, "\n") end
        end
        io.stdout:flush()
      end
    end,
  })
  if opts.json then
    local cjson = require "cjson"
    local doc = { ok = report.ok, profile = ctx.profile_name, steps = report.steps,
      first_failure = report.first_failure and report.first_failure.step or nil }
    io.stdout:write((cjson.encode(doc):gsub("\\/", "/")), "\n")
  elseif report.ok then
    io.stdout:write("all checks passed\n")
  else
    local f = report.first_failure
    io.stdout:write(string.format("first failure: %s — %s\n", f.step, tostring(f.detail)))
  end
  return report.ok and 0 or 1
end

return M
