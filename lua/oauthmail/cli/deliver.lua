-- oauthmail.cli.deliver — what send and sendmail share: a mailer for the
-- profile, progress lines on a terminal while it works (attempts, waits), and
-- the receipt or the error as the caller needs it.
local common = require "oauthmail.cli.common"

local M = {}

-- deliver.mailer(ctx) -> mailer | nil, err
function M.mailer(ctx)
  ctx.listener = function(ev)
    if ev.event == "attempt_failed" and ctx:progress_on() then
      ctx:status_done()
      ctx:say("attempt %s failed%s%s: %s", tostring(ev.attempt),
        ev.code and (" with " .. tostring(ev.code)) or "", ev.enhanced and (" " .. ev.enhanced) or "",
        ev.action == "fail" and "giving up" or ("will " .. tostring(ev.action)))
    elseif ev.event == "hold" and ctx:progress_on() then
      ctx:say("holding the message for the %s limit: %s s", tostring(ev.limit), tostring(ev.seconds))
    elseif ev.event == "refresh" and ctx:progress_on() then
      ctx:status("refreshing the access token...")
    elseif ev.event == "session_open" and ctx:progress_on() then
      ctx:status("connected to " .. tostring(ev.host) .. ", sending...")
    end
  end
  local p, err = ctx:load_profile()
  if not p then return nil, err end
  return require("oauthmail").new(p)
end

-- deliver.send(ctx, mailer, msg) -> receipt | nil, err
function M.send(ctx, mailer, msg)
  local receipt, err = mailer:send(msg)
  ctx:status_done()
  mailer:close()
  if receipt then
    ctx:event { type = "cli", event = "delivered", message_id = receipt.message_id, attempts = receipt.attempts }
  else
    ctx:event { type = "cli", event = "failed", error_kind = err.kind, code = err.code, enhanced = err.enhanced,
      retryable = err.retryable, exit = common.exit_code(err) }
  end
  return receipt, err
end

return M
