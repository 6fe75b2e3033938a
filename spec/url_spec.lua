-- spec/url_spec.lua — oauthmail.url: the one copy of the form and percent
-- encoders and of the loopback rule.
local url = require "oauthmail.url"

describe("oauthmail.url", function()
  it("form-encodes as RFC 6749 appendix B says, and decodes it back", function()
    assert.equal("a+b%2Bc%26d%3De*-._%7E%C3%BC", url.form_component("a b+c&d=e*-._~ü"))
    assert.equal("a b+c&d=e*-._~ü", url.decode(url.form_component("a b+c&d=e*-._~ü")))
    assert.equal("grant_type=client_credentials&scope=a+b", url.form {
      { "grant_type", "client_credentials" }, { "skipped", nil }, { "scope", "a b" } })
  end)

  it("percent-encodes everything but RFC 3986 unreserved characters", function()
    assert.equal("a%20b%2Bc~d", url.percent("a b+c~d"))
  end)

  it("parses a query: first value wins, & and ; separate, names decoded", function()
    assert.same({ code = "x y", state = "s", ["a b"] = "1" }, url.parse_query("code=x+y&state=s;a%20b=1&code=other"))
  end)

  it("knows loopback hosts by name or literal only", function()
    for _, h in ipairs { "localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "::1", "[::1]" } do
      assert.is_true(url.is_loopback(h), h)
    end
    for _, h in ipairs { "127.0.0.1.example.org", "localhost.evil", "10.0.0.1", "::2", "128.0.0.1", "127.0.0.256" } do
      assert.is_false(url.is_loopback(h), h)
    end
  end)
end)
