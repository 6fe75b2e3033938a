-- spec/names_spec.lua — the "did you mean" hint used by profiles and stores.
local names = require "oauthmail.names"

describe("oauthmail.names", function()
  it("measures edit distance", function()
    assert.equal(0, names.distance("smtp", "smtp"))
    assert.equal(2, names.distance("smpt", "smtp"))      -- a swap is two edits
    assert.equal(1, names.distance("encrypton", "encryption"))
    assert.equal(3, names.distance("", "abc"))
  end)

  it("suggests the nearest key only when it is a plausible typo", function()
    local set = { smtp = true, store = true, scope = true, encryption = true }
    assert.equal("smtp", names.closest("smpt", set))
    assert.equal("encryption", names.closest("Encrypton", set))
    assert.equal("store", names.closest("stroe", set))
    assert.is_nil(names.closest("wholly_unrelated", set))
    assert.is_nil(names.closest("x", {}))
  end)
end)
