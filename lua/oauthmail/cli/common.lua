-- oauthmail.cli.common — what every subcommand shares: finding a profile by
-- name on the search path, the command line's default token store, the
-- --trace writer, progress on a terminal, and exit codes from sysexits.h.
local errors = require "oauthmail.errors"

local M = {}

-- sysexits.h
M.EX = { OK = 0, USAGE = 64, DATAERR = 65, NOINPUT = 66, UNAVAILABLE = 69, SOFTWARE = 70,
  CANTCREAT = 73, IOERR = 74, TEMPFAIL = 75, NOPERM = 77, CONFIG = 78 }

local function getenv(k)
  local v = os.getenv(k)
  if v == "" then return nil end
  return v
end
M.getenv = getenv

local function home() return getenv("HOME") or "" end

-- ------------------------------------------------------------ profiles

-- The folders searched for NAME.lua, in order.
function M.search_path()
  local dirs = {}
  local env = getenv("OAUTHMAIL_PROFILE_PATH")
  if env then
    for d in env:gmatch("[^:]+") do dirs[#dirs + 1] = d end
  end
  dirs[#dirs + 1] = (getenv("XDG_CONFIG_HOME") or (home() .. "/.config")) .. "/oauthmail/profiles"
  dirs[#dirs + 1] = "/etc/oauthmail/profiles"
  return dirs
end

-- Where the command line keeps tokens of profiles that name no store.
function M.state_dir()
  return (getenv("XDG_STATE_HOME") or (home() .. "/.local/state")) .. "/oauthmail"
end

local function readable(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function list_dir(dir)
  local out = {}
  local p = io.popen("ls -1 -- '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null")
  if not p then return out end
  for line in p:lines() do
    local name = line:match("^(.+)%.lua$")
    if name then out[#out + 1] = name end
  end
  p:close()
  table.sort(out)
  return out
end

-- profiles.list() -> { {name=, path=, dir=, shadowed_by=?}, ... } in search order
function M.list_profiles()
  local seen, out = {}, {}
  for _, dir in ipairs(M.search_path()) do
    for _, name in ipairs(list_dir(dir)) do
      local e = { name = name, dir = dir, path = dir .. "/" .. name .. ".lua" }
      if seen[name] then e.shadowed_by = seen[name].path else seen[name] = e end
      out[#out + 1] = e
    end
  end
  return out
end

-- A NAME with a slash or ending in .lua is a path; otherwise NAME.lua is
-- looked for on the search path.
function M.find_profile(name)
  if type(name) ~= "string" or name == "" then
    return errors.fail("config", "no profile given: use --profile NAME (or set OAUTHMAIL_PROFILE)",
      { reason = "no_profile", hint = "list the profiles found with: oauthmail profiles" })
  end
  if name:find("/", 1, true) or name:match("%.lua$") then
    if readable(name) then return name end
    return errors.fail("config", "cannot read profile file " .. name, { reason = "profile_file" })
  end
  if not name:match("^[%w][%w._@%-]*$") then
    return errors.fail("config", "'" .. name .. "' is not a profile name (letters, digits, . _ - @)",
      { reason = "profile_name" })
  end
  local dirs = M.search_path()
  for _, dir in ipairs(dirs) do
    local p = dir .. "/" .. name .. ".lua"
    if readable(p) then return p end
  end
  local names = {}
  for _, e in ipairs(M.list_profiles()) do names[e.name] = true end
  local near = require("oauthmail.names").closest(name, names)
  return errors.fail("config", string.format("no profile '%s' (looked for %s.lua in %s)%s", name, name,
    table.concat(dirs, ", "), near and (" — did you mean '" .. near .. "'?") or ""),
    { reason = "no_profile", hint = "put " .. name .. ".lua in one of those folders, give a path, "
      .. "or list the profiles found with: oauthmail profiles" })
end

-- ------------------------------------------------------------ terminal

-- Is file descriptor fd a terminal? isatty(3) through oauthmail.sys (no shell
-- is started: a short-lived command pays for every process it spawns).
function M.isatty(fd)
  local forced = getenv("OAUTHMAIL_TTY")   -- "0" or "1": tests and wrappers decide
  if forced then return forced == "1" end
  return require("oauthmail.sys").isatty(fd)
end

-- ------------------------------------------------------------ the context

local Ctx = {}
Ctx.__index = Ctx

-- common.context(opts) -> ctx: opts are the parsed common options.
function M.context(opts, command)
  local self = setmetatable({ opts = opts, command = command, quiet = opts.quiet == true }, Ctx)
  return self
end

-- Lines for the person at the terminal (stderr), never for scripts (stdout).
function Ctx:say(fmt, ...)
  if self.quiet then return end
  io.stderr:write(string.format(fmt, ...), "\n")
  io.stderr:flush()
end

-- Progress: only when stderr is a terminal, and not with --quiet.
function Ctx:progress_on()
  if self.quiet then return false end
  return M.isatty(2)
end

-- Overwrite the current stderr line (a countdown, a percentage).
function Ctx:status(text)
  if not self:progress_on() then return end
  io.stderr:write("\r\27[K", text)
  io.stderr:flush()
  self.status_shown = true
end

function Ctx:status_done()
  if self.status_shown then
    io.stderr:write("\r\27[K")
    io.stderr:flush()
    self.status_shown = false
  end
end

-- Open --trace FILE (if given). Returns true | nil, err.
function Ctx:open_trace()
  if not self.opts.trace or self.tracer then return true end
  local w, err = require("oauthmail.trace").writer(self.opts.trace, self.profile_name)
  if not w then
    return errors.fail("config", "cannot open trace file " .. self.opts.trace .. ": " .. tostring(err and err.message or err),
      { reason = "trace" })
  end
  self.tracer = w
  return true
end

-- One event into the trace (if any) and to the listeners.
function Ctx:event(ev)
  if self.tracer then self.tracer.event(ev, self.profile_name) end
  if self.listener then self.listener(ev) end
end

function Ctx:close()
  if self.tracer then self.tracer.close() self.tracer = nil end
end

-- ctx:load_profile() -> profile table | nil, err. The file is found, loaded
-- and given the command line's defaults: a file store under the state
-- folder when it names none, and the --trace writer.
function Ctx:load_profile()
  local name = self.opts.profile or getenv("OAUTHMAIL_PROFILE")
  local path, err = M.find_profile(name)
  if not path then return nil, err end
  local profile_mod = require "oauthmail.profile"
  local p
  p, err = profile_mod.load(path)
  if not p then return nil, err end
  self.profile_path = path
  self.profile_name = p.name
  if p.store == nil then
    local safe = tostring(p.name):gsub("[^%w._@%-]", "_")
    p.store = { kind = "file", path = M.state_dir() .. "/" .. safe .. ".json" }
    self.default_store = p.store.path
  end
  local ok
  ok, err = self:open_trace()
  if not ok then return nil, err end
  local own = p.trace
  if self.tracer then
    local this = self
    if type(own) == "function" then
      p.trace = function(ev) this:event(ev) return own(ev) end
    else
      p.trace = function(ev) this:event(ev) end
    end
  elseif self.listener then
    local this = self
    if type(own) ~= "function" and own ~= nil then
      -- a trace file named by the profile keeps its text form; listeners
      -- then see nothing, which only costs the progress lines
      return p
    end
    p.trace = function(ev)
      this:event(ev)
      if own then return own(ev) end
    end
  end
  return p
end

-- ------------------------------------------------------------ errors

-- The sysexits code for an error value: 75 when trying later may help.
function M.exit_code(err)
  if type(err) ~= "table" then return M.EX.SOFTWARE end
  local kind = err.kind
  if kind == "config" then
    if err.reason == "message" or err.reason == "raw" or err.reason == "address" or err.reason == "too_long"
      or err.reason == "missing" or err.reason == "utf8" then
      return M.EX.DATAERR
    end
    if err.reason == "reader" then return M.EX.NOINPUT end
    return M.EX.CONFIG
  end
  if err.retryable then return M.EX.TEMPFAIL end
  -- an SMTP 4xx is temporary by definition (err.code of oauth/http errors is an HTTP status)
  local code = tonumber(err.code)
  if (kind == "smtp" or kind == "auth") and code and code >= 400 and code < 500 then return M.EX.TEMPFAIL end
  if kind == "network" then return M.EX.TEMPFAIL end
  if kind == "auth" or kind == "oauth" then return M.EX.NOPERM end
  if kind == "store" then
    return err.reason == "timeout" and M.EX.TEMPFAIL or M.EX.CANTCREAT
  end
  if kind == "policy" then return M.EX.UNAVAILABLE end
  return M.EX.UNAVAILABLE
end

-- Print an error for a person: message, hint, on stderr (even with --quiet).
function M.report(err)
  if type(err) == "table" and err.oauth_error then
    if not tostring(err.message):find(err.oauth_error, 1, true) then
      err.message = tostring(err.message) .. " (" .. err.oauth_error .. ")"
    end
    err.hint = err.hint or require("oauthmail.doctor").OAUTH_HINTS[err.oauth_error]
  end
  local text = tostring(err)
  if type(err) == "table" and err.cause and not (err.hint or ""):find(err.cause, 1, true) then
    text = text .. "\n  cause: " .. tostring(err.cause)
  end
  io.stderr:write("oauthmail: ", text, "\n")
  io.stderr:flush()
end

return M
