-- cmake --install lays out what C and Lua users expect, and the installed
-- program and module work from the install tree alone.
local build = os.getenv("AM2Z_BUILD_DIR") or "build"

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"EXIT:$?\"")
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("EXIT:(%d+)%s*$"))
  return out:gsub("EXIT:%d+%s*$", ""), code
end

describe("cmake --install", function()
  local prefix

  setup(function()
    prefix = os.tmpname()
    os.remove(prefix)
    local out, code = sh(("cmake --install %s --prefix %s"):format(build, prefix))
    assert(code == 0, out)
  end)

  teardown(function()
    if prefix then sh("rm -rf " .. prefix) end
  end)

  it("lays out bin, lib, include, the Lua library, the C module and a pkg-config file", function()
    for _, f in ipairs({ "bin/am2z-lua", "include/am2z.h", "lib/libam2z.a", "lib/libam2z.so",
      "share/lua/5.1/am2z/init.lua", "share/lua/5.1/am2z/runtime.lua",
      "lib/lua/5.1/am2z/core.so", "lib/pkgconfig/am2z.pc", "lib/cmake/am2z/am2zConfig.cmake",
      "lib/cmake/am2z/am2zConfigVersion.cmake", "lib/cmake/am2z/am2zTargets.cmake" }) do
      local _, code = sh("test -e " .. prefix .. "/" .. f)
      assert.are.equal(0, code, f .. " is missing from the install tree")
    end
  end)

  it("the installed program runs a script using the installed library", function()
    local out, code = sh(("cd / && %s/bin/am2z-lua -e 'local am2z = require(\"am2z\") "
      .. "print(package.searchpath(\"am2z\", package.path))'"):format(prefix))
    assert.are.equal(0, code, out)
    assert.truthy(out:find(prefix .. "/bin/../share/lua/5.1/am2z/init.lua", 1, true), out)
  end)

  it("plain luajit loads the installed module and C core", function()
    local out, code = sh(("cd / && LUA_PATH='%s/share/lua/5.1/?.lua;%s/share/lua/5.1/?/init.lua;;' "
      .. "LUA_CPATH='%s/lib/lua/5.1/?.so;;' luajit -e 'local am2z = require(\"am2z\") "
      .. "print(am2z.run(function() return am2z.sleep(1) and \"slept\" end))'"):format(prefix, prefix, prefix))
    assert.are.equal(0, code, out)
    assert.truthy(out:find("slept", 1, true), out)
  end)

  -- The embedding example, built from its sources against the install tree
  -- only (nothing of build/), then run: a C host with Lua workflows.
  it("find_package(am2z) builds examples/embed against the install tree, and it runs", function()
    local bdir = os.tmpname()
    os.remove(bdir)
    local out, code = sh(("cmake -S examples/embed -B %s -DCMAKE_PREFIX_PATH=%s && cmake --build %s && "
      .. "cd / && AM2Z_LUA_DIR=%s/share/lua/5.1 %s/game_server %s/examples/embed/workflows 40")
      :format(bdir, prefix, bdir, prefix, bdir, os.getenv("PWD")))
    sh("rm -rf " .. bdir)
    assert.are.equal(0, code, out)
    assert.truthy(out:find("game server: OK", 1, true), out)
    assert.truthy(out:find("workflows reloaded", 1, true), out)
  end)

  it("pkg-config builds examples/embed too; the shared library finds its installed Lua files", function()
    local exe = os.tmpname()
    -- with strace (when present) the test also sees which Lua files it opened
    local _, has_strace = sh("command -v strace")
    local trace = has_strace == 0 and "strace -f -e trace=openat" or ""
    local out, code = sh(("cc examples/embed/game_server.c -o %s "
      .. "$(PKG_CONFIG_PATH=%s/lib/pkgconfig pkg-config --cflags --libs am2z) -Wl,-rpath,%s/lib && "
      .. "cd / && env -u AM2Z_LUA_DIR %s %s %s/examples/embed/workflows 40 2>&1")
      :format(exe, prefix, prefix, trace, exe, os.getenv("PWD")))
    os.remove(exe)
    assert.are.equal(0, code, out)
    assert.truthy(out:find("game server: OK", 1, true), out)
    if has_strace == 0 then
      -- the Lua library came from the install tree, not from the source tree
      assert.truthy(out:find(prefix .. "/lib/../share/lua/5.1/am2z/embed.lua", 1, true),
        "not loaded from the install tree")
    end
  end)

  it("the rockspec builds and installs with luarocks (cmake backend) into a tree of its own", function()
    local _, has = sh("command -v luarocks")
    if has ~= 0 then pending("luarocks is not installed") return end
    -- under valgrind every tool luarocks runs would be traced (and it rebuilds all)
    if os.getenv("AM2Z_UNDER_VALGRIND") then pending("not under valgrind") return end
    local tree = os.tmpname()
    os.remove(tree)
    local out, code = sh(("luarocks --lua-version=5.1 make --tree %s --deps-mode=none am2z-lua-0.1.0-1.rockspec "
      .. "LUA_INCDIR=/usr/include/luajit-2.1 && cd / && LUA_PATH='%s/share/lua/5.1/?.lua;%s/share/lua/5.1/?/init.lua;;' "
      .. "LUA_CPATH='%s/lib/lua/5.1/?.so;;' luajit -e 'local am2z = require(\"am2z\") "
      .. "print(package.searchpath(\"am2z.core\", package.cpath), am2z.run(function() return am2z.sleep(1) and \"slept\" end))'")
      :format(tree, tree, tree, tree))
    sh("rm -rf build.luarocks " .. tree)
    assert.are.equal(0, code, out)
    assert.truthy(out:find(tree .. "/lib/lua/5.1/am2z/core.so", 1, true), out)
    assert.truthy(out:find("slept", 1, true), out)
  end)

  it("pkg-config points a C compiler at the install tree", function()
    local src = os.tmpname() .. ".c"
    local f = assert(io.open(src, "w"))
    f:write('#include <am2z.h>\n#include <stdio.h>\n'
      .. 'int main(void) { printf("%s\\n", am2z_err_name(AM2Z_ETIMEDOUT)); return 0; }\n')
    f:close()
    local exe = src .. ".bin"
    local out, code = sh(("PKG_CONFIG_PATH=%s/lib/pkgconfig cc %s -o %s "
      .. "$(PKG_CONFIG_PATH=%s/lib/pkgconfig pkg-config --cflags --libs am2z) -Wl,-rpath,%s/lib && %s")
      :format(prefix, src, exe, prefix, prefix, exe))
    os.remove(src)
    os.remove(exe)
    assert.are.equal(0, code, out)
    assert.truthy(out:find("ETIMEDOUT", 1, true), out)
  end)
end)
