-- spec/support/smtp_peers.lua — what the SMTP specs talk to: a scripted fake
-- transport that checks every byte the client writes (curl's test9xx idea,
-- without sockets), and the real servers started on loopback: the npm
-- smtp-server (spec/peers/smtp.mjs) and Dovecot's submission service.
local h = require "spec.support.helpers"
local errors = require "oauthmail.errors"

local M = {}

local function show(s)
  return (s:gsub("\r", "\\r"):gsub("\n", "\\n\n"):gsub("%z", "\\0"):gsub("\1", "^A"))
end

-- fake(script): script is a list of {"S", bytes} (the server says), {"C", bytes}
-- (the client must write exactly this next) and {"TLS"} (the client upgrades).
-- The server only speaks once everything before its line was written, so a
-- client that waits for a reply it should not wait for fails with a timeout,
-- and one that writes something else fails at once.
function M.fake(script)
  local t = { writes = {}, pos = 1, closed = false, tls = false }
  local pending = ""
  local function advance()
    while script[t.pos] and script[t.pos][1] == "C" do
      local want = script[t.pos][2]
      local n = math.min(#want, #pending)
      if pending:sub(1, n) ~= want:sub(1, n) then
        error("fake server: at step " .. t.pos .. " the client wrote\n" .. show(pending) ..
          "\nbut should have written\n" .. show(want), 0)
      end
      if #pending < #want then return end
      pending = pending:sub(#want + 1)
      t.pos = t.pos + 1
    end
    if #pending > 0 then
      error("fake server: unexpected bytes from the client at step " .. t.pos .. ":\n" .. show(pending), 0)
    end
  end
  function t.send(_, s)
    assert(not t.closed, "send on a closed fake transport")
    t.writes[#t.writes + 1] = s
    pending = pending .. s
    advance()
    return true
  end
  function t.receive_some()
    local step = script[t.pos]
    if not step then return nil, errors.new("network", "connection closed by the fake server", { reason = "closed" }) end
    if step[1] == "S" then
      t.pos = t.pos + 1
      return step[2]
    end
    return nil, errors.new("network", "timed out: the fake server waits for " .. show(step[2] or step[1]),
      { reason = "timeout" })
  end
  function t.starttls()
    local step = script[t.pos]
    if not step or step[1] ~= "TLS" then error("fake server: unexpected STARTTLS handshake at step " .. t.pos, 0) end
    t.pos = t.pos + 1
    t.tls = true
    return true
  end
  function t.close() t.closed = true end
  function t.done() return t.pos > #script end
  function t.transcript() return table.concat(t.writes) end
  return t
end

-- The npm smtp-server peer. opts: {token=, tls="starttls"|"implicit"|"none",
-- starttls=false, auth={"XOAUTH2"}, reject={"addr"}, size=, two_step_only=,
-- crash_in_data=true (the server kills itself once a message body starts)}
function M.node_smtp(opts)
  local certs = require("spec.support.certs").get()
  local dir = h.tmpdir()
  local cfg = {
    port = opts.port or 0, tls = opts.tls or "starttls", cert = certs.server.cert, key = certs.server.key,
    token = opts.token, user = opts.user or "alice@example.org",
    auth = opts.auth or { "XOAUTH2", "PLAIN", "LOGIN" }, reject = opts.reject or {},
    hide_starttls = opts.hide_starttls or false, size = opts.size or 0,
    max_auth_line = opts.max_auth_line or 0, spool = dir .. "/spool.jsonl",
    password = opts.password, introspect = opts.introspect or false,
    auth_optional = opts.auth_optional or false, crash_in_data = opts.crash_in_data or false,
    tokens = opts.tokens, data_delay_ms = opts.data_delay_ms, max_connections = opts.max_connections,
    stats = dir .. "/stats.json",
  }
  local json = require "cjson"
  h.write_file(dir .. "/config.json", json.encode(cfg))
  local proc = h.spawn("node " .. h.quote(h.peers .. "/smtp.mjs") .. " " .. h.quote(dir .. "/config.json"),
    { ready = opts.introspect and "introspection on (%d+).-listening on (%d+)" or "listening on (%d+)",
      cwd = h.peers, timeout = 60 })
  proc.port = tonumber(proc.match[#proc.match])
  proc.introspect_port = opts.introspect and tonumber(proc.match[1])
  proc.ca = certs.ca
  proc.spool = cfg.spool
  -- {connections=, current=, max_concurrent=, refused=} counted by the server
  function proc.stats()
    local text = h.read_file(cfg.stats)
    if not text or text == "" then return { connections = 0, current = 0, max_concurrent = 0, refused = 0 } end
    return json.decode(text)
  end
  -- messages the server accepted, as {from=, to={}, data=}
  function proc.messages()
    local out = {}
    for line in (h.read_file(cfg.spool) or ""):gmatch("[^\n]+") do out[#out + 1] = json.decode(line) end
    return out
  end
  return proc
end

function M.have_dovecot()
  return (h.exec("test -x /usr/sbin/dovecot && test -d /usr/lib/dovecot/modules"))
end

-- Dovecot's submission service with passdb oauth2 (XOAUTH2 and OAUTHBEARER),
-- its token introspection endpoint and its relay sink (both smtp.mjs).
-- Returns {port= (STARTTLS), tls_port= (implicit), sink=, ca=, stop()}.
function M.dovecot(opts)
  local certs = require("spec.support.certs").get()
  local sink = M.node_smtp { tls = "none", token = opts.token, user = opts.user, auth = {},
    introspect = true, auth_optional = true }
  local dir = h.tmpdir()
  -- the mail processes run as the dovecot user: their home must be reachable
  local _, made = h.exec("mktemp -d /tmp/oauthmail-dovecot-home.XXXXXX")
  local home = made:match("[^\n]+")
  h.exec("chmod 755 " .. h.quote(home) .. " && chown dovecot:dovecot " .. h.quote(home) ..
    " && mkdir -p " .. h.quote(dir .. "/run") .. " " .. h.quote(dir .. "/state"))
  local subst = {
    DIR = dir, HOME = home, CERT = certs.server.cert, KEY = certs.server.key, SINK_PORT = sink.port,
    PORT = h.free_port(), TLS_PORT = h.free_port(), INTROSPECT_PORT = sink.introspect_port,
  }
  local function render(name, out)
    local text = assert(h.read_file(h.root .. "/spec/support/" .. name))
    text = text:gsub("@([%u_]+)@", function(k) return tostring(assert(subst[k], k)) end)
    h.write_file(out, text)
  end
  render("dovecot.conf.in", dir .. "/dovecot.conf")
  render("dovecot-oauth2.conf.ext.in", dir .. "/dovecot-oauth2.conf.ext")
  local proc = h.spawn("/usr/sbin/dovecot -F -c " .. h.quote(dir .. "/dovecot.conf"),
    { ready = "(starting up)", timeout = 60 })
  h.wait_port(subst.PORT)
  proc.port, proc.tls_port, proc.sink, proc.ca = subst.PORT, subst.TLS_PORT, sink, certs.ca
  local stop = proc.stop
  function proc.stop()
    stop()
    sink.stop()
    h.exec("rm -rf " .. h.quote(home))
  end
  return proc
end

return M
