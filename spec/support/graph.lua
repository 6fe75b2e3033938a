-- spec/support/graph.lua — start the Graph sendMail peer (spec/peers/graph.mjs)
-- over HTTPS with the test CA, its tokens checked against a running
-- oidc-provider's JWKS, and drive its control routes.
local cjson = require "cjson"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"
local crypto = require "oauthmail.crypto"

local M = {}

-- the resource the oidc-provider issues Graph-audience tokens for (spec/peers/oidc.mjs)
M.AUDIENCE = "https://graph.oauthmail.test"
M.SCOPE = "Mail.Send"

-- graph.start{issuer=, user=} -> {url, port, ca, faults(list), clear(), stats(), messages(), stop()}
function M.start(opts)
  local c = certs.get()
  local dir = h.tmpdir()
  h.write_file(dir .. "/graph.json", cjson.encode {
    cert = c.server.cert, key = c.server.key, ca = c.ca, jwks_uri = opts.issuer .. "/jwks",
    audience = M.AUDIENCE, scope = M.SCOPE, user = opts.user,
  })
  local proc = h.spawn("node " .. h.quote(h.peers .. "/graph.mjs") .. " " .. h.quote(dir .. "/graph.json"), {
    cwd = h.peers, ready = "GRAPH READY (https://127%.0%.0%.1:(%d+))", timeout = 60,
  })
  local g = { proc = proc, ca = c.ca, url = proc.match[1], port = tonumber(proc.match[2]) }
  local function req(method, path, body)
    return h.http_json({ port = g.port, ca_file = c.ca }, method, path, body)
  end
  function g.stop() proc.stop() end
  function g.faults(list) assert(req("POST", "/_faults", { faults = list }) == 200) end
  function g.clear()
    req("DELETE", "/_faults")
    req("DELETE", "/_messages")
  end
  function g.slow(ms) assert(req("POST", "/_slow", { ms = ms }) == 200) end
  function g.stats()
    local status, doc = req("GET", "/_stats")
    assert(status == 200, "graph peer stats")
    return doc
  end
  -- accepted (and dropped) messages, with their exact bytes in data
  function g.messages()
    local out = {}
    for _, m in ipairs(g.stats().messages) do
      m.data = crypto.b64decode(m.b64)
      out[#out + 1] = m
    end
    return out
  end
  return g
end

return M
