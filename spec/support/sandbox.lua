-- spec/support/sandbox.lua — start the project's sandbox (spec/peers/sandbox.mjs,
-- a real smtp-server with Microsoft-style replies and fault switches) and
-- drive its control routes: queue faults, add accepted tokens, read counters
-- and the messages it delivered to its maildir.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"

local M = {}

-- One HTTP/1.0 exchange with the plain-HTTP control port.
local function request(port, method, path, body)
  return h.http_json({ port = port }, method, path, body)
end

-- sandbox.start{user=, tokens={...}, jwks_uri=, ca=, tls="starttls", maildir=}
-- -> {port, control_port, ca, maildir, faults(list), clear(), tokens(list), stats(), messages(), stop()}
function M.start(opts)
  opts = opts or {}
  local c = certs.get()
  local dir = h.tmpdir()
  local cfg = {
    port = 0, tls = opts.tls or "starttls", cert = c.server.cert, key = c.server.key,
    maildir = opts.maildir or (dir .. "/mail"), user = opts.user, tokens = opts.tokens or {},
    jwks_uri = opts.jwks_uri, ca = opts.ca or c.ca,
  }
  h.write_file(dir .. "/sandbox.json", cjson.encode(cfg))
  local proc = h.spawn("node " .. h.quote(h.peers .. "/sandbox.mjs") .. " " .. h.quote(dir .. "/sandbox.json"), {
    cwd = h.peers, ready = "SANDBOX READY smtp=(%d+) control=(%d+)", timeout = 60,
  })
  local sb = { proc = proc, ca = c.ca, maildir = cfg.maildir }
  sb.port = tonumber(proc.match[1])
  sb.control_port = tonumber(proc.match[2])
  function sb.stop() proc.stop() end
  function sb.faults(list)
    local status = request(sb.control_port, "POST", "/faults", { faults = list })
    assert(status == 200, "sandbox refused the faults")
  end
  function sb.clear() request(sb.control_port, "DELETE", "/faults") end
  function sb.tokens(list)
    assert(request(sb.control_port, "POST", "/tokens", { tokens = list }) == 200)
  end
  function sb.stats()
    local status, doc = request(sb.control_port, "GET", "/stats")
    assert(status == 200)
    return doc
  end
  -- delivered messages: {n, file, from, to, size, message_id, user, token, data}
  function sb.messages() return h.maildir_messages(sb.maildir) end
  -- SMTP settings for a profile pointing at this sandbox
  function sb.smtp(extra)
    local t = { host = "127.0.0.1", port = sb.port, tls = cfg.tls, ca_file = c.ca,
      timeout = 10 }
    for k, v in pairs(extra or {}) do t[k] = v end
    return t
  end
  return sb
end

return M
