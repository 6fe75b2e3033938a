-- spec/options_spec.lua — oauthmail.options: one way to check option tables.
local options = require "oauthmail.options"

describe("oauthmail.options", function()
  local callable_table = setmetatable({}, { __call = function() end })

  it("knows callables, finite and whole numbers", function()
    assert.is_true(options.callable(print))
    assert.is_true(options.callable(callable_table))
    assert.is_false(options.callable({}))
    assert.is_false(options.callable("print"))
    for _, v in ipairs { 0, -1.5, 1e300 } do assert.is_true(options.finite(v)) end
    for _, v in ipairs { 0 / 0, math.huge, -math.huge, "1" } do assert.is_false(options.finite(v)) end
    assert.is_true(options.whole(3))
    assert.is_false(options.whole(3.5))
  end)

  it("gives the first problem as a value, in a stable order", function()
    local schema = { a = "string", b = "number|boolean", c = "callable",
      d = function(v) if v < 0 then return "must not be negative" end end }
    assert.is_nil(options.problem({ a = "x", b = true, c = callable_table, d = 1 }, schema))
    assert.same({ "a", "must be a string" }, { options.problem({ a = 1, b = "x" }, schema) })
    assert.same({ "b", "must be a number or a boolean" }, { options.problem({ b = "x" }, schema) })
    assert.same({ "c", "must be a function" }, { options.problem({ c = {} }, schema) })
    assert.same({ "d", "must not be negative" }, { options.problem({ d = -1 }, schema) })
    assert.is_nil(options.problem({ zzz = 1 }, schema))
    assert.same({ "strng", "is not an option (did you mean 'string'?)" },
      { options.problem({ strng = 1 }, { string = "string" }, true) })
  end)

  it("raises the problem with the caller's name, at the caller's caller", function()
    local function open(o) options.check("thing.open", o, { port = "number" }, 2) end
    local ok, err = pcall(function() open { port = "x" } end)
    assert.is_false(ok)
    assert.matches("options_spec.lua:%d+: thing.open: 'port' must be a number", err)
  end)
end)
