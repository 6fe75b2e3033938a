-- examples/sandbox_demo.lua — what `make demo` runs (through bin/demo): a real
-- OAuth2 provider (oidc-provider) and the sandbox SMTP server (smtp-server with
-- Microsoft-style replies) start on loopback; a mailer made from a profile
-- gets a token with client credentials, survives one refused AUTH (the
-- sandbox is told to answer 535 once: the token is refreshed and AUTH tried
-- again), sends a composed message, and the redacted transcript and the
-- delivered message are printed. Needs no input; stops the peers at the end.
local oauthmail = require "oauthmail"
local oidc = require "spec.support.oidc"
local sandbox = require "spec.support.sandbox"

local function say(...) io.stdout:write(string.format(...), "\n") io.stdout:flush() end
local function rule(title) say("\n== %s %s", title, string.rep("=", math.max(0, 66 - #title))) end

local srv, sb
local ok, err = pcall(function()
  rule("starting peers")
  srv = oidc.start()
  say("identity provider  %s  (oidc-provider, client 'cc-post', client credentials)", srv.issuer)
  sb = sandbox.start { user = "noreply@contoso.test", jwks_uri = srv.issuer .. "/jwks", ca = srv.ca }
  say("SMTP sandbox       127.0.0.1:%d  (smtp-server, STARTTLS, XOAUTH2, tokens checked against the provider's keys)",
    sb.port)

  local transcript = {}
  local profile = {
    name = "demo-tenant", provider = "generic",
    issuer = srv.issuer, token_endpoint = srv.token_endpoint, ca_file = srv.ca,
    flow = "client_credentials", client_id = "cc-post", client_secret = srv.secrets.post,
    client_auth = "client_secret_post", scope = "mail.send",
    user = "noreply@contoso.test",
    smtp = { host = "127.0.0.1", port = sb.port, tls = "starttls", ca_file = sb.ca, timeout = 10 },
    trace = function(ev) transcript[#transcript + 1] = oauthmail.format_event(ev) end,
  }
  -- one fault: the first AUTH is refused the way Exchange refuses it
  sb.faults { { stage = "auth", code = 535, enhanced = "5.7.3", text = "Authentication unsuccessful [sandbox]" } }

  rule("sending")
  local mailer = assert(oauthmail.new(profile))
  local receipt, serr = mailer:send {
    to = { "ops@example.org" }, subject = "Nightly report from the oauthmail demo",
    text = "Everything went fine.\nThis message travelled over STARTTLS with an OAuth2 bearer token.\n",
  }
  mailer:close()
  if not receipt then error(tostring(serr), 0) end
  say("receipt: message_id=%s attempts=%d reply=%d %s", receipt.message_id, receipt.attempts,
    receipt.reply.code, receipt.reply.enhanced or "")
  say("         accepted=%s rejected=%d", table.concat(receipt.accepted, ","), #receipt.rejected)

  rule("redacted transcript")
  for _, line in ipairs(transcript) do
    local noise = line:match("^smtp %* state ") or (line:match("^http ") and not (line:match("^http [<>] [A-Z]+ ")
      or line:match("^http < HTTP/") or line:match("access_token")))
    if not noise then
      say("  %s", line)
    end
  end

  rule("delivered (" .. sb.maildir .. ")")
  local msgs = sb.messages()
  local m = msgs[#msgs]
  say("file %s  from=%s  to=%s  authenticated as %s", m.file, m.from, table.concat(m.to, ","), m.user)
  say("%s", (m.data:gsub("\r\n", "\n")))
  -- the demo's own guard: nothing secret may have been printed
  local all = table.concat(transcript, "\n")
  assert(not all:find(srv.secrets.post, 1, true), "client secret leaked into the transcript")
end)

if sb then sb.stop() end
if srv then srv.stop() end
require("spec.support.helpers").cleanup()   -- the test CA and keys made for the demo
if not ok then
  io.stderr:write("demo failed: ", tostring(err), "\n")
  os.exit(1)
end
say("\ndemo finished: one message delivered; peers stopped.")
