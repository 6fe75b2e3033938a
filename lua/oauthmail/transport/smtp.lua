-- oauthmail.transport.smtp — the SMTP transport under the mailer: what a
-- transport does for the session pool (oauthmail.pool) and the send policy
-- (policy.deliver), and nothing else. A transport is a table with
--   connect()               -> session | nil, err   (no credentials yet)
--   authenticate(s, token)  -> true | nil, err
--   submit(s, m)            -> receipt | nil, err   one message {from, to, data(m) -> a fresh source, size, eight_bit}
--   submit_many(s, list)    -> list of receipts or errors (optional: pipelined batches)
--   usable(s)               -> may s take another message?
--   close(s)                -> end politely (QUIT), bounded by the session's timeout
--   abandon(s)              -> drop at once, no network I/O (finalizers)
--   classify(err)           -> "reauth"|"reconnect"|"throttle"|"retry"|"fail"
-- Microsoft Graph fits the same shape: connect makes no connection,
-- authenticate keeps the token, submit is one HTTP request (202 = accepted).
local policy = require "oauthmail.policy"
local smtp = require "oauthmail.smtp"

local M = {}
local T = {}
T.__index = T

-- transport.smtp.new(opts, {user=, trace=}) with opts the profile's smtp table.
function M.new(opts, ctx)
  return setmetatable({ opts = opts, user = ctx.user, trace = ctx.trace, name = "smtp" }, T)
end

function T:connect()
  local o = {}
  for k, v in pairs(self.opts) do o[k] = v end
  o.mechanism, o.two_step = nil, nil
  o.trace = self.trace
  return smtp.open(o)
end

function T:authenticate(s, token)
  local o = self.opts
  return s:auth { mechanism = o.mechanism, user = self.user, token = token.access_token, two_step = o.two_step }
end

function T.submit(_, s, m)
  return s:send { from = m.from, to = m.to, data = m.data(m), size = m.size, eight_bit = m.eight_bit }
end

-- Pipelined MAIL/RCPT/BDAT LAST when the server offers PIPELINING and
-- CHUNKING (session:send_many falls back to one by one otherwise). The
-- messages of send_many have their whole text at hand (m.text: a string,
-- or the list of strings it is made of): the session reads it from there,
-- in one window with the rest of the list.
-- The receipts are the session's: new tables, the mailer's to keep; a
-- message every recipient took gets the final reply alone (compact).
function T.submit_many(_, s, list)
  for i = 1, #list do
    local text = list[i].text
    if type(text) ~= "string" and type(text) ~= "table" then
      -- (a caller other than send_many: each message's own source)
      local out = {}
      for k = 1, #list do
        local m = list[k]
        out[k] = { from = m.from, to = m.to, data = m.text or m.data(m), size = m.size, eight_bit = m.eight_bit }
      end
      return s:send_many(out, { window = #list })
    end
  end
  return s:send_many(list, { window = #list, field = "text", compact = true })
end

function T.usable(_, s)
  return not (s.broken or s.closed)
end

function T.close(_, s)
  return s:close()
end

-- No QUIT: close the socket and forget the session (a finalizer must not
-- talk to the network).
function T.abandon(_, s)
  s.closed = true
  if s.conn then pcall(s.conn.close, s.conn) end
  if s.eng then pcall(s.eng.close, s.eng) end
end

T.classify = function(_, err) return policy.classify(err) end

return M
