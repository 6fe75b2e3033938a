-- oauthmail token — a valid access token on stdout and nothing else, for
-- msmtp's passwordeval, neomutt's smtp_oauth_refresh_command and the like.
-- From the store when it has margin left; refreshed (once, under the store's
-- lock) when not. --json prints {access_token, expires_at, token_type, scope}.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { json = {} }
M.HELP = [[
usage: oauthmail token --profile NAME [--json] [--trace FILE] [--quiet]
Prints a valid access token on stdout (refreshing it only when needed).
--json   {"access_token", "expires_at", "token_type", "scope"} instead
Exit 0, or a sysexits code with the reason on stderr (77: sign-in needed or refused,
75: try again later, 78: profile problem).
]]

function M.run(ctx, opts)
  local p, err = ctx:load_profile()
  if not p then common.report(err) return common.exit_code(err) end
  local oauthmail = require "oauthmail"
  local mailer
  mailer, err = oauthmail.new(p)
  if not mailer then common.report(err) return common.exit_code(err) end
  local tok
  tok, err = mailer.tokens:get()
  if not tok then
    mailer:close()
    require("oauthmail.decoder").explain(err, mailer.settings.ctx)
    common.report(err)
    return common.exit_code(err)
  end
  mailer:close()
  ctx:event { type = "cli", event = "token", expires_at = tok.expires_at }
  if opts.json then
    local cjson = require "cjson"
    local scope = tok.scope
    if type(scope) == "table" then scope = table.concat(scope, " ") end
    local out = { access_token = tok.access_token, expires_at = tok.expires_at,
      token_type = tok.token_type or "Bearer", scope = scope }
    io.stdout:write((cjson.encode(out):gsub("\\/", "/")), "\n")
  else
    io.stdout:write(tok.access_token, "\n")
  end
  return 0
end

return M
