-- Northwind: a tenant that needs code — the flow depends on where the program
-- runs, every message gets a footer and may only go to the tenant's own
-- domains, token refreshes are logged (without the token), and the sending
-- rate is lower than the Microsoft default because other tools share the mailbox.
local ALLOWED = { ["northwind.example"] = true, ["northwind-partners.example"] = true }

local function domain(addr) return (addr:match("@([^>]+)>?$") or ""):lower() end

return {
  provider = "microsoft",
  tenant = "northwind.onmicrosoft.com",
  client_id = os.getenv("NORTHWIND_CLIENT_ID") or "00000000-0000-0000-0000-000000000000",
  client_secret = os.getenv("NORTHWIND_SECRET"),
  user = "notifications@northwind.example",

  -- unattended on servers, a person's sign-in on a workstation
  select_flow = function(ctx)
    if os.getenv("NORTHWIND_WORKSTATION") then return "device_code" end
    return ctx.has_secret and "client_credentials" or "device_code"
  end,

  before_send = function(msg)
    for _, field in ipairs { "to", "cc", "bcc" } do
      local list = type(msg[field]) == "string" and { msg[field] } or msg[field] or {}
      for _, a in ipairs(list) do
        if not ALLOWED[domain(a)] then return false, "recipient outside the tenant: " .. a end
      end
    end
    if msg.text then msg.text = msg.text .. "\n-- \nSent by Northwind notifications.\n" end
  end,

  on_token = function(tok)
    io.stderr:write(string.format("northwind: new token, valid until %s\n", os.date("!%H:%M:%SZ", tok.expires_at)))
  end,

  limits = { messages_per_minute = 10, connections = 1, on_limit = "wait", max_wait = 90 },
  policy = { attempts = 4, max_time = 60 },
}
