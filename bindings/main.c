/*
 * main.c -- the am2z-lua program: LuaJIT with the engine loaded and its loop
 * running. The script's main chunk runs as an engine coroutine, so top-level
 * code may call runtime:execute, am2z.sleep and friends directly.
 *
 * The process exits when the main chunk is done and nothing is pending on
 * the loop, or after a graceful stop on SIGINT/SIGTERM.
 */
#include "am2z_lua.h"

#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *progname = "am2z-lua";

static void usage(FILE *f)
{
    fprintf(f,
        "usage: %s [options] [script [args...]]\n"
        "\n"
        "Runs a Lua script with the am2z engine loaded. The main chunk runs as an\n"
        "engine coroutine: runtime:execute, am2z.sleep and ctx-style waits work at\n"
        "top level. The program exits when the script is done and nothing is\n"
        "pending, or after a graceful stop on SIGINT/SIGTERM.\n"
        "\n"
        "options:\n"
        "  -e chunk       run the Lua string 'chunk' (repeatable; runs before the script)\n"
        "  -w, --watch    hot reload: every workflow file the script loads with\n"
        "                 runtime:load(path) is watched and reloaded on change\n"
        "                 (same as AM2Z_WATCH=1)\n"
        "  -v, --version  print the version and exit\n"
        "  -h, --help     print this help and exit\n"
        "  --             stop handling options\n"
        "\n"
        "The script gets its arguments in the global table 'arg' (arg[0] is the\n"
        "script, arg[1..n] the arguments) and as '...', as with luajit.\n"
        "\n"
        "environment:\n"
        "  AM2Z_LOG_LEVEL   debug | info | warn | error | silent\n"
        "  AM2Z_LOG_FORMAT  pretty | json | silent\n"
        "  AM2Z_REDIS_URL   redis://host:port/db: the default Redis of QueueRuntime,\n"
        "                   RedisStateManager and am2z.redis.connect\n"
        "  AM2Z_WATCH       1: as --watch\n"
        "\n"
        "docs: docs/cli.md, docs/api.md\n",
        progname);
}

static int file_exists(const char *p)
{
    return access(p, R_OK) == 0;
}

/* Prepends the directory holding the am2z Lua library to package.path: the
 * install tree when this binary is installed, else the source tree. */
static void set_paths(lua_State *L)
{
    char exe[PATH_MAX], cand[PATH_MAX + 64];
    const char *dir = AM2Z_SOURCE_LUA_DIR;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(cand, sizeof(cand), "%s/../share/lua/5.1/am2z/init.lua", exe);
            if (file_exists(cand)) {
                static char inst[PATH_MAX + 32];
                snprintf(inst, sizeof(inst), "%s/../share/lua/5.1", exe);
                dir = inst;
            }
        }
    }
    if (!file_exists(AM2Z_SOURCE_LUA_DIR "/am2z/init.lua") && dir == (const char *) AM2Z_SOURCE_LUA_DIR)
        dir = AM2Z_INSTALL_LUA_DIR;

    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

/* ---- signals ------------------------------------------------------------ */

static uv_signal_t sig_int, sig_term;
static int got_signal;
static lua_State *gL;

/* First signal: ask the Lua library to stop every runtime gracefully (in an
 * engine coroutine, since stopping waits); the loop then ends once nothing
 * is pending. Second signal: leave at once. */
static void signal_cb(uv_signal_t *h, int signum)
{
    if (got_signal) {
        fprintf(stderr, "%s: second signal, exiting now\n", progname);
        _exit(128 + signum);
    }
    got_signal = signum;
    lua_State *L = gL;
    int top = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "am2z");
    if (lua_pcall(L, 1, 1, 0) == 0 && lua_istable(L, -1)) {
        lua_getfield(L, -1, "_onSignal");
        if (lua_isfunction(L, -1)) {
            lua_pushstring(L, signum == SIGINT ? "SIGINT" : "SIGTERM");
            /* _onSignal spawns its own root execution and returns. */
            if (lua_pcall(L, 1, 0, 0) != 0)
                fprintf(stderr, "%s: stopping on signal failed: %s\n", progname,
                        lua_tostring(L, -1));
        }
    }
    lua_settop(L, top);
    (void) h;
}

static void signals_close(void)
{
    uv_close((uv_handle_t *) &sig_int, NULL);
    uv_close((uv_handle_t *) &sig_term, NULL);
}

/* The main execution's body: runs each -e chunk, then the script, with the
 * script's arguments as varargs. */
static const char *MAIN_BODY =
    "local chunks, n, args = ...\n"
    "local unpack = unpack or table.unpack\n"
    "for i = 1, n do chunks[i](unpack(args, 1, args.n)) end\n"
    "local am2z = package.loaded['am2z']\n"
    "if am2z and am2z._onMainDone then am2z._onMainDone() end\n";

int main(int argc, char **argv)
{
    int i, nchunks = 0, script_idx = -1, status = 0;
    lua_State *L;

    if (argc > 0 && argv[0] && argv[0][0])
        progname = argv[0];

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            if (i + 1 < argc)
                script_idx = i + 1;
            break;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
            printf("am2z-lua %s (%s, libuv %s)\n", AM2Z_VERSION, LUAJIT_VERSION,
                   uv_version_string());
            return 0;
        }
        if (strcmp(a, "-w") == 0 || strcmp(a, "--watch") == 0) {
            /* read by lua/am2z/reload.lua: runtime:load watches by default */
            setenv("AM2Z_WATCH", "1", 1);
            continue;
        }
        if (strcmp(a, "-e") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s: '-e' needs an argument\n", progname);
                usage(stderr);
                return 1;
            }
            i++;
            nchunks++;
            continue;
        }
        if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "%s: unknown option '%s'\n", progname, a);
            usage(stderr);
            return 1;
        }
        script_idx = i;
        break;
    }
    if (script_idx < 0 && nchunks == 0) {
        usage(stderr);
        return 1;
    }

    L = luaL_newstate();
    if (L == NULL) {
        fprintf(stderr, "%s: cannot create Lua state (out of memory)\n", progname);
        return 1;
    }
    gL = L;
    luaL_openlibs(L);
    set_paths(L);
    am2z_lua_open(L, NULL);
    lua_pop(L, 1);

    /* arg table, as luajit builds it. */
    lua_createtable(L, argc, 2);
    {
        int base = script_idx >= 0 ? script_idx : argc;
        for (i = 0; i < argc; i++) {
            lua_pushstring(L, argv[i]);
            lua_rawseti(L, -2, i - base);
        }
    }
    lua_setglobal(L, "arg");

    /* main body, chunks table, count, args table */
    if (luaL_loadbuffer(L, MAIN_BODY, strlen(MAIN_BODY), "=am2z-lua") != 0) {
        fprintf(stderr, "%s: %s\n", progname, lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    lua_newtable(L);
    int n = 0;
    for (i = 1; i < argc && (script_idx < 0 || i < script_idx); i++) {
        if (strcmp(argv[i], "-e") == 0) {
            const char *chunk = argv[++i];
            if (luaL_loadbuffer(L, chunk, strlen(chunk), "=(command line)") != 0) {
                fprintf(stderr, "%s: %s\n", progname, lua_tostring(L, -1));
                lua_close(L);
                return 1;
            }
            lua_rawseti(L, -2, ++n);
        }
    }
    if (script_idx >= 0) {
        const char *script = argv[script_idx];
        int rc = strcmp(script, "-") == 0 ? luaL_loadfile(L, NULL) : luaL_loadfile(L, script);
        if (rc != 0) {
            fprintf(stderr, "%s: %s\n", progname, lua_tostring(L, -1));
            lua_close(L);
            return 1;
        }
        lua_rawseti(L, -2, ++n);
    }
    lua_pushinteger(L, n);
    lua_createtable(L, argc, 1);
    {
        int k = 0;
        for (i = script_idx >= 0 ? script_idx + 1 : argc; i < argc; i++) {
            lua_pushstring(L, argv[i]);
            lua_rawseti(L, -2, ++k);
        }
        lua_pushinteger(L, k);
        lua_setfield(L, -2, "n");
    }

    if (am2z_lua_spawn_main(L, 3) == 0) {
        fprintf(stderr, "%s: cannot start: %s\n", progname, lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }

    uv_loop_t *loop = am2z_engine_loop(am2z_lua_engine(L));
    uv_signal_init(loop, &sig_int);
    uv_signal_init(loop, &sig_term);
    uv_signal_start(&sig_int, signal_cb, SIGINT);
    uv_signal_start(&sig_term, signal_cb, SIGTERM);
    /* Signal watchers alone must not keep the process alive. */
    uv_unref((uv_handle_t *) &sig_int);
    uv_unref((uv_handle_t *) &sig_term);

    am2z_lua_run(L, UV_RUN_DEFAULT);

    const char *err = NULL;
    int st = am2z_lua_main_status(L, 0, &err);
    if (st == AM2Z_ESTATE && !got_signal) {
        fprintf(stderr, "%s: the main chunk is waiting for something that can never "
                        "happen (nothing is left pending on the loop)\n", progname);
        status = 1;
    } else if (st != AM2Z_OK && st != AM2Z_ESTATE && st != AM2Z_ECANCELED) {
        fprintf(stderr, "%s: %s\n", progname, err ? err : am2z_strerror(st));
        status = 1;
    }
    if (got_signal)
        status = 128 + got_signal;
    signals_close();
    lua_close(L);
    return status;
}
