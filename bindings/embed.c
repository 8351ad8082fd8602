/*
 * The embedding API (am2z_host_* and am2z_call_* in am2z.h): an engine with
 * its Lua runtime inside a C/C++ program, on the program's libuv loop or its
 * own. The Lua half is lua/am2z/embed.lua; this file owns the lua_State,
 * turns C calls into protected Lua calls, and carries results, events and
 * native-processor calls back to C.
 *
 * Threading: everything runs on the loop's thread. Errors: every function
 * returns 0 or a negative am2z_err_t and leaves a message for
 * am2z_host_error(); nothing raises or aborts on bad arguments.
 */
#define _GNU_SOURCE 1   /* dladdr */
#include <dlfcn.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "am2z_lua.h"

#ifndef AM2Z_SOURCE_LUA_DIR
#define AM2Z_SOURCE_LUA_DIR ""
#endif
#ifndef AM2Z_INSTALL_LUA_DIR
#define AM2Z_INSTALL_LUA_DIR ""
#endif

struct am2z_call_s {
    am2z_host_t  *host;
    am2z_call_t  *prev, *next;     /* the host's list of live calls */
    uint64_t      exec_id, token;
    char         *eid;
    int           done;            /* 0 pending, 1 succeeded, 2 failed */
    char         *json, *code, *msg;
    int           retryable;       /* -1: the error's own rule */
    int           lua_released;    /* the execution stopped waiting */
    int           aborted;
    am2z_cancel_fn on_cancel;
    void         *cancel_ud;
};

struct am2z_host_s {
    lua_State   *L;
    am2z_engine_t *e;
    int          api_ref;          /* registry: the am2z.embed table */
    int          started;
    am2z_call_t *calls;
    char         err[1024];
};

static const char *NULL_HOST_MSG = "am2z: host is NULL";

static int set_err(am2z_host_t *h, int rc, const char *fmt, ...)
{
    va_list ap;
    if (h == NULL)
        return rc;
    va_start(ap, fmt);
    vsnprintf(h->err, sizeof(h->err), fmt, ap);
    va_end(ap);
    return rc;
}

const char *am2z_host_error(const am2z_host_t *h)
{
    if (h == NULL)
        return NULL_HOST_MSG;
    return h->err;
}

/* ---- calls from Lua into C ------------------------------------------------ */

#define HOSTUP(L) ((am2z_host_t *) lua_touserdata(L, lua_upvalueindex(1)))

/* _c.result(cbp, udp, eid, ok, json) */
static int c_result(lua_State *L)
{
    am2z_result_fn cb;
    void *ud = lua_touserdata(L, 2);
    *(void **) &cb = lua_touserdata(L, 1);
    if (cb)
        cb(ud, lua_tostring(L, 3), (int) lua_tointeger(L, 4), lua_tostring(L, 5));
    return 0;
}

/* _c.eval_result(cbp, udp, ok, json) */
static int c_eval_result(lua_State *L)
{
    am2z_eval_fn cb;
    void *ud = lua_touserdata(L, 2);
    *(void **) &cb = lua_touserdata(L, 1);
    if (cb)
        cb(ud, (int) lua_tointeger(L, 3), lua_tostring(L, 4));
    return 0;
}

/* _c.event(cbp, udp, event, json) */
static int c_event(lua_State *L)
{
    am2z_event_fn cb;
    void *ud = lua_touserdata(L, 2);
    *(void **) &cb = lua_touserdata(L, 1);
    if (cb)
        cb(ud, lua_tostring(L, 3), lua_tostring(L, 4));
    return 0;
}

static char *dup_str(const char *s)
{
    size_t n;
    char *d;
    if (s == NULL)
        return NULL;
    n = strlen(s);
    d = malloc(n + 1);
    if (d)
        memcpy(d, s, n + 1);
    return d;
}

static void call_free(am2z_call_t *c)
{
    am2z_host_t *h = c->host;
    if (c->prev)
        c->prev->next = c->next;
    else if (h)
        h->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->eid);
    free(c->json);
    free(c->code);
    free(c->msg);
    free(c);
}

/* _c.call_new(fnp, udp, json, exec_id, token, eid) -> call
 * Runs the native function, which may complete the call before returning. */
static int c_call_new(lua_State *L)
{
    am2z_host_t *h = HOSTUP(L);
    am2z_native_fn fn;
    void *ud = lua_touserdata(L, 2);
    const char *json = lua_tostring(L, 3);
    am2z_call_t *c = calloc(1, sizeof(*c));
    *(void **) &fn = lua_touserdata(L, 1);
    if (c == NULL)
        return luaL_error(L, "native processor: out of memory");
    c->host = h;
    c->exec_id = (uint64_t) lua_tonumber(L, 4);
    c->token = (uint64_t) lua_tonumber(L, 5);
    c->eid = dup_str(lua_tostring(L, 6));
    c->retryable = -1;
    c->next = h->calls;
    if (h->calls)
        h->calls->prev = c;
    h->calls = c;
    lua_pushlightuserdata(L, c);
    fn(c, json ? json : "{}", ud);
    return 1;
}

/* _c.call_take(call) -> nil | "ok", json | "fail", code, message, retryable */
static int c_call_take(lua_State *L)
{
    am2z_call_t *c = lua_touserdata(L, 1);
    if (c->done == 0) {
        lua_pushnil(L);
        return 1;
    }
    if (c->done == 1) {
        lua_pushliteral(L, "ok");
        lua_pushstring(L, c->json ? c->json : "{}");
        return 2;
    }
    lua_pushliteral(L, "fail");
    lua_pushstring(L, c->code ? c->code : "");
    lua_pushstring(L, c->msg ? c->msg : "native processor failed");
    if (c->retryable < 0)
        lua_pushnil(L);
    else
        lua_pushboolean(L, c->retryable);
    return 4;
}

/* _c.call_abort(call): the execution is aborted (timeout, cancel). */
static int c_call_abort(lua_State *L)
{
    am2z_call_t *c = lua_touserdata(L, 1);
    if (c->aborted || c->lua_released || c->done)
        return 0;
    c->aborted = 1;
    if (c->on_cancel)
        c->on_cancel(c, c->cancel_ud);
    return 0;
}

/* _c.call_release(call): Lua no longer needs it; freed once C is done too. */
static int c_call_release(lua_State *L)
{
    am2z_call_t *c = lua_touserdata(L, 1);
    c->lua_released = 1;
    if (c->done)
        call_free(c);
    return 0;
}

/* ---- native call completion (from C) --------------------------------------- */

static int call_complete(am2z_call_t *c)
{
    am2z_host_t *h = c->host;
    am2z_exec_t *x;
    if (c->lua_released) {
        /* the execution timed out or was cancelled meanwhile */
        call_free(c);
        return AM2Z_ESTALE;
    }
    x = am2z_exec_find(h->e, c->exec_id);
    if (x)
        am2z_exec_complete_host(x, c->token, AM2Z_OK);
    return AM2Z_OK;
}

int am2z_call_succeed(am2z_call_t *c, const char *state_json)
{
    if (c == NULL || state_json == NULL)
        return AM2Z_EINVAL;
    if (c->done)
        return AM2Z_ESTATE;
    c->json = dup_str(state_json);
    if (c->json == NULL)
        return AM2Z_ENOMEM;
    c->done = 1;
    return call_complete(c);
}

int am2z_call_fail(am2z_call_t *c, const char *code, const char *message, int retryable)
{
    if (c == NULL)
        return AM2Z_EINVAL;
    if (c->done)
        return AM2Z_ESTATE;
    c->code = dup_str(code ? code : "");
    c->msg = dup_str(message ? message : "native processor failed");
    c->retryable = retryable < 0 ? -1 : retryable != 0;
    c->done = 2;
    return call_complete(c);
}

int am2z_call_on_cancel(am2z_call_t *c, am2z_cancel_fn fn, void *ud)
{
    if (c == NULL)
        return AM2Z_EINVAL;
    c->on_cancel = fn;
    c->cancel_ud = ud;
    return AM2Z_OK;
}

const char *am2z_call_execution_id(const am2z_call_t *c)
{
    return c && c->eid ? c->eid : "";
}

int am2z_call_is_cancelled(const am2z_call_t *c)
{
    return c ? (c->aborted || c->lua_released) : 1;
}

/* ---- calling into Lua ----------------------------------------------------- */

/* Pushes api[fname]; returns the stack top before it. */
static int push_api(am2z_host_t *h, const char *fname)
{
    lua_State *L = h->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->api_ref);
    lua_getfield(L, -1, fname);
    lua_remove(L, -2);
    return top;
}

static int traceback(lua_State *L)
{
    const char *m = lua_tostring(L, 1);
    lua_pushstring(L, m ? m : "(error object is not a string)");
    return 1;
}

/* Calls the function pushed by push_api with nargs arguments; on success
 * leaves nres results. A Lua error or a nil first result with a message
 * becomes an error code with that message. */
static int api_call(am2z_host_t *h, const char *fname, int nargs, int nres, int rc_on_err)
{
    lua_State *L = h->L;
    int base = lua_gettop(L) - nargs;       /* the function's index */
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    if (lua_pcall(L, nargs, nres, base) != 0) {
        const char *m = lua_tostring(L, -1);
        set_err(h, rc_on_err, "%s: %s", fname, m ? m : "error");
        lua_settop(L, base - 1);
        return rc_on_err;
    }
    lua_remove(L, base);
    if (nres >= 2 && lua_isnil(L, -nres) && lua_isstring(L, -nres + 1)) {
        set_err(h, rc_on_err, "%s: %s", fname, lua_tostring(L, -nres + 1));
        lua_pop(L, nres);
        return rc_on_err;
    }
    return AM2Z_OK;
}

/* ---- host ------------------------------------------------------------------ */

static int file_exists(const char *p)
{
    return p && *p && access(p, R_OK) == 0;
}

static void set_lua_path(lua_State *L, const char *dir)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

static const luaL_Reg c_fns[] = {
    { "result", c_result },         { "event", c_event },
    { "eval_result", c_eval_result }, { "call_take", c_call_take },
    { "call_abort", c_call_abort }, { "call_release", c_call_release },
};

int am2z_host_new(const am2z_host_opts_t *opts, am2z_host_t **out)
{
    am2z_host_opts_t dflt;
    am2z_host_t *h;
    const char *dir;
    char cand[PATH_MAX + 64];
    lua_State *L;

    if (out == NULL)
        return AM2Z_EINVAL;
    *out = NULL;
    if (opts == NULL) {
        memset(&dflt, 0, sizeof(dflt));
        opts = &dflt;
    }
    h = calloc(1, sizeof(*h));
    if (h == NULL)
        return AM2Z_ENOMEM;
    h->api_ref = LUA_NOREF;
    *out = h;
    L = luaL_newstate();
    if (L == NULL)
        return set_err(h, AM2Z_ENOMEM, "am2z_host_new: cannot create a Lua state");
    h->L = L;
    luaL_openlibs(L);

    /* Where the am2z Lua library is: given, else $AM2Z_LUA_DIR, else next
     * to this library's install tree (found from where the code was loaded
     * from, so any --prefix works), else the configured install dir, else
     * the source tree this library was built from. */
    dir = opts->lua_dir;
    if (dir == NULL)
        dir = getenv("AM2Z_LUA_DIR");
    if (dir == NULL) {
        static char near[PATH_MAX];
        Dl_info info;
        if (dladdr((void *) am2z_host_new, &info) && info.dli_fname) {
            char *slash;
            snprintf(near, sizeof(near), "%s", info.dli_fname);
            slash = strrchr(near, '/');
            if (slash) {
                *slash = '\0';
                snprintf(cand, sizeof(cand), "%s/../share/lua/5.1/am2z/init.lua", near);
                if (file_exists(cand)) {
                    size_t n = strlen(near);
                    snprintf(near + n, sizeof(near) - n, "/../share/lua/5.1");
                    dir = near;
                }
            }
        }
    }
    if (dir == NULL) {
        snprintf(cand, sizeof(cand), "%s/am2z/init.lua", AM2Z_INSTALL_LUA_DIR);
        dir = file_exists(cand) ? AM2Z_INSTALL_LUA_DIR : AM2Z_SOURCE_LUA_DIR;
    }
    snprintf(cand, sizeof(cand), "%s/am2z/init.lua", dir);
    if (!file_exists(cand))
        return set_err(h, AM2Z_ENOTFOUND,
                       "am2z_host_new: the am2z Lua library is not in '%s' (set opts.lua_dir)", dir);
    set_lua_path(L, dir);

    am2z_lua_open(L, opts->loop);
    if (!lua_istable(L, -1))
        return set_err(h, AM2Z_ENOMEM, "am2z_host_new: cannot open the engine");
    lua_pop(L, 1);
    h->e = am2z_lua_engine(L);

    lua_getglobal(L, "require");
    lua_pushliteral(L, "am2z.embed");
    if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
        int rc = set_err(h, AM2Z_EINVAL, "am2z_host_new: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return rc;
    }
    /* the C functions embed.lua calls */
    lua_getfield(L, -1, "_c");
    for (size_t i = 0; i < sizeof(c_fns) / sizeof(c_fns[0]); i++) {
        lua_pushcfunction(L, c_fns[i].func);
        lua_setfield(L, -2, c_fns[i].name);
    }
    lua_pushlightuserdata(L, h);          /* call_new needs its host */
    lua_pushcclosure(L, c_call_new, 1);
    lua_setfield(L, -2, "call_new");
    lua_pop(L, 1);
    h->api_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    push_api(h, "init");
    lua_createtable(L, 0, 6);
    if (opts->redis_url) {
        lua_pushstring(L, opts->redis_url);
        lua_setfield(L, -2, "redisUrl");
    }
    if (opts->queue_prefix) {
        lua_pushstring(L, opts->queue_prefix);
        lua_setfield(L, -2, "queuePrefix");
    }
    if (opts->max_call_depth > 0) {
        lua_pushinteger(L, opts->max_call_depth);
        lua_setfield(L, -2, "maxCallDepth");
    }
    if (opts->default_timeout_ms > 0) {
        lua_pushnumber(L, opts->default_timeout_ms);
        lua_setfield(L, -2, "defaultTimeout");
    }
    if (opts->concurrency > 0) {
        lua_pushinteger(L, opts->concurrency);
        lua_setfield(L, -2, "concurrency");
    }
    if (opts->log_level) {
        lua_pushstring(L, opts->log_level);
        lua_setfield(L, -2, "logLevel");
    }
    return api_call(h, "am2z_host_new", 1, 0, AM2Z_EINVAL);
}

uv_loop_t *am2z_host_loop(am2z_host_t *h)
{
    return h && h->e ? am2z_engine_loop(h->e) : NULL;
}

static int not_started(am2z_host_t *h, const char *fname)
{
    char why[sizeof(h->err)];
    /* the message quotes the earlier one, which it overwrites */
    snprintf(why, sizeof(why), "%s", h->err);
    return set_err(h, AM2Z_ESTATE, "%s: the host failed to start (%s)", fname, why);
}

#define CHECK_HOST(h, fname)                                                   \
    do {                                                                       \
        if ((h) == NULL)                                                       \
            return AM2Z_EINVAL;                                                \
        if ((h)->api_ref == LUA_NOREF)                                         \
            return not_started((h), fname);                                    \
    } while (0)

int am2z_host_load(am2z_host_t *h, const char *path, int watch)
{
    CHECK_HOST(h, "am2z_host_load");
    if (path == NULL || *path == '\0')
        return set_err(h, AM2Z_EINVAL, "am2z_host_load: expected a file or directory path, got %s",
                       path ? "an empty string" : "NULL");
    push_api(h, "load");
    lua_pushstring(h->L, path);
    lua_pushboolean(h->L, watch);
    return api_call(h, "am2z_host_load", 2, 0, AM2Z_EINVAL);
}

int am2z_host_start(am2z_host_t *h)
{
    CHECK_HOST(h, "am2z_host_start");
    push_api(h, "start");
    h->started = 1;
    return api_call(h, "am2z_host_start", 0, 0, AM2Z_EINVAL);
}

int am2z_host_register_native(am2z_host_t *h, const char *name, am2z_native_fn fn, void *ud,
                               uint32_t timeout_ms)
{
    CHECK_HOST(h, "am2z_host_register_native");
    if (name == NULL || *name == '\0')
        return set_err(h, AM2Z_EINVAL, "am2z_host_register_native: expected a processor name");
    if (fn == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_register_native: expected a function for '%s'", name);
    push_api(h, "registerNative");
    lua_pushstring(h->L, name);
    lua_pushlightuserdata(h->L, *(void **) &fn);
    lua_pushlightuserdata(h->L, ud);
    lua_pushnumber(h->L, timeout_ms);
    return api_call(h, "am2z_host_register_native", 4, 0, AM2Z_EINVAL);
}

int am2z_host_execute(am2z_host_t *h, const char *processor, const char *state_json,
                      const char *session_id, am2z_result_fn cb, void *ud,
                      char execution_id[AM2Z_EXECUTION_ID_MAX])
{
    int rc;
    CHECK_HOST(h, "am2z_host_execute");
    if (processor == NULL || *processor == '\0')
        return set_err(h, AM2Z_EINVAL, "am2z_host_execute: expected a processor name");
    if (state_json == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_execute: expected state_json (a JSON object), got NULL");
    if (!h->started)
        return set_err(h, AM2Z_ESTATE, "am2z_host_execute: the host is not started (am2z_host_start)");
    push_api(h, "execute");
    lua_pushstring(h->L, processor);
    lua_pushstring(h->L, state_json);
    if (session_id)
        lua_pushstring(h->L, session_id);
    else
        lua_pushnil(h->L);
    lua_pushlightuserdata(h->L, *(void **) &cb);
    lua_pushlightuserdata(h->L, ud);
    rc = api_call(h, "am2z_host_execute", 5, 2, AM2Z_EINVAL);
    if (rc != AM2Z_OK)
        return rc;
    if (execution_id) {
        const char *id = lua_tostring(h->L, -2);
        snprintf(execution_id, AM2Z_EXECUTION_ID_MAX, "%s", id ? id : "");
    }
    lua_pop(h->L, 2);
    return AM2Z_OK;
}

int am2z_host_cancel(am2z_host_t *h, const char *execution_id)
{
    int known;
    CHECK_HOST(h, "am2z_host_cancel");
    if (execution_id == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_cancel: expected an execution id, got NULL");
    push_api(h, "cancel");
    lua_pushstring(h->L, execution_id);
    if (api_call(h, "am2z_host_cancel", 1, 1, AM2Z_EINVAL) != AM2Z_OK)
        return AM2Z_EINVAL;
    known = lua_toboolean(h->L, -1);
    lua_pop(h->L, 1);
    if (!known)
        return set_err(h, AM2Z_ENOTFOUND, "am2z_host_cancel: no running execution '%s'", execution_id);
    return AM2Z_OK;
}

int am2z_host_stats_json(am2z_host_t *h, char **json)
{
    CHECK_HOST(h, "am2z_host_stats_json");
    if (json == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_stats_json: expected an output pointer");
    *json = NULL;
    push_api(h, "stats");
    if (api_call(h, "am2z_host_stats_json", 0, 1, AM2Z_EINVAL) != AM2Z_OK)
        return AM2Z_EINVAL;
    *json = dup_str(lua_tostring(h->L, -1));
    lua_pop(h->L, 1);
    return *json ? AM2Z_OK : AM2Z_ENOMEM;
}

int am2z_host_on(am2z_host_t *h, const char *event, am2z_event_fn cb, void *ud)
{
    CHECK_HOST(h, "am2z_host_on");
    if (event == NULL || *event == '\0' || cb == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_on: expected an event name and a callback");
    push_api(h, "on");
    lua_pushstring(h->L, event);
    lua_pushlightuserdata(h->L, *(void **) &cb);
    lua_pushlightuserdata(h->L, ud);
    return api_call(h, "am2z_host_on", 3, 0, AM2Z_EINVAL);
}

int am2z_host_eval(am2z_host_t *h, const char *lua_code, am2z_eval_fn cb, void *ud)
{
    CHECK_HOST(h, "am2z_host_eval");
    if (lua_code == NULL)
        return set_err(h, AM2Z_EINVAL, "am2z_host_eval: expected Lua code, got NULL");
    push_api(h, "eval");
    lua_pushstring(h->L, lua_code);
    lua_pushlightuserdata(h->L, *(void **) &cb);
    lua_pushlightuserdata(h->L, ud);
    return api_call(h, "am2z_host_eval", 3, 2, AM2Z_EINVAL) == AM2Z_OK ? (lua_pop(h->L, 2), AM2Z_OK)
                                                                       : AM2Z_EINVAL;
}

int am2z_host_run(am2z_host_t *h, uv_run_mode mode)
{
    CHECK_HOST(h, "am2z_host_run");
    return am2z_lua_run(h->L, mode);
}

int am2z_host_stop(am2z_host_t *h, uint32_t grace_ms)
{
    CHECK_HOST(h, "am2z_host_stop");
    push_api(h, "stop");
    lua_pushnumber(h->L, grace_ms);
    h->started = 0;
    return api_call(h, "am2z_host_stop", 1, 0, AM2Z_EINVAL);
}

void am2z_host_free(am2z_host_t *h)
{
    if (h == NULL)
        return;
    if (h->L) {
        /* Closes the engine: executions are killed, handles closed. */
        lua_close(h->L);
        h->L = NULL;
    }
    while (h->calls) {
        am2z_call_t *c = h->calls;
        c->host = NULL;
        h->calls = c->next;
        c->prev = c->next = NULL;
        call_free(c);
    }
    free(h);
}
