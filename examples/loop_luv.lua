-- examples/loop_luv.lua — oauthmail on a libuv loop through luv: tasks
-- started with the adapter's spawn yield to the loop on every wait, and a
-- uv timer keeps firing while mail is sent.
--   lua examples/loop_luv.lua   (needs lua-luv)
local uv = require "luv"
local oauthmail = require "oauthmail"
local luvw = require "oauthmail.wait.luv"
local tenant = require "examples.local_tenant"

oauthmail.wait.use(luvw)
local profile, stop = tenant.profile()
local mailer = assert(oauthmail.new(profile))

local ticks, done = 0, 0
local timer = uv.new_timer()
timer:start(50, 50, function() ticks = ticks + 1 end)
for i = 1, 5 do
  luvw.spawn(function()
    local r, err = mailer:send { to = "ops@example.org", subject = "luv " .. i, text = "hello\n" }
    print(i, r and ("sent " .. r.message_id) or tostring(err))
    done = done + 1
    if done == 5 then timer:stop() timer:close() end
  end)
end
uv.run()
print("timer ticks while sending: " .. ticks)
mailer:close()
stop()
