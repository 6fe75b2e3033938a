-- fuzz/smtp_engine.lua — the driver of the smtp_engine target: the input is a
-- hostile server. Byte 1 and 2 choose how the client behaves (trace, limits,
-- SASL mechanism and initial response, STARTTLS, pipelining, DATA or BDAT,
-- how many messages); the rest is what the server sends, fed to the engine in
-- pieces split at each 0xFF byte. The client reacts to each reply the way
-- lua/oauthmail/smtp.lua would, so every state gets hostile replies.
--
-- Findings (raised, so the harness aborts): a raise from the engine on a
-- legal call sequence, a reply table out of shape, or the token/password
-- showing up in a trace event or a reply although the server never sent it.
local core = require "oauthmail.core"

local TOKEN = "ya29.FUZZ-secret-token-0123456789abcdef"
local PASSWORD = "fuzz-Passw0rd!"
local USER = "user@example.com"
local MECHS = { "XOAUTH2", "OAUTHBEARER", "PLAIN", "LOGIN" }
local STATES = {}
for _, s in ipairs(core.smtp.states) do STATES[s] = true end

local function bit(b, n) return math.floor(b / 2 ^ n) % 2 == 1 end

local function check_reply(r)
  assert(type(r) == "table", "reply is not a table")
  assert(math.type == nil or math.type(r.code) == "integer", "reply code is not an integer")
  assert(r.code >= 200 and r.code <= 599, "reply code out of range: " .. tostring(r.code))
  assert(type(r.text) == "string" and type(r.lines) == "table" and #r.lines >= 1, "reply without text or lines")
  assert(STATES[r.command], "reply names no state: " .. tostring(r.command))
  if r.enhanced then assert(r.enhanced:match("^%d%.%d+%.%d+$"), "odd enhanced code " .. r.enhanced) end
end

return function(data)
  if #data < 2 then return end
  local f1, f2 = data:byte(1, 2)
  local server = data:sub(3)
  local mech = MECHS[math.floor(f1 / 4) % 4 + 1]
  local secret = (mech == "PLAIN" or mech == "LOGIN") and PASSWORD or TOKEN
  -- a server that sends the secret itself (plainly, or as a base64 challenge
  -- the engine decodes) may see it again: nothing leaked then
  local seen = server:gsub("\255", "")
  local watch = not seen:find(secret, 1, true)
  for challenge in seen:gmatch("334 ([^\r\n]*)") do
    local raw = core.crypto.b64decode(challenge)
    if raw and raw:find(secret, 1, true) then watch = false end
  end
  local small = bit(f1, 1)
  local e = core.smtp.engine {
    trace = bit(f1, 0), max_line = small and 64 or nil, max_reply = small and 256 or nil,
  }
  local initial_mode = math.floor(f1 / 32) % 4  -- nil, true, false, nil
  local use_bdat, use_tls, use_pipe = bit(f1, 7), bit(f2, 0), bit(f2, 1)
  local messages_left = bit(f2, 6) and 2 or 1
  local caps, tls_done, authed, quitting = {}, false, false, false
  local rcpts_wanted = 0

  local function sweep(what)
    assert(STATES[e:state()], "the engine is in no state")
    local evs = e:trace_events()
    if evs and watch then
      for _, ev in ipairs(evs) do
        if ev.text:find(secret, 1, true) then error("secret in a trace event after " .. what .. ": " .. ev.text) end
      end
    end
    e:output()
  end

  local function quit()
    quitting = true
    e:quit()
  end

  local function body()
    local text = bit(f2, 5) and ".leading dot\r\nbare LF\nbare CR\r..\r\n.\r\nend" or "Subject: x\r\n\r\nhello\r\n"
    if use_bdat and caps.CHUNKING then
      e:bdat(text:sub(1, 7), false)
      e:bdat(text:sub(8), true)
    else
      e:data()
    end
  end

  -- bit 4 of byte 1: the messages go as one pipelined batch (eng:batch),
  -- when the server offers PIPELINING and CHUNKING
  local batch
  local function start_batch()
    local list = {
      { from = USER, to = { "a@example.org", "b@example.org" }, data = "Subject: x\r\n\r\nhello\r\n" },
      { from = "", to = "c@example.org", data = bit(f2, 5) and ".x\rbare\n\128\255" or "short" },
      { from = USER, to = "bad address@example.org", data = "x\r\n" },
      { from = USER, to = "d@example.org", data = bit(f2, 5) and { "Subject: y\r\n", "\r\nbare\n", "" }
        or { "Subject: y\r\n", "\r\nbody\r\n" }, eight_bit = true },
    }
    local queued, problems = e:batch(list, { 1, 2, 3, 4 }, type(caps.SIZE) == "number" and caps.SIZE or -1,
      bit(f2, 4))
    assert(problems and problems[3] and problems[3].reason == "invalid_address", "the bad address went out")
    local refused = 0
    for i, p in pairs(problems) do
      refused = refused + 1
      assert(i == 3 or p.reason == "too_large", "a good message was refused: " .. tostring(p.message))
    end
    assert(queued + refused == 4, "the batch lost a message")
    if queued == 0 then return end
    batch = { list = list, results = problems, st = {} }
  end

  local function batch_settled()
    local b = batch
    batch = nil
    local failed = {}
    for _, i in ipairs(b.st.failed) do failed[i] = true end
    for _, i in ipairs { 1, 2, 4 } do
      local r = b.results[i]
      assert(type(r) == "table", "a batched message was not settled")
      if r.reason == "too_large" or (r.accepted == nil and r.code and r.code < 300 and not failed[i]) then
        r = { code = r.code or 250, accepted = { "" }, rejected = {} }  -- refused before sending, or compact
      elseif failed[i] then
        assert(type(r.mr) == "table" and type(r.fr) == "table" and type(r.accepted) == "table"
          and type(r.rejected) == "table", "a failed batch message without its replies")
        check_reply(r.fr.lines and r.fr or { code = r.fr.code, text = r.fr.text, lines = { "" }, command = "BDAT" })
      else
        assert(r.code >= 200 and r.code < 300 and #r.accepted >= 1, "a receipt that is no receipt")
      end
      for addr, rr in pairs(r.rejected) do
        assert(type(addr) == "string", "rejected by something not an address")
        check_reply(rr)
      end
      if watch and (r.text or ""):find(secret, 1, true) then error("secret in a batch result") end
    end
    messages_left = 0
    e:noop()
    if bit(f2, 3) then quit() end
  end

  local function transaction()
    if bit(f1, 4) and caps.PIPELINING and caps.CHUNKING then return start_batch() end
    local params = {}
    if bit(f2, 2) then params[1] = "SMTPUTF8" end
    if caps.SIZE then params[#params + 1] = "SIZE=42" end
    local ok, err = e:mail("<" .. USER .. ">", params)
    if not ok then error("MAIL refused a valid sender: " .. tostring(err)) end
    rcpts_wanted = 2
    if caps.PIPELINING and use_pipe then
      assert(e:rcpt("a@example.org"))
      assert(e:rcpt("b@example.org"))
      rcpts_wanted = 0
      body()
    end
  end

  -- bit 7 of byte 2: the client also makes mistakes the engine must refuse
  -- cleanly (raise before it holds a secret, or return an error value)
  local clumsy = bit(f2, 7)

  local function auth()
    if clumsy then
      assert(not pcall(e.auth, e, mech, { user = "bad\r\nuser", token = TOKEN, password = PASSWORD }),
        "AUTH took a user with CRLF")
      assert(not pcall(e.auth, e, mech, { user = USER, token = TOKEN .. "\0", password = PASSWORD .. "\0" }),
        "AUTH took a secret with NUL")
      assert(not pcall(e.auth, e, "CRAM-MD5", { user = USER, token = TOKEN }), "AUTH took an unknown mechanism")
      local ok, err = e:mail("<a\r\nb@example.com>")
      assert(ok == nil and err.reason == "invalid_address", "MAIL took an address with CRLF")
      assert(core.smtp.check_address("user@example.com"))
      assert(not core.smtp.check_address("<a@b>c>"))
    end
    local initial
    if initial_mode == 1 then initial = true elseif initial_mode == 2 then initial = false end
    e:auth(mech, { user = USER, token = TOKEN, password = PASSWORD, host = "smtp.example.com", port = 587,
      initial = initial })
  end

  local function on_reply(r)
    check_reply(r)
    if watch and (r.text:find(secret, 1, true) or (r.challenge_text or ""):find(secret, 1, true)) then
      error("secret in a reply the server never sent it in")
    end
    if r.continue then return end          -- the engine answered a 334 itself
    local cmd, ok2 = r.command, r.code < 400
    if quitting and cmd == "QUIT" then return "done" end
    if cmd == "IDLE" then return "done" end -- unasked-for reply: the session ends
    if cmd == "GREETING" then
      if not ok2 then quit() return end
      assert(e:ehlo("client.example"))
    elseif cmd == "EHLO" then
      if not ok2 then assert(e:helo("client.example")) return end
      caps = r.caps or {}
      if use_tls and caps.STARTTLS and not tls_done then e:starttls()
      elseif not authed then authed = true auth()
      else transaction() end
    elseif cmd == "HELO" then
      authed = true
      auth()
    elseif cmd == "STARTTLS" then
      if r.injected then return "done" end  -- the client gives up there
      tls_done = true
      if r.code == 220 then
        e:reset()
        assert(e:ehlo("client.example"))
      else
        authed = true
        auth()
      end
    elseif cmd:match("^AUTH") then
      if select(1, e:pending()) == 0 then transaction() end
    elseif cmd == "MAIL" then
      if rcpts_wanted > 0 then
        assert(e:rcpt("a@example.org"))
        rcpts_wanted = rcpts_wanted - 1
      end
    elseif cmd == "RCPT" then
      if rcpts_wanted > 0 then
        assert(e:rcpt("b@example.org"))
        rcpts_wanted = rcpts_wanted - 1
      elseif select(1, e:pending()) == 0 then
        body()
      end
    elseif cmd == "DATA" then
      if r.code == 354 then
        e:body(bit(f2, 5) and ".x\r" or "line one\r\n")
        e:body(bit(f2, 5) and "\n.\n" or ".two\r\n")
        e:body_end()
      elseif select(1, e:pending()) == 0 then
        e:rset()
      end
    elseif cmd == "DATA_END" or (cmd == "BDAT" and select(1, e:pending()) == 0) then
      messages_left = messages_left - 1
      if messages_left > 0 then
        if bit(f2, 4) then e:rset() end
        transaction()
      else
        e:noop()
        if bit(f2, 3) then quit() end
      end
    elseif cmd == "RSET" then
      if messages_left > 0 and select(1, e:pending()) == 0 then transaction() end
    elseif cmd == "NOOP" then
      if select(1, e:pending()) == 0 then quit() end
    end
  end

  -- the first reply is asked for before any byte arrived, as smtp.lua does
  assert(e:reply() == nil)
  e:feed("")
  assert(e:reply() == nil)
  e:expect_greeting()
  sweep("start")
  local done = false
  for piece in (server .. "\255"):gmatch("([^\255]*)\255") do
    e:feed(piece)
    while not done do
      if batch then
        local settled, progressed, final_next = e:batch_replies(batch.list, batch.results, batch.st, nil,
          bit(f1, 4) and bit(f2, 6))
        sweep("batch replies")
        if settled == nil then
          assert(type(progressed) == "table" and type(progressed.message) == "string",
            "engine error is not an error value")
          if watch and progressed.message:find(secret, 1, true) then error("secret in an engine error") end
          done = true
        elseif settled then
          batch_settled()
          sweep("the batch settled")
        else
          assert(type(progressed) == "number" and type(final_next) == "boolean")
          break
        end
      else
        local r, err = e:reply()
        sweep("a reply")
        if err then
          assert(type(err) == "table" and type(err.message) == "string", "engine error is not an error value")
          if watch and err.message:find(secret, 1, true) then error("secret in an engine error") end
          done = true
        elseif not r then
          break
        elseif on_reply(r) == "done" then
          done = true
        end
        sweep("the client's answer")
      end
    end
    if done then break end
  end
  local queued, unread = e:pending()
  assert(queued >= 0 and unread >= 0)
  tostring(e)
  e:close()
  e:close()
end
