/*
 * core_lua.c -- the am2z.core Lua module: the only place Lua meets the core.
 *
 * Protocol. Every execution body is a Lua coroutine created here. A call
 * that must wait (sleep, wait for another execution) starts one request in
 * the core and ends with `return lua_yield(L, 0)`. The core completes the
 * request from a timer or a settlement and posts the execution; the drain
 * then calls host_resume, which pushes the results for that wake and
 * resumes the coroutine. Nothing here resumes from inside a callback.
 *
 * Errors. Misuse (wrong types, waiting outside an engine coroutine) raises
 * before the core owns anything. Runtime conditions return nil, CODE.
 */
#include "am2z_lua.h"

#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>

/* Keys of our private registry entries: addresses are unique and cheap. */
static char AM2Z_HOST_KEY;
/* Yielded first by the trampoline when a body has returned, so the resume
 * hook can tell "done, coroutine reusable" from a wait or a stray yield. */
static char AM2Z_POOL_MARK;

/* Idle coroutines kept for reuse: creating a coroutine per attempt and
 * collecting it later was the largest single cost of a step. */
#define AM2Z_POOL_MAX 1024
/* Bodies take few arguments (callers pack the rest in a table): the
 * trampoline's frame width is paid in stack slots by every coroutine. */
#define AM2Z_SPAWN_MAX_ARGS 4

/* Every body runs inside this loop; after each one it parks at a yield and
 * can be handed the next body. The results travel through a shared box and
 * every local is cleared before parking, so a pooled coroutine keeps
 * nothing of its last job alive (only one body runs at a time, so one box
 * serves all coroutines). */
static const char TRAMPOLINE[] =
    "local MARK, yield, box = ...\n"
    "return function(fn, a1, a2, a3, a4)\n"
    "  while true do\n"
    "    local r1, r2 = fn(a1, a2, a3, a4)\n"
    "    if r2 == nil then r2 = true end\n"
    "    box[1], box[2] = r1, r2\n"
    "    r1, r2 = nil, nil\n"
    "    fn, a1, a2, a3, a4 = nil, nil, nil, nil, nil\n"
    "    fn, a1, a2, a3, a4 = yield(MARK)\n"
    "  end\n"
    "end\n";

/* Per-execution host record, in the space the core allocates with each
 * execution (exec_host_size). */
typedef struct {
    lua_State *co;          /* borrowed: anchored at threads[tslot]; NULL once the body ended */
    int        tslot;       /* slot in the threads table; 0 when none */
    int        rslot;       /* slot in the results table; 0 when none */
    int        abort_ref;   /* onAbort callbacks table in the callbacks table; 0 when none */
    int        cslot;       /* continuation { fn, a1, a2 } in the conts table; 0 when none */
    int        nargs;       /* arguments waiting on co's stack for the first resume */
    int        started;
    int        xread_results; /* the pending Redis call is an XREAD to filter */
} lexec_t;

/* Slot numbers for our private tables, recycled through a free stack kept
 * in C: one table write per store instead of luaL_ref's four table
 * operations (it keeps its free list inside the table). */
typedef struct {
    int *free;                  /* owned */
    int  n, cap, next;
} slots_t;

static int slot_alloc(slots_t *s)
{
    return s->n > 0 ? s->free[--s->n] : ++s->next;
}

static void slot_free(slots_t *s, int slot)
{
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 256;
        int *f = realloc(s->free, (size_t) cap * sizeof(*f));
        if (f == NULL)
            return;             /* the slot is lost, not reused: harmless */
        s->free = f;
        s->cap = cap;
    }
    s->free[s->n++] = slot;
}

typedef struct {
    am2z_engine_t *e;           /* owned */
    lua_State     *L;           /* main thread: callbacks never run on a
                                 * coroutine that may be suspended or dead */
    lua_State     *loop_L;      /* the thread that is running the loop now */
    lua_State     *running;     /* coroutine inside lua_resume now, or NULL */
    am2z_exec_t   *current;     /* its execution */
    int            threads_ref; /* registry: table of anchored coroutines */
    int            results_ref; /* registry: table of body results */
    int            cbs_ref;     /* registry: table of onAbort lists */
    int            errh_ref;    /* registry: error reporter, or LUA_NOREF */
    slots_t        tslots;      /* slots of the threads table */
    slots_t        rslots;      /* slots of the results table */
    int            pool[AM2Z_POOL_MAX];  /* tslots of parked, reusable coroutines */
    int            pool_n;
    int            tramp_ref;   /* registry: the trampoline function */
    int            box_ref;     /* registry: the trampoline's result box */
    int            conts_ref;   /* registry: continuations waiting for a settlement */
    slots_t        cslots;
    int            in_run;      /* nested core.run guard */
    int            closing;     /* engine being freed: no Lua work any more */
    am2z_exec_t   *main_exec;   /* am2z_lua_spawn_main's, with a reference */
} lhost_t;

#define HOST(L) ((lhost_t *) lua_touserdata((L), lua_upvalueindex(1)))

static lexec_t *LX(am2z_exec_t *x)
{
    return (lexec_t *) am2z_exec_host_data(x);
}

/* ---- small helpers ------------------------------------------------------ */

static void reg_unref(lhost_t *h, lua_State *L, int table_ref, int *ref)
{
    /* 0 is "none" as well: host records start zeroed. */
    if (*ref <= 0) {
        *ref = LUA_NOREF;
        return;
    }
    if (!h->closing) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, table_ref);
        luaL_unref(L, -1, *ref);
        lua_pop(L, 1);
    }
    *ref = LUA_NOREF;
}

/* The thread on which Lua values may be pushed right now: the coroutine
 * being resumed, the thread running the loop, or the main thread. */
static lua_State *host_L(lhost_t *h)
{
    if (h->running)
        return h->running;
    if (h->loop_L)
        return h->loop_L;
    return h->L;
}

static int push_status(lua_State *L, int status)
{
    lua_pushstring(L, am2z_err_name(status));
    return 1;
}

/* Reports an error raised by a callback the engine called (onAbort). It
 * never escapes into the loop. */
static void report_error(lhost_t *h, lua_State *L, const char *what)
{
    const char *msg = lua_tostring(L, -1);
    if (h->errh_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->errh_ref);
        lua_pushstring(L, what);
        lua_pushvalue(L, -3);
        if (lua_pcall(L, 2, 0, 0) == 0) {
            lua_pop(L, 1);
            return;
        }
        lua_pop(L, 1);
    }
    fprintf(stderr, "am2z: %s: %s\n", what, msg ? msg : "(non-string error)");
    lua_pop(L, 1);
}

static int traceback_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (!lua_isnoneornil(L, 1) && luaL_callmeta(L, 1, "__tostring"))
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* ---- hooks -------------------------------------------------------------- */

static void release_body(lhost_t *h, lexec_t *lx)
{
    lx->co = NULL;
    if (lx->tslot == 0)
        return;
    if (!h->closing) {
        lua_State *L = host_L(h);
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->threads_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, lx->tslot);
        lua_pop(L, 1);
        slot_free(&h->tslots, lx->tslot);
    }
    lx->tslot = 0;
}

/* The body returned through the trampoline: the coroutine is parked at its
 * yield with an empty stack above it, ready for another body. */
static void recycle_body(lhost_t *h, lexec_t *lx)
{
    if (h->pool_n < AM2Z_POOL_MAX && !h->closing && lx->tslot) {
        /* It stays anchored in its threads slot; only the slot moves. */
        h->pool[h->pool_n++] = lx->tslot;
        lx->tslot = 0;
        lx->co = NULL;
        return;
    }
    release_body(h, lx);
}

static void result_clear(lhost_t *h, lua_State *L, lexec_t *lx)
{
    if (lx->rslot == 0)
        return;
    if (!h->closing) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->results_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, lx->rslot);
        lua_pop(L, 1);
        slot_free(&h->rslots, lx->rslot);
    }
    lx->rslot = 0;
}

/* Stores the value at the top of `from` as the execution's result. */
static void store_result(lhost_t *h, lexec_t *lx, lua_State *from)
{
    lua_State *L = host_L(h);
    result_clear(h, L, lx);
    if (from != L)
        lua_xmove(from, L, 1);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lx->rslot = slot_alloc(&h->rslots);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->results_ref);
    lua_insert(L, -2);
    lua_rawseti(L, -2, lx->rslot);
    lua_pop(L, 1);
}

static void push_result(lhost_t *h, lua_State *L, am2z_exec_t *x)
{
    lexec_t *lx = LX(x);
    if (lx->rslot == 0) {
        lua_pushnil(L);
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->results_ref);
    lua_rawgeti(L, -1, lx->rslot);
    lua_remove(L, -2);
}

/* Pushes what a wait returns to the Lua caller: for a settled execution
 * `status, result`; for an interrupted wait `nil, reason`. */
static int push_settled(lhost_t *h, lua_State *L, am2z_exec_t *t)
{
    push_status(L, am2z_exec_settled_status(t));
    push_result(h, L, t);
    return 2;
}

static int push_child(lhost_t *h, lua_State *L, am2z_exec_t *c)
{
    lua_pushnumber(L, (lua_Number) am2z_exec_id(c));
    push_settled(h, L, c);
    am2z_exec_unref(c);
    return 3;
}

/* ---- Redis replies as Lua values --------------------------------------- */

/* Inside an array: nil is the JSON-null lightuserdata (cjson.null), an
 * error reply a table { err = message } (the rest of the array is kept). */
static void push_reply(lua_State *L, const am2z_reply_t *r)
{
    lua_checkstack(L, 4);
    switch (r->type) {
    case AM2Z_REPLY_STRING:
    case AM2Z_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case AM2Z_REPLY_INTEGER:
        lua_pushnumber(L, (lua_Number) r->integer);
        break;
    case AM2Z_REPLY_ARRAY:
        lua_createtable(L, (int) r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_reply(L, r->element[i]);
            lua_rawseti(L, -2, (int) i + 1);
        }
        break;
    case AM2Z_REPLY_ERROR:
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        break;
    default:
        lua_pushlightuserdata(L, NULL);
        break;
    }
}

/* At the top: nil reply -> nil; error reply -> nil, "EREPLY", message. */
static int push_reply_top(lua_State *L, const am2z_reply_t *r)
{
    if (r->type == AM2Z_REPLY_NIL) {
        lua_pushnil(L);
        return 1;
    }
    if (r->type == AM2Z_REPLY_ERROR) {
        lua_pushnil(L);
        lua_pushliteral(L, "EREPLY");
        lua_pushlstring(L, r->str, r->len);
        return 3;
    }
    push_reply(L, r);
    return 1;
}

static int reply_is(const am2z_reply_t *r, const char *s)
{
    size_t n = strlen(s);
    return r && (r->type == AM2Z_REPLY_STRING || r->type == AM2Z_REPLY_STATUS) && r->len == n
           && memcmp(r->str, s, n) == 0;
}

/* An XREAD reply, keeping only the entries a QueueRuntime waits for
 * (completed / failed / cancel events) and only their fields it reads:
 * { { key, lastId, { { event = , jobId = , returnvalue = , failedReason = ,
 * am2zError = }, ... } }, ... }. The reader sees every event of every queue;
 * turning all of them into Lua tables was a good part of its cost. */
static int push_xread_results(lua_State *L, const am2z_reply_t *r)
{
    static const char *const keep[] = { "event", "jobId", "returnvalue", "failedReason",
                                        "am2zError" };
    if (r->type != AM2Z_REPLY_ARRAY)
        return push_reply_top(L, r);
    lua_checkstack(L, 8);
    lua_createtable(L, (int) r->elements, 0);
    for (size_t i = 0; i < r->elements; i++) {
        const am2z_reply_t *st = r->element[i], *entries;
        int m = 0;
        if (st->type != AM2Z_REPLY_ARRAY || st->elements < 2
            || st->element[1]->type != AM2Z_REPLY_ARRAY)
            continue;
        entries = st->element[1];
        lua_createtable(L, 3, 0);
        push_reply(L, st->element[0]);
        lua_rawseti(L, -2, 1);
        if (entries->elements > 0) {
            const am2z_reply_t *last = entries->element[entries->elements - 1];
            if (last->type == AM2Z_REPLY_ARRAY && last->elements > 0) {
                push_reply(L, last->element[0]);
                lua_rawseti(L, -2, 2);
            }
        }
        lua_newtable(L);
        for (size_t j = 0; j < entries->elements; j++) {
            const am2z_reply_t *e = entries->element[j], *f;
            int wanted = 0;
            if (e->type != AM2Z_REPLY_ARRAY || e->elements < 2
                || e->element[1]->type != AM2Z_REPLY_ARRAY)
                continue;
            f = e->element[1];
            for (size_t k = 0; k + 1 < f->elements; k += 2) {
                if (reply_is(f->element[k], "event")) {
                    const am2z_reply_t *v = f->element[k + 1];
                    wanted = reply_is(v, "completed") || reply_is(v, "failed") || reply_is(v, "cancel");
                    break;
                }
            }
            if (!wanted)
                continue;
            lua_createtable(L, 0, 4);
            for (size_t k = 0; k + 1 < f->elements; k += 2) {
                for (size_t q = 0; q < sizeof(keep) / sizeof(keep[0]); q++) {
                    if (reply_is(f->element[k], keep[q])) {
                        push_reply(L, f->element[k + 1]);
                        lua_setfield(L, -2, keep[q]);
                        break;
                    }
                }
            }
            lua_rawseti(L, -2, ++m);
        }
        lua_rawseti(L, -2, 3);
        lua_rawseti(L, -2, (int) i + 1);
    }
    return 1;
}

static int push_wake(lhost_t *h, lua_State *co, am2z_exec_t *x, am2z_wake_t *w)
{
    lua_checkstack(co, 4);
    switch (w->kind) {
    case AM2Z_WAKE_SLEEP:
    case AM2Z_WAKE_YIELD:
    case AM2Z_WAKE_HOST:
        if (w->status == AM2Z_OK) {
            lua_pushboolean(co, 1);
            return 1;
        }
        lua_pushnil(co);
        push_status(co, w->status);
        return 2;
    case AM2Z_WAKE_CHILD: {
        am2z_exec_t *c = w->status == AM2Z_OK ? am2z_exec_take_child(x) : NULL;
        if (c == NULL) {
            lua_pushnil(co);
            push_status(co, w->status == AM2Z_OK ? AM2Z_ECANCELED : w->status);
            return 2;
        }
        return push_child(h, co, c);
    }
    case AM2Z_WAKE_EXTERN: {
        int n, filter = LX(x)->xread_results;
        /* the flag belongs to this one request, whatever its outcome */
        LX(x)->xread_results = 0;
        if (w->status != AM2Z_OK) {
            if (w->payload && w->payload_free)
                w->payload_free(w->payload);
            lua_pushnil(co);
            push_status(co, w->status);
            lua_pushstring(co, am2z_strerror(w->status));
            return 3;
        }
        if (w->payload == NULL) {
            lua_pushboolean(co, 1);
            return 1;
        }
        if (filter) {
            n = push_xread_results(co, w->payload);
        } else {
            n = push_reply_top(co, w->payload);
        }
        am2z_reply_free(w->payload);
        return n;
    }
    case AM2Z_WAKE_EXEC: {
        am2z_exec_t *t = w->target;
        int n;
        if (t && am2z_exec_is_settled(t)) {
            n = push_settled(h, co, t);
        } else {
            lua_pushnil(co);
            push_status(co, w->status == AM2Z_OK ? AM2Z_ECANCELED : w->status);
            n = 2;
        }
        if (t)
            am2z_exec_unref(t);
        return n;
    }
    default:
        return 0;
    }
}

static void host_resume(void *hostp, am2z_exec_t *x)
{
    lhost_t *h = hostp;
    lexec_t *lx = LX(x);
    lua_State *co = lx->co;
    am2z_wake_t w;
    int nargs, st;

    am2z_exec_take_wake(x, &w);
    if (co == NULL) {                   /* body already abandoned */
        if (w.target)
            am2z_exec_unref(w.target);
        am2z_exec_finish(x, AM2Z_EFAILED);
        return;
    }
    if (!lx->started) {
        lx->started = 1;
        if (am2z_exec_aborted(x)) {
            /* Born cancelled (its parent was aborted first): the body never
             * runs, so it cannot start side effects nobody will wait for. */
            release_body(h, lx);
            am2z_exec_finish(x, AM2Z_ECANCELED);
            return;
        }
        nargs = lx->nargs;
    } else {
        nargs = push_wake(h, co, x, &w);
    }

    lua_State *saved_running = h->running;
    am2z_exec_t *saved_current = h->current;
    h->running = co;
    h->current = x;
    st = lua_resume(co, nargs);
    h->running = saved_running;
    h->current = saved_current;

    if (st == LUA_YIELD) {
        int s = am2z_exec_state(x);
        /* The body returned (checked first: a request it began but could not
         * wait for is cut loose by am2z_exec_finish below). */
        if (lua_gettop(co) == 1 && lua_touserdata(co, 1) == &AM2Z_POOL_MARK) {
            lua_State *L = host_L(h);
            lua_settop(co, 0);
            lua_rawgeti(L, LUA_REGISTRYINDEX, h->box_ref);
            lua_rawgeti(L, -1, 2);
            int ok = lua_toboolean(L, -1);
            lua_pop(L, 1);
            lua_rawgeti(L, -1, 1);
            lua_pushnil(L);
            lua_rawseti(L, -3, 1);
            lua_pushnil(L);
            lua_rawseti(L, -3, 2);
            lua_remove(L, -2);                  /* box */
            store_result(h, lx, L);
            recycle_body(h, lx);
            am2z_exec_finish(x, ok ? AM2Z_OK : AM2Z_EFAILED);
            return;
        }
        if (s == AM2Z_EXEC_SUSPENDED || s == AM2Z_EXEC_READY)
            return;
        /* A plain coroutine.yield from the body: nothing will ever resume
         * it, so fail the execution rather than leave it hanging. */
        lua_settop(co, 0);
        lua_pushliteral(co, "coroutine.yield was called directly in an execution "
                            "body; use ctx:sleep/ctx:call (or yield only inside "
                            "coroutines the body created itself)");
        store_result(h, lx, co);
        release_body(h, lx);
        am2z_exec_finish(x, AM2Z_EFAILED);
        return;
    }
    if (st == 0) {
        /* Bodies return (result, ok): ok == false settles as a failure. */
        int top = lua_gettop(co);
        int ok = top < 2 || lua_toboolean(co, 2);
        if (top == 0)
            lua_pushnil(co);
        else
            lua_settop(co, 1);
        store_result(h, lx, co);
        lua_settop(co, 0);
        release_body(h, lx);
        am2z_exec_finish(x, ok ? AM2Z_OK : AM2Z_EFAILED);
        return;
    }
    /* A raise that escaped the body. The Lua library wraps user code in
     * xpcall, so this is a bug or an out-of-memory: keep the traceback. */
    {
        lua_State *L = host_L(h);
        const char *msg = lua_tostring(co, -1);
        luaL_traceback(L, co, msg ? msg : "(non-string error)", 0);
        store_result(h, lx, L);
        release_body(h, lx);
        am2z_exec_finish(x, AM2Z_EFAILED);
    }
}

static void host_release(void *hostp, am2z_exec_t *x)
{
    lhost_t *h = hostp;
    lexec_t *lx = LX(x);
    lua_State *L = host_L(h);

    if (h->closing)
        return;
    release_body(h, lx);
    result_clear(h, L, lx);
    reg_unref(h, L, h->cbs_ref, &lx->abort_ref);
    if (lx->cslot) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->conts_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, 2 * lx->cslot - 1);
        lua_pushnil(L);
        lua_rawseti(L, -2, 2 * lx->cslot);
        lua_pop(L, 1);
        slot_free(&h->cslots, lx->cslot);
        lx->cslot = 0;
    }
}

/* Runs the execution's onAbort callbacks, once, at the moment of abort. */
static void host_abort(void *hostp, am2z_exec_t *x, int reason)
{
    lhost_t *h = hostp;
    lexec_t *lx = LX(x);
    lua_State *L;
    int n, i, base;

    if (h->closing || lx->abort_ref <= 0)
        return;
    L = host_L(h);
    /* The callbacks belong to no execution: a wait or spawn from them must
     * fail cleanly instead of acting for whatever body is running now. */
    lua_State *saved_running = h->running;
    am2z_exec_t *saved_current = h->current;
    h->running = NULL;
    h->current = NULL;
    lua_checkstack(L, 8);
    base = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->cbs_ref);
    lua_rawgeti(L, -1, lx->abort_ref);
    reg_unref(h, L, h->cbs_ref, &lx->abort_ref);
    if (!lua_istable(L, -1)) {
        lua_settop(L, base);
        h->running = saved_running;
        h->current = saved_current;
        return;
    }
    n = (int) lua_objlen(L, -1);
    for (i = 1; i <= n; i++) {
        lua_pushcfunction(L, traceback_handler);
        lua_rawgeti(L, base + 2, i);
        lua_pushstring(L, am2z_err_name(reason));
        if (lua_pcall(L, 1, 0, -3) != 0)
            report_error(h, L, "onAbort callback failed");
        lua_settop(L, base + 2);
    }
    lua_settop(L, base);
    h->running = saved_running;
    h->current = saved_current;
}

/* ---- argument checks ---------------------------------------------------- */

static am2z_exec_t *check_current(lua_State *L, lhost_t *h, const char *fname)
{
    if (h->current == NULL || h->running == NULL) {
        luaL_error(L, "%s: must be called inside an engine coroutine "
                      "(a processor body, am2z.run(fn), or the main chunk run by am2z-lua)",
                   fname);
        return NULL;
    }
    if (h->running != L) {
        luaL_error(L, "%s: called from a coroutine the engine does not run "
                      "(a coroutine created inside the execution); "
                      "call it from the execution's own coroutine",
                   fname);
        return NULL;
    }
    return h->current;
}

/* For every call that suspends: the coroutine must be able to yield from
 * here. A wait from a function that C called (a table.sort comparator, a
 * gsub callback, a metamethod, an onAbort callback) would start a request
 * and then fail to yield, leaving the execution out of step with its body. */
static am2z_exec_t *check_can_wait(lua_State *L, lhost_t *h, const char *fname)
{
    am2z_exec_t *x = check_current(L, h, fname);
    if (!lua_isyieldable(L))
        luaL_error(L, "%s: cannot wait here: called from a function that C called "
                      "(a table.sort comparator, a string.gsub callback, a metamethod, "
                      "an onAbort callback, ...)", fname);
    return x;
}

static uint64_t check_id(lua_State *L, int idx)
{
    lua_Number n = luaL_checknumber(L, idx);
    if (n < 1 || n != floor(n))
        luaL_argerror(L, idx, "expected an execution id (positive integer)");
    return (uint64_t) n;
}

static int check_reason(lua_State *L, int idx)
{
    const char *s = luaL_optstring(L, idx, "ECANCELED");
    if (strcmp(s, "ETIMEDOUT") == 0)
        return AM2Z_ETIMEDOUT;
    if (strcmp(s, "ECANCELED") == 0)
        return AM2Z_ECANCELED;
    luaL_argerror(L, idx, "expected \"ECANCELED\" or \"ETIMEDOUT\"");
    return 0;
}

static int fail(lua_State *L, int rc)
{
    lua_pushnil(L);
    push_status(L, rc);
    lua_pushstring(L, am2z_strerror(rc));
    return 3;
}

/* ---- Lua functions ------------------------------------------------------ */

/* Creates an execution whose body is the function at `fidx` called with
 * the `nargs` values from `aidx` on (both on L's stack, left in place).
 * Raises only before the core owns anything (Lua memory errors). */
static int spawn_body(lhost_t *h, lua_State *L, int fidx, int aidx, int nargs,
                      am2z_exec_t *parent, const am2z_exec_opts_t *o, am2z_exec_t **out)
{
    am2z_exec_t *x;
    lua_State *co;
    int rc, tslot;

    /* Get the coroutine before the core owns anything, so a Lua memory
     * error here cannot leak a record. */
    lua_checkstack(L, nargs + 4);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->threads_ref);
    if (h->pool_n > 0) {
        tslot = h->pool[--h->pool_n];
        lua_rawgeti(L, -1, tslot);
        co = lua_tothread(L, -1);
        lua_pop(L, 1);
    } else {
        co = lua_newthread(L);
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->tramp_ref);
        lua_xmove(L, co, 1);
        tslot = slot_alloc(&h->tslots);
        lua_rawseti(L, -2, tslot);           /* pops the thread */
    }
    lua_pop(L, 1);
    lua_checkstack(co, nargs + LUA_MINSTACK);
    lua_pushvalue(L, fidx);
    for (int i = 0; i < nargs; i++)
        lua_pushvalue(L, aidx + i);
    lua_xmove(L, co, nargs + 1);

    rc = am2z_exec_new(h->e, parent, o, &x);
    if (rc != AM2Z_OK) {
        /* Never started: drop it rather than park a coroutine whose stack
         * holds a body it will not run. */
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->threads_ref);
        lua_pushnil(L);
        lua_rawseti(L, -2, tslot);
        lua_pop(L, 1);
        slot_free(&h->tslots, tslot);
        return rc;
    }
    lexec_t *lx = LX(x);
    lx->co = co;
    lx->tslot = tslot;
    lx->rslot = 0;
    lx->cslot = 0;
    lx->abort_ref = 0;
    lx->nargs = nargs + 1;                  /* fn + its arguments */
    *out = x;
    return AM2Z_OK;
}

/* Settled hook: starts the execution's continuation, if it has one, as a
 * new root execution fn(a1, a2, status, result). */
static void host_settled(void *hostp, am2z_exec_t *x)
{
    lhost_t *h = hostp;
    lexec_t *lx = LX(x);
    am2z_exec_opts_t o;
    am2z_exec_t *k;
    lua_State *L;
    int base;

    /* am2z-lua: a main chunk that failed ends the program (its error is
     * printed by main), whatever else is still pending on the loop. */
    if (x == h->main_exec && am2z_exec_settled_status(x) != AM2Z_OK
        && am2z_exec_settled_status(x) != AM2Z_ECANCELED)
        uv_stop(am2z_engine_loop(h->e));
    if (lx->cslot == 0 || h->closing)
        return;
    L = host_L(h);
    base = lua_gettop(L);
    lua_checkstack(L, 8);
    /* conts[2k-1] = fn, conts[2k] = arg: no table per continuation. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->conts_ref);
    lua_rawgeti(L, base + 1, 2 * lx->cslot - 1);
    lua_rawgeti(L, base + 1, 2 * lx->cslot);
    lua_pushnil(L);
    lua_rawseti(L, base + 1, 2 * lx->cslot - 1);
    lua_pushnil(L);
    lua_rawseti(L, base + 1, 2 * lx->cslot);
    slot_free(&h->cslots, lx->cslot);
    lx->cslot = 0;
    lua_pushnil(L);
    push_status(L, am2z_exec_settled_status(x));
    push_result(h, L, x);
    memset(&o, 0, sizeof(o));
    o.attempt = 1;
    if (spawn_body(h, L, base + 2, base + 3, 4, NULL, &o, &k) != AM2Z_OK)
        fprintf(stderr, "am2z: could not start a continuation (engine closing?)\n");
    lua_settop(L, base);
}

/* core.on_settle(id, fn, arg?) -> true | false (unknown id)
 * When the execution settles, fn(arg, nil, status, result) runs as a new
 * root execution (at once if it has settled already). One per execution. */
static int l_on_settle(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = am2z_exec_find(h->e, check_id(L, 1));
    lexec_t *lx;
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 3);
    if (x == NULL) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lx = LX(x);
    if (lx->cslot)
        return luaL_error(L, "core.on_settle: execution already has a continuation");
    lx->cslot = slot_alloc(&h->cslots);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->conts_ref);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, 2 * lx->cslot - 1);
    lua_pushvalue(L, 3);
    lua_rawseti(L, -2, 2 * lx->cslot);
    lua_pop(L, 1);
    if (am2z_exec_is_settled(x))
        host_settled(h, x);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.spawn(fn, mode, timeout_ms, depth, attempt, ...) -> id
 * mode: "child" (settles into the caller's wait_child), "watch" (a child
 * for cancellation only; wait with core.wait), "root" (no parent). */
static int l_spawn(lua_State *L)
{
    lhost_t *h = HOST(L);
    const char *mode = luaL_checkstring(L, 2);
    lua_Number tmo = luaL_optnumber(L, 3, 0);
    int depth = (int) luaL_optinteger(L, 4, 0);
    int attempt = (int) luaL_optinteger(L, 5, 1);
    int nargs = lua_gettop(L) - 5;
    am2z_exec_t *parent = NULL, *x;
    am2z_exec_opts_t o;
    int rc;

    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (nargs < 0)
        nargs = 0;
    if (tmo < 0 || tmo > 4294967295.0)
        luaL_argerror(L, 3, "timeout must be between 0 and 2^32-1 ms");
    if (strcmp(mode, "root") != 0) {
        if (strcmp(mode, "child") != 0 && strcmp(mode, "watch") != 0)
            luaL_argerror(L, 2, "expected \"child\", \"watch\" or \"root\"");
        parent = check_current(L, h, "core.spawn");
    }
    memset(&o, 0, sizeof(o));
    o.timeout_ms = (uint32_t) ceil(tmo);
    o.depth = depth;
    o.attempt = attempt;
    o.notify_parent = mode[0] == 'c';

    if (nargs > AM2Z_SPAWN_MAX_ARGS)
        luaL_error(L, "core.spawn: at most %d arguments for the body", AM2Z_SPAWN_MAX_ARGS);
    rc = spawn_body(h, L, 1, 6, nargs, parent, &o, &x);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    lua_pushnumber(L, (lua_Number) am2z_exec_id(x));
    return 1;
}

/* core.wait_child() -> id, status, result | nil, reason */
static int l_wait_child(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = check_can_wait(L, h, "core.wait_child");
    int rc = am2z_exec_wait_child(x);
    if (rc == AM2Z_READY)
        return push_child(h, L, am2z_exec_take_child(x));
    if (rc == AM2Z_ENOTFOUND)
        return luaL_error(L, "core.wait_child: the execution has no child left to wait for");
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.wait(id) -> status, result | nil, reason */
static int l_wait(lua_State *L)
{
    lhost_t *h = HOST(L);
    uint64_t id = check_id(L, 1);
    am2z_exec_t *x = check_can_wait(L, h, "core.wait");
    am2z_exec_t *t = am2z_exec_find(h->e, id);
    int rc;

    if (t == NULL) {
        lua_pushnil(L);
        push_status(L, AM2Z_ENOTFOUND);
        return 2;
    }
    if (t == x)
        return luaL_error(L, "core.wait: an execution cannot wait for itself");
    rc = am2z_exec_wait_exec(x, t);
    if (rc == AM2Z_READY)
        return push_settled(h, L, t);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.sleep(ms) -> true | nil, reason */
static int l_sleep(lua_State *L)
{
    lhost_t *h = HOST(L);
    lua_Number ms = luaL_checknumber(L, 1);
    am2z_exec_t *x;
    int rc;

    if (!(ms >= 0) || isinf(ms))
        return luaL_argerror(L, 1, "expected a finite number of milliseconds >= 0");
    x = check_can_wait(L, h, "sleep");
    rc = am2z_exec_sleep(x, ms);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.yield() -> true | nil, reason: lets the rest of the loop run. */
static int l_yield(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = check_can_wait(L, h, "core.yield");
    int rc = am2z_exec_yield(x);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.wait_host(token) -> true | nil, reason
 * Suspends until core.complete_host(id, token) (a Lua-level future). */
static int l_wait_host(lua_State *L)
{
    lhost_t *h = HOST(L);
    uint64_t token = check_id(L, 1);
    am2z_exec_t *x = check_can_wait(L, h, "core.wait_host");
    int rc = am2z_exec_wait_host(x, token);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.complete_host(id, token, status?) -> true | false (stale or gone) */
static int l_complete_host(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = am2z_exec_find(h->e, check_id(L, 1));
    uint64_t token = check_id(L, 2);
    int status = lua_isnoneornil(L, 3) ? AM2Z_OK : check_reason(L, 3);
    lua_pushboolean(L, x != NULL && am2z_exec_complete_host(x, token, status) == AM2Z_OK);
    return 1;
}

/* core.cancel(id, reason?) -> true | false (unknown or already finished) */
static int l_cancel(lua_State *L)
{
    lhost_t *h = HOST(L);
    uint64_t id = check_id(L, 1);
    int reason = check_reason(L, 2);
    am2z_exec_t *x = am2z_exec_find(h->e, id);
    if (x == NULL || am2z_exec_state(x) == AM2Z_EXEC_DONE || am2z_exec_aborted(x)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    am2z_exec_cancel(x, reason);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.aborted(id?) -> reason | nil (current execution when id is nil) */
static int l_aborted(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x;
    if (lua_isnoneornil(L, 1))
        x = h->current;
    else
        x = am2z_exec_find(h->e, check_id(L, 1));
    if (x == NULL || am2z_exec_aborted(x) == 0) {
        lua_pushnil(L);
        return 1;
    }
    return push_status(L, am2z_exec_aborted(x));
}

/* core.on_abort(id, fn): fn(reason) runs once when the execution is
 * aborted; at once if it already was. */
static int l_on_abort(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = am2z_exec_find(h->e, check_id(L, 1));
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (x == NULL || am2z_exec_state(x) == AM2Z_EXEC_DONE) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (am2z_exec_aborted(x)) {
        lua_pushvalue(L, 2);
        push_status(L, am2z_exec_aborted(x));
        lua_call(L, 1, 0);
        lua_pushboolean(L, 1);
        return 1;
    }
    lexec_t *lx = LX(x);
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->cbs_ref);
    if (lx->abort_ref <= 0) {
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lx->abort_ref = luaL_ref(L, -3);
    } else {
        lua_rawgeti(L, -1, lx->abort_ref);
    }
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, (int) lua_objlen(L, -2) + 1);
    lua_pop(L, 2);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.current() -> id, depth, attempt | nil */
static int l_current(lua_State *L)
{
    lhost_t *h = HOST(L);
    if (h->current == NULL || h->running != L) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, (lua_Number) am2z_exec_id(h->current));
    lua_pushinteger(L, am2z_exec_depth(h->current));
    lua_pushinteger(L, am2z_exec_attempt(h->current));
    return 3;
}

/* core.status(id) -> "running"|"OK"|"EFAILED"|... | nil when gone */
static int l_status(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = am2z_exec_find(h->e, check_id(L, 1));
    if (x == NULL) {
        lua_pushnil(L);
        return 1;
    }
    if (!am2z_exec_is_settled(x)) {
        lua_pushliteral(L, "running");
        return 1;
    }
    return push_status(L, am2z_exec_settled_status(x));
}

/* Runs the loop until root `x` settles. Returns 0, or -1 when nothing is
 * left that could ever settle it. */
static int run_until_settled(lhost_t *h, lua_State *L, am2z_exec_t *x)
{
    lua_State *saved = h->loop_L;
    int rc = 0;
    h->loop_L = L;
    h->in_run++;
    while (!am2z_exec_is_settled(x)) {
        int alive = uv_run(am2z_engine_loop(h->e), UV_RUN_ONCE);
        if (!alive && !am2z_exec_is_settled(x)) {
            am2z_stats_t s;
            am2z_engine_stats(h->e, &s);
            if (s.ready == 0 && s.timers == 0) {
                rc = -1;
                break;
            }
        }
    }
    h->in_run--;
    h->loop_L = saved;
    return rc;
}

/* core.run(fn, timeout_ms?) -> status, result
 * Runs fn as a root execution and drives the loop until it settles. */
static int l_run(lua_State *L)
{
    lhost_t *h = HOST(L);
    lua_Number tmo = luaL_optnumber(L, 2, 0);
    am2z_exec_t *x;
    uint64_t id;

    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (h->running)
        return luaL_error(L, "am2z.run: already inside an engine coroutine; "
                             "call the function directly instead of nesting am2z.run");
    if (h->in_run)
        return luaL_error(L, "am2z.run: the loop is already running "
                             "(am2z.run called from a callback)");
    lua_settop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(2));   /* the spawn closure */
    lua_pushvalue(L, 1);
    lua_pushliteral(L, "root");
    lua_pushnumber(L, tmo);
    lua_call(L, 3, 3);
    if (lua_isnil(L, -3))
        return luaL_error(L, "am2z.run: could not start: %s", lua_tostring(L, -1));
    id = (uint64_t) lua_tonumber(L, -3);
    lua_settop(L, 0);
    x = am2z_exec_find(h->e, id);
    am2z_exec_ref(x);
    if (run_until_settled(h, L, x) != 0) {
        am2z_exec_cancel(x, AM2Z_ECANCELED);
        am2z_exec_unref(x);
        return luaL_error(L, "am2z.run: the function is waiting for something that can "
                             "never happen (nothing is left pending on the loop)");
    }
    push_settled(h, L, x);
    am2z_exec_unref(x);
    return 2;
}

/* core.run_loop(mode) -> alive: "default" | "once" | "nowait" */
static int l_run_loop(lua_State *L)
{
    lhost_t *h = HOST(L);
    static const char *const modes[] = { "default", "once", "nowait", NULL };
    static const uv_run_mode um[] = { UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT };
    int m = luaL_checkoption(L, 1, "default", modes);
    if (h->running || h->in_run)
        return luaL_error(L, "core.run_loop: the loop is already running");
    lua_State *saved = h->loop_L;
    h->loop_L = L;
    h->in_run++;
    int alive = uv_run(am2z_engine_loop(h->e), um[m]);
    h->in_run--;
    h->loop_L = saved;
    lua_pushboolean(L, alive);
    return 1;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, am2z_now_ms());
    return 1;
}

/* sha256(string) -> 64 hex digits (the state store's integrity hash). */
static int l_sha256(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char hex[65];
    int rc = am2z_sha256_hex(s, len, hex);
    if (rc != 0) return luaL_error(L, "sha256: %s", am2z_strerror(rc));
    lua_pushlstring(L, hex, 64);
    return 1;
}

/* ISO-8601 UTC with milliseconds; the formatted seconds are cached since a
 * runtime stamps every step and strftime dominates otherwise. */
static int l_iso_now(lua_State *L)
{
    static time_t cached_sec = -1;
    static char   cached[32];
    struct timeval tv;
    char buf[40];

    if (lua_isnumber(L, 1)) {               /* a given wall-clock time, ms */
        double ms = lua_tonumber(L, 1);
        tv.tv_sec = (time_t) (ms / 1000);
        tv.tv_usec = (suseconds_t) ((ms - (double) tv.tv_sec * 1000) * 1000);
    } else {
        gettimeofday(&tv, NULL);
    }
    if (tv.tv_sec != cached_sec) {
        struct tm tm;
        gmtime_r(&tv.tv_sec, &tm);
        strftime(cached, sizeof(cached), "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = tv.tv_sec;
    }
    int n = snprintf(buf, sizeof(buf), "%s.%03dZ", cached, (int) (tv.tv_usec / 1000));
    lua_pushlstring(L, buf, (size_t) n);
    return 1;
}

static int l_wall_ms(lua_State *L)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    lua_pushnumber(L, (lua_Number) tv.tv_sec * 1000.0 + (lua_Number) (tv.tv_usec / 1000));
    return 1;
}

/* core.retry_delay(maxAttempts, backoffMs, multiplier, maxBackoffMs, jitter,
 *                  failedAttempt, random) -> delay ms | nil when exhausted */
static int l_retry_delay(lua_State *L)
{
    am2z_retry_policy_t p;
    const char *why;
    p.max_attempts = (int) luaL_checkinteger(L, 1);
    p.backoff_ms = luaL_checknumber(L, 2);
    p.multiplier = luaL_checknumber(L, 3);
    p.max_backoff_ms = luaL_optnumber(L, 4, 0);
    p.jitter = lua_toboolean(L, 5);
    int failed = (int) luaL_checkinteger(L, 6);
    double rnd = luaL_optnumber(L, 7, 0);
    if (am2z_retry_policy_check(&p, &why) != AM2Z_OK)
        return luaL_error(L, "retry policy: %s", why);
    double d = am2z_retry_delay(&p, failed, rnd);
    if (d < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, d);
    return 1;
}

static int l_stats(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_stats_t s;
    am2z_engine_stats(h->e, &s);
    lua_createtable(L, 0, 9);
#define F(name) lua_pushnumber(L, (lua_Number) s.name); lua_setfield(L, -2, #name);
    F(live) F(running) F(started) F(succeeded) F(failed) F(timed_out)
    F(cancelled) F(timers) F(ready)
#undef F
    return 1;
}

static int l_debug_counts(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_stats_t s;
    int n;
    am2z_engine_stats(h->e, &s);
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number) s.live);
    lua_setfield(L, -2, "execs");
    lua_pushnumber(L, (lua_Number) s.timers);
    lua_setfield(L, -2, "timers");
    /* Coroutines in use and stored results, counted the slow way: this is
     * for tests. */
    const int refs[2] = { h->threads_ref, h->results_ref };
    const char *names[2] = { "threads", "results" };
    for (int k = 0; k < 2; k++) {
        n = 0;
        lua_rawgeti(L, LUA_REGISTRYINDEX, refs[k]);
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            n++;
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
        if (k == 0)
            n -= h->pool_n;             /* parked coroutines are not in use */
        lua_pushinteger(L, n);
        lua_setfield(L, -2, names[k]);
    }
    return 1;
}

/* core.emit(name, json?) -> forwards a runtime event to C subscribers. */
static int l_emit(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_event_t ev;
    if (am2z_engine_subscribers(h->e) == 0)
        return 0;
    ev.name = luaL_checkstring(L, 1);
    ev.json = luaL_optstring(L, 2, NULL);
    ev.exec = h->current;
    am2z_engine_emit(h->e, &ev);
    return 0;
}

static int l_subscribers(lua_State *L)
{
    lhost_t *h = HOST(L);
    lua_pushinteger(L, am2z_engine_subscribers(h->e));
    return 1;
}

/* core.set_error_handler(fn(what, err)) for callback errors. */
static int l_set_error_handler(lua_State *L)
{
    lhost_t *h = HOST(L);
    if (h->errh_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, h->errh_ref);
    h->errh_ref = LUA_NOREF;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TFUNCTION);
        lua_pushvalue(L, 1);
        h->errh_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

/* core.cancel_main() -> true when am2z-lua's main chunk was running and
 * is now cancelled (its pending wait returns nil, ECANCELED). */
static int l_cancel_main(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_exec_t *x = h->main_exec;
    int ok = x && !am2z_exec_is_settled(x) && am2z_exec_state(x) != AM2Z_EXEC_DONE;
    if (ok)
        am2z_exec_cancel(x, AM2Z_ECANCELED);
    lua_pushboolean(L, ok);
    return 1;
}

static int l_in_exec(lua_State *L)
{
    lhost_t *h = HOST(L);
    lua_pushboolean(L, h->current != NULL && h->running == L);
    return 1;
}

/* ---- Redis connections ---------------------------------------------------- */

#define AM2Z_REDIS_MT "am2z.redis.connection"

typedef struct {
    am2z_redis_t *r;            /* owned; NULL once closed */
    lhost_t      *h;            /* borrowed: the host outlives its connections */
    int           log_ref;      /* registry: log function(level, msg) or LUA_NOREF */
} lredis_t;

static lredis_t *check_redis(lua_State *L, int idx)
{
    lredis_t *c = luaL_checkudata(L, idx, AM2Z_REDIS_MT);
    if (c->r == NULL)
        luaL_argerror(L, idx, "the Redis connection is closed");
    return c;
}

/* Connection log lines go to the Lua log function given at creation; they
 * can come from any callback, so they run protected on whatever thread may
 * take a call right now. */
static void redis_log_cb(void *ud, int level, const char *msg)
{
    lredis_t *c = ud;
    lhost_t *h = c->h;
    if (h->closing || c->log_ref == LUA_NOREF) {
        fprintf(stderr, "am2z: %s\n", msg);
        return;
    }
    lua_State *L = host_L(h);
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->log_ref);
    lua_pushinteger(L, level);
    lua_pushstring(L, msg);
    if (lua_pcall(L, 2, 0, 0) != 0)
        fprintf(stderr, "am2z: %s (and the log function failed: %s)\n", msg, lua_tostring(L, -1));
    lua_settop(L, top);
}

static const char *opt_string(lua_State *L, int t, const char *k)
{
    const char *s = NULL;
    lua_getfield(L, t, k);
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "core.redis_new: expected %s to be a string", k);
        s = lua_tostring(L, -1);
    }
    lua_pop(L, 1);          /* the string stays alive in the options table */
    return s;
}

static lua_Integer opt_int(lua_State *L, int t, const char *k, lua_Integer dflt)
{
    lua_Integer v = dflt;
    lua_getfield(L, t, k);
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1))
            luaL_error(L, "core.redis_new: expected %s to be a number", k);
        v = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* core.redis_new{ host, port, username, password, db, name, connectTimeout,
 *                 reconnectMax, log = fn(level, msg) } -> connection
 * Starts connecting at once; see core.redis_wait_ready. */
static int l_redis_new(lua_State *L)
{
    lhost_t *h = HOST(L);
    am2z_redis_opts_t o;
    lredis_t *c;
    int rc;

    luaL_checktype(L, 1, LUA_TTABLE);
    memset(&o, 0, sizeof(o));
    o.host = opt_string(L, 1, "host");
    o.username = opt_string(L, 1, "username");
    o.password = opt_string(L, 1, "password");
    o.client_name = opt_string(L, 1, "name");
    o.port = (int) opt_int(L, 1, "port", 6379);
    o.db = (int) opt_int(L, 1, "db", 0);
    o.connect_timeout_ms = (uint32_t) opt_int(L, 1, "connectTimeout", 5000);
    o.reconnect_max_ms = (uint32_t) opt_int(L, 1, "reconnectMax", 5000);
    if (o.port <= 0 || o.port > 65535)
        return luaL_error(L, "core.redis_new: expected port to be 1-65535, got %d", o.port);
    if (o.db < 0)
        return luaL_error(L, "core.redis_new: expected db to be >= 0, got %d", o.db);

    c = lua_newuserdata(L, sizeof(*c));
    c->r = NULL;
    c->h = h;
    c->log_ref = LUA_NOREF;
    luaL_getmetatable(L, AM2Z_REDIS_MT);
    lua_setmetatable(L, -2);
    lua_getfield(L, 1, "log");
    if (lua_isfunction(L, -1))
        c->log_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
        lua_pop(L, 1);
    o.log = redis_log_cb;
    o.log_ud = c;
    rc = am2z_redis_new(h->e, &o, &c->r);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return 1;
}

/* core.redis_wait_ready(conn) -> true | nil, code, message */
static int l_redis_wait_ready(lua_State *L)
{
    lhost_t *h = HOST(L);
    lredis_t *c = check_redis(L, 1);
    am2z_exec_t *x = check_can_wait(L, h, "redis connect");
    int rc = am2z_redis_wait_ready(c->r, x);
    if (rc == AM2Z_READY) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.redis_call(conn, timeout_ms, cmd, args...) -> reply | nil, code, message
 * Arguments are strings or numbers; the reply converts as push_reply says. */
static int redis_call_flags(lua_State *L, int flags);

static int l_redis_call(lua_State *L)
{
    return redis_call_flags(L, 0);
}

static int redis_call_flags(lua_State *L, int flags)
{
    lhost_t *h = HOST(L);
    lredis_t *c = check_redis(L, 1);
    lua_Number tmo = luaL_checknumber(L, 2);
    int argc = lua_gettop(L) - 2, rc;
    const char *argv_s[32];
    size_t lens_s[32];
    const char **argv = argv_s;
    size_t *lens = lens_s;
    am2z_exec_t *x;

    if (argc < 1)
        return luaL_error(L, "redis call: expected a command name");
    if (tmo < 0 || tmo > 4294967295.0)
        return luaL_argerror(L, 2, "timeout must be between 0 and 2^32-1 ms");
    for (int i = 0; i < argc; i++) {
        int t = lua_type(L, 3 + i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            return luaL_error(L, "redis call: argument %d must be a string or a number, got %s",
                              i + 1, lua_typename(L, t));
    }
    x = check_can_wait(L, h, "redis call");
    /* No raise below: the argument vector may be heap memory. */
    if (argc > 32) {
        argv = malloc((size_t) argc * sizeof(*argv));
        lens = malloc((size_t) argc * sizeof(*lens));
        if (argv == NULL || lens == NULL) {
            free(argv);
            free(lens);
            return fail(L, AM2Z_ENOMEM);
        }
    }
    for (int i = 0; i < argc; i++)
        argv[i] = lua_tolstring(L, 3 + i, &lens[i]);  /* numbers become strings in place */
    rc = am2z_redis_command_ex(c->r, x, (uint32_t) tmo, argc, argv, lens, flags);
    if (argv != argv_s) {
        free(argv);
        free(lens);
    }
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

/* core.redis_xread_results(conn, timeout_ms, "XREAD", ...) -> as redis_call,
 * with the reply filtered by push_xread_results. */
static int l_redis_xread_results(lua_State *L)
{
    int n = redis_call_flags(L, AM2Z_REDIS_XREAD_RESULTS);
    lhost_t *h = HOST(L);
    /* l_redis_call either yielded (the request is pending) or returned an
     * error; only a pending request gets the flag. */
    if (n == -1 && h->current)          /* LuaJIT's lua_yield returns -1 */
        LX(h->current)->xread_results = 1;
    return n;
}

/* core.redis_script(name) -> source | nil */
static int l_redis_script(lua_State *L)
{
    const char *src = am2z_redis_script(luaL_checkstring(L, 1));
    if (src == NULL)
        lua_pushnil(L);
    else
        lua_pushstring(L, src);
    return 1;
}

static int l_redis_ready(lua_State *L)
{
    lredis_t *c = luaL_checkudata(L, 1, AM2Z_REDIS_MT);
    lua_pushboolean(L, c->r && am2z_redis_ready(c->r));
    return 1;
}

static int redis_gc(lua_State *L)
{
    lredis_t *c = luaL_checkudata(L, 1, AM2Z_REDIS_MT);
    if (c->r) {
        if (!c->h->closing)
            am2z_redis_close(c->r);
        c->r = NULL;
    }
    if (c->log_ref != LUA_NOREF && !c->h->closing) {
        luaL_unref(L, LUA_REGISTRYINDEX, c->log_ref);
        c->log_ref = LUA_NOREF;
    }
    return 0;
}

/* ---- file watches ---------------------------------------------------------- */

#define AM2Z_WATCH_MT "am2z.watch"

typedef struct { am2z_watch_t *w; lhost_t *h; } lwatch_t;

/* core.watch_new(path) -> watch | nil, code, message */
static int l_watch_new(lua_State *L)
{
    lhost_t *h = HOST(L);
    const char *path = luaL_checkstring(L, 1);
    lwatch_t *lw = lua_newuserdata(L, sizeof(*lw));
    int rc;
    lw->w = NULL;
    lw->h = h;
    luaL_getmetatable(L, AM2Z_WATCH_MT);
    lua_setmetatable(L, -2);
    lw->w = am2z_watch_new(h->e, path, &rc);
    if (lw->w == NULL)
        return fail(L, rc);
    return 1;
}

static lwatch_t *check_watch(lua_State *L)
{
    lwatch_t *lw = luaL_checkudata(L, 1, AM2Z_WATCH_MT);
    return lw;
}

/* core.watch_next(watch) -> { filename, flags } | nil, code, message */
static int l_watch_next(lua_State *L)
{
    lhost_t *h = HOST(L);
    lwatch_t *lw = check_watch(L);
    am2z_exec_t *x;
    int rc;
    if (lw->w == NULL)
        return fail(L, AM2Z_ECLOSED);
    x = check_can_wait(L, h, "core.watch_next");
    rc = am2z_watch_next(lw->w, x);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return lua_yield(L, 0);
}

static int watch_gc(lua_State *L)
{
    lwatch_t *lw = luaL_checkudata(L, 1, AM2Z_WATCH_MT);
    if (lw->w) {
        if (!lw->h->closing)
            am2z_watch_close(lw->w);
        lw->w = NULL;
    }
    return 0;
}

/* ---- lock keeper ----------------------------------------------------------- */

#define AM2Z_LK_MT "am2z.lockkeeper"

typedef struct { am2z_lockkeeper_t *k; } llk_t;

/* core.lockkeeper_new{ host, port, username, password, db, stalledKey,
 *                      lockDuration, interval } -> keeper */
static int l_lk_new(lua_State *L)
{
    am2z_lockkeeper_opts_t o;
    llk_t *u;
    int rc;
    luaL_checktype(L, 1, LUA_TTABLE);
    memset(&o, 0, sizeof(o));
    o.host = opt_string(L, 1, "host");
    o.username = opt_string(L, 1, "username");
    o.password = opt_string(L, 1, "password");
    o.stalled_key = opt_string(L, 1, "stalledKey");
    o.port = (int) opt_int(L, 1, "port", 6379);
    o.db = (int) opt_int(L, 1, "db", 0);
    o.lock_ms = (uint32_t) opt_int(L, 1, "lockDuration", 30000);
    o.interval_ms = (uint32_t) opt_int(L, 1, "interval", 0);
    if (o.stalled_key == NULL)
        return luaL_error(L, "core.lockkeeper_new: expected stalledKey");
    u = lua_newuserdata(L, sizeof(*u));
    u->k = NULL;
    luaL_getmetatable(L, AM2Z_LK_MT);
    lua_setmetatable(L, -2);
    rc = am2z_lockkeeper_new(&o, &u->k);
    if (rc != AM2Z_OK)
        return fail(L, rc);
    return 1;
}

static llk_t *check_lk(lua_State *L)
{
    llk_t *u = luaL_checkudata(L, 1, AM2Z_LK_MT);
    if (u->k == NULL)
        luaL_argerror(L, 1, "the lock keeper is closed");
    return u;
}

static int l_lk_add(lua_State *L)
{
    llk_t *u = check_lk(L);
    int rc = am2z_lockkeeper_add(u->k, luaL_checkstring(L, 2), luaL_checkstring(L, 3),
                                 luaL_checkstring(L, 4));
    lua_pushboolean(L, rc == AM2Z_OK);
    return 1;
}

static int l_lk_remove(lua_State *L)
{
    llk_t *u = check_lk(L);
    lua_pushboolean(L, am2z_lockkeeper_remove(u->k, luaL_checkstring(L, 2)) == AM2Z_OK);
    return 1;
}

static int l_lk_counts(lua_State *L)
{
    llk_t *u = check_lk(L);
    unsigned long ok = 0, bad = 0;
    am2z_lockkeeper_counts(u->k, &ok, &bad);
    lua_pushnumber(L, (lua_Number) ok);
    lua_pushnumber(L, (lua_Number) bad);
    return 2;
}

static int lk_gc(lua_State *L)
{
    llk_t *u = luaL_checkudata(L, 1, AM2Z_LK_MT);
    if (u->k) {
        am2z_lockkeeper_free(u->k);   /* joins the thread: no Lua involved */
        u->k = NULL;
    }
    return 0;
}

/* ---- module ------------------------------------------------------------- */

static int host_gc(lua_State *L)
{
    lhost_t *h = lua_touserdata(L, 1);
    if (h->e) {
        h->closing = 1;
        am2z_engine_free(h->e);
        h->e = NULL;
        free(h->tslots.free);
        free(h->rslots.free);
        free(h->cslots.free);
    }
    return 0;
}

static const luaL_Reg core_funcs[] = {
    { "wait_child", l_wait_child },
    { "wait", l_wait },
    { "sleep", l_sleep },
    { "yield", l_yield },
    { "cancel", l_cancel },
    { "on_settle", l_on_settle },
    { "wait_host", l_wait_host },
    { "complete_host", l_complete_host },
    { "aborted", l_aborted },
    { "on_abort", l_on_abort },
    { "current", l_current },
    { "status", l_status },
    { "run_loop", l_run_loop },
    { "now", l_now },
    { "iso_now", l_iso_now },
    { "sha256", l_sha256 },
    { "wall_ms", l_wall_ms },
    { "retry_delay", l_retry_delay },
    { "stats", l_stats },
    { "_debug_counts", l_debug_counts },
    { "emit", l_emit },
    { "subscribers", l_subscribers },
    { "set_error_handler", l_set_error_handler },
    { "in_exec", l_in_exec },
    { "redis_new", l_redis_new },
    { "redis_wait_ready", l_redis_wait_ready },
    { "redis_call", l_redis_call },
    { "redis_xread_results", l_redis_xread_results },
    { "redis_ready", l_redis_ready },
    { "redis_script", l_redis_script },
    { "watch_new", l_watch_new },
    { "watch_next", l_watch_next },
    { "watch_close", watch_gc },
    { "lockkeeper_new", l_lk_new },
    { "lockkeeper_add", l_lk_add },
    { "lockkeeper_remove", l_lk_remove },
    { "lockkeeper_counts", l_lk_counts },
    { "lockkeeper_close", lk_gc },
    { "redis_close", redis_gc },
    { "cancel_main", l_cancel_main },
    { NULL, NULL }
};

static lhost_t *get_host(lua_State *L)
{
    lhost_t *h;
    lua_pushlightuserdata(L, &AM2Z_HOST_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    h = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return h;
}

am2z_engine_t *am2z_lua_engine(lua_State *L)
{
    lhost_t *h = get_host(L);
    return h ? h->e : NULL;
}

int am2z_lua_open(lua_State *L, uv_loop_t *loop)
{
    lhost_t *h = get_host(L);
    int hidx;

    if (h == NULL) {
        am2z_engine_opts_t o;
        h = lua_newuserdata(L, sizeof(*h));
        memset(h, 0, sizeof(*h));
        h->errh_ref = LUA_NOREF;
        hidx = lua_gettop(L);
        lua_newtable(L);
        lua_pushcfunction(L, host_gc);
        lua_setfield(L, -2, "__gc");
        lua_setmetatable(L, hidx);

        lua_State *mainL = L;
        /* LuaJIT has no LUA_RIDX_MAINTHREAD; the main thread is the one a
         * coroutine-free caller runs on, and require runs there too in every
         * host we support. Remember whichever thread opened us. */
        h->L = mainL;
        lua_newtable(L);
        h->threads_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_newtable(L);
        h->results_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_newtable(L);
        h->cbs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_newtable(L);
        h->conts_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        if (luaL_loadbuffer(L, TRAMPOLINE, sizeof(TRAMPOLINE) - 1, "=am2z.trampoline") != 0)
            return lua_error(L);
        lua_pushlightuserdata(L, &AM2Z_POOL_MARK);
        lua_getglobal(L, "coroutine");
        lua_getfield(L, -1, "yield");
        lua_remove(L, -2);
        lua_createtable(L, 2, 0);
        lua_pushvalue(L, -1);
        h->box_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_call(L, 3, 1);
        h->tramp_ref = luaL_ref(L, LUA_REGISTRYINDEX);

        memset(&o, 0, sizeof(o));
        o.loop = loop;
        o.host = h;
        o.hooks.resume = host_resume;
        o.hooks.release = host_release;
        o.hooks.abort = host_abort;
        o.hooks.settled = host_settled;
        o.exec_host_size = sizeof(lexec_t);
        if (am2z_engine_new(&o, &h->e) != AM2Z_OK)
            return luaL_error(L, "am2z.core: could not create the engine (libuv failed)");

        lua_pushlightuserdata(L, &AM2Z_HOST_KEY);
        lua_pushvalue(L, hidx);
        lua_rawset(L, LUA_REGISTRYINDEX);

        luaL_newmetatable(L, AM2Z_LK_MT);
        lua_pushcfunction(L, lk_gc);
        lua_setfield(L, -2, "__gc");
        lua_pop(L, 1);

        luaL_newmetatable(L, AM2Z_REDIS_MT);
        lua_pushcfunction(L, redis_gc);
        lua_setfield(L, -2, "__gc");
        lua_pop(L, 1);

        luaL_newmetatable(L, AM2Z_WATCH_MT);
        lua_pushcfunction(L, watch_gc);
        lua_setfield(L, -2, "__gc");
        lua_pop(L, 1);
    } else {
        lua_pushlightuserdata(L, &AM2Z_HOST_KEY);
        lua_rawget(L, LUA_REGISTRYINDEX);
        hidx = lua_gettop(L);
    }

    lua_newtable(L);
    for (const luaL_Reg *r = core_funcs; r->name; r++) {
        lua_pushvalue(L, hidx);
        lua_pushcclosure(L, r->func, 1);
        lua_setfield(L, -2, r->name);
    }
    lua_pushvalue(L, hidx);
    lua_pushcclosure(L, l_spawn, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "spawn");
    /* core.run calls spawn through its second upvalue. */
    lua_pushvalue(L, hidx);
    lua_insert(L, -2);
    lua_pushcclosure(L, l_run, 2);
    lua_setfield(L, -2, "run");
    lua_pushliteral(L, AM2Z_VERSION);
    lua_setfield(L, -2, "version");

    lua_remove(L, hidx);
    lua_getglobal(L, "package");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "loaded");
        if (lua_istable(L, -1)) {
            lua_pushvalue(L, -3);
            lua_setfield(L, -2, "am2z.core");
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return 1;
}

int luaopen_am2z_core(lua_State *L)
{
    return am2z_lua_open(L, NULL);
}

uint64_t am2z_lua_spawn_main(lua_State *L, int nargs)
{
    lhost_t *h = get_host(L);
    int fidx = lua_gettop(L) - nargs;
    uint64_t id;

    if (h == NULL) {
        lua_pushliteral(L, "am2z.core is not open");
        return 0;
    }
    /* spawn(fn, "root", 0, 0, 1, args...) through a closure with the host
     * upvalue, exactly as Lua callers do. */
    lua_pushlightuserdata(L, &AM2Z_HOST_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_pushcclosure(L, l_spawn, 1);
    lua_insert(L, fidx);
    lua_pushliteral(L, "root");
    lua_pushnumber(L, 0);
    lua_pushinteger(L, 0);
    lua_pushinteger(L, 1);
    for (int i = 0; i < 4; i++)
        lua_insert(L, fidx + 2);
    if (lua_pcall(L, nargs + 5, 1, 0) != 0)
        return 0;
    id = (uint64_t) lua_tonumber(L, -1);
    lua_pop(L, 1);
    h->main_exec = am2z_exec_find(h->e, id);
    if (h->main_exec)
        am2z_exec_ref(h->main_exec);
    h->loop_L = L;
    return id;
}

int am2z_lua_run(lua_State *L, uv_run_mode mode)
{
    lhost_t *h = get_host(L);
    int alive;
    if (h == NULL || h->in_run || h->running)
        return -1;
    lua_State *saved = h->loop_L;
    h->loop_L = L;
    h->in_run++;
    alive = uv_run(am2z_engine_loop(h->e), mode);
    h->in_run--;
    h->loop_L = saved;
    return alive;
}

int am2z_lua_main_status(lua_State *L, uint64_t id, const char **errmsg)
{
    lhost_t *h = get_host(L);
    am2z_exec_t *x = h ? h->main_exec : NULL;
    int st;

    (void) id;
    *errmsg = NULL;
    if (x == NULL)
        return AM2Z_ENOTFOUND;
    if (!am2z_exec_is_settled(x))
        return AM2Z_ESTATE;
    st = am2z_exec_settled_status(x);
    if (st != AM2Z_OK) {
        push_result(h, L, x);
        *errmsg = lua_tostring(L, -1);   /* stays on L's stack for the caller */
    }
    return st;
}
