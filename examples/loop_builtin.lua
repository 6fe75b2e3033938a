-- examples/loop_builtin.lua — ten sends at once on one mailer under the
-- built-in loop, while a ticker keeps running: the sends share a pool of
-- three sessions and one token.
--   lua examples/loop_builtin.lua            (a local tenant on loopback)
--   OAUTHMAIL_PROFILE=profiles/contoso.lua lua examples/loop_builtin.lua
local oauthmail = require "oauthmail"
local tenant = require "examples.local_tenant"

local profile, stop = tenant.profile()
local mailer = assert(oauthmail.new(profile))

oauthmail.run(function()
  local done, ticks = 0, 0
  oauthmail.spawn(function()
    while done < 10 do ticks = ticks + 1 oauthmail.wait.sleep(0.05) end
  end)
  for i = 1, 10 do
    oauthmail.spawn(function()
      local r, err = mailer:send { to = "ops@example.org", subject = "report " .. i, text = "part " .. i .. "\n" }
      print(i, r and ("sent " .. r.message_id) or tostring(err))
      done = done + 1
    end)
  end
  while done < 10 do oauthmail.wait.sleep(0.05) end
  print(string.format("the ticker ran %d times meanwhile; sessions used: %d", ticks, mailer:stats().sessions))
end)
mailer:close()
stop()
