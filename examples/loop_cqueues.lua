-- examples/loop_cqueues.lua — oauthmail inside a cqueues controller (as in a
-- lua-http server): every wait becomes a cqueues.poll, so the controller's
-- other coroutines (here a ticker) run while mail is sent.
--   lua examples/loop_cqueues.lua   (needs lua-cqueues)
local cqueues = require "cqueues"
local oauthmail = require "oauthmail"
local tenant = require "examples.local_tenant"

oauthmail.wait.use(require "oauthmail.wait.cqueues")
local profile, stop = tenant.profile()
local mailer = assert(oauthmail.new(profile))

local cq = cqueues.new()
local done, ticks = 0, 0
cq:wrap(function()
  while done < 5 do ticks = ticks + 1 cqueues.sleep(0.05) end
end)
for i = 1, 5 do
  cq:wrap(function()
    local r, err = mailer:send { to = "ops@example.org", subject = "cqueues " .. i, text = "hello\n" }
    print(i, r and ("sent " .. r.message_id) or tostring(err))
    done = done + 1
  end)
end
assert(cq:loop())
print("ticks while sending: " .. ticks)
mailer:close()
stop()
