-- bench/smtp_sink.lua — a fast SMTP sink for bench/smtp_throughput: implicit
-- TLS over oauthmail.conn, offers PIPELINING, CHUNKING, 8BITMIME, SIZE and
-- AUTH (any credentials pass), discards every message. Replies are held until
-- the client's bytes run out, so a pipelined group costs one write back.
-- Usage: lua bench/smtp_sink.lua CERT KEY [concurrent [DELAY_MS]]   (prints "listening on PORT")
-- With "concurrent" it serves every connection at once under oauthmail.run
-- (each connection a task; one poll(2) for all of them). DELAY_MS holds
-- every write of replies that long (through oauthmail.wait, so the other
-- connections go on): a server a network round trip away.
local conn = require "oauthmail.conn"
local wait = require "oauthmail.wait"
local DELAY = (tonumber(arg[4]) or 0) / 1000

local cert, key = arg[1], arg[2]
local l = assert(conn.listen { host = "127.0.0.1", port = 0, backlog = 2048, tls = { cert = cert, key = key } })
io.stdout:write("listening on ", l:port(), "\n")
io.stdout:flush()

local EHLO = "250-sink\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250-SIZE 0\r\n" ..
  "250-ENHANCEDSTATUSCODES\r\n250 AUTH XOAUTH2 OAUTHBEARER PLAIN\r\n"
local READ = 256 * 1024

local function serve(c)
  local buf, pos = "", 1
  local out, n = {}, 0
  local messages = 0
  local function reply(s) n = n + 1 out[n] = s end
  local function flush()
    if n > 0 then
      if DELAY > 0 then wait.sleep(DELAY) end
      local ok = c:send(table.concat(out, "", 1, n))
      out, n = {}, 0
      return ok
    end
    return true
  end
  -- the client has nothing more to say for now: answer, then read on
  local function more()
    if not flush() then return false end
    local d = c:receive_some(READ)
    if not d then return false end
    if pos > #buf then buf = d else buf = buf:sub(pos) .. d end
    pos = 1
    return true
  end
  c:send("220 sink ESMTP\r\n")
  local auth_cont = false
  while true do
    local e = buf:find("\n", pos, true)
    if not e then
      if not more() then return messages end
    else
      local line = buf:sub(pos, e - 1)
      pos = e + 1
      local verb = line:sub(1, 4):upper()
      if auth_cont then
        auth_cont = false
        reply "235 2.7.0 ok\r\n"
      elseif verb == "MAIL" then reply "250 2.1.0 ok\r\n"
      elseif verb == "RCPT" then reply "250 2.1.5 ok\r\n"
      elseif verb == "BDAT" then
        local size, last = line:match("^....%s+(%d+)(.*)")
        size = tonumber(size)
        local have = #buf - pos + 1
        if have >= size then
          pos = pos + size
        else
          local need = size - have
          buf, pos = "", 1
          if not flush() then return messages end
          while need > 0 do
            local d = c:receive_some(need < READ and need or READ)
            if not d then return messages end
            need = need - #d
          end
        end
        if last:upper():find("LAST", 1, true) then
          messages = messages + 1
          reply "250 2.0.0 queued\r\n"
        else
          reply "250 2.0.0 chunk ok\r\n"
        end
      elseif verb == "DATA" then
        reply "354 go ahead\r\n"
        -- find CRLF.CRLF, the CRLF ending the DATA line counts as its start
        local tail = "\r\n"
        while true do
          local s = tail .. buf:sub(pos)
          local i = s:find("\r\n.\r\n", 1, true)
          if i then
            pos = pos + (i + 4) - #tail
            break
          end
          tail = s:sub(-4)
          buf, pos = "", 1
          if not more() then return messages end
        end
        messages = messages + 1
        reply "250 2.0.0 queued\r\n"
      elseif verb == "EHLO" then reply(EHLO)
      elseif verb == "HELO" then reply "250 sink\r\n"
      elseif verb == "AUTH" then
        if line:find("^%S+%s+%S+%s+%S") then reply "235 2.7.0 ok\r\n"
        else auth_cont = true reply "334 \r\n" end
      elseif verb == "RSET" or verb == "NOOP" then reply "250 2.0.0 ok\r\n"
      elseif verb == "QUIT" then
        reply "221 2.0.0 bye\r\n"
        flush()
        return messages
      else reply "502 5.5.2 unknown\r\n" end
    end
  end
end

if arg[3] == "concurrent" then
  local loop = require "oauthmail.loop"
  loop.run(function()
    while true do
      local c = l:accept(3600)
      if not c then break end
      c:settimeout(600)
      loop.spawn(function()
        serve(c)
        c:close()
      end)
    end
  end)
else
  while true do
    local c = l:accept(3600)
    if not c then break end
    c:settimeout(120)
    local m = serve(c)
    c:close()
    io.stderr:write("sink: connection done, ", m, " messages\n")
  end
end
