-- LuaRocks package: the Lua library (am2z/*.lua) and its C core (am2z/core.so),
-- built with the project's CMake build (the cmake backend).
--   luarocks --lua-version=5.1 make am2z-lua-0.1.0-1.rockspec LUA_INCDIR=/usr/include/luajit-2.1
--   (add --tree DIR for a tree of its own; Debian's luarocks defaults to Lua 5.2)
-- Needs the Debian packages scripts/setup.sh installs (libuv1-dev,
-- libhiredis-dev, libssl-dev, libluajit2-5.1-dev, cmake, pkg-config) and
-- lua-cjson at run time.
package = "am2z-lua"
version = "0.1.0-1"
source = {
  url = "file://.",   -- built from a checkout with `luarocks make`; no release archive yet

}
description = {
  license = "MIT",   -- as AM2Z, the project this ports (no LICENSE file in this tree yet)
  summary = "Workflow orchestration engine: a C core with LuaJIT processors, local or over Redis (BullMQ 6 compatible)",
  detailed = [[
Processors written in Lua, composed (chain, parallel, route, batch, nested
calls) with timeouts, cancellation, retries and typed errors, run in-process
(LocalRuntime) or by workers over Redis (QueueRuntime, wire-compatible with
BullMQ 6), with hot reload of workflow files.
]],
}
dependencies = {
  "lua >= 5.1, < 5.2",
  "lua-cjson",
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    AM2Z_LUA_INSTALL_DIR = "$(LUADIR)",
    AM2Z_CMOD_INSTALL_DIR = "$(LIBDIR)",
    AM2Z_INSTALL_C = "OFF",
    AM2Z_TESTS = "OFF",
  },
}
