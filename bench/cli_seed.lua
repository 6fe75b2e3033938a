-- bench/cli_seed.lua — put a valid (fake) access token into the default file
-- store of profile NAME, the way `oauthmail login` or a first `oauthmail
-- token` would leave it, so the benchmark measures the cached path.
-- Usage: lua bench/cli_seed.lua NAME   (OAUTHMAIL_PROFILE_PATH, XDG_STATE_HOME set)
local common = require "oauthmail.cli.common"
local ctx = common.context({ profile = arg[1] }, "bench")
local p = assert(ctx:load_profile())
local mailer = assert(require("oauthmail").new(p))
local now = os.time()
local tok = "bench-oauthmail-access-token-" .. string.rep("x", 1200)
assert(mailer.tokens.store:save(mailer.tokens.key, { access_token = tok, token_type = "Bearer",
  expires_at = now + 3600, obtained_at = now }))
io.stdout:write(tok, "\n")
