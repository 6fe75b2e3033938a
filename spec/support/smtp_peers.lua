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
  function t:send(s)
    assert(not t.closed, "send on a closed fake transport")
    t.writes[#t.writes + 1] = s
    pending = pending .. s
    advance()
    return true
  end
  function t:receive_some()
    local step = script[t.pos]
    if not step then return nil, errors.new("network", "connection closed by the fake server", { reason = "closed" }) end
    if step[1] == "S" then
      t.pos = t.pos + 1
      return step[2]
    end
    return nil, errors.new("network", "timed out: the fake server waits for " .. show(step[2] or step[1]),
      { reason = "timeout" })
  end
  function t:starttls()
    local step = script[t.pos]
    if not step or step[1] ~= "TLS" then error("fake server: unexpected STARTTLS handshake at step " .. t.pos, 0) end
    t.pos = t.pos + 1
    t.tls = true
    return true
  end
  function t:close() t.closed = true end
  function t.done() return t.pos > #script end
  function t.transcript() return table.concat(t.writes) end
  return t
end

-- The npm smtp-server peer. opts: {token=, tls="starttls"|"implicit"|"none",
-- starttls=false, auth={"XOAUTH2"}, reject={"addr"}, size=, two_step_only=}
function M.node_smtp(opts)
  local certs = require("spec.support.certs").get()
  local dir = h.tmpdir()
  local cfg = {
    port = 0, tls = opts.tls or "starttls", cert = certs.server.cert, key = certs.server.key,
    token = opts.token, user = opts.user or "alice@example.org",
    auth = opts.auth or { "XOAUTH2", "PLAIN", "LOGIN" }, reject = opts.reject or {},
    hide_starttls = opts.hide_starttls or false, size = opts.size or 0,
    max_auth_line = opts.max_auth_line or 0, spool = dir .. "/spool.jsonl",
    password = opts.password,
  }
  local json = require "cjson"
  h.write_file(dir .. "/config.json", json.encode(cfg))
  local proc = h.spawn("node " .. h.quote(h.peers .. "/smtp.mjs") .. " " .. h.quote(dir .. "/config.json"),
    { ready = "listening on (%d+)", cwd = h.peers, timeout = 20 })
  proc.port = tonumber(proc.match[1])
  proc.ca = certs.ca
  proc.spool = cfg.spool
  -- messages the server accepted, as {from=, to={}, data=}
  function proc.messages()
    local out = {}
    for line in (h.read_file(cfg.spool) or ""):gmatch("[^\n]+") do out[#out + 1] = json.decode(line) end
    return out
  end
  return proc
end

return M
