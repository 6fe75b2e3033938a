-- oauthmail.message: exact bytes for a simple message, MIME structures,
-- RFC 2047/2231/2045 encodings decoded back by the test, refusals of CR/LF
-- injection, restartable streamed readers with bounded memory, from_raw, and
-- an independent parse of the output by Python's email package.
local message = require "oauthmail.message"
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local smtp = require "oauthmail.smtp"
local cjson = require "cjson"
local h = require "spec.support.helpers"
local peers = require "spec.support.smtp_peers"

local OPTS = { now = 1751371200, hostname = "mail.example.org", boundary_seed = "spec" }
local PYTHON = "/usr/bin/python3"

-- ----------------------------------------------------------- decoders

local function lines(s)
  local t = {}
  for l in (s .. "\r\n"):gmatch("(.-)\r\n") do t[#t + 1] = l end
  if t[#t] == "" then t[#t] = nil end
  return t
end

local function header_section(s)
  return s:sub(1, (s:find("\r\n\r\n", 1, true)))
end

-- the unfolded value of the first header `name`
local function header(s, name)
  local hs = header_section(s):gsub("\r\n[ \t]", " ")
  for l in hs:gmatch("[^\r\n]+") do
    local n, v = l:match("^([^:]+):%s*(.*)$")
    if n and n:lower() == name:lower() then return v end
  end
end

local function hexbyte(x) return string.char(tonumber(x, 16)) end

-- RFC 2047, independently of the module: encoded-words separated only by
-- white space are joined without it.
local function decode_2047(v)
  v = v:gsub("(%?=)%s+(=%?)", "%1%2")
  return (v:gsub("=%?([^?]+)%?([BbQq])%?([^?]*)%?=", function(cs, enc, text)
    assert(cs:upper() == "UTF-8", "charset " .. cs)
    if enc:upper() == "B" then return assert(crypto.b64decode(text)) end
    return (text:gsub("_", " "):gsub("=(%x%x)", hexbyte))
  end))
end

local function decode_qp(s)
  return (s:gsub("=\r\n", ""):gsub("=(%x%x)", hexbyte))
end

local function crlf(s) return (s:gsub("\r\n", "\n"):gsub("\n", "\r\n")) end

local function read_all(r)
  local t = {}
  while true do
    local c, err = r()
    if c == nil then return table.concat(t), err end
    t[#t + 1] = c
  end
end

-- Python's email package as an independent parser: structure, filenames,
-- Content-IDs, decoded bodies (text as text, all as sha256 and size).
local PY = [[
import email, email.policy, sys, json, hashlib
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=email.policy.default)
out = {'headers': {}, 'defects': [], 'parts': []}
for k in m.keys():
    out['headers'][k.lower()] = str(m[k])
for p in m.walk():
    d = {'type': p.get_content_type(), 'filename': p.get_filename(), 'cid': p.get('Content-ID'),
         'disposition': p.get_content_disposition()}
    out['defects'] += [type(x).__name__ for x in p.defects]
    if not p.is_multipart():
        c = p.get_payload(decode=True)
        d['sha256'] = hashlib.sha256(c).hexdigest()
        d['size'] = len(c)
        if p.get_content_maintype() == 'text':
            d['text'] = p.get_content()
    out['parts'].append(d)
print(json.dumps(out))
]]

local function python_parse(bytes_or_path)
  local path = bytes_or_path
  if not bytes_or_path:find("^/") then
    path = h.tmpdir() .. "/m.eml"
    h.write_file(path, bytes_or_path)
  end
  local script = h.tmpdir() .. "/parse.py"
  h.write_file(script, PY)
  local ok, out = h.exec(PYTHON .. " " .. h.quote(script) .. " " .. h.quote(path))
  assert(ok, out)
  return cjson.decode(out)
end

local function sha256_hex(s) return crypto.hex(crypto.sha256(s)) end

local function file_sha256(path)
  local ok, out = h.exec("sha256sum " .. h.quote(path))
  assert(ok, out)
  return out:match("^(%x+)")
end

local function assert_lines_within(s, max)
  for i, l in ipairs(lines(s)) do
    if #l > max then error("line " .. i .. " has " .. #l .. " octets (max " .. max .. "): " .. l:sub(1, 80), 2) end
  end
end

local function compose_ok(t, o)
  local m, err = message.compose(t, o or OPTS)
  assert(m, err and tostring(err))
  return m
end

local function config_error(t, o)
  local m, err = message.compose(t, o or OPTS)
  assert.is_nil(m)
  assert.is_true(errors.is(err))
  assert.equal("config", err.kind)
  return err.message, err
end

-- ------------------------------------------------------------------ specs

describe("message.compose", function()
  it("writes the exact bytes of a simple text message", function()
    local m = compose_ok {
      from = "Alice Example <alice@example.org>", to = "bob@example.net",
      subject = "Nightly report", text = "All jobs finished.\nSee you tomorrow.\n",
    }
    assert.equal(
      "Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n" ..
      "From: Alice Example <alice@example.org>\r\n" ..
      "To: bob@example.net\r\n" ..
      "Subject: Nightly report\r\n" ..
      "Message-ID: <30f385d02bf183910e1b65c7496538e9@mail.example.org>\r\n" ..
      "MIME-Version: 1.0\r\n" ..
      "Content-Type: text/plain; charset=utf-8\r\n" ..
      "Content-Transfer-Encoding: 7bit\r\n" ..
      "\r\n" ..
      "All jobs finished.\r\n" ..
      "See you tomorrow.\r\n", m:tostring())
    assert.equal("30f385d02bf183910e1b65c7496538e9@mail.example.org", m.message_id)
    assert.same({ from = "alice@example.org", to = { "bob@example.net" } }, m.envelope)
    assert.is_false(m.needs_smtputf8)
    assert.is_false(m.has_8bit)
  end)

  it("dates in UTC from os.time() and makes a random Message-ID at the sender's domain", function()
    local before = os.time()
    local a = compose_ok({ from = "a@example.org", to = "b@example.net", text = "x" }, {})
    local b = compose_ok({ from = "a@example.org", to = "b@example.net", text = "x" }, {})
    local s = a:tostring()
    assert.matches("^Date: %a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d %+0000\r\n", s)
    assert.matches("^%x+@example%.org$", a.message_id)
    assert.not_equal(a.message_id, b.message_id)
    assert.equal(message._date(before):sub(1, 16), header(s, "Date"):sub(1, 16))
  end)

  it("puts text and html in multipart/alternative, text first", function()
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net", subject = "alt",
      text = "plain body\n", html = "<p>html body</p>\n",
    }
    local s = m:tostring()
    local ct = header(s, "Content-Type")
    local b = ct:match('^multipart/alternative; boundary="([^"]+)"$')
    assert.truthy(b, ct)
    local plain_at = s:find("Content-Type: text/plain; charset=utf-8", 1, true)
    local html_at = s:find("Content-Type: text/html; charset=utf-8", 1, true)
    assert.truthy(plain_at and html_at and plain_at < html_at)
    assert.equal(3, select(2, s:gsub("%-%-" .. b:gsub("%p", "%%%0"), "")))
    assert.equal("\r\n--" .. b .. "--\r\n", s:sub(-(#b + 8)))
    local py = python_parse(s)
    assert.same({}, py.defects)
    assert.equal("multipart/alternative", py.parts[1].type)
    assert.equal("text/plain", py.parts[2].type)
    assert.equal("plain body\n", py.parts[2].text:gsub("\r\n", "\n"))
    assert.equal("text/html", py.parts[3].type)
    assert.equal("<p>html body</p>\n", py.parts[3].text:gsub("\r\n", "\n"))
  end)

  it("puts an inline image with its Content-ID in multipart/related around the html", function()
    local png = "\137PNG\r\n\26\n" .. string.rep("\0\1\2\255", 100)
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net", subject = "logo",
      text = "see the logo", html = '<p><img src="cid:logo@example.org"></p>',
      attachments = { { data = png, filename = "logo.png", inline = true, content_id = "<logo@example.org>" } },
    }
    local s = m:tostring()
    assert.truthy(s:find("\r\nContent-ID: <logo@example.org>\r\n", 1, true))
    assert.truthy(s:find('Content-Type: multipart/related; type="text/html";', 1, true))
    local py = python_parse(s)
    assert.same({}, py.defects)
    local types = {}
    for i, p in ipairs(py.parts) do types[i] = p.type end
    assert.same({ "multipart/alternative", "text/plain", "multipart/related", "text/html", "image/png" }, types)
    assert.equal("<logo@example.org>", py.parts[5].cid)
    assert.equal("inline", py.parts[5].disposition)
    assert.equal("logo.png", py.parts[5].filename)
    assert.equal(sha256_hex(png), py.parts[5].sha256)
  end)

  it("gives a generated Content-ID to an inline part without one", function()
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net", html = "<p>x</p>",
      attachments = { { data = "GIF89a", filename = "x.gif", inline = true } },
    }
    assert.matches("\r\nContent%-ID: <part1%.%x+@mail%.example%.org>\r\n", m:tostring())
  end)

  it("names a non-ASCII attachment with RFC 2231 and an ASCII filename= fallback", function()
    local name = "Übersicht März.pdf"
    local data = string.rep("%PDF-1.4 fake ", 50)
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net", text = "report attached",
      attachments = { { data = data, filename = name } },
    }
    local s = m:tostring()
    local disp = header(s:sub((s:find("Content-Disposition: attachment", 1, true))), "Content-Disposition")
    assert.equal("attachment; filename*=UTF-8''%C3%9Cbersicht%20M%C3%A4rz.pdf; filename=\"_bersicht M_rz.pdf\"", disp)
    assert.truthy(s:find("Content-Type: application/pdf;", 1, true))
    local py = python_parse(s)
    assert.same({}, py.defects)
    assert.equal("multipart/mixed", py.parts[1].type)
    assert.equal(name, py.parts[3].filename)
    assert.equal("attachment", py.parts[3].disposition)
    assert.equal(sha256_hex(data), py.parts[3].sha256)
  end)

  it("does not add name= when the caller's content_type already has one", function()
    for _, ct in ipairs { "text/csv; name=given.csv", "text/csv; charset=utf-8; NAME=\"given.csv\"",
      "text/csv;name*=UTF-8''given.csv" } do
      local s = compose_ok({ from = "a@example.org", to = "b@example.net", text = "x",
        attachments = { { data = "a,b\n", filename = "report.csv", content_type = ct } } }):tostring()
      local v = header(s:sub((s:find("Content-Type: text/csv", 1, true))), "Content-Type")
      local n = 0
      for _ in (";" .. v:lower()):gmatch(";%s*name[%*%d]*%s*=") do n = n + 1 end
      assert.equal(1, n, v)
      assert.truthy(s:find('filename="?report.csv', 1, false), s)
    end
    -- a filename= parameter in the type is not a name=: name= is still added
    local s = compose_ok({ from = "a@example.org", to = "b@example.net", text = "x",
      attachments = { { data = "x", filename = "r.bin", content_type = "application/x-thing; filename=o" } } })
      :tostring()
    assert.truthy(s:find("application/x-thing; filename=o; name=r.bin", 1, true), s)
  end)

  it("continues a long non-ASCII filename over several RFC 2231 segments within 78 columns", function()
    local name = string.rep("Größenverhältnisse ", 8) .. ".xlsx"
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net",
      attachments = { { data = "x", filename = name } },
    }
    local s = m:tostring()
    assert.truthy(s:find("filename*0*=UTF-8''", 1, true))
    assert.truthy(s:find("filename*2*=", 1, true))
    assert_lines_within(header_section(s), 78)
    local py = python_parse(s)
    assert.same({}, py.defects)
    assert.equal(name, py.parts[2].filename)
    assert.equal("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", py.parts[2].type)
  end)

  it("encodes a non-ASCII subject as RFC 2047 words of at most 75 chars, lines of at most 78", function()
    local subjects = {
      "Grüße aus Köln — Bericht über das Quartal, mit Zahlen, Tabellen und vielen Umlauten äöü ÄÖÜ ß",
      "日本語の件名はとても長くなることがありますので、正しく折り返されることを確認します。終わり。",
      "emoji 📬📬📬 and = signs ? and _underscores_ =?UTF-8?Q?not-a-word?=",
      "x",
      "ä",
    }
    for _, subj in ipairs(subjects) do
      local m = compose_ok { from = "a@example.org", to = "b@example.net", subject = subj, text = "x" }
      local s = m:tostring()
      local raw = s:match("\r\n(Subject:.-)\r\n[^ \t]")
      for w in raw:gmatch("=%?[^?]+%?[BQ]%?[^?]*%?=") do
        assert.is_true(#w <= 75, w)
      end
      assert_lines_within(raw, 78)
      assert.is_nil(raw:find("[\128-\255]"))
      assert.equal(subj, decode_2047(header(s, "Subject")))
      assert.equal(subj, python_parse(s).headers.subject)
    end
    -- B for mostly non-ASCII, Q for mostly ASCII
    assert.truthy(message.encode_header("日本語の件名"):find("?B?", 1, true))
    assert.truthy(message.encode_header("Weekly report for the team in Zurich, with one ä"):find("?Q?", 1, true))
    assert.truthy(message.encode_header("Grüße"):find("?B?", 1, true))   -- shorter than Gr=C3=BC=C3=9Fe
    assert.equal("plain ASCII stays", message.encode_header("plain ASCII stays"))
  end)

  it("folds a long ASCII subject at white space and keeps its spacing", function()
    local subj = "word  " .. string.rep("lorem ipsum dolor ", 12) .. "\tend"
    local m = compose_ok { from = "a@example.org", to = "b@example.net", subject = subj, text = "x" }
    local s = m:tostring()
    local raw = s:match("\r\n(Subject:.-)\r\n[^ \t]")
    assert.truthy(raw:find("\r\n ", 1, true))
    assert_lines_within(raw, 78)
    assert.equal(subj, header_section(s):match("\r\nSubject: (.-)\r\n[^ \t]"):gsub("\r\n", ""))
  end)

  it("keeps a subject's leading white space (readers drop only the one space after the colon)", function()
    for _, subj in ipairs { " x", "  two", "\tTab", " ", " é lead", "  =?not?= encoded" } do
      local s = compose_ok({ from = "a@example.org", to = "b@example.net", subject = subj, text = "x" }):tostring()
      local raw = header_section(s):match("\r\nSubject:(.-)\r\n[^ \t]"):gsub("\r\n([ \t])", "%1")
      assert.equal(" ", raw:sub(1, 1))
      assert.equal(subj, decode_2047(raw:sub(2)))
    end
    assert.equal("=?UTF-8?Q?_x?=", message.encode_header(" x"))
  end)

  it("encodes a subject with a bare LF-class control (needs_encoding covers \\10)", function()
    local encode = require "oauthmail.message.encode"
    assert.is_true(encode.needs_encoding("a\nb"))
    assert.is_true(encode.needs_encoding("a\rb"))
    assert.is_false(encode.needs_encoding("a\tb"))
    local field = encode.unstructured("Subject", "a\nb")
    assert.is_nil(field:find("\n", 1, true))
    assert.truthy(field:find("=?UTF-8?", 1, true))
  end)

  it("encodes display names: RFC 2047 when non-ASCII, quoted when they hold specials", function()
    local m = compose_ok {
      from = { name = "Jörg Müller", address = "joerg@example.org" },
      to = { 'Doe, John <john@example.net>', '"Smith \\"Jr\\"" <smith@example.net>', "Plain Name <p@example.net>" },
      reply_to = "Support Team <support@example.org>", text = "x",
    }
    local s = m:tostring()
    assert.truthy(header(s, "From"):find("^=%?UTF%-8%?[BQ]%?.-%?= <joerg@example%.org>$"))
    assert.equal("Jörg Müller <joerg@example.org>", decode_2047(header(s, "From")))
    assert.equal('"Doe, John" <john@example.net>, "Smith \\"Jr\\"" <smith@example.net>, Plain Name <p@example.net>',
      header(s, "To"))
    assert.equal("Support Team <support@example.org>", header(s, "Reply-To"))
    local py = python_parse(s)
    assert.equal("Jörg Müller <joerg@example.org>", py.headers.from)
    assert.same({}, py.defects)
    assert.same({ "john@example.net", "smith@example.net", "p@example.net" }, m.envelope.to)
  end)

  it("folds a long recipient list between addresses", function()
    local to = {}
    for i = 1, 30 do to[i] = "Recipient Number " .. i .. " <r" .. i .. "@example.net>" end
    local m = compose_ok { from = "a@example.org", to = to, text = "x" }
    local s = m:tostring()
    assert_lines_within(header_section(s), 78)
    assert.equal(30, #m.envelope.to)
    local py = python_parse(s)
    assert.truthy(py.headers.to:find("Recipient Number 30 <r30@example.net>", 1, true))
  end)

  it("keeps Bcc out of the headers and in the envelope, deduplicated in order", function()
    local m = compose_ok {
      from = "a@example.org", to = { "B@example.net", "c@example.net" }, cc = "b@EXAMPLE.net",
      bcc = { "hidden@example.com", "C@example.net" }, text = "x",
    }
    local s = m:tostring()
    assert.is_nil(s:find("hidden", 1, true))
    assert.is_nil(s:lower():find("\nbcc:", 1, true))
    assert.same({ "B@example.net", "c@example.net", "hidden@example.com" }, m.envelope.to)
    -- a message with Bcc recipients only has no To header
    local only = compose_ok { from = "a@example.org", bcc = "hidden@example.com", text = "x" }
    assert.is_nil(header(only:tostring(), "To"))
    assert.same({ "hidden@example.com" }, only.envelope.to)
  end)

  describe("bodies", function()
    it("uses quoted-printable for mostly-ASCII text: = escapes, soft breaks, trailing white space", function()
      local text = "price = 5 €, café\n" .. string.rep("long line of words ", 10) .. "\n" ..
        "trailing spaces   \n" .. "tab at end\t\n" .. "=3D literal\n" ..
        string.rep("é", 30) .. "\n" .. string.rep("plain ASCII line to keep it mostly ASCII\n", 8) .. string.rep("x", 75) .. " \n" .. "end"
      local m = compose_ok { from = "a@example.org", to = "b@example.net", text = text }
      local s = m:tostring()
      assert.equal("quoted-printable", header(s, "Content-Transfer-Encoding"))
      local body = s:sub(s:find("\r\n\r\n", 1, true) + 4)
      assert_lines_within(body, 76)
      for _, l in ipairs(lines(body)) do
        assert.is_nil(l:find("[ \t]$"), "trailing white space: " .. l)
        assert.is_nil(l:find("[\128-\255]"))
        assert.is_nil(l:gsub("=%x%x", ""):find("=.", 1), "bare = in: " .. l)
      end
      assert.truthy(body:find("price =3D 5 =E2=82=AC, caf=C3=A9\r\n", 1, true))
      assert.truthy(body:find("trailing spaces  =20\r\n", 1, true))
      assert.truthy(body:find("tab at end=09\r\n", 1, true))
      assert.truthy(body:find("=3D3D literal", 1, true))
      assert.truthy(body:find("=\r\n", 1, true))
      assert.equal(crlf(text) .. "\r\n", decode_qp(body))
      local py = python_parse(s)
      -- the message ends with a line break, so the last body line gains one
      assert.equal(text .. "\n", py.parts[1].text:gsub("\r\n", "\n"))
    end)

    it("uses base64 in 76-column lines for mostly non-ASCII text and for attachments", function()
      local text = string.rep("これは日本語の本文です。", 40)
      local data = string.rep("\0\1\2\3\255", 1000)
      local m = compose_ok {
        from = "a@example.org", to = "b@example.net", text = text,
        attachments = { { data = data, filename = "blob.bin" } },
      }
      local s = m:tostring()
      local py = python_parse(s)
      assert.same({}, py.defects)
      assert.equal(text, py.parts[2].text)
      assert.equal("application/octet-stream", py.parts[3].type)
      assert.equal(sha256_hex(data), py.parts[3].sha256)
      local n64 = 0
      for part in s:gmatch("Content%-Transfer%-Encoding: base64\r\n\r\n(.-)\r\n%-%-") do
        n64 = n64 + 1
        local ls = lines(part)
        for i, l in ipairs(ls) do
          if i < #ls then assert.equal(76, #l) else assert.is_true(#l <= 76 and #l > 0) end
          assert.truthy(l:find("^[A-Za-z0-9+/=]+$"))
        end
      end
      assert.equal(2, n64)
    end)

    it("keeps 7bit for short ASCII lines and never writes a line over 998 octets", function()
      local long = string.rep("abcdefghij", 500)   -- one 5,000-char line
      local m = compose_ok {
        from = "a@example.org", to = "b@example.net",
        subject = string.rep("S", 1200) .. " " .. string.rep("T", 1200),
        text = "short\n" .. long .. "\nshort again\n", html = "<p>" .. long .. "</p>",
        headers = { { "X-Long", string.rep("v", 2000) }, { "X-Words", string.rep("word ", 400) } },
      }
      local s = m:tostring()
      assert_lines_within(s, 998)
      assert_lines_within(s:sub(s:find("\r\n\r\n", 1, true)), 78)
      local py = python_parse(s)
      assert.equal("short\n" .. long .. "\nshort again\n", py.parts[2].text:gsub("\r\n", "\n"))
      assert.equal(string.rep("S", 1200) .. " " .. string.rep("T", 1200), py.headers.subject)
      assert.equal(string.rep("v", 2000), py.headers["x-long"])
      local m2 = compose_ok { from = "a@example.org", to = "b@example.net", text = "ok\nfine\n" }
      assert.equal("7bit", header(m2:tostring(), "Content-Transfer-Encoding"))
    end)

    it("picks a boundary that does not occur in a 7bit body", function()
      local seeded = compose_ok { from = "a@example.org", to = "b@example.net", text = "a", html = "b" }
      local b1 = header(seeded:tostring(), "Content-Type"):match('boundary="([^"]+)"')
      local m = compose_ok { from = "a@example.org", to = "b@example.net", text = "--" .. b1 .. "\n", html = "b" }
      local b2 = header(m:tostring(), "Content-Type"):match('boundary="([^"]+)"')
      assert.not_equal(b1, b2)
      local py = python_parse(m:tostring())
      assert.equal("--" .. b1 .. "\n", py.parts[2].text:gsub("\r\n", "\n"))
    end)
  end)

  describe("refuses", function()
    it("CR/LF in the subject, names, addresses, headers, filenames, naming the field", function()
      local base = function(extra)
        local t = { from = "a@example.org", to = "b@example.net", text = "x" }
        for k, v in pairs(extra) do t[k] = v end
        return t
      end
      assert.equal("subject: contains a line break",
        config_error(base { subject = "hi\r\nBcc: victim@example.com" }))
      assert.equal("subject: contains a line break", config_error(base { subject = "hi\nthere" }))
      assert.equal("to[2]: address contains a line break",
        config_error(base { to = { "ok@example.net", "b@example.net\r\nRCPT TO: x@y" } }))
      assert.equal("to[2]: address contains a line break",
        config_error(base { to = { "ok@example.net", "Bob <b@example.net\r\n>" } }))
      assert.equal("to[1]: display name contains a line break",
        config_error(base { to = { "Evil\r\nBcc: x@y <b@example.net>" } }))
      assert.equal("from: display name contains a line break",
        config_error(base { from = { name = "Evil\nX: y", address = "a@example.org" } }))
      assert.equal("cc: address contains a line break", config_error(base { cc = { address = "c@x.org\r\n" } }))
      assert.equal("reply_to: address contains a line break", config_error(base { reply_to = "r@x.org\n" }))
      assert.equal("headers[1]: value contains a line break",
        config_error(base { headers = { { "X-Tag", "v\r\nBcc: x@y" } } }))
      assert.equal("headers.X-Tag: value contains a line break", config_error(base { headers = { ["X-Tag"] = "v\n" } }))
      local msg = config_error(base { headers = { { "X-Tag\r\nBcc", "v" } } })
      assert.equal("headers[1]: 'X-Tag??Bcc' is not a valid header name", msg)
      assert.equal("attachments[1].filename: contains a line break",
        config_error(base { attachments = { { data = "x", filename = "a\r\n.pdf" } } }))
      assert.equal("attachments[1].content_id: contains a line break",
        config_error(base { attachments = { { data = "x", inline = true, content_id = "a\nb" } } }))
      assert.equal("attachments[1].content_type: contains a line break",
        config_error(base { attachments = { { data = "x", content_type = "text/plain\r\nX: y" } } }))
      assert.equal("message_id: contains a line break", config_error(base { message_id = "a@b\r\n" }))
    end)

    it("structural headers, Bcc, own fields and bad names in custom headers", function()
      local t = function(hs) return { from = "a@example.org", to = "b@example.net", text = "x", headers = hs } end
      assert.equal("headers[1]: Content-Type is set by the message structure and cannot be given",
        config_error(t { { "Content-Type", "text/html" } }))
      assert.equal("headers.MIME-Version: MIME-Version is set by the message structure and cannot be given",
        config_error(t { ["MIME-Version"] = "2.0" }))
      assert.equal("headers[2]: content-transfer-encoding is set by the message structure and cannot be given",
        config_error(t { { "X-Ok", "1" }, { "content-transfer-encoding", "8bit" } }))
      assert.equal("headers[1]: Bcc is never written into the message: use the bcc field",
        config_error(t { { "BCC", "x@example.com" } }))
      assert.equal("headers[1]: Subject is written from the subject field: use that instead",
        config_error(t { { "Subject", "x" } }))
      assert.equal("headers[1]: 'X Space' is not a valid header name", config_error(t { { "X Space", "v" } }))
      assert.equal("headers[1]: 'X:Colon' is not a valid header name", config_error(t { { "X:Colon", "v" } }))
      assert.equal("headers[1]: '' is not a valid header name", config_error(t { { "", "v" } }))
    end)

    it("bad addresses, missing sender or recipients, missing files", function()
      local t = function(extra)
        local m = { from = "a@example.org", to = "b@example.net", text = "x" }
        for k, v in pairs(extra) do m[k] = v end
        return m
      end
      assert.equal("to: 'not an address' is not an address of the form user@domain", config_error(t { to = "not an address" }))
      assert.equal("to[1]: 'a..b@example.net' has an invalid local part", config_error(t { to = { "a..b@example.net" } }))
      assert.equal("cc: 'c@exa mple.net' has an invalid domain", config_error(t { cc = "c@exa mple.net" }))
      assert.equal("from: a sender is required", config_error { to = "b@example.net", text = "x" })
      assert.equal("to: at least one recipient (to, cc or bcc) is required",
        config_error { from = "a@example.org", text = "x" })
      assert.equal("attachments[1].path: cannot open 'x.pdf': No such file or directory",
        config_error(t { attachments = { { path = "x.pdf" } } }))
      assert.equal("attachments[2]: path or data is required",
        config_error(t { attachments = { { data = "1" }, { filename = "a" } } }))
      assert.equal("attachments[1]: give path or data, not both",
        config_error(t { attachments = { { data = "1", path = "/etc/hostname" } } }))
      assert.equal("attachments[1].content_type: 'pdf' is not an ASCII MIME type (type/subtype[; params])",
        config_error(t { attachments = { { data = "1", content_type = "pdf" } } }))
      assert.equal("text: is not valid UTF-8", config_error(t { text = "caf\233" }))
      assert.equal("subject: is not valid UTF-8", config_error(t { subject = "\192\128" }))
    end)

    it("wrong argument types by raising", function()
      assert.has_error(function() message.compose("x") end, "message.compose: expected a message table")
      assert.has_error(function() message.compose { from = "a@example.org", to = "b@example.net", subject = 1 } end,
        "message.compose: subject must be a string")
      assert.has_error(function() message.compose { from = "a@example.org", to = 5 } end,
        "message.compose: to must be an address or a list of addresses")
      assert.has_error(function() message.parse_address(nil) end)
    end)
  end)

  describe("international addresses", function()
    it("refuses a non-ASCII local part unless opts.smtputf8, then flags needs_smtputf8", function()
      local t = { from = "a@example.org", to = { "b@example.net", "jörg@example.net" }, text = "x" }
      local msg = config_error(t)
      assert.equal("to[2]: 'jörg@example.net' has a non-ASCII local part: set opts.smtputf8 " ..
        "(the server must offer SMTPUTF8)", msg)
      local m = compose_ok(t, { smtputf8 = true, now = 0, hostname = "h.example" })
      assert.is_true(m.needs_smtputf8)
      assert.truthy(m:tostring():find("jörg@example.net", 1, true))
    end)

    it("keeps an IDN domain in UTF-8 and flags needs_smtputf8", function()
      local m = compose_ok { from = "a@example.org", to = "info@bücher.example", text = "x" }
      assert.is_true(m.needs_smtputf8)
      assert.same({ "info@bücher.example" }, m.envelope.to)
    end)
  end)

  describe("custom headers", function()
    it("accepts a list or a map, encodes non-ASCII values, lets Message-ID and Date be given", function()
      local m = compose_ok {
        from = "a@example.org", to = "b@example.net", text = "x",
        headers = { { "X-Priority", "1" }, { name = "X-Note", value = "Grüße" }, { "Message-ID", "<given@example.org>" },
          { "Date", "Mon, 30 Jun 2025 08:00:00 +0200" }, { "In-Reply-To", "<prev@example.org>" } },
      }
      local s = m:tostring()
      assert.equal("given@example.org", m.message_id)
      assert.equal("<given@example.org>", header(s, "Message-ID"))
      assert.equal(1, select(2, s:gsub("\r\nMessage%-ID:", "")))
      assert.equal("Mon, 30 Jun 2025 08:00:00 +0200", header(s, "Date"))
      assert.equal(1, select(2, ("\r\n" .. s):gsub("\r\nDate:", "")))
      assert.equal("Grüße", decode_2047(header(s, "X-Note")))
      assert.equal("1", header(s, "X-Priority"))
      local m2 = compose_ok {
        from = "a@example.org", to = "b@example.net", text = "x",
        headers = { ["X-B"] = "2", ["X-A"] = "1" }, message_id = "mine@example.org",
      }
      local s2 = m2:tostring()
      assert.truthy(s2:find("X-A: 1\r\nX-B: 2\r\n", 1, true))
      assert.equal("<mine@example.org>", header(s2, "Message-ID"))
    end)
  end)

  it("guesses content types from the extension, else application/octet-stream", function()
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net",
      attachments = { { data = "1", filename = "a.PDF" }, { data = "2", filename = "b.jpeg" },
        { data = "3", filename = "c.unknownext" }, { data = "4" },
        { data = "5", filename = "d.csv", content_type = "text/csv; charset=utf-8" } },
    }
    local py = python_parse(m:tostring())
    assert.same({}, py.defects)
    local types = {}
    for i = 2, #py.parts do types[#types + 1] = py.parts[i].type end
    assert.same({ "application/pdf", "image/jpeg", "application/octet-stream", "application/octet-stream", "text/csv" },
      types)
    assert.truthy(m:tostring():find("Content-Type: text/csv; charset=utf-8; name=d.csv", 1, true))
  end)
end)

describe("message readers", function()
  local dir
  setup(function() dir = h.tmpdir() end)

  local function structures()
    local f57 = h.write_file(dir .. "/57.bin", string.rep("z", 57))
    local fempty = h.write_file(dir .. "/empty.txt", "")
    local fodd = h.write_file(dir .. "/odd.bin", string.rep("\1\2\3", 12345) .. "!")
    local base = { from = "a@example.org", to = "b@example.net", subject = "size ä" }
    local list = {
      { text = "only text" },
      { text = "ends with newline\n" },
      { html = "<b>only html</b>" },
      { text = "t", html = "<i>h</i>" },
      { text = "t", html = "<img src=cid:x>", attachments = { { data = "img", inline = true, content_id = "x" } } },
      { text = "é" .. string.rep("a", 5000) },
      { text = string.rep("ж", 3000) },
      {},
      { attachments = { { path = fempty } } },
      { text = "t", attachments = { { path = f57 }, { path = fodd }, { data = "" }, { data = string.rep("q", 58) } } },
      { html = "<p>x</p>", attachments = { { path = fodd, inline = true }, { data = string.rep("r", 76 * 57 + 1) } } },
    }
    for _, t in ipairs(list) do for k, v in pairs(base) do t[k] = v end end
    return list
  end

  it("m:size() is exactly #m:tostring() for every structure", function()
    for i, t in ipairs(structures()) do
      local m = compose_ok(t)
      local s = assert(m:tostring())
      assert.equal(#s, m:size(), "structure " .. i)
      assert.equal("\r\n", s:sub(-2), "structure " .. i)
      assert.is_nil(s:find("[^\r]\n"), "bare LF in structure " .. i)
      assert.is_nil(s:find("\r[^\n]"), "bare CR in structure " .. i)
      assert.same({}, python_parse(s).defects, "structure " .. i)
    end
  end)

  it("gives a new reader on each call that produces identical bytes", function()
    local t = structures()[10]
    local m = compose_ok(t)
    local r1, r2 = m:reader(), m:reader()
    assert.not_equal(r1, r2)
    -- interleaved: each reader has its own position and file handle
    local a, b = {}, {}
    while true do
      local c1, c2 = r1(), r2()
      if c1 then a[#a + 1] = c1 end
      if c2 then b[#b + 1] = c2 end
      if not c1 and not c2 then break end
    end
    local s1, s2 = table.concat(a), table.concat(b)
    assert.equal(s1, s2)
    assert.equal(s1, read_all(m:reader()))
    assert.equal(m:size(), #s1)
    assert.is_nil(r1())   -- stays at its end
  end)

  it("streams a 50 MB attachment from disk with bounded memory", function()
    local path = dir .. "/big.bin"
    local ok, out = h.exec("head -c 52428800 /dev/urandom > " .. h.quote(path))
    assert(ok, out)
    local m = compose_ok {
      from = "a@example.org", to = "b@example.net", subject = "big", text = "see attachment",
      attachments = { { path = path } },
    }
    local outpath = dir .. "/big.eml"
    local f = assert(io.open(outpath, "wb"))
    -- Live memory, not heap size: the whole suite's data is the baseline, and
    -- garbage may grow with it before a cycle. What must stay bounded is what
    -- the reader keeps alive, measured after a full collection.
    collectgarbage()
    collectgarbage()
    local baseline = collectgarbage("count")
    local peak, total, chunks, biggest = 0, 0, 0, 0
    local r = m:reader()
    while true do
      local c, err = r()
      assert.is_nil(err)
      if not c then break end
      total, chunks = total + #c, chunks + 1
      if #c > biggest then biggest = #c end
      f:write(c)
      if chunks % 50 == 0 then
        collectgarbage()
        local kb = collectgarbage("count") - baseline
        if kb > peak then peak = kb end
      end
    end
    f:close()
    assert.is_true(peak < 20 * 1024, "live Lua memory grew by " .. math.floor(peak) .. " KB")
    assert.is_true(biggest <= 128 * 1024, "a chunk of " .. biggest .. " bytes")
    assert.is_true(chunks > 500)
    assert.equal(m:size(), total)
    local py = python_parse(outpath)
    assert.equal("big.bin", py.parts[3].filename)
    assert.equal(52428800, py.parts[3].size)
    assert.equal(file_sha256(path), py.parts[3].sha256)
    os.remove(outpath)
    os.remove(path)
  end)

  it("returns nil, err from the reader when a file vanished or changed, and keeps returning it", function()
    local path = h.write_file(dir .. "/gone.pdf", string.rep("p", 1000))
    local m = compose_ok { from = "a@example.org", to = "b@example.net", text = "x", attachments = { { path = path } } }
    os.remove(path)
    local s, err = read_all(m:reader())
    assert.truthy(s:find("Content-Type: application/pdf", 1, true))
    assert.is_true(errors.is(err))
    assert.equal("config", err.kind)
    assert.equal("reader", err.reason)
    assert.equal("attachments[1].path: cannot open '" .. path .. "': No such file or directory", err.message)
    local r = m:reader()
    local c
    repeat c = r() until c == nil
    local again, err2 = r()
    assert.is_nil(again)
    assert.equal(err.message, err2.message)
    assert.is_nil(m:tostring())
    h.write_file(path, string.rep("p", 999))
    local _, err3 = m:tostring()
    assert.equal("attachments[1].path: '" .. path .. "' changed after the message was made (its size differs)",
      err3.message)
    h.write_file(path, string.rep("p", 1001))
    local _, err4 = m:tostring()
    assert.equal(err3.message, err4.message)
    h.write_file(path, string.rep("p", 1000))
    assert.equal(m:size(), #assert(m:tostring()))
  end)

  it("gives a clean config error through an SMTP session when the attachment cannot be read", function()
    local path = h.write_file(dir .. "/later.pdf", string.rep("p", 100))
    local m = compose_ok { from = "a@example.org", to = "b@example.net", text = "x", attachments = { { path = path } } }
    os.remove(path)
    local t = peers.fake {
      { "S", "220 mx.test ESMTP\r\n" }, { "C", "EHLO localhost\r\n" }, { "S", "250-mx.test\r\n250 8BITMIME\r\n" },
      { "C", "MAIL FROM:<a@example.org> BODY=8BITMIME\r\n" }, { "S", "250 ok\r\n" },
      { "C", "RCPT TO:<b@example.net>\r\n" }, { "S", "250 ok\r\n" },
      { "C", "DATA\r\n" }, { "S", "354 go\r\n" },
    }
    local s = assert(smtp.open { transport = t, tls = "none" })
    local receipt, err = s:send { from = m.envelope.from, to = m.envelope.to, data = m:reader() }
    assert.is_nil(receipt)
    assert.equal("config", err.kind)
    assert.equal("reader", err.reason)
    assert.truthy(err.message:find("attachments[1].path: cannot open '" .. path .. "'", 1, true), err.message)
    assert.is_true(t.closed)
  end)
end)

describe("message.from_raw", function()
  local RAW = table.concat({
    "From: Alice <alice@example.org>",
    "To: Bob <bob@example.net>, \"Doe, Jane\" <jane@example.net>",
    "Cc: team: carol@example.net, dave@example.net (Dave);",
    "Bcc: hidden@example.com,",
    "  also-hidden@example.com",
    "Subject: raw",
    "",
    "line one",
    "line two with bare LF",
    "",
  }, "\n")

  it("takes the envelope from the headers, removes Bcc, adds Date and Message-ID, makes CRLF", function()
    local m = assert(message.from_raw(RAW, OPTS))
    assert.same({ from = "alice@example.org",
      to = { "bob@example.net", "jane@example.net", "carol@example.net", "dave@example.net",
        "hidden@example.com", "also-hidden@example.com" } }, m.envelope)
    local s = m:tostring()
    assert.is_nil(s:find("hidden", 1, true))
    assert.is_nil(s:find("Bcc", 1, true))
    assert.is_nil(s:find("[^\r]\n"))
    assert.equal("From: Alice <alice@example.org>\r\n" ..
      "To: Bob <bob@example.net>, \"Doe, Jane\" <jane@example.net>\r\n" ..
      "Cc: team: carol@example.net, dave@example.net (Dave);\r\n" ..
      "Subject: raw\r\n" ..
      "Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n" ..
      "Message-ID: <" .. m.message_id .. ">\r\n" ..
      "\r\n" ..
      "line one\r\nline two with bare LF\r\n", s)
    assert.matches("^%x+@mail%.example%.org$", m.message_id)
    assert.equal(#s, m:size())
    assert.is_false(m.has_8bit)
    assert.is_false(m.needs_smtputf8)
  end)

  it("keeps a given Date and Message-ID and takes the envelope from the arguments", function()
    local raw = "Date: Mon, 30 Jun 2025 08:00:00 +0200\r\nMessage-ID: <given@example.org>\r\n" ..
      "From: a@example.org\r\nTo: b@example.net\r\n\r\nbody é\r\n"
    local m = assert(message.from_raw(raw, { from = "bounce@example.org", to = { "x@example.net", "y@example.net" } }))
    assert.same({ from = "bounce@example.org", to = { "x@example.net", "y@example.net" } }, m.envelope)
    assert.equal("given@example.org", m.message_id)
    assert.equal(raw, m:tostring())
    assert.is_true(m.has_8bit)
  end)

  it("streams the body from a file, parsing only the header section", function()
    local dir = h.tmpdir()
    -- mixed line endings, with a CRLF split across the 64 KB read boundary
    local head = "From: a@example.org\nTo: b@example.net\nBcc: secret@example.com\nSubject: file\n\n"
    local fill = 64 * 1024 - #head - 1   -- in lines of 100 bytes: none over 998 octets
    local filler = string.rep(string.rep("x", 99) .. "\n", math.floor(fill / 100)) .. string.rep("x", fill % 100)
    local body = filler .. "\r\nsecond\rthird\nfourth\r\n" .. string.rep("line\n", 30000) .. "no final newline"
    local path = h.write_file(dir .. "/msg.eml", head .. body)
    local m = assert(message.from_raw({ path = path }, OPTS))
    assert.same({ from = "a@example.org", to = { "b@example.net", "secret@example.com" } }, m.envelope)
    local s = assert(m:tostring())
    assert.equal(#s, m:size())
    assert.equal(s, read_all(m:reader()))
    assert.is_nil(s:find("secret", 1, true))
    local expect_body = crlf(filler) .. "\r\nsecond\r\nthird\r\nfourth\r\n" .. string.rep("line\r\n", 30000) ..
      "no final newline\r\n"
    assert.equal(expect_body, s:sub(#s - #expect_body + 1))
    local expect_head = "From: a@example.org\r\nTo: b@example.net\r\nSubject: file\r\n"
    assert.equal(expect_head, s:sub(1, #expect_head))
    -- a file that changes after from_raw fails in the reader
    h.write_file(path, head .. body .. "more")
    local _, err = m:tostring()
    assert.equal("reader", err.reason)
    assert.truthy(err.message:find("changed after the message was made", 1, true))
  end)

  it("takes the sender from Sender when From has several mailboxes, and skips an mbox From_ line", function()
    local m = assert(message.from_raw("From MAILER-DAEMON Mon Jun 30 08:00:00 2025\n" ..
      "From: a@example.org, b@example.org\nSender: s@example.org\nTo: t@example.net\n\nx\n", OPTS))
    assert.equal("s@example.org", m.envelope.from)
    assert.is_nil(m:tostring():find("MAILER-DAEMON", 1, true))
  end)

  it("refuses messages without sender, recipients or headers, and bad envelope arguments", function()
    local function fails(src, o)
      local m, err = message.from_raw(src, o)
      assert.is_nil(m)
      assert.equal("config", err.kind)
      return err.message
    end
    assert.equal("from: no sender: give opts.from or a From header", fails("To: b@example.net\n\nx\n"))
    assert.equal("to: no recipients: give opts.to or To/Cc/Bcc headers", fails("From: a@example.org\n\nx\n"))
    assert.equal("message: the message has no header section", fails("\nbody only\n"))
    assert.equal("message: line 2 of the header section is not a header field",
      fails("From: a@example.org\nthis is not a header\n\nx\n"))
    assert.equal("To header: 'bob' is not an address of the form user@domain",
      fails("From: a@example.org\nTo: bob\n\nx\n"))
    assert.equal("from: address contains a line break", fails("From: a@example.org\nTo: b@example.net\n\nx\n",
      { from = "a@example.org\r\nRCPT TO: x@y" }))
    assert.equal("to: address contains a line break", fails("From: a@example.org\n\nx\n", { to = "b@x.org\n" }))
    assert.equal("path: cannot open '/nonexistent/m.eml': No such file or directory",
      fails({ path = "/nonexistent/m.eml" }))
  end)
end)

describe("message.from_raw line limit", function()
  local LONG = string.rep("y", 999)
  local function fails(src)
    local m, err = message.from_raw(src, OPTS)
    assert.is_nil(m)
    assert.equal("config", err.kind)
    assert.equal("too_long", err.reason)
    return err.message
  end

  it("refuses a header or body line over 998 octets, naming the line", function()
    assert.equal("message: line 3 of the header section is longer than 998 octets (RFC 5322 2.1.1)",
      fails("From: a@example.org\nTo: b@example.net\nX-Long: " .. LONG .. "\n\nx\n"))
    assert.equal("message: line 2 of the body is longer than 998 octets (RFC 5322 2.1.1); "
      .. "encode it (quoted-printable or base64) first",
      fails("From: a@example.org\nTo: b@example.net\n\nok\n" .. LONG .. "\nend\n"))
    -- exactly 998 octets is allowed, in the header and in the body
    local ok998 = string.rep("z", 998)
    assert(message.from_raw("From: a@example.org\nTo: b@example.net\nX-L: " .. ok998:sub(6) .. "\n\n" .. ok998, OPTS))
  end)

  it("checks body lines of a file while measuring it, across the 64 KB chunk edge", function()
    local dir = h.tmpdir()
    local head = "From: a@example.org\nTo: b@example.net\n\n"
    -- short lines up to 500 bytes before the 64 KB read edge, then a line across it
    local filler = string.rep("a\n", 32518)   -- 65036 bytes
    local path = h.write_file(dir .. "/long.eml", head .. filler .. string.rep("q", 1100) .. "\nend\n")
    assert.equal("message: line 32519 of the body is longer than 998 octets "
      .. "(RFC 5322 2.1.1); encode it (quoted-printable or base64) first", fails({ path = path }))
    local okpath = h.write_file(dir .. "/ok.eml", head .. filler .. string.rep("q", 998) .. "\nend\n")
    assert(message.from_raw({ path = okpath }, OPTS))
  end)
end)

describe("message.parse_address", function()
  it("parses the accepted forms", function()
    assert.same({ address = "user@example.org" }, message.parse_address("user@example.org"))
    assert.same({ address = "user@example.org" }, message.parse_address("  <user@example.org> "))
    assert.same({ name = "Name", address = "user@example.org" }, message.parse_address("Name <user@example.org>"))
    assert.same({ name = "Doe, \"J\"", address = "j@example.org" }, message.parse_address('"Doe, \\"J\\"" <j@example.org>'))
    assert.same({ name = "Jörg", address = "jörg@bücher.example" }, message.parse_address("Jörg <jörg@bücher.example>"))
    assert.same({ address = "\"odd local\"@example.org" }, message.parse_address("\"odd local\"@example.org"))
    assert.same({ address = "x@[192.0.2.1]" }, message.parse_address("x@[192.0.2.1]"))
  end)

  it("returns config errors for what is not an address", function()
    for s, why in pairs {
      [""] = "address is empty",
      ["no-at-sign"] = "'no-at-sign' is not an address of the form user@domain",
      ["a@b@"] = "'a@b@' is not an address of the form user@domain",
      [".a@example.org"] = "'.a@example.org' has an invalid local part",
      ["a@-example.org"] = "'a@-example.org' has an invalid domain",
      ["a@example..org"] = "'a@example..org' has an invalid domain",
      ["a@example.org\r\n"] = "address contains a line break",
      ["a@ex\255.org"] = "address is not valid UTF-8",
      [string.rep("a", 250) .. "@example.org"] = "address is longer than 254 octets",
    } do
      local mb, err = message.parse_address(s)
      assert.is_nil(mb)
      assert.equal("config", err.kind)
      assert.equal(why, err.message)
    end
  end)
end)

describe("message.encode_header", function()
  it("encodes, folds for the given column, and round-trips", function()
    local s = string.rep("Überraschung ", 12)
    local v = message.encode_header(s, #"X-Long-Header-Name: ")
    assert.is_nil(v:find("[\128-\255]"))
    assert_lines_within("X-Long-Header-Name: " .. v, 78)
    assert.equal(s, decode_2047(v))
    assert.truthy(message.encode_header("a line =?"):find("^=%?UTF%-8%?[BQ]%?.*%?=$"))
    assert.equal("a line =?", decode_2047(message.encode_header("a line =?")))
    local _, err = message.encode_header("x\r\ny")
    assert.equal("header value contains a line break", err.message)
  end)
end)

describe("message through a real SMTP server (smtp-server on loopback)", function()
  local certs = require "spec.support.certs"
  local TOKEN = "ya29.message-spec-token-0123456789abcdef"
  local peer
  setup(function() peer = peers.node_smtp { token = TOKEN } end)
  teardown(function() if peer then peer.stop() end end)

  local function send(m)
    local trace = h.trace_collector()
    local s = assert(smtp.open { host = "localhost", port = peer.port, ca_file = certs.get().ca, timeout = 10,
      tls = "starttls", trace = trace })
    assert.is_true(s:auth { user = "alice@example.org", token = TOKEN })
    local r, err = s:send { from = m.envelope.from, to = m.envelope.to, data = m:reader() }
    s:close()
    h.assert_no_secrets(trace.text(), { TOKEN })
    return r, err
  end

  it("delivers the exact bytes of m:reader(), dot-stuffing included, to every envelope recipient", function()
    local dir = h.tmpdir()
    local path = h.write_file(dir .. "/data.bin", string.rep("\0\255.\r\n", 6000))
    local m = compose_ok {
      from = "alice@example.org", to = "bob@example.org", bcc = "carol@example.org", subject = "über",
      text = ".leading dot\n..two dots\n.\nend\n", attachments = { { path = path } },
    }
    local r = assert(send(m))
    assert.equal(250, r.code)
    local last = peer.messages()[#peer.messages()]
    assert.same({ "bob@example.org", "carol@example.org" }, last.to)
    assert.equal(m:size(), last.size)
    assert.equal(m:tostring(), last.data)
  end)

  it("streams a 5 MB attachment and the server counts m:size() octets", function()
    local dir = h.tmpdir()
    local path = dir .. "/five.bin"
    assert(h.exec("head -c 5000000 /dev/urandom > " .. h.quote(path)))
    local m = compose_ok { from = "alice@example.org", to = "bob@example.org", text = "x", attachments = { { path = path } } }
    assert(send(m))
    local last = peer.messages()[#peer.messages()]
    assert.equal(m:size(), last.size)
  end)
end)

-- Issue 12, defects 5, 6 and 10.
describe("message hardening", function()
  it("parses a 1 MB hostile To: header in linear time (defect 5)", function()
    local core = require "oauthmail.core"
    for _, value in ipairs {
      string.rep(" ", 1024 * 1024) .. "x",                              -- white space, then not an address
      "a@example.org" .. string.rep(" ", 1024 * 1024) .. "x",
      "Name" .. string.rep(" ", 1024 * 1024) .. "<a@example.org>",
      string.rep("<a> ", 256 * 1024) .. "x",
      string.rep("\t ", 512 * 1024) .. "<a@example.org>" .. string.rep(" ", 1000) .. "y",
    } do
      local t0 = core.monotime()
      local raw = "From: a@example.org\r\nTo: " .. value .. "\r\nSubject: x\r\n\r\nbody\r\n"
      local m, err = message.from_raw(raw, OPTS)
      local dt = core.monotime() - t0
      -- a bound that only a quadratic parser misses (64 KB took 32 s before)
      assert.truthy(dt < 10, string.format("took %.1f s", dt))
      if not m then assert.equal("config", err.kind) end
      local t1 = core.monotime()
      message.parse_address(value)
      assert.truthy(core.monotime() - t1 < 5)
    end
    -- and the white space around a real address is still trimmed
    assert.same({ name = "Name", address = "a@example.org" },
      message.parse_address("  Name" .. string.rep(" ", 100000) .. "<a@example.org>  "))
  end)

  it("refuses control bytes in every address header, quoted or literal (defect 6)", function()
    for _, bad in ipairs {
      '"a\\\0b"@example.org', '"a\\\27b"@example.org', "a@[1.2.3.\0]", "a@[\27]", '"\27[31m"@example.org',
    } do
      for _, field in ipairs { "reply_to", "to", "cc", "bcc", "from" } do
        local t = { from = "a@example.org", to = "b@example.org", text = "x" }
        t[field] = bad
        local msg, err = config_error(t)
        assert.truthy(msg:find("control", 1, true), field .. ": " .. msg)
        assert.equal("address", err.reason)
      end
      local mb, err = message.parse_address(bad)
      assert.is_nil(mb)
      assert.truthy(err.message:find("control", 1, true))
    end
    -- a display name with ESC or NUL
    for _, name in ipairs { "Evil\27[2J", "nul\0name" } do
      config_error { from = "a@example.org", to = { { name = name, address = "b@example.org" } }, text = "x" }
      config_error { from = "a@example.org", reply_to = name .. " <c@example.org>", to = "b@example.org", text = "x" }
    end
    -- and from_raw checks Reply-To like To and Cc
    local m, err = message.from_raw('From: a@example.org\r\nTo: b@example.org\r\nReply-To: "x\\\27y"@example.org\r\n\r\nb\r\n', OPTS)
    assert.is_nil(m)
    assert.truthy(err.message:find("Reply-To", 1, true), err.message)
  end)

  it("names attachments so Python's email reads every file name back exactly (defect 10)", function()
    local names = { "=?utf-8?q?evil?=.txt", "a*b.txt", "it's.txt", "a'b*c.txt", "100%.txt", "semi;colon.txt",
      'quote".txt', "back\\slash.txt", "plain.txt", "Ünï cödé*'.txt", "=?x?b?QUJD?=",
      "(comment).txt", "a,b.txt", "two  spaces.txt" }
    local atts = {}
    for i, n in ipairs(names) do atts[i] = { data = "data " .. i, filename = n } end
    local m = compose_ok { from = "a@example.org", to = "b@example.net", text = "x", attachments = atts }
    local py = python_parse(m:tostring())
    assert.same({}, py.defects)
    for i, n in ipairs(names) do
      assert.equal(n, py.parts[i + 2].filename)
    end
  end)
end)

describe("message.encode.crlf", function()
  it("makes every line break form CRLF, and returns CRLF text as it is", function()
    local encode = require "oauthmail.message.encode"
    for input, want in pairs {
      ["a\nb"] = "a\r\nb", ["a\rb"] = "a\r\nb", ["a\r\nb"] = "a\r\nb", ["a\r"] = "a\r\n", ["\n"] = "\r\n",
      ["a\r\r\nb"] = "a\r\n\r\nb", ["a\n\rb"] = "a\r\n\r\nb", [""] = "", ["no break"] = "no break",
      ["x\r\ny\nz"] = "x\r\ny\r\nz", ["x\r\ny\r"] = "x\r\ny\r\n",
      -- as many CRs as LFs, one of them alone
      ["a\r\nb\rc\n"] = "a\r\nb\r\nc\r\n", ["a\rb\r\n\r\n"] = "a\r\nb\r\n\r\n",
    } do
      assert.equal(want, encode.crlf(input), string.format("%q", input))
    end
  end)
end)

describe("message.encode.has_8bit", function()
  it("finds any byte above 127, wherever it is, and nothing in 7-bit text", function()
    local encode = require "oauthmail.message.encode"
    assert.is_false(encode.has_8bit(""))
    assert.is_false(encode.has_8bit("plain\r\ntext\0with\1controls\127"))
    for _, b in ipairs { 128, 160, 195, 255 } do
      local c = string.char(b)
      assert.is_true(encode.has_8bit(c), tostring(b))
      assert.is_true(encode.has_8bit(c .. string.rep("a", 5000)), tostring(b))
      assert.is_true(encode.has_8bit(string.rep("a", 5000) .. c), tostring(b))
      assert.is_true(encode.has_8bit(string.rep("a\r\n", 100) .. c .. "\0tail"), tostring(b))
    end
  end)
end)

describe("message.from_raw with one text read again", function()
  local TEXT = "From: a@example.org\r\nTo: b@example.org\r\nBcc: secret@example.org\r\nSubject: again\r\n\r\nbody\r\n"

  it("gives each message its own Message-ID, the call's envelope, and leaves Bcc out every time", function()
    local m1 = assert(message.from_raw(TEXT, { now = 1751371200 }))
    local m2 = assert(message.from_raw(TEXT, { now = 1751371201, to = "c@example.org" }))
    local m3 = assert(message.from_raw(TEXT, { from = "d@example.org", hostname = "mx.example.org" }))
    assert.are_not.equal(m1.message_id, m2.message_id)
    assert.are_not.equal(m2.message_id, m3.message_id)
    assert.truthy(m3.message_id:find("@mx.example.org$"))
    assert.same({ "b@example.org", "secret@example.org" }, m1.envelope.to)
    assert.same({ "c@example.org" }, m2.envelope.to)
    assert.equal("a@example.org", m2.envelope.from)
    assert.equal("d@example.org", m3.envelope.from)
    local t1, t2 = assert(m1:tostring()), assert(m2:tostring())
    for _, t in ipairs { t1, t2 } do assert.falsy(t:find("secret@example.org", 1, true)) end
    assert.truthy(t1:find("Date: " .. message._date(1751371200) .. "\r\n", 1, true))
    assert.truthy(t2:find("Date: " .. message._date(1751371201) .. "\r\n", 1, true))
    assert.equal("Tue, 01 Jul 2025 12:00:00 +0000", message._date(1751371200))
    assert.equal("Tue, 01 Jul 2025 12:00:01 +0000", message._date(1751371201))
    assert.equal(#t1, m1:size())
  end)

  it("refuses a bad text each time it is given, and a bad envelope for a text that read well", function()
    local bad = "From: a@example.org\r\nReply-To: x\27y@example.org\r\nTo: b@example.org\r\n\r\nbody\r\n"
    for _ = 1, 2 do
      local m, err = message.from_raw(bad)
      assert.is_nil(m)
      assert.equal("address", err.reason)
    end
    assert(message.from_raw(TEXT))
    local m, err = message.from_raw(TEXT, { to = "c@example.org\r\nRCPT TO:<x@evil.example>" })
    assert.is_nil(m)
    assert.equal("to", err.field)
    m, err = message.from_raw(TEXT, { to = "nul\0@example.org" })
    assert.is_nil(m)
    assert.equal("to", err.field)
  end)
end)

describe("message.id_pool", function()
  it("hands out distinct random hex of the asked length, drawn n ids at a time", function()
    local ids = message.id_pool(8)
    local seen = {}
    for _ = 1, 200 do
      local id = ids(16)
      assert.matches("^%x+$", id)
      assert.equal(32, #id)
      assert.is_nil(seen[id])
      seen[id] = true
    end
    assert.equal(24, #ids(12))
    assert.has_error(function() message.id_pool(0) end, "message.id_pool: n must be a positive whole number")
  end)

  it("makes the random part of the ids compose and from_raw add, and nothing when boundary_seed is set", function()
    local function fixed(len) return string.rep("ab", len) end
    local raw = "From: a@example.org\r\nTo: b@example.org\r\n\r\nx\r\n"
    local m = assert(message.from_raw(raw, { ids = fixed, hostname = "h.example.org" }))
    assert.equal(string.rep("ab", 16) .. "@h.example.org", m.message_id)
    m = assert(message.compose({ from = "a@example.org", to = "b@example.org", text = "x" },
      { ids = fixed, hostname = "h.example.org" }))
    assert.equal(string.rep("ab", 16) .. "@h.example.org", m.message_id)
    local seeded = assert(message.from_raw(raw, { ids = fixed, boundary_seed = "s", hostname = "h.example.org" }))
    assert.are_not.equal(string.rep("ab", 16) .. "@h.example.org", seeded.message_id)
    assert.has_error(function() message.from_raw(raw, { ids = "x" }) end, "message.from_raw: opts.ids must be a function")
    assert.has_error(function() message.compose({ from = "a@example.org", to = "b@example.org" }, { ids = 1 }) end,
      "message.compose: opts.ids must be a function")
  end)
end)
