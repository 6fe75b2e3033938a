-- oauthmail.message — RFC 5322 / MIME messages for the mailer: composed from
-- a table (addresses, subject, text, html, attachments, inline parts,
-- headers) or taken from raw text or a file (sendmail-style). A message is a
-- list of segments — strings, base64-encoded files or data, a raw file body —
-- so its size is known without building it and big files are streamed in
-- bounded chunks, identically on every m:reader() call. See docs/message.md.
-- The parts: message/compose.lua, message/raw.lua, message/reader.lua (the
-- object), message/types.lua, message/address.lua, message/encode.lua.
local errors = require "oauthmail.errors"
local encode = require "oauthmail.message.encode"
local address = require "oauthmail.message.address"
local common = require "oauthmail.message.common"
local compose = require "oauthmail.message.compose"
local from_raw = require "oauthmail.message.raw"

local M = {}

M._date = common.rfc5322_date
M.content_types = require("oauthmail.message.types").TYPES
M.Message = require("oauthmail.message.reader").Message

-- message.compose(tbl [, opts]) -> m | nil, err
function M.compose(tbl, opts)
  return common.guarded(compose, tbl, opts)
end

-- message.from_raw(text | {path=} [, {from=, to=, now=, hostname=}]) -> m | nil, err
function M.from_raw(src, opts)
  return common.guarded(from_raw, src, opts)
end

-- message.id_pool(n) -> ids: a source for opts.ids that draws the random
-- bytes of n ids at once (one batch of messages; never kept across a fork)
function M.id_pool(n)
  if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then error("message.id_pool: n must be a positive whole number", 2) end
  return common.id_pool(n)
end

-- message.parse_address(s) -> {name=, address=} | nil, err
function M.parse_address(s)
  if type(s) ~= "string" then error("message.parse_address: expected a string", 2) end
  local mb, why = address.parse(s)
  if not mb then return errors.fail("config", why, { reason = "address" }) end
  return mb
end

-- message.encode_header(s [, used]) -> RFC 2047 encoded, folded value
function M.encode_header(s, used)
  if type(s) ~= "string" then error("message.encode_header: expected a string", 2) end
  if used ~= nil and type(used) ~= "number" then error("message.encode_header: used must be a number", 2) end
  if s:find("[\r\n]") then return errors.fail("config", "header value contains a line break", { reason = "line_break" }) end
  if not encode.valid_utf8(s) then return errors.fail("config", "header value is not valid UTF-8", { reason = "utf8" }) end
  return encode.encode_header(s, used)
end

return M
