-- luacheck configuration: one code path for Lua 5.1, LuaJIT, 5.3 and 5.4.
std = "max"
max_line_length = 140
codes = true
files["spec"] = { std = "+busted" }
files["bench"] = { globals = { "arg" } }
exclude_files = { "spec/peers/node_modules", "build", "luarocks-tree" }
