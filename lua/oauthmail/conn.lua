-- oauthmail.conn — TCP and TLS connections, client and loopback server side.
-- The mechanics live in csrc/conn.c; this module is its documented face.
-- See docs/conn.md for every option and error.
local core = require "oauthmail.core"
require "oauthmail.errors"  -- gives core errors their __tostring

local M = {}

-- conn.connect{host=, port=, tls="none"|"implicit", timeout=10, ca_file=, ca_path=,
--   verify=true, min_tls="1.2", client_cert=, client_key=, servername=} -> conn | nil, err
M.connect = core.conn.connect

-- conn.listen{host="127.0.0.1", port=0, backlog=64, tls={cert=, key=, min_tls=}} -> listener | nil, err
M.listen = core.conn.listen

return M
