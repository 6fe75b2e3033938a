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

-- The token the profile's first transport authenticates with: from the
-- store when it has margin left, read by the token manager alone, so the
-- common case loads neither the mailer nor OpenSSL nor libcurl (a cached
-- token is what msmtp's passwordeval asks for, once per message).
local function stored(p)
  local s, err = require("oauthmail.profile").read(p)
  if not s then return nil, err end
  local oauth = s.transports[1] == "graph" and s.graph_oauth or s.oauth
  local clock = s.policy.clock   -- a profile's own clock, as the mailer would use it
  local mgr
  mgr, err = require("oauthmail.tokens").for_settings(s, oauth, {
    trace = p.trace, clock = clock and function() return math.floor(clock()) end })
  if not mgr then return nil, err end
  return mgr:peek()
end

-- Otherwise the mailer's manager obtains one (refresh, or a flow that needs
-- nobody), under the store's lock.
local function obtained(p)
  local mailer, err = require("oauthmail").new(p)
  if not mailer then return nil, err end
  local tok
  tok, err = mailer.tokens:get()
  if not tok then require("oauthmail.decoder").explain(err, mailer.settings.ctx) end
  mailer:close()
  return tok, err
end

function M.run(ctx, opts)
  local p, err = ctx:load_profile()
  if not p then common.report(err) return common.exit_code(err) end
  local tok
  tok, err = stored(p)
  if not tok then tok, err = obtained(p) end
  if not tok then
    common.report(err)
    return common.exit_code(err)
  end
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
