-- spec/fs_spec.lua — core.fs: locks with deadlines, atomic replace (including
-- a crash in the middle of it), stat, private directories, bounded reads.
local h = require "spec.support.helpers"
local fs = require "oauthmail.fs"  -- core.fs plus the waiting lock

-- Run a Lua chunk in a child interpreter with arguments; returns ok, output, rc.
local function run_lua_umask(umask, code, ...)
  local file = h.tmpdir() .. "/chunk.lua"
  h.write_file(file, code)
  local args = {}
  for i = 1, select("#", ...) do args[i] = h.quote((select(i, ...))) end
  return h.exec("umask " .. umask .. "; " .. h.lua_bin .. " " .. h.quote(file) .. " " .. table.concat(args, " "))
end

local function run_lua(code, ...) return run_lua_umask("022", code, ...) end

local function listdir(dir)
  local _, out = h.exec("ls -A " .. h.quote(dir))
  local names = {}
  for name in out:gmatch("[^\n]+") do names[#names + 1] = name end
  table.sort(names)
  return names
end

describe("core.fs.lock", function()
  it("excludes a second holder until the first unlocks, then grants it", function()
    local path = h.tmpdir() .. "/a.lock"
    local l1 = assert(fs.lock(path, { timeout = 1 }))
    assert.is_true(l1:held())
    -- flock belongs to the open file description, so a second open in the
    -- same process competes exactly as another process would
    local t0 = h.now()
    local l2, err = fs.lock(path, { timeout = 0.3 })
    assert.is_nil(l2)
    assert.equals("store", err.kind)
    assert.equals("timeout", err.reason)
    assert.equals("timed out after 0.3 s waiting for lock on " .. path, err.message)
    assert.is_true(h.now() - t0 >= 0.29)
    assert.is_true(h.now() - t0 < 5)
    assert.is_true(l1:unlock())
    assert.is_true(l1:unlock())  -- idempotent
    assert.is_false(l1:held())
    local l3 = assert(fs.lock(path, { timeout = 0.3 }))
    l3:unlock()
  end)

  it("is held against another process, which times out", function()
    local path = h.tmpdir() .. "/b.lock"
    local l1 = assert(fs.lock(path))
    local script = "local fs = require('oauthmail.fs'); local l, e = fs.lock(arg[1], {timeout = 0.2});"
      .. " io.write(l and 'got' or e.message)"
    local _, out = run_lua(script, path)
    assert.matches("timed out after 0.2 s waiting for lock on", out, 1, true)
    l1:unlock()
    _, out = run_lua(script, path)
    assert.equals("got", out)
  end)

  it("lets shared holders coexist and keeps out an exclusive one", function()
    local path = h.tmpdir() .. "/c.lock"
    local s1 = assert(fs.lock(path, { exclusive = false }))
    local s2 = assert(fs.lock(path, { exclusive = false, timeout = 0.2 }))
    local x, err = fs.lock(path, { timeout = 0.1 })
    assert.is_nil(x)
    assert.equals("timeout", err.reason)
    s1:unlock(); s2:unlock()
  end)

  it("releases on garbage collection", function()
    local path = h.tmpdir() .. "/d.lock"
    do local _ = assert(fs.lock(path)) end
    collectgarbage(); collectgarbage()
    local l = assert(fs.lock(path, { timeout = 0.2 }))
    l:unlock()
  end)

  it("reports a lock file that cannot be created, naming it", function()
    local path = h.tmpdir() .. "/missing/e.lock"
    local l, err = fs.lock(path, { timeout = 0.1 })
    assert.is_nil(l)
    assert.equals("missing", err.reason)
    assert.matches(path, err.message, 1, true)
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() fs.lock() end)
    assert.has_error(function() fs.lock("/tmp/x", { timeout = "soon" }) end)
    assert.has_error(function() fs.lock("/tmp/x", { timeout = -1 }) end)
  end)

  it("refuses a timeout that would never expire (NaN, inf, over a day)", function()
    local path = h.tmpdir() .. "/n.lock"
    for _, t in ipairs { 0 / 0, math.huge, -math.huge, 86401 } do
      local ok, err = pcall(fs.lock, path, { timeout = t })
      assert.is_false(ok, "timeout " .. tostring(t) .. " accepted")
      assert.matches("timeout must be a number of seconds in %[0, 86400%]", err)
    end
    local lk = assert(fs.lock(path, { timeout = 86400 }))
    lk:unlock()
  end)
end)

describe("core.fs.atomic_write", function()
  it("writes the data with exactly the requested mode, whatever the umask", function()
    local dir = h.tmpdir()
    local path = dir .. "/f.json"
    local ok, out = run_lua_umask("077",
      "assert(require('oauthmail.core').fs.atomic_write(arg[1], 'hello', tonumber('640', 8)))", path)
    assert.is_true(ok, out)
    assert.equals("hello", h.read_file(path))
    assert.equals(tonumber("640", 8), fs.stat(path).mode)
    assert.is_true(fs.atomic_write(path, "replaced\0binary", tonumber("600", 8)))
    assert.equals("replaced\0binary", h.read_file(path))
    assert.equals(tonumber("600", 8), fs.stat(path).mode)
    assert.same({ "f.json" }, listdir(dir))  -- no temp file left behind
  end)

  it("fails cleanly in a missing directory, naming the file", function()
    local path = h.tmpdir() .. "/nope/f.json"
    local ok, err = fs.atomic_write(path, "x", tonumber("600", 8))
    assert.is_nil(ok)
    assert.equals("store", err.kind)
    assert.matches(path, err.message, 1, true)
  end)

  it("leaves the target untouched and removes its temp file when the rename fails", function()
    local dir = h.tmpdir()
    local target = dir .. "/isdir"
    assert(fs.mkdir_private(target))
    h.write_file(target .. "/inside", "keep")
    local ok, err = fs.atomic_write(target, "new", tonumber("600", 8))
    assert.is_nil(ok)
    assert.matches("cannot write " .. target, err.message, 1, true)
    assert.same({ "isdir" }, listdir(dir))
    assert.equals("keep", h.read_file(target .. "/inside"))
  end)

  it("keeps the old file intact when the process dies in the middle of a write", function()
    local dir = h.tmpdir()
    local path = dir .. "/f.json"
    assert(fs.atomic_write(path, "old content", tonumber("600", 8)))
    local _, out, rc = run_lua(
      "require('oauthmail.core').fs.atomic_write(arg[1], string.rep('n', 100000), 384, 'during_save') print('survived')", path)
    assert.equals(86, rc)
    assert.not_matches("survived", out)
    assert.equals("old content", h.read_file(path))
    -- the crash leaves a half-written temp file; the target is what matters
    local names = listdir(dir)
    assert.equals("f.json", names[1])
    assert.matches("^f%.json%.tmp%.", names[2])
  end)

  it("removes temp files left by crashed writers, and only those", function()
    local dir = h.tmpdir()
    local path = dir .. "/f.json"
    local _, _, rc = run_lua("require('oauthmail.core').fs.atomic_write(arg[1], 'half', 384, 'during_save')", path)
    assert.equals(86, rc)
    local crashed = listdir(dir)[1]
    assert.matches("^f%.json%.tmp%.%d+%.%x+$", crashed)  -- that writer's pid is gone now
    local _, pid_out = h.exec("sh -c 'echo $$'")
    local dead = tonumber(pid_out:match("%d+"))
    local keep = {
      "f.json.tmp.1.abc",                               -- pid 1 runs: maybe a writer at work
      "f.json.tmp." .. dead,                            -- not our name pattern
      "f.json.tmpx." .. dead .. ".1",
      "g.json.tmp." .. dead .. ".1",                    -- another file's temp
      "f.json.tmp." .. dead .. ".xyz",
    }
    for _, name in ipairs(keep) do h.write_file(dir .. "/" .. name, "x") end
    h.write_file(dir .. "/f.json.tmp." .. dead .. ".7f", "stale")
    local ok, warning = fs.atomic_write(path, "new", 384)
    assert.is_true(ok)
    assert.is_nil(warning)
    assert.equals("new", h.read_file(path))
    local want = { "f.json" }
    for _, name in ipairs(keep) do want[#want + 1] = name end
    table.sort(want)
    assert.same(want, listdir(dir))
  end)

  it("reports a failed directory sync after the rename as success with a warning", function()
    local dir = h.tmpdir()
    local path = dir .. "/f.json"
    assert(fs.atomic_write(path, "old", 384))
    local ok, warning = fs.atomic_write(path, "new", 384, "dir_sync")
    assert.is_true(ok)
    assert.equals(path .. " was replaced, but its directory could not be synced (Input/output error): " ..
      "the change may not survive a power cut", warning)
    assert.equals("new", h.read_file(path))
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() fs.atomic_write("/tmp/x") end)
    assert.has_error(function() fs.atomic_write("/tmp/x", "d", 1000000) end)
  end)
end)

describe("core.fs.stat", function()
  it("reports mode, owner, size, type and modification time", function()
    local dir = h.tmpdir()
    local path = h.write_file(dir .. "/s", "12345", "604")
    local st = assert(fs.stat(path))
    h.exec("touch -d @1700000000.25 " .. h.quote(path))
    assert.is_true(math.abs(fs.stat(path).mtime - 1700000000.25) < 1e-3)
    assert.equals(tonumber("604", 8), st.mode)
    assert.equals(5, st.size)
    assert.equals("file", st.type)
    assert.equals(fs.uid(), st.uid)
    assert.equals("directory", fs.stat(dir).type)
    h.exec("ln -s s " .. h.quote(dir .. "/l"))
    assert.equals("link", fs.stat(dir .. "/l", { follow = false }).type)
    assert.equals("file", fs.stat(dir .. "/l").type)
  end)

  it("says when the file is missing", function()
    local path = h.tmpdir() .. "/none"
    local st, err = fs.stat(path)
    assert.is_nil(st)
    assert.equals("missing", err.reason)
    assert.matches("cannot stat " .. path, err.message, 1, true)
  end)
end)

describe("core.fs.mkdir_private", function()
  it("creates every missing level with mode 0700 and accepts existing ones", function()
    local base = h.tmpdir()
    local path = base .. "/a/b/c"
    assert.is_true(run_lua_umask("0", "assert(require('oauthmail.core').fs.mkdir_private(arg[1]))", path))
    for _, p in ipairs { base .. "/a", base .. "/a/b", path } do
      assert.equals(tonumber("700", 8), fs.stat(p).mode)
    end
    assert.is_true(fs.mkdir_private(path))
    assert.is_true(fs.mkdir_private(path .. "/"))
  end)

  it("fails when a file is in the way, naming it", function()
    local base = h.tmpdir()
    h.write_file(base .. "/file", "x")
    local ok, err = fs.mkdir_private(base .. "/file/sub")
    assert.is_nil(ok)
    assert.matches("cannot create directory " .. base .. "/file", err.message, 1, true)
  end)
end)

describe("core.fs.read_file", function()
  it("reads a file whole, within the bound", function()
    local path = h.write_file(h.tmpdir() .. "/r", string.rep("x", 20000) .. "\0end")
    assert.equals(string.rep("x", 20000) .. "\0end", fs.read_file(path))
    assert.equals(20004, #fs.read_file(path, 20004))
  end)

  it("returns the descriptor's fstat with the data", function()
    local path = h.write_file(h.tmpdir() .. "/r", "secret")
    assert(os.execute("chmod 640 " .. h.quote(path)))
    local data, st = fs.read_file(path)
    assert.equals("secret", data)
    local by_path = fs.stat(path)
    assert.same({ mode = tonumber("640", 8), uid = fs.uid(), gid = by_path.gid, size = 6, type = "file",
      mtime = by_path.mtime }, st)
    if math.type then assert.equals("integer", math.type(st.size)) end
  end)

  it("refuses a symbolic link unless follow=true", function()
    local dir = h.tmpdir()
    local target = h.write_file(dir .. "/target", "key")
    assert(os.execute("ln -s target " .. h.quote(dir .. "/link")))
    local data, err = fs.read_file(dir .. "/link")
    assert.is_nil(data)
    assert.equals("store", err.kind)
    assert.equals("link", err.reason)
    assert.equals("refusing to read " .. dir .. "/link: it is a symbolic link", err.message)
    local followed, st = fs.read_file(dir .. "/link", 100, { follow = true })
    assert.equals("key", followed)
    assert.equals(fs.stat(target).mode, st.mode)
  end)

  it("refuses a FIFO at once (no writer, no blocking) and a directory", function()
    local dir = h.tmpdir()
    assert(os.execute("mkfifo " .. h.quote(dir .. "/fifo")))
    -- in a child under timeout(1): a read_file that blocked would hang the suite
    local ok, out, rc = h.exec("timeout 10 " .. h.lua_bin .. " -e " .. h.quote(
      "local d, e = require('oauthmail.core').fs.read_file('" .. dir .. "/fifo') " ..
      "io.write(tostring(d), ' ', e.reason, ' ', e.message)"))
    assert.is_true(ok, "rc=" .. tostring(rc) .. " " .. out)
    assert.equals("nil not_file refusing to read " .. dir .. "/fifo: it is a FIFO, not a regular file", out)
    local data, err = fs.read_file(dir)
    assert.is_nil(data)
    assert.equals("not_file", err.reason)
    assert.matches("it is a directory", err.message, 1, true)
  end)

  it("refuses a file larger than the bound", function()
    local path = h.write_file(h.tmpdir() .. "/r", string.rep("x", 20000))
    local data, err = fs.read_file(path, 100)
    assert.is_nil(data)
    assert.equals("too_large", err.reason)
    assert.is_nil(fs.read_file(path, 19999))
    assert.equals(20000, #fs.read_file(path, 20000))
    assert.matches(path .. " is larger than 100 bytes", err.message, 1, true)
  end)

  it("says when the file is missing", function()
    local data, err = fs.read_file("/nonexistent/oauthmail")
    assert.is_nil(data)
    assert.equals("missing", err.reason)
    assert.matches("/nonexistent/oauthmail", err.message, 1, true)
  end)

  it("removes files, a missing one included", function()
    local path = h.write_file(h.tmpdir() .. "/gone", "x")
    assert.is_true(fs.remove(path))
    assert.is_nil(h.read_file(path))
    assert.is_true(fs.remove(path))
  end)
end)
