-- oauthmail.tokens — the token lifecycle: hand out an access token that stays
-- valid for a safety margin, from memory, from the store, by refresh token, or
-- by re-running a flow that needs nobody; refresh once however many callers
-- need it at once (coroutines here, processes through the store's lock); and
-- save a rotated refresh token before the new access token is used.
local cjson = require "cjson.safe"
local errors = require "oauthmail.errors"
local options = require "oauthmail.options"
local store_mod = require "oauthmail.store"
local wait = require "oauthmail.wait"

local M = {}
local Manager = {}
Manager.__index = Manager

local pack = table.pack or function(...) return { n = select("#", ...), ... } end
local unpack = table.unpack or unpack

local protected_call = errors.pcall

local finite = options.finite

-- How long an access token stays in the refused set when its expiry is unknown.
local INVALID_TTL = 86400

-- Yielded by get() from a coroutine while another coroutine of this manager
-- is refreshing, when the waiter in use cannot park coroutines itself (the
-- default blocking one): the caller's scheduler resumes the waiter later, and
-- get() then returns the shared result. Under a loop's waiter (oauthmail.run,
-- cqueues, luv) the coroutine is parked and woken when the refresh ends.
M.WAIT = wait.WAIT

M.DEFAULT_MARGIN = 300

-- tokens.default_margin(provider) -> seconds: the preset's, else DEFAULT_MARGIN.
function M.default_margin(provider)
  local preset = type(provider) == "string" and require("oauthmail.providers").presets[provider]
  return preset and preset.margin or M.DEFAULT_MARGIN
end

-- TEST HOOK (spec/support/token_worker.lua only): called with "after_token",
-- "before_save" and "after_save" so the crash tests can end the process there.
M._test_fault = nil

local function fault(point)
  if M._test_fault then M._test_fault(point) end
end

local function json_string(s)
  return (cjson.encode(s):gsub("\\/", "/"))
end

local function scope_string(scope)
  local list = {}
  if type(scope) == "table" then
    for _, s in ipairs(scope) do list[#list + 1] = tostring(s) end
  elseif type(scope) == "string" then
    for s in scope:gmatch("%S+") do list[#list + 1] = s end
  end
  table.sort(list)
  return table.concat(list, " ")
end

-- The account a token belongs to: who issues it, to which client, for which
-- user, with which scopes. Readable in a token file, unambiguous as a key.
function M.account_key(flow)
  if type(flow) ~= "table" then error("tokens.account_key: expected the flow table", 2) end
  local parts = {
    flow.issuer or flow.token_endpoint or flow.tenant or "",
    flow.client_id or "",
    flow.user or flow.username or flow.login_hint or "",
    scope_string(flow.scope),
  }
  for i, p in ipairs(parts) do parts[i] = json_string(tostring(p)) end
  return "[" .. table.concat(parts, ",") .. "]"
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local OPTIONS = {
  flow = function(v) if type(v) ~= "table" then return "must be the flow configuration table" end end,
  margin = function(v) if not options.finite(v) or v < 0 then return "must be a non-negative number of seconds" end end,
  interactive = "boolean|function",
  clock = "callable", trace = "callable", seed = "callable",
  oauth2 = function(v)
    if type(v) ~= "table" or type(v.run) ~= "function" or type(v.refresh) ~= "function" then
      return "must be a module with run and refresh"
    end
  end,
  profile = "string", lock_timeout = "number",
  store = function(v) local _ = v end,   -- checked by oauthmail.store
}

-- tokens.check(opts) -> nil | field, text: what tokens.new would refuse, as a
-- value (oauthmail.new names the profile field from it).
function M.check(opts)
  if type(opts) ~= "table" then return "opts", "expected an options table" end
  if opts.flow == nil then return "flow", "must be the flow configuration table" end
  return options.problem(opts, OPTIONS)
end

local function check_opts(opts)
  if type(opts) ~= "table" then error("tokens.new: expected an options table", 3) end
  local field, text = M.check(opts)
  if field then error(string.format("tokens.new: '%s' %s", field, text), 3) end
end

-- tokens.new{flow=, store=, margin=, interactive=, oauth2=, profile=, lock_timeout=, clock=, trace=}
function M.new(opts)
  check_opts(opts)
  local flow = opts.flow
  local self = setmetatable({
    flow = flow,
    store = store_mod.new(opts.store),
    -- the provider preset's margin (microsoft: 600 s, for 501 5.5.127) unless given
    margin = opts.margin or M.default_margin(flow.provider),
    interactive = opts.interactive or false,
    oauth2 = opts.oauth2,
    profile = opts.profile,
    lock_timeout = opts.lock_timeout or 30,
    clock = opts.clock or os.time,
    trace_fn = opts.trace,
    invalid = {},      -- access tokens a server refused (set of strings, memory only)
    cached = nil,      -- the last record this manager handed out or loaded
    unsaved = nil,     -- a record obtained but not yet saved (the store failed)
    inflight = nil,    -- the coroutine (or MAIN) refreshing right now
    seed = opts.seed,  -- fn() -> a refresh token of another account of the same sign-in, or nil
  }, Manager)
  self.key = opts.key or M.account_key(flow)
  if not store_mod.is_store(self.store) then error("tokens.new: 'store' is not a store", 2) end
  return self
end

-- tokens.for_settings(settings, oauth [, {trace=, clock=, seed=}]) -> manager | nil, err
-- The manager a profile's settings (oauthmail.profile.read) give for one of
-- its flow tables (settings.oauth, or settings.graph_oauth): its store,
-- margin and interactivity. `seed`, another manager, lends its refresh token
-- to this one while it has none. A wrong field is a config error naming it.
function M.for_settings(s, oauth, extra)
  extra = extra or {}
  local flow = {}
  for k, v in pairs(oauth) do flow[k] = v end
  flow.trace = extra.trace
  local seed = extra.seed
  local topts = {
    flow = flow, store = s.store, margin = s.margin, interactive = s.interactive,
    profile = s.name, clock = extra.clock, trace = extra.trace,
    seed = seed and function() return seed:refresh_token() end or nil,
  }
  -- the profile's field, from check's value (its options carry the
  -- profile's names); only a store that cannot be opened raises below
  local field, text = M.check(topts)
  if field then
    return errors.fail("config", field .. ": " .. text, { reason = "profile", field = field, retryable = false })
  end
  local ok, mgr = pcall(M.new, topts)
  if not ok then
    local msg = tostring(mgr):gsub("^[^:]*:%d+: ", "")
    return errors.fail("config", "store: " .. msg, { reason = "profile", field = "store", retryable = false })
  end
  return mgr
end

local MAIN = {}

function Manager:trace(ev)
  if self.trace_fn then
    ev.type = "token"
    self.trace_fn(ev)
  end
end

-- store:<method>(...) with a raise turned into a store error: a broken store
-- (or a custom one with a bug) must not throw out of get() or mailer:send().
function Manager:store_call(method, ...)
  local st = self.store
  local res = pack(protected_call(st[method], st, ...))
  if res[1] then return unpack(res, 2, res.n) end
  local name = "token store"
  if type(st.describe) == "function" then
    local ok, d = pcall(st.describe, st)
    if ok and type(d) == "string" then name = d end
  end
  return errors.fail("store", string.format("%s failed: %s", name, tostring(res[2])), { reason = "raised" })
end

function Manager:api()
  if not self.oauth2 then self.oauth2 = require "oauthmail.oauth2" end
  return self.oauth2
end

function Manager:grant()
  return self.flow.grant or self.flow.flow
end

function Manager:is_interactive_grant()
  local api = self:api()
  if api.interactive then return api.interactive(self:grant()) == true end
  local g = self:grant()
  return g == "authorization_code" or g == "device_code"
end

function Manager:may_interact()
  if type(self.interactive) == "function" then return self.interactive(self:grant()) == true end
  return self.interactive == true
end

-- The margin that applies to one record: the configured one, or half the
-- token's lifetime when the server issues tokens shorter-lived than the
-- margin (otherwise every get would refresh).
function Manager:margin_for(rec)
  local m = self.margin
  if rec.obtained_at and rec.expires_at then
    local half = (rec.expires_at - rec.obtained_at) / 2
    if half < m then m = half end
  end
  return m
end

-- A record from a store is checked before any arithmetic on it: a command
-- store may print "expires_at": "soon", a custom one may hand back anything.
-- A malformed record is treated as absent (its refresh token is still tried).
function Manager:well_formed(rec)
  if type(rec) ~= "table" or rec.access_token == nil then return false end
  if options.access_token_problem(rec.access_token) or (rec.expires_at ~= nil and not finite(rec.expires_at))
    or (rec.obtained_at ~= nil and not finite(rec.obtained_at)) then
    self:trace { event = "bad_record", account = self.key }
    return false
  end
  return true
end

function Manager:usable(rec)
  if not self:well_formed(rec) then return false end
  if self.invalid[rec.access_token] then return false end
  if rec.expires_at == nil then return true end
  return rec.expires_at - self.clock() >= self:margin_for(rec)
end

local function public(rec)
  local t = copy(rec)
  t.obtained_at = nil
  return t
end

function Manager:consent_error(cause)
  local cmd = "oauthmail login --profile " .. (self.profile or "<profile>")
  local msg = string.format('no usable token for %s and the "%s" flow needs a person to sign in; '
    .. 'run "%s" or call manager:login()', self.flow.user or self.flow.username or self.flow.client_id or "this account",
    tostring(self:grant()), cmd)
  local fields = { reason = "consent_required", hint = 'run "' .. cmd .. '" once on a machine with a browser '
    .. '(or the device code screen), then retry' }
  if cause then
    msg = msg .. " (" .. tostring(cause.message) .. ")"
    fields.oauth_error = cause.oauth_error
    fields.provider_code = cause.provider_code
  end
  return errors.fail("oauth", msg, fields)
end

-- Obtain a fresh token record. The caller holds the store's lock.
function Manager:fetch(rec, allow_interactive)
  local api = self:api()
  local tok, err, refresh_err
  if not (rec and type(rec.refresh_token) == "string") and self.seed and self:is_interactive_grant() then
    -- a delegated sign-in made for another resource (SMTP) gives this one
    -- (Graph) its token through its refresh token: no second sign-in
    local ok, rt = pcall(self.seed)
    if ok and type(rt) == "string" and rt ~= "" then
      self:trace { event = "seeded", account = self.key }
      rec = { refresh_token = rt }
    end
  end
  if rec and type(rec.refresh_token) == "string" then
    self:trace { event = "refresh", account = self.key }
    tok, err = api.refresh(self.flow, rec.refresh_token)
    if not tok then
      -- a dead refresh token (expired, revoked, rotated away: invalid_grant)
      -- is replaced by a new grant; anything else is reported as it is
      if not (errors.is(err) and err.oauth_error == "invalid_grant") then return nil, err end
      refresh_err = err
      self:trace { event = "refresh_rejected", account = self.key, oauth_error = err.oauth_error,
        provider_code = err.provider_code }
    elseif not tok.refresh_token then
      tok.refresh_token = rec.refresh_token
    end
  end
  if not tok then
    if self:is_interactive_grant() and not allow_interactive then
      return self:consent_error(refresh_err)
    end
    self:trace { event = "run_flow", account = self.key, grant = self:grant() }
    tok, err = api.run(self.flow)
    if not tok then return nil, err end
  end
  if type(tok) ~= "table" or type(tok.access_token) ~= "string" then
    error("tokens: the oauth2 module returned no access_token", 0)
  end
  local new = copy(tok)
  new.obtained_at = self.clock()
  -- freshly issued: even if it is a token refused before (a server that
  -- caches client-credentials tokens hands out the same one), it is used;
  -- whether a second refusal is final is the caller's decision
  self.invalid[new.access_token] = nil
  return new
end

-- Save and remember a record; on failure keep it so the next get retries the
-- save before anything else (a rotated refresh token must not be lost).
function Manager:commit(new)
  fault("before_save")
  local ok, err = self:store_call("save", self.key, new)
  fault("after_save")
  if not ok then
    self.unsaved = new
    self:trace { event = "save_failed", account = self.key }
    err.message = "obtained a new token but could not save it: " .. tostring(err.message)
      .. " (kept in memory; the save is retried on the next get)"
    return nil, err
  end
  self.unsaved = nil
  self.cached = new
  self:trace { event = "saved", account = self.key, expires_at = new.expires_at }
  return new
end

-- Is the stored record newer than (or the same as) the one kept back unsaved?
local function supersedes(stored, unsaved)
  if type(stored) ~= "table" or type(stored.access_token) ~= "string" then return false end
  if stored.access_token == unsaved.access_token then return true end
  return finite(stored.obtained_at) and finite(unsaved.obtained_at) and stored.obtained_at >= unsaved.obtained_at
end

function Manager:release_held()
  if self.held_release then self.held_release() end
end

-- Under the store's lock: re-read, refresh only if still needed, save, release.
function Manager:locked_obtain(force_flow)
  local raw_release, lerr = self:store_call("lock", self.key, self.lock_timeout)
  if not raw_release then return nil, lerr end
  -- remembered so a refresh that raised does not leave the lock held
  local function release()
    self.held_release = nil
    errors.pcall(raw_release)
  end
  self.held_release = release
  local rec, rerr = self:store_call("load", self.key)
  if rerr then release() return nil, rerr end
  if self.unsaved then
    -- a token kept back after a failed save is written only if the store
    -- does not meanwhile hold a newer one (another process refreshed)
    if supersedes(rec, self.unsaved) then
      self.unsaved = nil
      self:trace { event = "unsaved_dropped", account = self.key }
    else
      local result, err = self:commit(self.unsaved)
      if not result then release() return nil, err end
      rec = result
    end
  end
  if not force_flow and self:usable(rec) then
    self:trace { event = "from_store", account = self.key, after_lock = true }
    self.cached = rec
    release()
    return rec
  end
  local new, ferr = self:fetch(not force_flow and rec or nil, force_flow or self:may_interact())
  if not new then release() return nil, ferr end
  fault("after_token")
  local result, err = self:commit(new)
  release()
  return result, err
end

-- Run `fn` as the one in-process refresh, or wait for the one in flight.
function Manager:single_flight(fn, ...)
  local co, ismain = coroutine.running()
  local me = (co == nil or ismain) and MAIN or co
  local holder = self.inflight
  if holder and holder ~= MAIN and coroutine.status(holder) == "dead" then
    -- its coroutine was closed while suspended in the refresh: nothing is in flight
    holder = nil
    self.inflight = nil
    self:release_held()
  end
  if holder then
    -- the holder is running (it is us, or main, which cannot be suspended) or
    -- it resumed us: a trace hook or the flow called get() again
    if holder == me or holder == MAIN or coroutine.status(holder) == "normal" then
      return errors.fail("policy", "get() was called from inside this account's own token refresh "
        .. "(a trace hook or the flow calling back)", { reason = "busy" })
    end
    if me == MAIN then
      return errors.fail("policy", "a token refresh for this account is already in progress in this "
        .. "process; call get() from a coroutine to wait for it", { reason = "busy" })
    end
    -- bounded like the store's lock: a holder that is never resumed again
    -- must not keep its waiters forever
    local deadline = self.clock() + self.lock_timeout
    local mono_deadline = wait.now() + self.lock_timeout
    self.refreshed = self.refreshed or wait.cond()
    repeat
      self.refreshed:wait(mono_deadline)
      if self.inflight ~= nil and (self.clock() >= deadline or wait.now() >= mono_deadline) then
        return errors.fail("store", string.format("timed out after %g s waiting for another coroutine's "
          .. "token refresh (the coroutine refreshing was not resumed)", self.lock_timeout), { reason = "timeout" })
      end
    until self.inflight == nil
    return nil, nil, true
  end
  self.inflight = me
  local res = pack(protected_call(fn, self, ...))
  self.inflight = nil
  if self.refreshed then self.refreshed:signal() end
  if not res[1] then
    -- a raise (flow, trace hook, programming error) gives back the lock
    -- before it goes on to the caller
    self:release_held()
    error(res[2], 0)
  end
  return res[2], res[3]
end

-- manager:peek() -> token | nil, err: a token with margin left from memory
-- or the store, without any request or lock; nil (and no error) when there
-- is none and get() would have to obtain one.
function Manager:peek()
  if self.unsaved then return nil end
  if self:usable(self.cached) then return public(self.cached) end
  local rec, err = self:store_call("load", self.key)
  if err then return nil, err end
  if self:usable(rec) then
    self:trace { event = "from_store", account = self.key }
    self.cached = rec
    return public(rec)
  end
  return nil
end

-- manager:get() -> token | nil, err
function Manager:get()
  for _ = 1, 3 do
    local tok, err = self:peek()
    if tok or err then return tok, err end
    local rec, waited
    rec, err, waited = self:single_flight(self.locked_obtain, false)
    if not waited then
      if not rec then return nil, err end
      return public(rec)
    end
    -- another coroutine refreshed meanwhile: take its result from the cache
  end
  return errors.fail("policy", "could not obtain a token after waiting for other refreshes", { reason = "busy" })
end

-- manager:refresh_token() -> the refresh token this manager holds (memory
-- or store), or nil; never traced.
function Manager:refresh_token()
  local rec = self.cached
  if not (rec and type(rec.refresh_token) == "string") then
    rec = self:store_call("load", self.key)
  end
  return type(rec) == "table" and type(rec.refresh_token) == "string" and rec.refresh_token or nil
end

-- manager:invalidate(token) after a server refused it: the next get refreshes.
function Manager:invalidate(token)
  local at = type(token) == "table" and token.access_token or token
  if type(at) ~= "string" then error("manager:invalidate: expected a token table or an access token string", 2) end
  -- entries live until the token would have expired anyway, so the set
  -- stays small in a long-running process
  local now = self.clock()
  for k, until_t in pairs(self.invalid) do
    if until_t <= now then self.invalid[k] = nil end
  end
  local exp = type(token) == "table" and finite(token.expires_at) and token.expires_at or now + INVALID_TTL
  self.invalid[at] = exp
  self:trace { event = "invalidated", account = self.key }
  return true
end

-- manager:login() -> token | nil, err: run the configured flow now (the
-- interactive ones included) and save the result, whatever the store holds.
function Manager:login()
  local rec, err, waited = self:single_flight(self.locked_obtain, true)
  if waited then return self:get() end
  if not rec then return nil, err end
  return public(rec)
end

-- manager:logout() -> true | nil, err: forget this account's tokens here and in the store.
function Manager:logout()
  local release, lerr = self:store_call("lock", self.key, self.lock_timeout)
  if not release then return nil, lerr end
  local ok, err = self:store_call("save", self.key, nil)
  errors.pcall(release)
  self.cached, self.unsaved = nil, nil
  if not ok then return nil, err end
  return true
end

M.Manager = Manager
return M
