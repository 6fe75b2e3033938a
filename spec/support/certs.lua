-- spec/support/certs.lua — a test PKI made at run time with the openssl
-- command: a CA, leaf certificates for loopback, and the broken ones the TLS
-- tests need (expired, wrong host, self-signed). Nothing here is committed.
local h = require "spec.support.helpers"

local M = {}
local cache

local function run(cmd)
  local ok, out = h.exec(cmd)
  if not ok then error("openssl failed: " .. cmd .. "\n" .. out, 2) end
  return out
end

local CA_CONF = [[
[ ca ]
default_ca = testca
[ testca ]
dir = %s
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
default_md = sha256
policy = anything
copy_extensions = copy
unique_subject = no
[ anything ]
commonName = supplied
]]

-- Issue a leaf signed by the CA: name, cn, sans ("DNS:a,IP:127.0.0.1"),
-- startdate/enddate (YYYYMMDDHHMMSSZ), key ("rsa" or "ec"), client (bool).
local function issue(d, o)
  local key = d .. "/" .. o.name .. ".key"
  local csr = d .. "/" .. o.name .. ".csr"
  local crt = d .. "/" .. o.name .. ".crt"
  local ext = d .. "/" .. o.name .. ".ext"
  if o.key == "ec" then
    run("openssl ecparam -name prime256v1 -genkey -noout -out " .. key)
  else
    run("openssl genrsa -out " .. key .. " 2048")
  end
  h.write_file(ext, table.concat({
    "basicConstraints=CA:FALSE",
    o.sans and ("subjectAltName=" .. o.sans) or "",
    o.client and "extendedKeyUsage=clientAuth" or "extendedKeyUsage=serverAuth,clientAuth",
  }, "\n") .. "\n")
  run(string.format("openssl req -new -key %s -subj '/CN=%s' -out %s", key, o.cn, csr))
  run(string.format("openssl ca -batch -notext -config %s/ca.cnf -cert %s/ca.crt -keyfile %s/ca.key -in %s -out %s -extfile %s %s",
    d, d, d, csr, crt, ext,
    o.startdate and ("-startdate " .. o.startdate .. " -enddate " .. o.enddate) or "-days 30"))
  return { cert = crt, key = key, name = o.name }
end

-- certs.get() -> table of paths, made once per Lua process:
--   ca (file), server (localhost, 127.0.0.1, ::1), ec_server, expired (notAfter 2026-01-01),
--   wronghost (mail.example.org), selfsigned, client, other_ca (an unrelated CA)
function M.get()
  if cache then return cache end
  local d = h.tmpdir()
  h.write_file(d .. "/ca.cnf", CA_CONF:format(d))
  h.write_file(d .. "/index.txt", "")
  h.write_file(d .. "/serial", "1000\n")
  run("mkdir -p " .. d .. "/newcerts")
  run("openssl req -x509 -newkey rsa:2048 -nodes -keyout " .. d .. "/ca.key -out " .. d ..
      "/ca.crt -days 30 -subj '/CN=oauthmail test CA'" ..
      " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign")
  local c = { dir = d, ca = d .. "/ca.crt", ca_key = d .. "/ca.key" }
  c.server = issue(d, { name = "server", cn = "localhost", sans = "DNS:localhost,IP:127.0.0.1,IP:::1" })
  c.ec_server = issue(d, { name = "ec_server", cn = "localhost", sans = "DNS:localhost,IP:127.0.0.1", key = "ec" })
  c.expired = issue(d, { name = "expired", cn = "localhost", sans = "DNS:localhost,IP:127.0.0.1",
                         startdate = "20250101000000Z", enddate = "20260101000000Z" })
  c.wronghost = issue(d, { name = "wronghost", cn = "mail.example.org", sans = "DNS:mail.example.org" })
  c.client = issue(d, { name = "client", cn = "oauthmail test client", client = true })
  c.selfsigned = { cert = d .. "/selfsigned.crt", key = d .. "/selfsigned.key" }
  run("openssl req -x509 -newkey rsa:2048 -nodes -keyout " .. c.selfsigned.key .. " -out " ..
      c.selfsigned.cert .. " -days 30 -subj '/CN=localhost' -addext subjectAltName=DNS:localhost,IP:127.0.0.1")
  cache = c
  return c
end

return M
