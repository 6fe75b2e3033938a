-- spec/decoder_spec.lua — the error decoder: every code the mailer promises to
-- explain gets a cause and a fix; unknown codes are left alone.
local decoder = require "oauthmail.decoder"
local errors = require "oauthmail.errors"

local function explained(fields, ctx)
  local e = errors.new(fields.kind or "smtp", fields.message or "x", fields)
  decoder.explain(e, ctx)
  return e
end

describe("decoder", function()
  local cases = {
    { { code = 535, enhanced = "5.7.3", kind = "auth" }, "SMTP.Send" },
    { { code = 535, enhanced = "5.7.139", kind = "auth" }, "security defaults" },
    { { code = 501, enhanced = "5.5.127" }, "margin" },
    { { code = 550, enhanced = "5.7.60" }, "Send As" },
    { { code = 554, enhanced = "5.2.252", text = "SendAsDenied; not allowed to send as" }, "SendAs" },
    { { code = 554, enhanced = "5.2.252", text = "Submission quota exceeded" }, "quota" },
    { { code = 550, enhanced = "5.2.2" }, "quota" },
    { { code = 421, enhanced = "4.7.66" }, "TLS 1.2" },
    { { code = 432, enhanced = "4.3.2" }, "connections" },
    { { code = 451, enhanced = "4.7.500" }, "back-off" },
    { { code = 421, enhanced = "4.4.2" }, "reconnects" },
  }
  for _, c in ipairs(cases) do
    it("explains " .. c[1].code .. " " .. c[1].enhanced, function()
      local e = explained(c[1])
      assert.is_string(e.cause)
      assert.is_string(e.fix)
      assert.truthy(e.hint:find(c[2], 1, true), e.hint)
      assert.truthy(tostring(e):find("hint: ", 1, true))
    end)
  end

  it("marks permanent conditions behind transient codes as not retryable", function()
    assert.is_false(explained { code = 421, enhanced = "4.7.66", retryable = true }.retryable)
    assert.is_false(explained { code = 554, enhanced = "5.2.252", text = "quota" }.retryable)
  end)

  it("explains an error challenge by its status", function()
    local e = explained { kind = "auth", code = 535, challenge = { status = "401", scope = "x" } }
    assert.truthy(e.hint:find("bearer token", 1, true), e.hint)
    e = explained { kind = "auth", code = 535, challenge = { status = "400" } }
    assert.truthy(e.hint:find("malformed", 1, true), e.hint)
    -- a specific enhanced code wins over the challenge
    e = explained { kind = "auth", code = 535, enhanced = "5.7.139", challenge = { status = "401" } }
    assert.truthy(e.hint:find("SMTP AUTH is switched off", 1, true), e.hint)
  end)

  local aad = {
    ["700082"] = "login", ["50076"] = "MFA", ["50079"] = "MFA", ["65001"] = "consent",
    ["7000215"] = "Value", ["7000222"] = "expired", ["700016"] = "client_id", ["90002"] = "tenant",
    ["50126"] = "user name or password", ["53003"] = "Conditional Access", ["70011"] = "SMTP.Send",
    ["500011"] = "Exchange Online", ["700027"] = "certificate",
  }
  for code, word in pairs(aad) do
    it("explains AADSTS" .. code, function()
      local e = explained { kind = "oauth", provider_code = "AADSTS" .. code, oauth_error = "invalid_grant" }
      assert.truthy(e.hint:lower():find(word:lower(), 1, true), e.hint)
    end)
  end

  it("finds an AADSTS code in the message and fills the admin consent URL", function()
    local e = explained({ kind = "oauth", message = "AADSTS65001: The user or administrator has not consented" },
      { tenant = "contoso.onmicrosoft.com", client_id = "app-123", login = "https://login.microsoftonline.us" })
    assert.truthy(e.hint:find("https://login.microsoftonline.us/contoso.onmicrosoft.com/adminconsent?client_id=app-123",
      1, true), e.hint)
  end)

  it("leaves unknown codes and non-errors alone", function()
    local e = explained { code = 552, enhanced = "5.3.4" }
    assert.is_nil(e.hint)
    e = explained { kind = "oauth", provider_code = "AADSTS1" }
    assert.is_nil(e.hint)
    assert.is_nil(decoder.lookup(nil))
    assert.equals("x", decoder.explain("x"))
  end)
end)
