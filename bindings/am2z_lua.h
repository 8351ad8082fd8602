/*
 * am2z_lua.h -- opening the Lua binding on a given loop (host programs and
 * embedders). `require("am2z.core")` uses luaopen_am2z_core, which creates
 * an engine with its own loop.
 */
#ifndef AM2Z_LUA_H
#define AM2Z_LUA_H

#include <lua.h>
#include "am2z.h"

/* Pushes the am2z.core module table for an engine on `loop` (NULL: the
 * engine owns a loop) and records it in package.loaded["am2z.core"]. */
int am2z_lua_open(lua_State *L, uv_loop_t *loop);

/* The engine behind the binding opened in L, or NULL. */
am2z_engine_t *am2z_lua_engine(lua_State *L);

/* Runs the function at the top of L's stack (with nargs arguments below it
 * removed first) as a root execution and returns without running the loop.
 * Used by the am2z-lua program for the main chunk. Returns the execution id
 * (0 on error, with a message on the stack). */
uint64_t am2z_lua_spawn_main(lua_State *L, int nargs);

/* Runs the engine's loop from the host (marks it running, so Lua code cannot
 * start a nested loop from a callback). -1 when it already runs. */
int am2z_lua_run(lua_State *L, uv_run_mode mode);

/* After the loop ends: status of the main execution and its error text. */
int am2z_lua_main_status(lua_State *L, uint64_t id, const char **errmsg);

int luaopen_am2z_core(lua_State *L);

#endif
