-- oauthmail sendmail — a sendmail-compatible entry point (cron, git
-- send-email, mutt, PHP's mail(), logwatch): the message on stdin, recipients
-- as arguments or from its headers (-t), the usual flags; silent on success,
-- the reason on stderr and an exit code from sysexits.h otherwise (75 when
-- trying later may help, so the caller queues and retries).
local common = require "oauthmail.cli.common"
local deliver = require "oauthmail.cli.deliver"

local M = {}
local EX = common.EX

M.HELP = [[
usage: oauthmail sendmail [--profile NAME] [--trace FILE] [--quiet] [--queue] [-t] [-i|-oi] [-f SENDER]
                          [-F NAME] [other sendmail flags] [--] [RECIPIENT...]
Reads a message on stdin and sends it through the profile's mailbox.
  --queue       when sending fails for now (what would exit 75: the server or the network is
                down, a 4xx), keep the message in the profile's spool and exit 0;
                `oauthmail queue run` (cron) delivers it later, once
  -t            recipients from the To, Cc and Bcc headers (Bcc is removed), plus any given
  -f, -r ADDR   envelope sender (default: the profile's from, else user)
  -F NAME       full name for the From header, when the message has none
  -i, -oi       a line with a single '.' does not end the message
  ignored (as other sendmail replacements do): -B -C -h -L -N -O -R -V -X (with a value),
  -bm -d* -G -m -n -o* -U -v
  refused (exit 64): -bs -bp -bq -bv -bd -bi -q
Exit codes: 0 sent; 64 usage; 65 bad message; 66 no input; 69 refused for good; 75 temporary,
try again later; 77 sign-in needed or refused; 78 profile/configuration.
]]

-- Flags that take a value (as the next argument or glued: -fme@x).
local WITH_VALUE = { f = "from", r = "from", F = "fullname", B = true, C = true, h = true, L = true,
  N = true, O = true, R = true, V = true, X = true, p = true }
-- Flags without a value that change nothing here.
local IGNORED = { G = true, m = true, n = true, U = true, v = true, d = true }
local REFUSED_B = { s = "-bs (SMTP on stdin)", p = "-bp (queue listing)", q = "-bq", v = "-bv (verify)",
  d = "-bd (daemon)", i = "-bi (aliases)", h = "-bh", H = "-bH", P = "-bP" }

-- sendmail.parse(argv) -> opts, recipients | nil, message
function M.parse(argv)
  local opts, rcpt = {}, {}
  local i = 1
  local function value(rest, flag)
    if rest ~= "" then return rest end
    i = i + 1
    if argv[i] == nil then return nil, "option -" .. flag .. " needs a value" end
    return argv[i]
  end
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do rcpt[#rcpt + 1] = argv[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, v = a:match("^%-%-([%w%-]+)=(.*)$")
      name = name or a:sub(3)
      if name == "profile" or name == "trace" then
        if v == nil then
          i = i + 1
          v = argv[i]
          if v == nil then return nil, "option --" .. name .. " needs a value" end
        end
        opts[name] = v
      elseif name == "quiet" or name == "help" or name == "queue" then
        opts[name] = true
      else
        return nil, "unknown option " .. a
      end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      local flag, rest = a:sub(2, 2), a:sub(3)
      if flag == "b" then
        if REFUSED_B[rest] then return nil, REFUSED_B[rest] .. " is not supported" end
        if rest ~= "m" then return nil, "-b" .. rest .. " is not supported" end
      elseif flag == "q" then
        return nil, "-q (queue runs) is not supported: messages are sent at once"
      elseif flag == "o" then
        if rest == "i" or rest == "I" then opts.ignore_dots = true end
        -- -oem, -odb, -oQ... are ignored; none takes a separate value
      elseif WITH_VALUE[flag] then
        local v, verr = value(rest, flag)
        if not v then return nil, verr end
        if WITH_VALUE[flag] ~= true then opts[WITH_VALUE[flag]] = v end
      elseif flag == "t" or flag == "i" or IGNORED[flag] then
        -- a cluster of value-less flags: -ti, -it, -tv
        for c in a:sub(2):gmatch(".") do
          if c == "t" then opts.headers = true
          elseif c == "i" then opts.ignore_dots = true
          elseif not IGNORED[c] then
            if flag == "d" then break end   -- -d debug levels carry digits
            return nil, "unknown option -" .. c .. " in " .. a
          end
        end
      else
        return nil, "unknown option " .. a
      end
    else
      rcpt[#rcpt + 1] = a
    end
    i = i + 1
  end
  return opts, rcpt
end

-- The message on stdin; without -i a line holding only '.' ends it.
local function read_stdin(ignore_dots)
  local data = io.stdin:read("*a")
  if data == nil then return nil end
  if not ignore_dots then
    local s = data:find("\n%.\r?\n") or (data:match("^%.\r?\n") and 0)
    if s then data = data:sub(1, s) end
  end
  return data
end

local function quote_name(name)
  if name:match("^[%w !#$%%&'*+/=?^_`{|}~%-]+$") then return name end
  return '"' .. name:gsub('[\\"]', "\\%0") .. '"'
end

-- --queue: the message as composed (Bcc gone, Date and Message-ID set) goes
-- durably into the profile's spool, the outbox `oauthmail queue` reads.
function M.queue(ctx, opts, m, why)
  local text, rerr = m:tostring()
  if not text then common.report(rerr) return EX.TEMPFAIL end
  local ob, oerr = require("oauthmail.cli.queue").open(ctx, {})
  if not ob then
    common.report(why)
    common.report(oerr)
    return EX.TEMPFAIL
  end
  local id, qerr = ob:enqueue { raw = text, from = m.envelope.from, to = m.envelope.to }
  ob:close()
  if not id then
    common.report(why)
    common.report(qerr)
    return EX.TEMPFAIL
  end
  ctx:event { type = "cli", event = "queued", id = id, reason = why and why.message }
  if not opts.quiet then
    io.stderr:write("oauthmail sendmail: not sent now (", tostring(why and why.message), "); queued as ", id,
      " for `oauthmail queue run`\n")
  end
  return 0
end

function M.run(ctx, opts, rcpt)
  local raw = read_stdin(opts.ignore_dots)
  if raw == nil or raw == "" then
    io.stderr:write("oauthmail sendmail: no message on stdin\n")
    return EX.NOINPUT
  end
  if not opts.headers and #rcpt == 0 then
    io.stderr:write("oauthmail sendmail: no recipients: give them as arguments or use -t\n")
    return EX.USAGE
  end
  local mailer, err = deliver.mailer(ctx)
  if not mailer then common.report(err) return common.exit_code(err) end
  local sender = opts.from or mailer.settings.from
  local head = raw:match("^(.-)\r?\n\r?\n") or raw
  if not (("\n" .. head):find("\n[Ff][Rr][Oo][Mm]%s*:")) then
    local from = sender
    if opts.fullname then
      if opts.fullname:find("[\r\n]") then
        io.stderr:write("oauthmail sendmail: -F: the name contains a line break\n")
        return EX.USAGE
      end
      local name = opts.fullname
      if name:find("[\128-\255]") then
        local enc, eerr = require("oauthmail.message").encode_header(name)
        if not enc then common.report(eerr) return EX.DATAERR end
        name = enc
      else
        name = quote_name(name)
      end
      from = name .. " <" .. sender .. ">"
    end
    raw = "From: " .. from .. "\r\n" .. raw
  end
  local message = require "oauthmail.message"
  local m
  m, err = message.from_raw(raw, { from = sender, to = (not opts.headers) and rcpt or nil })
  if not m then common.report(err) return EX.DATAERR end
  if opts.headers and #rcpt > 0 then
    local have = {}
    for _, a in ipairs(m.envelope.to) do have[a:lower()] = true end
    for _, a in ipairs(rcpt) do
      if not have[a:lower()] then
        m.envelope.to[#m.envelope.to + 1] = a
        have[a:lower()] = true
      end
    end
  end
  ctx:event { type = "cli", event = "sendmail", recipients = #m.envelope.to, size = m:size(),
    from_headers = opts.headers == true }
  local receipt
  receipt, err = deliver.send(ctx, mailer, m)
  if not receipt then
    local code = common.exit_code(err)
    if opts.queue and code == EX.TEMPFAIL then return M.queue(ctx, opts, m, err) end
    common.report(err)
    return code
  end
  return 0
end

return M
