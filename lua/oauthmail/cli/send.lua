-- oauthmail send — compose a message from arguments and send it through the
-- profile's mailbox; the receipt on stdout (--json for scripts).
local common = require "oauthmail.cli.common"
local deliver = require "oauthmail.cli.deliver"

local M = {}

M.OPTIONS = {
  to = { arg = true, multi = true }, cc = { arg = true, multi = true }, bcc = { arg = true, multi = true },
  from = { arg = true }, subject = { arg = true }, text = { arg = true }, text_file = { arg = true },
  html_file = { arg = true }, attach = { arg = true, multi = true }, header = { arg = true, multi = true },
  json = {},
}
M.HELP = [[
usage: oauthmail send --profile NAME --to ADDR [--to ADDR...] [--cc ADDR...] [--bcc ADDR...]
         [--from ADDR] [--subject TEXT] [--text TEXT | --text-file FILE] [--html-file FILE]
         [--attach FILE...] [--header 'Name: value'...] [--json] [--trace FILE] [--quiet]
Composes the message (MIME, attachments streamed from disk), sends it, prints the receipt.
Exit 0 when the server accepted it; 75 when trying later may help; 69, 77 or 78 otherwise.
]]

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

function M.run(ctx, opts, pos)
  if #pos > 0 then
    io.stderr:write("oauthmail send: unexpected argument '", pos[1], "' (recipients go in --to)\n")
    return common.EX.USAGE
  end
  if not (opts.to or opts.cc or opts.bcc) then
    io.stderr:write("oauthmail send: no recipient: give --to, --cc or --bcc\n")
    return common.EX.USAGE
  end
  local msg = { to = opts.to, cc = opts.cc, bcc = opts.bcc, from = opts.from, subject = opts.subject or "" }
  if opts.text and opts.text_file then
    io.stderr:write("oauthmail send: give --text or --text-file, not both\n")
    return common.EX.USAGE
  end
  msg.text = opts.text
  if opts.text_file then
    local s, e = read_file(opts.text_file)
    if not s then io.stderr:write("oauthmail send: ", tostring(e), "\n") return common.EX.NOINPUT end
    msg.text = s
  end
  if opts.html_file then
    local s, e = read_file(opts.html_file)
    if not s then io.stderr:write("oauthmail send: ", tostring(e), "\n") return common.EX.NOINPUT end
    msg.html = s
  end
  if msg.text == nil and msg.html == nil then msg.text = "" end
  if opts.attach then
    msg.attachments = {}
    for _, path in ipairs(opts.attach) do
      local f = io.open(path, "rb")
      if not f then io.stderr:write("oauthmail send: cannot read attachment ", path, "\n") return common.EX.NOINPUT end
      f:close()
      msg.attachments[#msg.attachments + 1] = { path = path }
    end
  end
  if opts.header then
    msg.headers = {}
    for _, h in ipairs(opts.header) do
      local name, value = h:match("^([%w%-]+):%s*(.*)$")
      if not name then io.stderr:write("oauthmail send: --header wants 'Name: value', got '", h, "'\n") return common.EX.USAGE end
      msg.headers[#msg.headers + 1] = { name, value }
    end
  end
  local mailer, err = deliver.mailer(ctx)
  if not mailer then common.report(err) return common.exit_code(err) end
  -- composed here (not inside send) so a big one can report its upload;
  -- a profile's before_send hook still gets the plain table it expects
  local m = msg
  if not mailer.hooks.before_send then
    msg.from = msg.from or mailer.settings.from
    m, err = require("oauthmail.message").compose(msg)
    if not m then common.report(err) mailer:close() return common.exit_code(err) end
  end
  local receipt
  receipt, err = deliver.send(ctx, mailer, m)
  if not receipt then common.report(err) return common.exit_code(err) end
  if opts.json then
    local cjson = require "cjson"
    local doc = { message_id = receipt.message_id, accepted = receipt.accepted, rejected = receipt.rejected,
      attempts = receipt.attempts, reply = receipt.reply }
    if #receipt.rejected == 0 then doc.rejected = cjson.empty_array end
    io.stdout:write((cjson.encode(doc):gsub("\\/", "/")), "\n")
  else
    io.stdout:write(string.format("sent <%s> to %s (%d attempt%s): %s %s\n", tostring(receipt.message_id),
      table.concat(receipt.accepted, ", "), receipt.attempts, receipt.attempts == 1 and "" or "s",
      tostring(receipt.reply.code), tostring(receipt.reply.text or "")))
    for _, r in ipairs(receipt.rejected) do
      io.stdout:write(string.format("rejected %s: %s %s\n", r.address, tostring(r.code), tostring(r.text or "")))
    end
  end
  return 0
end

return M
