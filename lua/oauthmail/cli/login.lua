-- oauthmail login — run the profile's flow now, interactive ones included,
-- and store the tokens. Device code: the code and the address, then a live
-- countdown until the code expires and what the polling is doing. Browser:
-- a loopback redirect listener and the browser opened on the sign-in page
-- (--no-browser prints the address instead; --manual reads the address the
-- browser ends on from stdin, for machines without a browser at all).
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { no_browser = {}, manual = {}, browser = { arg = true }, timeout = { arg = true } }
M.HELP = [[
usage: oauthmail login --profile NAME [--no-browser | --manual | --browser CMD] [--timeout SECONDS]
                       [--trace FILE] [--quiet]
Signs in with the profile's flow (device code, browser with loopback redirect, or a
non-interactive one) and stores the tokens in the profile's store.
  --no-browser   print the sign-in address instead of opening a browser
  --manual       no loopback listener: paste the address the browser ends on (stdin)
  --browser CMD  the command that opens the address (default: $BROWSER, else xdg-open)
  --timeout S    how long to wait for the browser's redirect (default 300)
]]

local function clock_text(s)
  s = math.max(0, math.floor(s))
  return string.format("%d:%02d", math.floor(s / 60), s % 60)
end

local function have_command(name)
  local r = os.execute("command -v " .. name .. " >/dev/null 2>&1")
  return r == true or r == 0
end

function M.run(ctx, opts)
  local sys = require "oauthmail.sys"
  local polls, deadline, interval = 0, nil, nil
  ctx.listener = function(ev)
    if ev.event == "slow_down" then
      interval = ev.interval
      ctx:status_done()
      if ctx:progress_on() then ctx:say("the server asked to poll more slowly: every %s s", tostring(ev.interval)) end
    elseif ev.event == "device_code" then
      interval = ev.interval
    end
  end
  local p, err = ctx:load_profile()
  if not p then common.report(err) return common.exit_code(err) end
  p.oauth = p.oauth or {}
  local o = p.oauth
  -- the device code: always shown (the person needs it), even with --quiet
  o.on_device_code = o.on_device_code or function(info)
    deadline = sys.monotime() + info.expires_in
    local lines = {}
    if info.verification_uri_complete then
      lines[#lines + 1] = "To sign in, open " .. info.verification_uri_complete
      lines[#lines + 1] = "(or open " .. info.verification_uri .. " and enter the code " .. info.user_code .. ")"
    else
      lines[#lines + 1] = "To sign in, open " .. info.verification_uri .. " and enter the code " .. info.user_code
    end
    lines[#lines + 1] = "The code expires in " .. clock_text(info.expires_in) .. "."
    io.stderr:write(table.concat(lines, "\n"), "\n")
    io.stderr:flush()
    ctx:event { type = "cli", event = "device_code_shown", expires_in = info.expires_in }
  end
  -- the wait between polls: a countdown on a terminal
  o.sleep = o.sleep or function(seconds)
    local stop = sys.monotime() + seconds
    polls = polls + 1
    while true do
      local now = sys.monotime()
      if now >= stop then break end
      if deadline then
        ctx:status(string.format("waiting for approval: %s left (checked %d time%s, every %s s)",
          clock_text(deadline - now), polls - 1, polls == 2 and "" or "s", tostring(interval or seconds)))
      end
      require("oauthmail.wait").sleep(math.min(1, stop - now))   -- the one waiter
    end
  end
  if opts.manual then
    o.manual = true
    o.read_line = o.read_line or function()
      io.stderr:write("address: ")
      io.stderr:flush()
      return io.stdin:read("*l")
    end
  elseif opts.no_browser then
    o.open_url, o.browser_command = nil, nil
    o.on_prompt = function(text) io.stderr:write(text) io.stderr:flush() end
  else
    local cmd = opts.browser or common.getenv("BROWSER")
    if not cmd and have_command("xdg-open") then cmd = "xdg-open" end
    if cmd and not o.open_url then
      o.browser_command = cmd
      o.on_prompt = function(_, url)
        io.stderr:write("Opening the sign-in page in the browser (waiting for the redirect); if nothing opens:\n",
          url, "\n")
        io.stderr:flush()
      end
    end
  end
  if opts.timeout then
    local t = tonumber(opts.timeout)
    if not t or t <= 0 then
      io.stderr:write("oauthmail login: --timeout wants a number of seconds > 0\n")
      return common.EX.USAGE
    end
    o.wait_timeout = t
  end
  local mailer
  mailer, err = require("oauthmail").new(p)
  if not mailer then common.report(err) return common.exit_code(err) end
  local tok
  tok, err = mailer:login()
  ctx:status_done()
  mailer:close()
  if not tok then common.report(err) return common.exit_code(err) end
  ctx:event { type = "cli", event = "login", grant = mailer.settings.flow, expires_at = tok.expires_at,
    refresh_token = tok.refresh_token ~= nil }
  local where = ctx.default_store or (type(p.store) == "table" and p.store.path) or "the profile's store"
  ctx:say("signed in (%s); tokens stored in %s%s", mailer.settings.flow, where,
    tok.refresh_token and "" or " (no refresh token: sign in again when the token expires)")
  return 0
end

return M
