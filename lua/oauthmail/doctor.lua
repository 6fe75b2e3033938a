-- oauthmail.doctor — check a profile step by step and say where it breaks:
-- profile, DNS, TCP, TLS, EHLO, token, token claims, AUTH (then RSET and
-- QUIT: no mail is sent), credential life. Each step gives a verdict ("pass",
-- "warn", "fail", "skip"), what it saw, and for a failure the cause and the
-- fix (from oauthmail.decoder where it knows the code). See docs/cli.md.
local errors = require "oauthmail.errors"
local decoder = require "oauthmail.decoder"
local providers = require "oauthmail.providers"

local M = {}

local DAY = 86400
M.WARN_DAYS = 30            -- credentials: warn this long before they end
M.TLS_WARN_DAYS = 14        -- the server's certificate
M.MS_REFRESH_IDLE = 90      -- Microsoft: a refresh token unused this many days is dead
M.MS_REFRESH_WARN = 60

-- RFC 6749 5.2 errors the decoder has no provider code for: the fix to try.
M.OAUTH_HINTS = {
  invalid_client = "the provider did not accept the client: check client_id and client_secret (the secret's "
    .. "value, not its id) or the client certificate, and client_auth",
  invalid_grant = "the stored grant is no longer valid (expired, revoked or rotated): sign in again with "
    .. "oauthmail login",
  invalid_scope = "the provider refused the scope: check the profile's scope",
  unauthorized_client = "this client may not use this flow: enable the grant in the app registration",
}

-- ------------------------------------------------------------ helpers

local function b64url_json(part)
  local crypto = require "oauthmail.crypto"
  local ok, raw = pcall(crypto.b64url_decode, part)
  if not ok or type(raw) ~= "string" then return nil end
  local doc = require("cjson.safe").decode(raw)
  if type(doc) ~= "table" then return nil end
  return doc
end

-- The payload of a JWT access token, or nil for an opaque one. Only the
-- claims are kept; the token itself never leaves this function.
function M.claims(access_token)
  if type(access_token) ~= "string" then return nil end
  local h, p = access_token:match("^([%w_%-]+)%.([%w_%-]+)%.[%w_%-]*$")
  if not h then return nil end
  return b64url_json(p)
end

local function list_of(v)
  if type(v) == "table" then return v end
  if type(v) == "string" then
    local t = {}
    for s in v:gmatch("%S+") do t[#t + 1] = s end
    return t
  end
  return {}
end

local function has(list, want)
  for _, v in ipairs(list) do
    if v == want then return true end
  end
  return false
end

-- ASN.1 DER, enough to reach a certificate's validity.
local function der_tlv(s, pos)
  local tag = s:byte(pos)
  if not tag then return nil end
  local len = s:byte(pos + 1)
  if not len then return nil end
  local hdr = 2
  if len >= 128 then
    local n = len - 128
    if n < 1 or n > 4 then return nil end
    len = 0
    for i = 1, n do len = len * 256 + (s:byte(pos + 1 + i) or 0) end
    hdr = 2 + n
  end
  return tag, pos + hdr, len
end

local function der_time(tag, v)
  local y, rest
  if tag == 0x17 then           -- UTCTime YYMMDDHHMMSSZ
    y = tonumber(v:sub(1, 2))
    if not y then return nil end
    y = y < 50 and 2000 + y or 1900 + y
    rest = v:sub(3)
  elseif tag == 0x18 then       -- GeneralizedTime YYYYMMDDHHMMSSZ
    y = tonumber(v:sub(1, 4))
    rest = v:sub(5)
  else
    return nil
  end
  local mo, d, hh, mi, ss = rest:match("^(%d%d)(%d%d)(%d%d)(%d%d)(%d%d)")
  if not mo then return nil end
  return require("oauthmail.trace").parse_time(string.format("%04d-%s-%sT%s:%s:%sZ", y, mo, d, hh, mi, ss))
end

-- doctor.cert_not_after(pem) -> epoch seconds | nil: the first certificate's notAfter.
function M.cert_not_after(pem)
  local b64 = pem:match("%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-(.-)%-%-%-%-%-END CERTIFICATE")
  if not b64 then return nil end
  local ok, der = pcall(require("oauthmail.crypto").b64decode, (b64:gsub("%s", "")))
  if not ok or type(der) ~= "string" then return nil end
  local _, p = der_tlv(der, 1)                 -- Certificate SEQUENCE
  if not p then return nil end
  local tag, tbs = der_tlv(der, p)             -- tbsCertificate SEQUENCE
  if tag ~= 0x30 then return nil end
  local pos = tbs
  local t, vp, len = der_tlv(der, pos)
  if t == 0xA0 then pos = vp + len t, vp, len = der_tlv(der, pos) end  -- [0] version
  -- serial, signature algorithm, issuer, then validity
  for _ = 1, 3 do
    if not t then return nil end
    pos = vp + len
    t, vp, len = der_tlv(der, pos)
  end
  if t ~= 0x30 then return nil end
  local t1, v1, l1 = der_tlv(der, vp)          -- notBefore
  if not t1 then return nil end
  local t2, v2, l2 = der_tlv(der, v1 + l1)     -- notAfter
  if not t2 then return nil end
  return der_time(t2, der:sub(v2, v2 + l2 - 1))
end

local function days(n) return math.floor(n / DAY) end

local function fmt_date(t) return os.date("!%Y-%m-%d", math.floor(t)) end

-- ------------------------------------------------------------ the run

local Run = {}
Run.__index = Run

function Run:add(step, verdict, detail, fields)
  local s = { step = step, verdict = verdict, detail = detail }
  for k, v in pairs(fields or {}) do s[k] = v end
  self.steps[#self.steps + 1] = s
  if self.on_step then self.on_step(s) end
  if verdict == "fail" and not self.first_failure then self.first_failure = s end
  return s
end

-- A failure from an error value: its message, and the decoder's cause and fix.
function Run:fail(step, err, fix, cause)
  if type(err) == "table" then decoder.explain(err, self.ctx) end
  local e = type(err) == "table" and err or {}
  local detail = tostring(e.message or err)
  if e.oauth_error and not detail:find(e.oauth_error, 1, true) then detail = detail .. " (" .. e.oauth_error .. ")" end
  if e.provider_code and not detail:find(e.provider_code, 1, true) then detail = detail .. " " .. e.provider_code end
  return self:add(step, "fail", detail, {
    cause = cause or e.cause, fix = fix or e.fix or e.hint or M.OAUTH_HINTS[e.oauth_error], code = e.code, enhanced = e.enhanced,
    error_kind = e.kind, reason = e.reason, oauth_error = e.oauth_error, provider_code = e.provider_code,
  })
end

local NET_FIX = {
  dns = "check smtp.host: the name does not resolve (a typo, or no DNS on this machine)",
  refused = "nothing listens on that port: check smtp.port (587 with tls = \"starttls\", 465 with tls = \"implicit\") and any firewall",
  timeout = "no answer in time: a firewall drops the connection, or the host or port is wrong",
}

local function tls_fix(err, smtp)
  local r = err.reason
  local msg = tostring(err.message)
  if r == "starttls_not_offered" then
    return "the server does not offer STARTTLS on port " .. smtp.port .. ": use its implicit-TLS port (465, "
      .. "tls = \"implicit\") or a server that offers STARTTLS; never send a token in clear text"
  end
  if r == "handshake" and msg:find("wrong version", 1, true) then
    return "the port speaks plain text, not TLS: use tls = \"starttls\" on 587, or the implicit-TLS port 465"
  end
  if msg:find("expired", 1, true) then
    return "the server's certificate has expired: its administrator must renew it (do not turn verify off)"
  end
  if msg:find("mismatch", 1, true) then
    return "connect with the name the certificate carries (smtp.host), or set smtp.servername"
  end
  if msg:find("not trusted", 1, true) then
    return "the chain does not end in a CA you trust: set smtp.ca_file for a private CA"
  end
  return "check smtp.tls, smtp.port and smtp.min_tls"
end

-- Which audiences and permissions a provider's SMTP server accepts.
local function needs(settings)
  local prov = settings.provider
  if prov == "microsoft" then
    local cloud = providers.CLOUDS[settings.cloud or "global"] or providers.CLOUDS.global
    local auds = {}
    for _, a in ipairs { cloud.app_resource, cloud.user_resource, "https://outlook.office.com",
      "https://outlook.office365.com", "00000002-0000-0ff1-ce00-000000000000" } do
      auds[a] = true
      auds[a .. "/"] = true
    end
    if settings.flow == "client_credentials" then
      return { audiences = auds, roles = "SMTP.SendAsApp", what = "Exchange Online (app-only)" }
    end
    return { audiences = auds, scp = "SMTP.Send", user = true, what = "Exchange Online (delegated)" }
  elseif prov == "google" then
    return { scope = "https://mail.google.com/", what = "Gmail" }
  end
  return nil
end

function Run:check_claims(tok)
  local s = self.settings
  local c = M.claims(tok.access_token)
  local need = needs(s)
  local now = self.clock()
  if not c then
    if need and need.scope then
      local scopes = list_of(tok.scope)
      if #scopes > 0 and not has(scopes, need.scope) then
        return self:add("claims", "fail", "opaque token with scope " .. table.concat(scopes, " "), {
          cause = need.what .. " needs the scope " .. need.scope .. " for SMTP",
          fix = "set scope = \"" .. need.scope .. "\" in the profile (it is the preset's), then oauthmail login again" })
      end
      return self:add("claims", "pass", "opaque token" .. (#scopes > 0 and (", scope " .. table.concat(scopes, " ")) or ""))
    end
    return self:add("claims", "skip", "opaque token (not a JWT): no claims to check")
  end
  local shown = {}
  local function show(k, v)
    if v ~= nil then
      if type(v) == "table" then v = table.concat(list_of(v), " ") end
      shown[#shown + 1] = k .. "=" .. tostring(v)
    end
  end
  show("aud", c.aud) show("scp", c.scp) show("roles", c.roles) show("tid", c.tid)
  show("upn", c.upn) show("preferred_username", c.preferred_username) show("email", c.email)
  if type(c.exp) == "number" then show("exp", fmt_date(c.exp) .. os.date("!T%H:%M:%SZ", math.floor(c.exp))) end
  local detail = table.concat(shown, " ")
  local public = { aud = c.aud, scp = c.scp, roles = c.roles, tid = c.tid, upn = c.upn,
    preferred_username = c.preferred_username, email = c.email, exp = c.exp }
  if type(c.exp) == "number" and c.exp <= now then
    return self:add("claims", "fail", detail, { claims = public, cause = "the token has expired",
      fix = "the store holds an expired token: run oauthmail login (or check this machine's clock)" })
  end
  if need and need.audiences then
    local ok = false
    for _, a in ipairs(list_of(c.aud)) do if need.audiences[a] then ok = true end end
    if not ok then
      return self:add("claims", "fail", detail, { claims = public,
        cause = need.what .. " accepts only tokens for the audience https://outlook.office.com or "
          .. "https://outlook.office365.com; this one is for " .. tostring(type(c.aud) == "table" and
          table.concat(c.aud, " ") or c.aud),
        fix = s.flow == "client_credentials"
          and "request the scope https://outlook.office365.com/.default (leave scope unset: it is the preset's)"
          or ("request the scope https://outlook.office.com/SMTP.Send offline_access (leave scope unset: "
            .. "it is the preset's), then oauthmail login again") })
    end
    if need.roles and not has(list_of(c.roles), need.roles) then
      return self:add("claims", "fail", detail, { claims = public,
        cause = "the app-only token has no " .. need.roles .. " role",
        fix = "grant the application permission Office 365 Exchange Online > SMTP.SendAsApp with admin consent" })
    end
    if need.scp and not has(list_of(c.scp), need.scp) then
      return self:add("claims", "fail", detail, { claims = public,
        cause = "the delegated token has no " .. need.scp .. " scope",
        fix = "add the delegated permission SMTP.Send to the app registration and sign in again (oauthmail login)" })
    end
    if need.user then
      local who = c.upn or c.preferred_username or c.email or c.unique_name
      if type(who) == "string" and who:lower() ~= tostring(s.user):lower() then
        return self:add("claims", "fail", detail, { claims = public,
          cause = "the token belongs to " .. who .. " but the profile's user is " .. tostring(s.user),
          fix = "sign in as " .. tostring(s.user) .. " (oauthmail login), or set user to the mailbox that signed in" })
      end
    end
  end
  if type(c.exp) == "number" and c.exp - now < (s.margin or 0) then
    return self:add("claims", "warn", detail, { claims = public,
      cause = "the token expires within the refresh margin", fix = "it is refreshed on the next use" })
  end
  return self:add("claims", "pass", detail, { claims = public })
end


-- One credential's end date as a check line: fail once past, warn within
-- WARN_DAYS, pass otherwise.
local function credential_end(self, what, t, now, cause, fix, fix_soon)
  if t <= now then
    self:add("credentials", "fail", what .. " expired on " .. fmt_date(t), { cause = cause, fix = fix })
  elseif t - now < M.WARN_DAYS * DAY then
    self:add("credentials", "warn", string.format("%s expires on %s (%d days)", what, fmt_date(t), days(t - now)),
      { fix = fix_soon })
  else
    self:add("credentials", "pass", string.format("%s valid until %s (%d days)", what, fmt_date(t), days(t - now)))
  end
end

function Run:credential_life(p, rec)
  local now = self.clock()
  local any = false
  local cert = p.client_certificate and p.client_certificate.cert
  if cert then
    any = true
    local f = io.open(cert, "rb")
    local pem = f and f:read("*a")
    if f then f:close() end
    local na = pem and M.cert_not_after(pem)
    if not na then
      self:add("credentials", "warn", "cannot read the client certificate's notAfter from " .. cert)
    else
      credential_end(self, "client certificate", na, now, "the certificate the app signs in with has expired",
        "make a new certificate, upload it to the app registration, and point client_certificate at it",
        "upload a new certificate to the app registration before then")
    end
  end
  if p.secret_expires then
    any = true
    local t = require("oauthmail.trace").parse_time(p.secret_expires)
    if not t then
      self:add("credentials", "warn", "secret_expires is not a date (YYYY-MM-DD): " .. tostring(p.secret_expires))
    else
      credential_end(self, "client secret", t, now, "the client secret's end date (secret_expires) has passed",
        "create a new client secret in the app registration and update the profile",
        "create a new client secret before then and update the profile (and secret_expires)")
    end
  end
  if type(rec) == "table" and type(rec.refresh_token) == "string" then
    any = true
    local at = tonumber(rec.obtained_at)
    if self.settings.provider == "microsoft" and at then
      local idle = now - at
      if idle >= M.MS_REFRESH_IDLE * DAY then
        self:add("credentials", "fail", string.format("refresh token last used %d days ago", days(idle)), {
          cause = "Microsoft expires refresh tokens unused for 90 days (AADSTS700082)",
          fix = "sign in again: oauthmail login" })
      elseif idle >= M.MS_REFRESH_WARN * DAY then
        self:add("credentials", "warn", string.format("refresh token last used %d days ago (dies after 90 unused)",
          days(idle)), { fix = "use the profile (oauthmail token) at least monthly, or sign in again" })
      else
        self:add("credentials", "pass", string.format("refresh token last used %d days ago (dies after 90 unused)",
          days(idle)))
      end
    else
      self:add("credentials", "pass", "refresh token stored" .. (at and (", last refreshed " .. fmt_date(at)) or ""))
    end
  end
  if not any then self:add("credentials", "skip", "no certificate, secret end date or refresh token to check") end
end

-- doctor.run(profile, opts) -> report {ok=, steps={...}, first_failure=}
-- profile: a table or a path (as oauthmail.new takes); opts: {on_step=fn,
-- clock=fn, timeout=seconds}. Never sends mail; never returns a secret.
function M.run(profile, opts)
  opts = opts or {}
  local self = setmetatable({ steps = {}, on_step = opts.on_step, clock = opts.clock or os.time }, Run)
  local oauthmail = require "oauthmail"
  local profile_mod = require "oauthmail.profile"
  local p, perr = profile_mod.load(profile)
  if not p then
    self:fail("profile", perr, "fix the profile file")
    return self:finish()
  end
  local mailer, err = oauthmail.new(p)
  if not mailer then
    self:fail("profile", err, "fix the field the message names (docs/profiles.md)")
    return self:finish()
  end
  local s = mailer.settings
  self.settings, self.ctx = s, s.ctx
  self:add("profile", "pass", string.format("%s, %s flow, user %s, SMTP %s:%d (%s, %s)", s.provider, s.flow,
    s.user, s.smtp.host, s.smtp.port, s.smtp.tls, s.smtp.mechanism))

  local smtp_opts = {}
  for k, v in pairs(s.smtp) do smtp_opts[k] = v end
  smtp_opts.mechanism, smtp_opts.two_step = nil, nil
  if opts.timeout then smtp_opts.timeout = opts.timeout end
  local timeout = smtp_opts.timeout or 30

  -- DNS and TCP: one plain connection (name resolution happens inside it)
  local conn = require "oauthmail.conn"
  local c, cerr = conn.connect { host = s.smtp.host, port = s.smtp.port, tls = "none", timeout = math.min(timeout, 15) }
  local reachable = false
  if c then
    c:close()
    self:add("dns", "pass", s.smtp.host .. " resolves")
    self:add("tcp", "pass", string.format("connected to %s:%d", s.smtp.host, s.smtp.port))
    reachable = true
  elseif cerr.reason == "dns" then
    self:fail("dns", cerr, NET_FIX.dns)
    self:add("tcp", "skip", "no address to connect to")
  else
    self:add("dns", "pass", s.smtp.host .. " resolves")
    self:fail("tcp", cerr, NET_FIX[cerr.reason] or "check smtp.host and smtp.port")
  end

  -- TLS and EHLO: the SMTP greeting, STARTTLS (or TLS from the first byte)
  local session
  if reachable then
    local smtp = require "oauthmail.smtp"
    smtp_opts.trace = opts.trace
    local serr
    session, serr = smtp.open(smtp_opts)
    if not session then
      if serr.kind == "tls" then
        self:fail("tls", serr, tls_fix(serr, s.smtp))
      elseif serr.kind == "network" and serr.reason == "timeout" then
        self:fail("tls", serr, s.smtp.tls == "starttls"
          and "no SMTP greeting: the port may expect TLS from the first byte (465: tls = \"implicit\")"
          or "no answer to the TLS handshake or greeting: check smtp.port and smtp.tls")
      else
        self:fail("ehlo", serr, "the server refused the session: check smtp.host and smtp.port")
      end
      self:add("ehlo", "skip", "no session")
    else
      local ci = session.conn and session.conn.tls_info and session.conn:tls_info()
      local pc = session.conn and session.conn.peer_certificate and session.conn:peer_certificate()
      if ci then
        local left
        local na = pc and require("oauthmail.trace").parse_time(pc.not_after)
        if na then left = days(na - self.clock()) end
        local detail = string.format("%s %s, certificate %s%s", tostring(ci.protocol), tostring(ci.cipher),
          pc and tostring(pc.subject) or "?", left and string.format(", %d days left", left) or "")
        if left and left < M.TLS_WARN_DAYS then
          self:add("tls", "warn", detail, { fix = "the server's certificate ends soon: its administrator must renew it" })
        else
          self:add("tls", "pass", detail, { protocol = ci.protocol, cert_days_left = left })
        end
      else
        self:add("tls", s.smtp.tls == "none" and "warn" or "fail", "no TLS (tls = \"none\")",
          { fix = "use tls = \"starttls\" (587) or \"implicit\" (465): a token must not travel in clear text" })
      end
      local caps = session.capabilities or {}
      local mechs = {}
      for m in pairs(type(caps.AUTH) == "table" and caps.AUTH or {}) do mechs[#mechs + 1] = m end
      table.sort(mechs)
      local flags = {}
      if caps.SIZE then flags[#flags + 1] = "SIZE" .. (type(caps.SIZE) == "number" and ("=" .. caps.SIZE) or "") end
      for _, k in ipairs { "PIPELINING", "CHUNKING", "SMTPUTF8", "8BITMIME" } do
        if caps[k] then flags[#flags + 1] = k end
      end
      local detail = "AUTH " .. (#mechs > 0 and table.concat(mechs, " ") or "(none)") .. "; " .. table.concat(flags, " ")
      local want = s.smtp.mechanism:upper()
      if not has(mechs, want) then
        self:add("ehlo", "fail", detail, { cause = "the server does not offer AUTH " .. want,
          fix = has(mechs, want == "XOAUTH2" and "OAUTHBEARER" or "XOAUTH2")
            and ("set smtp.mechanism = \"" .. (want == "XOAUTH2" and "oauthbearer" or "xoauth2") .. "\"")
            or "this server does not take OAuth2 tokens on this port; check smtp.host/smtp.port (Exchange: "
              .. "SMTP AUTH must be enabled for the mailbox)" })
      else
        self:add("ehlo", "pass", detail, { auth = mechs })
      end
    end
  else
    self:add("tls", "skip", "not connected")
    self:add("ehlo", "skip", "not connected")
  end

  -- token: from the store, by refresh, or by the flow — which one, said
  local how = "memory"
  local mgr = mailer.tokens
  local own_trace = mgr.trace_fn
  mgr.trace_fn = function(ev)
    if ev.event == "from_store" then how = "from the store"
    elseif ev.event == "refresh" then how = "refreshed"
    elseif ev.event == "run_flow" then how = "from the " .. tostring(ev.grant) .. " flow" end
    if own_trace then own_trace(ev) end
  end
  local tok, terr = mgr:get()
  mgr.trace_fn = own_trace
  if not tok then
    self:fail("token", terr, nil)
    self:add("claims", "skip", "no token")
  else
    local left = tok.expires_at and (tok.expires_at - self.clock())
    self:add("token", "pass", how .. (left and string.format(", expires in %d min", math.floor(left / 60)) or ""),
      { source = how })
    self:check_claims(tok)
  end

  -- AUTH with the token, then RSET and QUIT
  if session and tok and self.steps[#self.steps].verdict ~= "fail" and not self.first_failure then
    local ok, aerr = session:auth { mechanism = s.smtp.mechanism, user = s.user, token = tok.access_token,
      two_step = s.smtp.two_step }
    if ok then
      self:add("auth", "pass", string.format("AUTH %s as %s accepted (235)", s.smtp.mechanism:upper(), s.user))
      pcall(session.reset, session)
    else
      self:fail("auth", aerr)
    end
  else
    self:add("auth", "skip", session and "an earlier step failed" or "no SMTP session")
  end
  if session then session:close() end

  local rec = mgr.store:load(mgr.key)
  self:credential_life(p, rec)
  mailer:close()
  return self:finish()
end

function Run:finish()
  local ok = self.first_failure == nil
  return { ok = ok, steps = self.steps, first_failure = self.first_failure }
end

M.errors = errors
return M
