-- oauthmail.oauth2.device — the device authorization grant (RFC 8628): ask
-- for a user code, show it, then poll the token endpoint at the pace the
-- server sets (interval, +5 s on slow_down) until approval, denial, expiry or
-- the deadline the server gave with the code.
local sys = require "oauthmail.sys"
local waiter = require "oauthmail.wait"
local errors = require "oauthmail.errors"
local endpoint = require "oauthmail.oauth2.endpoint"
local discovery = require "oauthmail.oauth2.discovery"

local M = {}

local GRANT = "urn:ietf:params:oauth:grant-type:device_code"
local MAX_INTERVAL = 600      -- seconds between polls, at most
local MAX_EXPIRES_IN = 1800   -- the longest a device code is waited for (Google's is 1800)

local function default_show(info)
  io.stderr:write((info.message or ("To sign in, open " .. info.verification_uri .. " and enter the code "
    .. info.user_code)) .. "\n")
  io.stderr:flush()
end

local function pending(doc) return doc.error == "authorization_pending" or doc.error == "slow_down" end

-- oauth2.device_code(cfg) -> token | nil, err
function M.device_code(cfg)
  local c, err = discovery.resolve(cfg, { "device_authorization_endpoint", "token_endpoint" })
  if not c then return nil, err end
  local sleep = c.sleep or waiter.sleep
  local doc, derr = endpoint.call(c, c.device_authorization_endpoint, {
    { "scope", endpoint.scope_string(c.scope) },
  }, { what = "device authorization" })
  if not doc then return nil, derr end
  -- Google still says verification_url (the draft's name).
  local uri = doc.verification_uri or doc.verification_url
  if type(doc.device_code) ~= "string" or type(doc.user_code) ~= "string" or type(uri) ~= "string" then
    return errors.fail("oauth", "device authorization: the answer lacks device_code, user_code or verification_uri",
      { reason = "malformed" })
  end
  -- The server sets the pace and the deadline, within bounds: a NaN or an
  -- endless value must not turn the wait into a spin or a hang.
  local expires_in = endpoint.seconds(doc.expires_in, 900, 1, MAX_EXPIRES_IN)
  local interval = endpoint.seconds(doc.interval, 5, 1, MAX_INTERVAL)
  if not expires_in or not interval then
    return errors.fail("oauth", "device authorization: " .. (expires_in and "interval" or "expires_in")
      .. " in the answer is not a number", { reason = "malformed" })
  end
  local deadline = sys.monotime() + expires_in
  local info = {
    verification_uri = uri, user_code = doc.user_code, expires_in = expires_in,
    verification_uri_complete = type(doc.verification_uri_complete) == "string" and doc.verification_uri_complete or nil,
    message = type(doc.message) == "string" and doc.message or nil,
  }
  endpoint.trace(c, { event = "device_code", verification_uri = uri, expires_in = expires_in, interval = interval })
  local show = c.on_device_code or default_show
  show(info)

  local polls = 0
  while true do
    if sys.monotime() + interval > deadline then
      return errors.fail("oauth", "the device code expired before the user approved it (after "
        .. endpoint.fmt_secs(expires_in) .. " s)",
        { oauth_error = "expired_token", reason = "timeout", retryable = true,
          hint = "run the sign-in again and enter the code sooner" })
    end
    sleep(interval)
    polls = polls + 1
    local answer, perr = endpoint.call(c, c.token_endpoint, {
      { "grant_type", GRANT },
      { "device_code", doc.device_code },
    }, { what = "device token poll", accept_error = pending })
    if not answer then
      if perr.oauth_error == "access_denied" then
        perr.hint = "the user declined the sign-in on the verification page"
        perr.message = "the user denied the device sign-in" .. (perr.message and (": " .. perr.message) or "")
      elseif perr.oauth_error == "expired_token" then
        perr.hint = "run the sign-in again and enter the code sooner"
        perr.message = "the device code expired before it was approved" .. (perr.message and (": " .. perr.message) or "")
      end
      return nil, perr
    end
    if answer.error == "slow_down" then
      interval = math.min(interval + 5, MAX_INTERVAL)
      endpoint.trace(c, { event = "slow_down", interval = interval, polls = polls })
    elseif answer.error ~= "authorization_pending" then
      local tok, terr = endpoint.token(answer, "device token poll")
      if tok then endpoint.trace(c, { event = "token", grant = "device_code", polls = polls, expires_at = tok.expires_at }) end
      return tok, terr
    end
  end
end

return M
