-- oauthmail.sandbox.smtp — an SMTP submission server that answers as
-- Exchange Online does: STARTTLS, AUTH XOAUTH2 / OAUTHBEARER checked against
-- the sandbox's token service (audience, SMTP.Send or SMTP.SendAsApp, the
-- mailbox, expiry), and its replies: 535 5.7.3, 535 5.7.139 (SMTP AUTH off
-- for the mailbox), 501 5.5.127 (token within 10 minutes of expiry), 432
-- 4.3.2 (a fourth connection for a mailbox), 554 5.2.0 (recipient quota),
-- 421 4.7.66 (fault switch), and Google's 334 error challenge for a
-- Google-shaped mailbox. Accepted messages go to a maildir.
local cjson = require("cjson.safe").new()
local crypto = require "oauthmail.crypto"
local serve = require "oauthmail.sandbox.serve"

local M = {}

local HOST = "sandbox.outlook.test"
local APP_AUDS = { ["https://outlook.office365.com"] = true, ["https://outlook.office.com"] = true }

local Server = {}
Server.__index = Server

-- smtp.new{idp=, mailboxes={[addr]={kind="microsoft"|"google", smtp_auth=true, quota=N}},
--   tls={cert=, key=} | nil, maildir=, faults=, stats=, clock=}
function M.new(o)
  local self = setmetatable({ idp = o.idp, mailboxes = o.mailboxes, tls = o.tls, maildir = o.maildir,
    faults = o.faults, stats = o.stats or {}, clock = o.clock or os.time, sessions = {}, sent = {}, seq = 0 }, Server)
  for _, k in ipairs { "connections", "auth_ok", "auth_failed", "delivered" } do self.stats[k] = 0 end
  os.execute("mkdir -p '" .. self.maildir:gsub("'", "'\\''") .. "/new'")
  return self
end

local function reply(c, s) return serve.send(c, s .. "\r\n") end

-- Decode an XOAUTH2 or OAUTHBEARER initial response: user, token.
local function sasl(mech, b64)
  local raw = crypto.b64decode(b64 or "")
  if type(raw) ~= "string" then return nil end
  if mech == "XOAUTH2" then
    return raw:match("^user=([^\1]*)\1"), raw:match("\1auth=[Bb]earer ([^\1]*)\1")
  end
  -- OAUTHBEARER: gs2 header "n,a=user,", then \1-separated key=value
  return raw:match("^n,a=([^,]*),"), raw:match("\1auth=[Bb]earer ([^\1]*)\1")
end

-- The reply for a token presented for a mailbox, or nil when it is good.
function Server:check(user, token)
  local box = self.mailboxes[(user or ""):lower()]
  local claims = token and self.idp:lookup(token)
  if box and box.kind == "google" then
    -- Gmail takes only its own scope; anything else gets the error challenge
    if not claims or claims.aud ~= "https://mail.google.com/" or claims.exp <= self.clock() then return "google" end
    return nil
  end
  local bad = "535 5.7.3 Authentication unsuccessful [" .. HOST .. "]"
  if not box or not claims then return bad end
  if box.smtp_auth == false then
    return "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
      .. "Visit https://aka.ms/smtp_auth_disabled for more information. [" .. HOST .. "]"
  end
  if not APP_AUDS[claims.aud] then return bad end
  if claims.roles then
    local ok = false
    for _, r in ipairs(claims.roles) do if r == "SMTP.SendAsApp" then ok = true end end
    if not ok then return bad end
  elseif not (claims.scp or ""):find("SMTP.Send", 1, true) or (claims.upn or ""):lower() ~= user:lower() then
    return bad
  end
  local left = claims.exp - self.clock()
  if left <= 0 then return bad end
  if left < 600 then
    return "501 5.5.127 Authentication unsuccessful, the token will expire soon or has expired [" .. HOST .. "]"
  end
  return nil
end

function Server:count(user, delta)
  local k = user:lower()
  self.sessions[k] = (self.sessions[k] or 0) + delta
  return self.sessions[k]
end

function Server:deliver(from, rcpt, data, user)
  self.seq = self.seq + 1
  local id = string.format("%04d", self.seq)
  local file = self.maildir .. "/new/" .. id .. ".eml"
  local f = assert(io.open(file, "wb"))
  f:write(data)
  f:close()
  local mid = data:match("\n[Mm]essage%-[Ii][Dd]:%s*<([^>\r\n]*)>") or data:match("^[Mm]essage%-[Ii][Dd]:%s*<([^>\r\n]*)>")
  local idx = assert(io.open(self.maildir .. "/index.jsonl", "ab"))
  idx:write((cjson.encode { n = self.seq, file = file, from = from, to = rcpt, size = #data, message_id = mid,
    user = user }):gsub("\\/", "/"), "\n")
  idx:close()
  self.stats.delivered = self.stats.delivered + 1
  return id
end

local EHLO_PLAIN = { "250-" .. HOST .. " Hello [127.0.0.1]", "250-SIZE 37748736", "250-PIPELINING",
  "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-SMTPUTF8" }

-- One SMTP conversation (a task of sandbox.serve; every wait is a yield).
function Server:session(c)
  self.stats.connections = self.stats.connections + 1
  local r = serve.reader(c, 120)
  local f = self.faults:take("connect")
  if f then
    reply(c, string.format("%d %s %s", f.code or 421, f.enhanced or "4.7.66",
      f.text or "TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2."))
    return c:close()
  end
  reply(c, "220 " .. HOST .. " Microsoft ESMTP MAIL Service ready (oauthmail sandbox)")
  local secure, user, counted = false, nil, false
  local from, rcpt = nil, {}
  -- the end of the conversation; a line over its bound is refused, not kept
  local function finish(why)
    if why == "line too long" then reply(c, "500 5.5.2 Line too long") end
    if counted then self:count(user, -1) end
    c:close()
  end
  local function auth(mech, initial)
    local resp = initial
    if not resp or resp == "" then
      reply(c, "334 ")
      resp = r.line()
      if not resp then return false end
    end
    local u, token = sasl(mech, resp)
    local why = self:check(u, token)
    if why == "google" then
      self.stats.auth_failed = self.stats.auth_failed + 1
      reply(c, "334 " .. crypto.b64encode('{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'))
      r.line()
      reply(c, "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
        .. "535 5.7.8  https://support.google.com/mail/?p=BadCredentials")
      return true
    end
    if why then
      self.stats.auth_failed = self.stats.auth_failed + 1
      reply(c, why)
      return true
    end
    local fa = self.faults:take("auth")
    if fa then
      self.stats.auth_failed = self.stats.auth_failed + 1
      reply(c, string.format("%d %s %s", fa.code or 535, fa.enhanced or "5.7.3", fa.text or "Authentication unsuccessful"))
      return true
    end
    if self:count(u, 1) > 3 then
      self:count(u, -1)
      reply(c, "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [" .. HOST .. "]")
      return true
    end
    user, counted = u, true
    self.stats.auth_ok = self.stats.auth_ok + 1
    reply(c, "235 2.7.0 Authentication successful")
    return true
  end
  while true do
    local line, lerr = r.line(4096)
    if not line then return finish(lerr) end
    local verb, arg = line:match("^(%a+)%s*(.-)%s*$")
    verb = (verb or ""):upper()
    if verb == "EHLO" or verb == "HELO" then
      local lines = {}
      for i, l in ipairs(EHLO_PLAIN) do lines[i] = l end
      if secure or not self.tls then
        lines[#lines + 1] = "250-AUTH LOGIN XOAUTH2 OAUTHBEARER"
      end
      if not secure and self.tls then lines[#lines + 1] = "250-STARTTLS" end
      lines[#lines] = lines[#lines]:gsub("^250%-", "250 ")
      reply(c, table.concat(lines, "\r\n"))
    elseif verb == "STARTTLS" and self.tls and not secure then
      reply(c, "220 2.0.0 SMTP server ready")
      c:settimeout(10)
      local ok = c:starttls { server = true, cert = self.tls.cert, key = self.tls.key }
      if not ok then return finish() end
      secure = true
    elseif verb == "AUTH" then
      local mech, initial = arg:match("^(%S+)%s*(%S*)$")
      mech = (mech or ""):upper()
      if self.tls and not secure then
        reply(c, "530 5.7.57 Client not authenticated to send mail. [" .. HOST .. "]")
      elseif user then
        reply(c, "503 5.5.2 Already authenticated")
      elseif mech ~= "XOAUTH2" and mech ~= "OAUTHBEARER" then
        reply(c, "504 5.7.4 Unrecognized authentication type [" .. HOST .. "]")
      elseif not auth(mech, initial) then
        return finish()
      end
    elseif verb == "MAIL" then
      if not user then
        reply(c, "530 5.7.57 Client not authenticated to send mail. [" .. HOST .. "]")
      else
        local fm = self.faults:take("mail")
        if fm then
          reply(c, string.format("%d %s %s", fm.code or 451, fm.enhanced or "4.7.500", fm.text or "Server busy"))
        else
          from, rcpt = arg:match("^[Ff][Rr][Oo][Mm]:%s*<([^>]*)>") or "", {}
          reply(c, "250 2.1.0 Sender OK")
        end
      end
    elseif verb == "RCPT" then
      local to = arg:match("^[Tt][Oo]:%s*<([^>]*)>")
      local box = self.mailboxes[(user or ""):lower()] or {}
      local fr = self.faults:take("rcpt")
      if not from then
        reply(c, "503 5.5.1 Need MAIL command")
      elseif fr then
        reply(c, string.format("%d %s %s", fr.code or 550, fr.enhanced or "5.1.1", fr.text or "User unknown"))
      elseif box.quota and (self.sent[user] or 0) >= box.quota then
        reply(c, "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process "
          .. "message due to a permanent exception with message [" .. HOST .. "]")
      elseif to then
        rcpt[#rcpt + 1] = to
        self.sent[user] = (self.sent[user] or 0) + 1
        reply(c, "250 2.1.5 Recipient OK")
      else
        reply(c, "501 5.1.3 Invalid address")
      end
    elseif verb == "DATA" then
      if not from or #rcpt == 0 then
        reply(c, "503 5.5.1 Need RCPT command")
      else
        reply(c, "354 Start mail input; end with <CRLF>.<CRLF>")
        local parts = {}
        while true do
          local l, derr = r.line(1024 * 1024)
          if not l then return finish(derr) end
          if l == "." then break end
          if l:sub(1, 1) == "." then l = l:sub(2) end
          parts[#parts + 1] = l
        end
        local fd = self.faults:take("data")
        if fd then
          reply(c, string.format("%d %s %s", fd.code or 451, fd.enhanced or "4.3.2", fd.text or "Temporary failure"))
        else
          local id = self:deliver(from, rcpt, table.concat(parts, "\r\n") .. "\r\n", user)
          reply(c, "250 2.0.0 OK <" .. id .. ".sandbox@" .. HOST .. "> [Hostname=" .. HOST .. "]")
        end
        from, rcpt = nil, {}
      end
    elseif verb == "RSET" then
      from, rcpt = nil, {}
      reply(c, "250 2.0.0 Resetting")
    elseif verb == "NOOP" then
      reply(c, "250 2.0.0 OK")
    elseif verb == "QUIT" then
      reply(c, "221 2.0.0 Service closing transmission channel")
      return finish()
    else
      reply(c, "500 5.3.3 Unrecognized command")
    end
  end
end

M.Server = Server
return M
