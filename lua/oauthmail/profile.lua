-- oauthmail.profile — read a tenant's profile (a table, or a Lua file that
-- returns one), check every field against the schema below, and resolve it
-- with its provider's preset into the settings the mailer runs on.
-- A bad field is named with what was expected; an unknown one (a typo) is an
-- error with the closest known name. See docs/profiles.md.
local errors = require "oauthmail.errors"
local providers = require "oauthmail.providers"

local M = {}

local function enum(...) return { enum = { ... } } end

local GRANTS = enum("client_credentials", "authorization_code", "device_code", "refresh_token", "jwt_bearer", "password")

-- Each field: a type list ("string|table") or {enum=...} or {fields=...} (a nested table).
-- Number fields name their range (NUMBERS below): a count is a whole number
-- >= 1, seconds are finite and >= 0, a duration finite and > 0.
M.SCHEMA = {
  name = "string",
  provider = enum("microsoft", "google", "generic"),
  cloud = enum("global", "usgov", "china"),
  service = enum("exchange", "hve", "outlook"),
  tenant = "string",
  flow = GRANTS,
  client_id = "string",
  client_secret = "string",
  client_certificate = { fields = { cert = "string", key = "string", passphrase = "string",
    alg = enum("PS256", "RS256"), kid = "string" } },
  secret_expires = "string",   -- the client secret's end date (YYYY-MM-DD), for oauthmail doctor
  client_auth = enum("client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
    "self_signed_tls_client_auth", "none"),
  user = "string",
  from = "string",
  scope = "string|table",
  issuer = "string",
  token_endpoint = "string",
  authorization_endpoint = "string",
  device_authorization_endpoint = "string",
  revocation_endpoint = "string",
  endpoints = { fields = { token = "string", authorization = "string", device_authorization = "string",
    revocation = "string" } },
  ca_file = "string",
  service_account_file = "string",
  subject = "string",
  username = "string",
  password = "string",
  refresh_token = "string",
  allow_password_grant = "boolean",
  oauth = { fields = {
    timeout = "duration", retry = "table", proxy = "string", verify = "boolean", tls_client_cert = "string",
    tls_client_key = "string", redirect_uri = "string", redirect_path = "string", open_url = "function",
    browser_command = "string", on_prompt = "function", wait_timeout = "duration", manual = "boolean",
    read_line = "function", prompt = "string", login_hint = "string", authorization_params = "table",
    on_device_code = "function", assertion_lifetime = "duration", sleep = "function",
  } },
  smtp = { fields = {
    host = "string", port = "port", tls = enum("starttls", "implicit", "none"), timeout = "duration",
    data_timeout = "duration", ca_file = "string", ca_path = "string", verify = "boolean", min_tls = "string", client_cert = "string",
    client_key = "string", servername = "string", helo = "string",
    mechanism = enum("xoauth2", "oauthbearer"), two_step = "boolean", allow_plaintext_auth = "boolean",
    connect = "function",
  } },
  transport = "string|table",
  failover_on = "table",
  graph = { fields = {
    endpoint = "string", scope = "string|table", timeout = "duration", ca_file = "string", verify = "boolean",
    proxy = "string", max_request = "count", concurrency = "count", allow_http = "boolean", token_params = "table",
  } },
  token_params = "table",
  store = "table",
  margin = "seconds",
  interactive = "boolean|function",
  trace = "string|function",
  limits = { fields = {
    messages_per_minute = "count|false", messages_per_day = "count|false",
    recipients_per_day = "count|false", recipients_per_message = "count|false",
    connections = "count|false", on_limit = enum("wait", "fail"), max_wait = "seconds",
    shared = "table",
  } },
  policy = { fields = {
    reuse = "boolean", max_messages_per_session = "count", attempts = "count", max_time = "seconds",
    backoff_base = "seconds", backoff_max = "seconds", jitter = "fraction", reauth = "boolean",
    clock = "function", sleep = "function", random = "function", governor = "table",
  } },
  on_token = "function",
  select_flow = "function",
  before_send = "function",
  classify = "function",
}

-- ------------------------------------------------------------ validation

local closest = require("oauthmail.names").closest

local options = require "oauthmail.options"
local is_callable = options.callable

local function show(v)
  if type(v) == "string" then return "'" .. (v:gsub("%c", "?")) .. "'" end
  if type(v) == "number" or type(v) == "boolean" then return type(v) .. " " .. tostring(v) end
  return "a " .. type(v)
end

local function bad(path, text)
  return errors.new("config", path .. ": " .. text, { reason = "profile", field = path, retryable = false })
end

local finite, whole = options.finite, options.whole

-- Ranged numbers: the test and the words of the error.
local NUMBERS = {
  count = { function(v) return whole(v) and v >= 1 end, "a positive whole number" },
  seconds = { function(v) return finite(v) and v >= 0 end, "a finite number of seconds >= 0" },
  duration = { function(v) return finite(v) and v > 0 end, "a finite number of seconds > 0" },
  fraction = { function(v) return finite(v) and v >= 0 and v <= 1 end, "a number from 0 to 1" },
  port = { function(v) return whole(v) and v >= 1 and v <= 65535 end, "a port number (1-65535)" },
}

local function check(path, spec, v)
  if type(spec) == "string" then
    local wants = {}
    for t in spec:gmatch("[^|]+") do
      if t == "false" and v == false then return true end
      if t == "function" and is_callable(v) then return true end
      local num = NUMBERS[t]
      if num and type(v) == "number" and num[1](v) then return true end
      if not num and type(v) == t then return true end
      local w = num and num[2] or ((t:match("^[aeiou]") and "an " or "a ") .. t)
      wants[#wants + 1] = t == "false" and "false" or w
    end
    local got = (type(v) == "number" and v ~= v) and "nan" or show(v)
    return nil, bad(path, "expected " .. table.concat(wants, " or ") .. ", got " .. got)
  end
  if spec.enum then
    for _, e in ipairs(spec.enum) do if v == e then return true end end
    return nil, bad(path, "expected one of \"" .. table.concat(spec.enum, "\", \"") .. "\", got " .. show(v))
  end
  if type(v) ~= "table" then return nil, bad(path, "expected a table, got " .. show(v)) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    local sub = path == "" and tostring(k) or (path .. "." .. tostring(k))
    if type(k) ~= "string" then return nil, bad(sub, "unexpected non-string key") end
    local s = spec.fields[k]
    if s == nil then
      local near = closest(k, spec.fields)
      return nil, bad(sub, "unknown field" .. (near and (" (did you mean '" ..
        (path == "" and near or (path .. "." .. near)) .. "'?)") or ""))
    end
    local ok, err = check(sub, s, v[k])
    if not ok then return nil, err end
  end
  return true
end

-- profile.validate(p) -> true | nil, err  (only the shape; see resolve for meaning)
function M.validate(p)
  if type(p) ~= "table" then return nil, bad("profile", "expected a table, got " .. show(p)) end
  local ok, err = check("", { fields = M.SCHEMA }, p)
  if not ok then
    err.message = err.message:gsub("^: ", "profile: ")
    return nil, err
  end
  if p.store ~= nil and not (type(p.store.kind) == "string" or
    (type(p.store.load) == "function" and type(p.store.save) == "function")) then
    return nil, bad("store", "expected {kind=\"memory\"|\"file\"|\"command\", ...} or a store object")
  end
  return true
end

-- profile.load(p) -> table | nil, err: p is a table or the path of a Lua file returning one.
function M.load(p)
  if type(p) == "table" then return p end
  if type(p) ~= "string" then error("oauthmail.new: expected a profile table or a file path, got " .. type(p), 3) end
  local chunk, lerr = loadfile(p)
  if not chunk then
    return errors.fail("config", "cannot load profile " .. p .. ": " .. tostring(lerr), { reason = "profile_file" })
  end
  local ok, t = pcall(chunk)
  if not ok then
    return errors.fail("config", "profile " .. p .. " raised: " .. tostring(t), { reason = "profile_file" })
  end
  if type(t) ~= "table" then
    return errors.fail("config", "profile " .. p .. " must return a table, returned " .. type(t), { reason = "profile_file" })
  end
  if t.name == nil then t.name = p:match("([^/]+)%.lua$") or p end
  return t
end

-- ------------------------------------------------------------ resolution

local function merge(base, over)
  local t = {}
  for k, v in pairs(base or {}) do t[k] = v end
  for k, v in pairs(over or {}) do t[k] = v end
  return t
end

local function default_flow(p, provider)
  if provider == "google" then
    return p.service_account_file and "jwt_bearer" or "authorization_code"
  end
  if p.client_secret or p.client_certificate then return "client_credentials" end
  if p.refresh_token then return "refresh_token" end
  return "device_code"
end

local function sorted_keys(t)
  local l = {}
  for k in pairs(t) do l[#l + 1] = k end
  table.sort(l)
  return l
end

-- profile.resolve(p) -> settings | nil, err. p must have passed validate.
-- settings = {name, provider, flow, user, from, margin, interactive, store,
--   oauth (the oauth2/tokens flow table), smtp, limits, policy, hooks, ctx}
function M.resolve(p)
  local pname = p.provider or "generic"
  local preset = providers.get(pname)
  local flow = p.flow
  if flow == nil and p.select_flow then
    local ok, chosen = pcall(p.select_flow, {
      provider = pname, tenant = p.tenant, user = p.user, client_id = p.client_id,
      has_secret = p.client_secret ~= nil, has_certificate = p.client_certificate ~= nil,
      interactive = p.interactive,
    })
    if not ok then return nil, bad("select_flow", "raised: " .. tostring(chosen)) end
    local cok, cerr = check("select_flow", GRANTS, chosen)
    if not cok then
      cerr.message = "select_flow returned an unknown flow: " .. cerr.message:gsub("^select_flow: ", "")
      return nil, cerr
    end
    flow = chosen
  end
  flow = flow or default_flow(p, pname)
  if not preset.flows[flow] then
    return nil, bad("flow", string.format("\"%s\" is not available with provider \"%s\" (expected one of: %s)",
      flow, pname, table.concat(sorted_keys(preset.flows), ", ")))
  end
  local eff = merge(p, { flow = flow })
  if pname == "microsoft" then
    if flow == "client_credentials" then
      if p.tenant == nil then
        return nil, bad("tenant", "required for the client_credentials flow (a tenant id or a domain such as "
          .. "contoso.onmicrosoft.com)")
      end
      if providers.MULTI_TENANT[p.tenant:lower()] then
        return nil, bad("tenant", string.format("\"%s\" cannot be used with client_credentials: an application "
          .. "token needs a real tenant (its id or a verified domain); \"common\" and \"organizations\" only "
          .. "work for delegated flows", p.tenant))
      end
    end
  elseif pname == "generic" then
    local ep = p.endpoints or {}
    if not (p.issuer or p.token_endpoint or ep.token) then
      return nil, bad("issuer", "the generic provider needs issuer (OpenID discovery) or token_endpoint "
        .. "(or endpoints.token)")
    end
    if not (p.smtp and p.smtp.host) and p.transport ~= "graph" then
      return nil, bad("smtp.host", "required with the generic provider")
    end
  end
  if p.cloud and pname ~= "microsoft" then
    return nil, bad("cloud", "only applies to provider \"microsoft\"")
  end
  if p.service and pname ~= "microsoft" then
    return nil, bad("service", "only applies to provider \"microsoft\"")
  end
  if p.service and p.service ~= "exchange" and (p.cloud or "global") ~= "global" then
    return nil, bad("service", string.format("\"%s\" exists in the global cloud only (cloud = \"%s\")", p.service, p.cloud))
  end
  if p.service == "outlook" and not providers.DELEGATED[flow] then
    return nil, bad("flow", "\"" .. flow .. "\" does not work with service \"outlook\" (personal Outlook.com "
      .. "accounts): there is no application-only access to consumer mailboxes; use device_code or "
      .. "authorization_code")
  end
  if pname == "google" and flow == "device_code" then
    local scopes = p.scope or "https://mail.google.com/"
    if type(scopes) == "table" then scopes = table.concat(scopes, " ") end
    if (" " .. scopes .. " "):find(" https://mail.google.com/ ", 1, true) then
      return nil, bad("flow", "Google's device flow (\"device_code\") refuses the https://mail.google.com/ scope "
        .. "that SMTP needs (it allows only a short list of scopes for TV and limited-input devices); use "
        .. "\"authorization_code\" (browser sign-in with a loopback redirect) or, in Google Workspace, a "
        .. "service account with domain-wide delegation (flow \"jwt_bearer\", service_account_file)")
    end
  end
  if p.token_params ~= nil then
    for k, v in pairs(p.token_params) do
      if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
        return nil, bad("token_params", "expected form field names mapped to strings, got " .. show(k) .. " = " .. show(v))
      end
    end
  end
  if flow ~= "jwt_bearer" and type(p.client_id) ~= "string" then
    return nil, bad("client_id", "required for the " .. flow .. " flow (the application (client) id)")
  end
  if flow == "client_credentials" and not (p.client_secret or p.client_certificate) then
    return nil, bad("client_secret", "client_credentials needs client_secret or client_certificate")
  end
  if flow == "jwt_bearer" and not p.service_account_file then
    return nil, bad("service_account_file", "required for the jwt_bearer flow (a service-account JSON key)")
  end
  if flow == "password" and not (p.username or p.user) then
    return nil, bad("username", "required for the password flow")
  end
  if flow == "refresh_token" and not p.refresh_token then
    return nil, bad("refresh_token", "required for the refresh_token flow")
  end
  if type(p.user) ~= "string" or p.user == "" then
    return nil, bad("user", "required: the mailbox that authenticates to the SMTP server (e.g. noreply@contoso.com)")
  end
  -- the user goes into the SASL message and the trace: no byte that could
  -- end or forge a line or a SASL field, and a bound an address can meet
  if p.user:find("[%z\1-\31\127]") then
    return nil, bad("user", "contains a control character (CR, LF, NUL, ^A, ...): " .. string.format("%q", p.user))
  end
  if #p.user > 320 then
    return nil, bad("user", string.format("is %d bytes long; a mailbox name is at most 320", #p.user))
  end
  if p.client_certificate and not (p.client_certificate.cert and p.client_certificate.key) then
    return nil, bad("client_certificate", "expected {cert=<path>, key=<path>}")
  end
  local transports, terr = M.transports(p)
  if not transports then return nil, terr end
  local derived = preset.resolve(eff)

  local oauth = {
    grant = flow, provider = pname, client_id = p.client_id, client_secret = p.client_secret,
    client_certificate = p.client_certificate, client_auth = p.client_auth,
    scope = p.scope or derived.scope, issuer = p.issuer,
    token_endpoint = p.token_endpoint or derived.token_endpoint,
    authorization_endpoint = p.authorization_endpoint or derived.authorization_endpoint,
    device_authorization_endpoint = p.device_authorization_endpoint or derived.device_authorization_endpoint,
    revocation_endpoint = p.revocation_endpoint or derived.revocation_endpoint,
    authorization_params = derived.authorization_params,
    ca_file = p.ca_file, user = p.user, tenant = derived.tenant or p.tenant,
    service_account_file = p.service_account_file, subject = p.subject or (flow == "jwt_bearer" and p.user or nil),
    username = p.username or (flow == "password" and p.user or nil), password = p.password,
    refresh_token = p.refresh_token, allow_password_grant = p.allow_password_grant,
    token_params = p.token_params,
  }
  for k, v in pairs(p.oauth or {}) do oauth[k] = v end
  if pname == "microsoft" and flow ~= "client_credentials" and oauth.login_hint == nil then
    oauth.login_hint = p.user
  end

  local smtp = merge(preset.smtp, p.smtp)
  smtp.host = smtp.host or derived.smtp_host
  if pname == "google" and p.smtp and p.smtp.port == 465 and not p.smtp.tls then smtp.tls = "implicit" end

  local limits = merge(preset.limits, p.limits)
  for k, v in pairs(limits) do if v == false then limits[k] = nil end end
  limits.on_limit = limits.on_limit or "wait"
  limits.max_wait = limits.max_wait or 120

  local graph, goauth
  if transports.graph then
    local gerr
    graph, goauth, gerr = M.graph_settings(p, pname, derived, oauth)
    if not graph then return nil, gerr end
  end

  return {
    transports = transports, failover_on = p.failover_on or M.FAILOVER_ON, graph = graph, graph_oauth = goauth,
    name = p.name, provider = pname, flow = flow, user = p.user, from = p.from or p.user,
    margin = p.margin or preset.margin, interactive = p.interactive, store = p.store, trace = p.trace,
    oauth = oauth, smtp = smtp, limits = limits, policy = merge({}, p.policy),
    hooks = { on_token = p.on_token, before_send = p.before_send, classify = p.classify },
    ctx = { tenant = oauth.tenant, client_id = p.client_id, login = derived.login },
  }
end

-- What makes a message go to the next transport of the list (when the
-- first certainly did not accept it): SMTP AUTH disabled, basic/legacy
-- authentication refused, the SMTP host refusing or not answering the
-- connection (docs/graph.md).
M.FAILOVER_ON = { "5.7.139", "5.7.30", "refused", "timeout" }

local TRANSPORTS = { smtp = true, graph = true }

-- profile.transports(p) -> {names in order, smtp=true, graph=true} | nil, err
function M.transports(p)
  local t = p.transport
  if t == nil then t = { "smtp" } elseif type(t) == "string" then t = { t } end
  local out, seen = {}, {}
  for k, v in pairs(t) do
    if type(k) ~= "number" or k < 1 or k > #t or k % 1 ~= 0 then
      return nil, bad("transport", "expected \"smtp\", \"graph\" or an ordered list such as {\"smtp\", \"graph\"}")
    end
    if not TRANSPORTS[v] then
      return nil, bad("transport", "expected \"smtp\" or \"graph\", got " .. show(v))
    end
  end
  for _, v in ipairs(t) do
    if seen[v] then return nil, bad("transport", "names \"" .. v .. "\" twice") end
    seen[v] = true
    out[#out + 1] = v
  end
  if #out == 0 then return nil, bad("transport", "is an empty list") end
  for name in pairs(seen) do out[name] = true end
  for i, v in ipairs(p.failover_on or {}) do
    if type(v) ~= "string" then
      return nil, bad("failover_on[" .. i .. "]", "expected an enhanced code (\"5.7.139\"), a reply or HTTP code "
        .. "(\"535\"), a Graph error code or a network reason (\"refused\", \"timeout\"), got " .. show(v))
    end
  end
  if p.failover_on and #out < 2 then
    return nil, bad("failover_on", "only applies with a list of transports, such as transport = {\"smtp\", \"graph\"}")
  end
  return out
end

-- The Graph transport's settings and the flow of its token manager: the
-- profile's credentials, the Graph scope, the same store (another account
-- key, since the scope differs).
function M.graph_settings(p, pname, derived, oauth)
  local g = merge({}, p.graph)
  if pname == "google" then
    return nil, nil, bad("transport", "\"graph\" is Microsoft Graph; it does not apply to provider \"google\"")
  end
  g.endpoint = g.endpoint or derived.graph_endpoint
  g.scope = g.scope or derived.graph_scope
  if not g.endpoint then
    return nil, nil, bad("graph.endpoint", "required for the graph transport with provider \"" .. pname
      .. "\" (the Graph base URL, such as https://graph.microsoft.com)")
  end
  if not g.scope then
    return nil, nil, bad("graph.scope", "required for the graph transport with provider \"" .. pname .. "\"")
  end
  g.ca_file = g.ca_file or p.ca_file
  g.concurrency = g.concurrency or 4
  local goauth = merge(oauth, { scope = g.scope })
  if g.token_params then goauth.token_params = merge(oauth.token_params, g.token_params) end
  return g, goauth
end

-- profile.read(p) -> settings | nil, err: load + validate + resolve.
function M.read(p)
  local t, err = M.load(p)
  if not t then return nil, err end
  local ok
  ok, err = M.validate(t)
  if not ok then return nil, err end
  return M.resolve(t)
end

return M
