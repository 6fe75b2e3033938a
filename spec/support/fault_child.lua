-- spec/support/fault_child.lua — one mailer in its own process, for the
-- fault matrix rows where a process dies: it builds a mailer from the JSON
-- profile in OM_PROFILE (a file store, so a later process finds the token),
-- sends one message and prints "SENT <attempts>" or "ERROR <kind> <code>".
--
-- Environment (set by spec/fault_matrix_spec.lua):
--   OM_PROFILE       path of a JSON profile (oauthmail.new's table)
--   OM_MESSAGE_ID    Message-ID of the message (without <>)
--   OM_BODY_KB       size of the body in KiB (default 1)
--   OM_CLOCK_OFFSET  seconds added to the mailer's clock (a stored token then looks expired)
--   OM_FAULT         "during_save": TEST HOOK, the token file write ends the process
--                    with status 86 half way through (core.fs atomic_write)
local cjson = require "cjson"
local oauthmail = require "oauthmail"

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

if env("OM_FAULT") == "during_save" then require("oauthmail.store.file")._test_fault = "during_save" end

local f = assert(io.open(assert(env("OM_PROFILE"), "OM_PROFILE is required"), "rb"))
local profile = cjson.decode(f:read("*a"))
f:close()
local offset = tonumber(env("OM_CLOCK_OFFSET", "0"))
if offset ~= 0 then
  local clock = require("oauthmail.policy").default_clock()
  profile.policy = profile.policy or {}
  profile.policy.clock = function() return clock() + offset end
end

local id = env("OM_MESSAGE_ID", "child@fault.test")
local body = string.rep(string.rep("x", 78) .. "\r\n", math.floor(tonumber(env("OM_BODY_KB", "1")) * 1024 / 80))
local raw = "From: " .. profile.user .. "\r\nTo: ops@example.org\r\nSubject: fault child\r\nMessage-ID: <" .. id
  .. ">\r\n\r\n" .. body

local mailer = assert(oauthmail.new(profile))
io.stdout:write("STARTED\n")
io.stdout:flush()
local r, err = mailer:send { raw = raw, to = "ops@example.org" }
mailer:close()
if r then
  io.stdout:write("SENT ", tostring(r.attempts), "\n")
else
  io.stdout:write("ERROR ", tostring(err.kind), " ", tostring(err.code), "\n")
end
