-- oauthmail.cli.deliver — what send and sendmail share: a mailer for the
-- profile, progress lines on a terminal while it works (attempts, waits), and
-- the receipt or the error as the caller needs it.
local common = require "oauthmail.cli.common"

local M = {}

-- deliver.mailer(ctx) -> mailer | nil, err
function M.mailer(ctx)
  -- no listener when nothing is shown: the mailer then traces nothing (each
  -- traced line costs its redaction) unless --trace asks for it
  if ctx:progress_on() then
    ctx.listener = function(ev)
      if ev.event == "attempt_failed" then
        ctx:status_done()
        ctx:say("attempt %s failed%s%s: %s", tostring(ev.attempt),
          ev.code and (" with " .. tostring(ev.code)) or "", ev.enhanced and (" " .. ev.enhanced) or "",
          ev.action == "fail" and "giving up" or ("will " .. tostring(ev.action)))
      elseif ev.event == "hold" then
        ctx:say("holding the message for the %s limit: %s s", tostring(ev.limit), tostring(ev.seconds))
      elseif ev.event == "refresh" then
        ctx:status("refreshing the access token...")
      elseif ev.event == "session_open" then
        ctx:status("connected to " .. tostring(ev.host) .. ", sending...")
      end
    end
  end
  local p, err = ctx:load_profile()
  if not p then return nil, err end
  return require("oauthmail").new(p)
end

-- Big messages say how far the upload is (on a terminal): the message object
-- is wrapped so each chunk its reader hands to the session is counted.
M.PROGRESS_MIN = 1024 * 1024

function M.with_progress(ctx, m)
  if not ctx:progress_on() or type(m.size) ~= "function" then return m end
  local total = m:size()
  if not total or total < M.PROGRESS_MIN then return m end
  local w = setmetatable({}, { __index = m })
  function w.size() return total end
  function w.reader()
    local inner = m:reader()
    local done, shown = 0, -1
    return function()
      local chunk, err = inner()
      if chunk then
        done = done + #chunk
        local pct = math.floor(done * 100 / total)
        if pct ~= shown then
          shown = pct
          ctx:status(string.format("uploading: %d%% of %.1f MB", pct, total / 1048576))
        end
      end
      return chunk, err
    end
  end
  return w
end

-- deliver.send(ctx, mailer, msg) -> receipt | nil, err
function M.send(ctx, mailer, msg)
  local receipt, err = mailer:send(M.with_progress(ctx, msg))
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
