-- examples/per_tenant_hook.lua — one mailer per tenant in one process, each
-- from its own profile; the Northwind profile carries hooks (flow choice,
-- recipient policy, footer, token log) and its own limits.
--   lua examples/per_tenant_hook.lua
local oauthmail = require "oauthmail"

local tenants = {
  contoso = { profile = "examples/profiles/contoso_secret.lua", to = "ops@contoso.com" },
  northwind = { profile = "examples/profiles/tenant_hooks.lua", to = "ops@northwind.example" },
}

for name, t in pairs(tenants) do
  local mailer, err = oauthmail.new(t.profile)
  if not mailer then
    print(name .. ": profile refused: " .. tostring(err))
  else
    local receipt
    receipt, err = mailer:send { to = { t.to }, subject = "Status of " .. name, text = "All green.\n" }
    mailer:close()
    if receipt then
      print(name .. ": sent " .. receipt.message_id)
    else
      print(name .. ": " .. tostring(err))
    end
  end
end
