-- oauthmail logout — revoke the stored refresh token at the provider (RFC
-- 7009, where the provider has a revocation endpoint), then delete the
-- stored record. A revocation that fails keeps the record, so the logout can
-- be run again; --local-only deletes without asking the provider.
local common = require "oauthmail.cli.common"

local M = {}

M.OPTIONS = { local_only = {} }
M.HELP = [[
usage: oauthmail logout --profile NAME [--local-only] [--trace FILE] [--quiet]
Revokes the stored refresh token (where the provider has a revocation endpoint), then
deletes the stored tokens. --local-only: delete without revoking.
]]

function M.run(ctx, opts)
  local p, err = ctx:load_profile()
  if not p then common.report(err) return common.exit_code(err) end
  local mailer
  mailer, err = require("oauthmail").new(p)
  if not mailer then common.report(err) return common.exit_code(err) end
  local mgr = mailer.tokens
  local rec, lerr = mgr.store:load(mgr.key)
  if lerr then common.report(lerr) return common.exit_code(lerr) end
  local revoked = false
  if type(rec) == "table" and not opts.local_only then
    local flow = mgr.flow
    local secret = type(rec.refresh_token) == "string" and rec.refresh_token or nil
    local hint = secret and "refresh_token" or "access_token"
    secret = secret or (type(rec.access_token) == "string" and rec.access_token or nil)
    if secret and (flow.revocation_endpoint or flow.issuer) then
      local ok, rerr = require("oauthmail.oauth2").revoke(flow, secret, hint)
      if not ok then
        if not (flow.revocation_endpoint == nil and rerr and rerr.kind == "config") then
          rerr.message = "revocation failed, the stored tokens are kept: " .. tostring(rerr.message)
          rerr.hint = rerr.hint or "run the logout again, or use --local-only to delete them without revoking"
          common.report(rerr)
          ctx:event { type = "cli", event = "logout", revoked = false, deleted = false }
          return common.exit_code(rerr)
        end
        ctx:say("the provider has no revocation endpoint: deleting the local copy only")
      else
        revoked = true
      end
    elseif secret then
      ctx:say("the provider has no revocation endpoint: deleting the local copy only")
    end
  end
  local ok, derr = mgr:logout()
  if not ok then common.report(derr) return common.exit_code(derr) end
  ctx:event { type = "cli", event = "logout", revoked = revoked, deleted = rec ~= nil }
  if rec == nil then
    ctx:say("nothing stored for this profile")
  else
    ctx:say("%s the stored tokens", revoked and "revoked and deleted" or "deleted")
  end
  return 0
end

return M
