/*
 * am2z.h -- the public C API of the am2z engine core.
 *
 * The core owns the execution tree, timers, cancellation, retry arithmetic,
 * counters and event fan-out. It knows nothing about Lua: a "host" (the Lua
 * bindings, or an embedder) fills an am2z_hooks_t and runs the bodies of
 * executions when the core asks it to (the resume hook).
 *
 * Threading: one engine belongs to one loop thread. No function here may be
 * called from another thread.
 *
 * Errors: functions return AM2Z_OK (0) or a negative AM2Z_E* code; see
 * am2z_strerror() / am2z_err_name().
 */
#ifndef AM2Z_H
#define AM2Z_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AM2Z_VERSION "0.1.0"

/* name, message. Codes are negative and stable in this order. */
#define AM2Z_ERRNO_MAP(XX)                                                   \
    XX(EINVAL, "invalid argument")                                           \
    XX(ENOMEM, "out of memory")                                              \
    XX(EBUSY, "a request is already pending for this execution")             \
    XX(ETIMEDOUT, "operation timed out")                                     \
    XX(ECANCELED, "operation cancelled")                                     \
    XX(ESTATE, "operation not valid in the execution's current state")       \
    XX(EFAILED, "execution failed")                                          \
    XX(EDEPTH, "call depth exceeded")                                        \
    XX(ENOTFOUND, "not found")                                               \
    XX(ECLOSED, "engine is closing")                                         \
    XX(ESTALE, "handle refers to an execution that no longer exists")        \
    XX(EUV, "libuv error")                                                   \
    XX(ECONNREFUSED, "could not connect to Redis")                           \
    XX(ECONNRESET, "the Redis connection was lost")                          \
    XX(ENOTCONN, "not connected to Redis (reconnecting)")

typedef enum {
    AM2Z_OK = 0,
#define AM2Z_XX_ENUM(name, msg) AM2Z_##name,
    AM2Z__ERR_BEFORE_FIRST = -100,
    AM2Z_ERRNO_MAP(AM2Z_XX_ENUM)
#undef AM2Z_XX_ENUM
    AM2Z__ERR_END
} am2z_err_t;

const char *am2z_strerror(int code);
const char *am2z_err_name(int code);
/* Inverse of am2z_err_name(); returns AM2Z_EINVAL for an unknown name. */
int am2z_err_from_name(const char *name);

typedef struct am2z_engine_s am2z_engine_t;
typedef struct am2z_exec_s am2z_exec_t;

/* Execution lifecycle (one execution == one attempt of one processor body). */
typedef enum {
    AM2Z_EXEC_NEW = 0,      /* created, waiting in the ready queue to start */
    AM2Z_EXEC_RUNNING,      /* the host is running its body right now */
    AM2Z_EXEC_SUSPENDED,    /* waiting on its one pending request */
    AM2Z_EXEC_READY,        /* its request completed; waiting in the ready queue */
    AM2Z_EXEC_DONE          /* its body has returned (or was abandoned) */
} am2z_exec_state_t;

/* What a completed request delivers at resume time. */
typedef enum {
    AM2Z_WAKE_START = 0,    /* first run */
    AM2Z_WAKE_SLEEP,        /* sleep ended (status OK or the abort reason) */
    AM2Z_WAKE_CHILD,        /* a child settled: am2z_exec_take_child() */
    AM2Z_WAKE_EXEC,         /* a watched execution settled: wake.target */
    AM2Z_WAKE_HOST,         /* am2z_exec_complete_host() was called */
    AM2Z_WAKE_YIELD,        /* am2z_exec_yield(): just go round the loop */
    AM2Z_WAKE_EXTERN        /* an I/O layer completed it: wake.payload */
} am2z_wake_kind_t;

typedef struct {
    /* Called from the drain, never from inside another resume. The host runs
     * (starts or continues) the body, then either suspends it through one of
     * the request functions below, or calls am2z_exec_finish(). */
    void (*resume)(void *host, am2z_exec_t *exec);
    /* The record is about to be freed: drop every host reference. */
    void (*release)(void *host, am2z_exec_t *exec);
    /* The execution was aborted (cancel, deadline, parent's abort). Runs
     * exactly once per execution, synchronously, possibly while another body
     * is running on the loop thread; must not resume anything. May be NULL. */
    void (*abort)(void *host, am2z_exec_t *exec, int reason);
    /* The execution's outcome was just decided (am2z_exec_settled_status).
     * Runs exactly once, after the parent and waiters were notified; must
     * not resume anything (it may create and post executions). May be NULL. */
    void (*settled)(void *host, am2z_exec_t *exec);
} am2z_hooks_t;

typedef struct {
    uv_loop_t *loop;        /* NULL: the engine creates and owns a loop */
    am2z_hooks_t hooks;
    void *host;             /* passed to every hook */
    unsigned drain_budget;  /* resumes per loop turn before I/O gets a look; 0: default */
    size_t exec_host_size;  /* bytes of zeroed host space allocated with every
                             * execution record (am2z_exec_host_data) */
} am2z_engine_opts_t;

int  am2z_engine_new(const am2z_engine_opts_t *opts, am2z_engine_t **out);
/* Cancels every live execution, releases them, closes the engine's handles,
 * and (when it owns the loop) runs and closes the loop. Safe on NULL. */
void am2z_engine_free(am2z_engine_t *e);
uv_loop_t *am2z_engine_loop(am2z_engine_t *e);
/* uv_run on the engine's loop. */
int  am2z_engine_run(am2z_engine_t *e, uv_run_mode mode);
/* Monotonic clock in milliseconds (sub-millisecond precision). */
double am2z_now_ms(void);

typedef struct {
    uint64_t live;          /* execution records allocated and not yet freed */
    uint64_t running;       /* bodies started and not finished */
    uint64_t started;
    uint64_t succeeded;     /* settled AM2Z_OK */
    uint64_t failed;        /* settled AM2Z_EFAILED */
    uint64_t timed_out;
    uint64_t cancelled;
    uint64_t timers;        /* armed timers (sleeps, deadlines) */
    uint64_t ready;         /* executions in the ready queue */
} am2z_stats_t;
void am2z_engine_stats(am2z_engine_t *e, am2z_stats_t *out);

/* ---- executions ------------------------------------------------------- */

typedef struct {
    uint32_t timeout_ms;    /* 0: no deadline of its own */
    int      depth;         /* call depth, as the host counts it */
    int      attempt;       /* informational, 1-based */
    /* Non-zero: when this child settles it is queued for the parent's
     * am2z_exec_wait_child(). Zero: the parent link only carries
     * cancellation (wait for it with am2z_exec_wait_exec). */
    int      notify_parent;
} am2z_exec_opts_t;

/* Creates an execution as a child of `parent` (or a root when NULL) and
 * posts it: the resume hook starts it on a later drain, never inside this
 * call. A child of an aborted parent is created already aborted. The new
 * record starts with one reference owned by its body; the caller gets no
 * reference of its own (take one with am2z_exec_ref to keep the pointer). */
int am2z_exec_new(am2z_engine_t *e, am2z_exec_t *parent,
                  const am2z_exec_opts_t *opts, am2z_exec_t **out);

/* Looks a live record up by id; NULL once it has been freed. */
am2z_exec_t *am2z_exec_find(am2z_engine_t *e, uint64_t id);

void     am2z_exec_ref(am2z_exec_t *x);
void     am2z_exec_unref(am2z_exec_t *x);

uint64_t am2z_exec_id(const am2z_exec_t *x);       /* unique per engine, never reused */
int      am2z_exec_state(const am2z_exec_t *x);
int      am2z_exec_depth(const am2z_exec_t *x);
int      am2z_exec_attempt(const am2z_exec_t *x);
/* The exec_host_size bytes the engine allocated with the record. */
void    *am2z_exec_host_data(const am2z_exec_t *x);
am2z_exec_t *am2z_exec_parent(const am2z_exec_t *x);
/* 0 while undecided, else AM2Z_OK / AM2Z_EFAILED / AM2Z_ETIMEDOUT / AM2Z_ECANCELED
 * (AM2Z_OK is 0 too: use am2z_exec_is_settled to tell them apart). */
int      am2z_exec_settled_status(const am2z_exec_t *x);
int      am2z_exec_is_settled(const am2z_exec_t *x);
/* 0, or the reason (AM2Z_ETIMEDOUT / AM2Z_ECANCELED) it was aborted. */
int      am2z_exec_aborted(const am2z_exec_t *x);
/* Milliseconds since the body first started (0 before). */
double   am2z_exec_elapsed_ms(const am2z_exec_t *x);

/* (Re)arms the execution's deadline `ms` from now; 0 disarms it. When it
 * fires the execution is settled with AM2Z_ETIMEDOUT and aborted. */
int  am2z_exec_set_deadline(am2z_exec_t *x, uint32_t ms);

/* Settles the execution with `reason` (if undecided), marks it aborted,
 * runs the abort hook, completes its pending request with `reason`, and
 * cancels every descendant with AM2Z_ECANCELED. Idempotent. */
void am2z_exec_cancel(am2z_exec_t *x, int reason);

/* The body has returned. `status` is AM2Z_OK or AM2Z_EFAILED; it settles
 * the execution unless a deadline or cancel decided it first. Releases the
 * body's reference: do not use `x` after this unless you hold one. Children
 * still running are detached (they go on, reporting to nobody). */
void am2z_exec_finish(am2z_exec_t *x, int status);

/* Settles without finishing the body (a result known early). Idempotent:
 * the first decision wins. */
void am2z_exec_settle(am2z_exec_t *x, int status);

/* ---- suspensions: at most one pending request per execution ------------
 * Each returns AM2Z_OK when the execution is now suspended (the host must
 * return control to the drain), a positive AM2Z_READY when the answer is
 * already there (no suspension), or a negative error. */
#define AM2Z_READY 1

int am2z_exec_sleep(am2z_exec_t *x, double ms);
/* Waits until one of x's children settles (or returns READY if one has). */
int am2z_exec_wait_child(am2z_exec_t *x);
/* Pops the oldest settled child; the caller owns the returned reference. */
am2z_exec_t *am2z_exec_take_child(am2z_exec_t *x);
/* Waits until `target` settles; the wake carries a reference to target. */
int am2z_exec_wait_exec(am2z_exec_t *x, am2z_exec_t *target);
/* Suspends until am2z_exec_complete_host(x, token, status). The token is
 * the host's choice; a completion with any other token is ignored. */
int am2z_exec_wait_host(am2z_exec_t *x, uint64_t token);
int am2z_exec_complete_host(am2z_exec_t *x, uint64_t token, int status);
/* Goes round the loop once (other work runs), then resumes. */
int am2z_exec_yield(am2z_exec_t *x);

/* An I/O layer's pending operation (core/redis.c is one). `detach` is
 * called when the execution stops waiting for it (cancel, deadline, engine
 * shutdown): the operation must then forget the execution and never
 * complete it; it still frees itself when its I/O finishes. */
typedef void (*am2z_detach_fn)(void *ext);
int am2z_exec_wait_extern(am2z_exec_t *x, void *ext, am2z_detach_fn detach, uint64_t *gen);
/* Completes a wait_extern for generation `gen`; takes ownership of payload
 * (freed with payload_free if nobody takes it). Ignored when stale. */
int am2z_exec_complete_extern(am2z_exec_t *x, uint64_t gen, int status,
                              void *payload, void (*payload_free)(void *));

/* After the resume hook is called: what woke the execution. */
typedef struct {
    int          kind;      /* am2z_wake_kind_t */
    int          status;    /* AM2Z_OK, or the abort reason / host status */
    am2z_exec_t *target;    /* AM2Z_WAKE_EXEC: a reference the host must unref */
    void        *payload;   /* AM2Z_WAKE_EXTERN: owned by whoever holds the wake */
    void       (*payload_free)(void *);
} am2z_wake_t;
/* Moves the wake record out (target ownership passes to the caller). */
void am2z_exec_take_wake(am2z_exec_t *x, am2z_wake_t *out);

/* ---- Redis (hiredis async on the engine's loop) ------------------------ */

typedef struct am2z_redis_s am2z_redis_t;

enum { AM2Z_REPLY_STRING = 1, AM2Z_REPLY_ARRAY = 2, AM2Z_REPLY_INTEGER = 3,
       AM2Z_REPLY_NIL = 4, AM2Z_REPLY_STATUS = 5, AM2Z_REPLY_ERROR = 6 };

/* A reply copied out of hiredis inside its callback (hiredis frees its own
 * reply when the callback returns). str and element are owned by their node,
 * except under a node with block = 1: that node, its descendants and their
 * strings are one allocation, freed with it. A reply built by other code
 * must leave block at 0 (calloc). */
typedef struct am2z_reply_s {
    int                    type;
    int                    block;    /* 1: this node, everything under it and
                                        its strings are one allocation */
    long long              integer;
    char                  *str;      /* owned; STRING, STATUS, ERROR */
    size_t                 len;
    size_t                 elements;
    struct am2z_reply_s  **element;  /* owned; ARRAY */
} am2z_reply_t;
void am2z_reply_free(void *reply);

enum { AM2Z_LOG_DEBUG = 10, AM2Z_LOG_INFO = 20, AM2Z_LOG_WARN = 30, AM2Z_LOG_ERROR = 40 };

typedef struct {
    const char *host;               /* default "127.0.0.1" */
    int         port;               /* default 6379 */
    const char *username;           /* NULL: AUTH with the password only */
    const char *password;           /* NULL: no AUTH */
    int         db;                 /* SELECT when non-zero */
    const char *client_name;        /* CLIENT SETNAME when set */
    uint32_t    connect_timeout_ms; /* 0: 5000 */
    uint32_t    reconnect_max_ms;   /* cap of the reconnect backoff; 0: 5000 */
    void      (*log)(void *ud, int level, const char *msg);
    void       *log_ud;
} am2z_redis_opts_t;

/* Creates a connection and starts connecting; it reconnects by itself with
 * capped exponential backoff whenever the link drops, until closed. */
int  am2z_redis_new(am2z_engine_t *e, const am2z_redis_opts_t *o, am2z_redis_t **out);
/* Stops reconnecting and disconnects: pending commands complete with
 * AM2Z_ECONNRESET. The memory is released once libuv has closed the
 * handles. Safe to call twice. */
void am2z_redis_close(am2z_redis_t *r);
int  am2z_redis_ready(const am2z_redis_t *r);
/* Suspends x until the connection is ready: AM2Z_READY when it already is;
 * the wake status is AM2Z_OK, AM2Z_ECONNREFUSED or AM2Z_ETIMEDOUT. */
int  am2z_redis_wait_ready(am2z_redis_t *r, am2z_exec_t *x);
/* Sends one command and suspends x until its reply (wake payload: an
 * am2z_reply_t), AM2Z_ETIMEDOUT after timeout_ms (0: no own deadline), or
 * AM2Z_ECONNRESET when the link drops first. Commands from many executions
 * are pipelined on the one connection. AM2Z_ENOTCONN when not connected. */
int  am2z_redis_command(am2z_redis_t *r, am2z_exec_t *x, uint32_t timeout_ms,
                        int argc, const char **argv, const size_t *argvlen);
/* With AM2Z_REDIS_XREAD_RESULTS, an XREAD's reply keeps, per stream, only
 * the entries whose "event" is completed, failed or cancel, plus its last
 * entry as { id, {} } (QueueRuntime's events reader). */
enum { AM2Z_REDIS_XREAD_RESULTS = 1 };
int  am2z_redis_command_ex(am2z_redis_t *r, am2z_exec_t *x, uint32_t timeout_ms,
                           int argc, const char **argv, const size_t *argvlen, int flags);

/* ---- lock keeper: job-lock renewal on a thread of its own --------------
 * Renews every registered lock (SET PX when still held with its token)
 * every interval, on its own blocking connection, so locks survive a
 * processor that keeps the loop thread busy. Thread-safe add/remove. */
typedef struct am2z_lockkeeper_s am2z_lockkeeper_t;
typedef struct {
    const char *host;
    int         port;
    const char *username, *password;
    int         db;
    const char *stalled_key;     /* "<prefix>:<queue>:stalled" */
    uint32_t    lock_ms;         /* new lock TTL */
    uint32_t    interval_ms;     /* 0: lock_ms / 2 */
} am2z_lockkeeper_opts_t;
int  am2z_lockkeeper_new(const am2z_lockkeeper_opts_t *o, am2z_lockkeeper_t **out);
int  am2z_lockkeeper_add(am2z_lockkeeper_t *k, const char *lock_key, const char *token, const char *id);
int  am2z_lockkeeper_remove(am2z_lockkeeper_t *k, const char *lock_key);
void am2z_lockkeeper_counts(am2z_lockkeeper_t *k, unsigned long *renewed, unsigned long *failed);
void am2z_lockkeeper_free(am2z_lockkeeper_t *k);

/* The source of one of the server-side scripts of the BullMQ-compatible
 * queue layer (core/redis-scripts/<name>.lua), or NULL. */
const char *am2z_redis_script(const char *name);

/* ---- retry arithmetic (the same in every runtime) --------------------- */

typedef struct {
    int    max_attempts;        /* >= 1; 1 means no retry */
    double backoff_ms;          /* delay before the 2nd attempt */
    double multiplier;          /* >= 1 */
    double max_backoff_ms;      /* 0: uncapped */
    int    jitter;              /* non-zero: equal jitter, delay in [d/2, d] */
} am2z_retry_policy_t;

/* Delay before the attempt after `failed_attempt` (1-based). `unit_random`
 * in [0,1) is used only with jitter. Returns -1 when no attempt is left. */
double am2z_retry_delay(const am2z_retry_policy_t *p, int failed_attempt,
                        double unit_random);
int    am2z_retry_policy_check(const am2z_retry_policy_t *p, const char **why);

/* ---- file-system watches (hot reload) ------------------------------------
 * A watch on a file or directory (libuv fs events). Events queue until an
 * execution asks for the next one: am2z_watch_next suspends it and wakes it
 * with a reply array { filename (string, "" when unknown), flags (integer:
 * UV_RENAME 1 | UV_CHANGE 2, -1 for an error) }, or AM2Z_ECLOSED once the
 * watch is closed. One waiter at a time (AM2Z_EBUSY otherwise).
 * am2z_watch_new fails with AM2Z_ENOTFOUND for a missing path. Close with
 * am2z_watch_close (memory is released by libuv's close callback). */
typedef struct am2z_watch_s am2z_watch_t;
am2z_watch_t *am2z_watch_new(am2z_engine_t *e, const char *path, int *rc);
int  am2z_watch_next(am2z_watch_t *w, am2z_exec_t *x);
void am2z_watch_close(am2z_watch_t *w);

/* ---- hashing ---------------------------------------------------------- */

/* SHA-256 of len bytes as 64 lowercase hex digits and a NUL (OpenSSL).
 * Returns 0, AM2Z_EINVAL for a NULL out (or NULL data with len > 0). */
int am2z_sha256_hex(const void *data, size_t len, char out[65]);

/* ---- events ----------------------------------------------------------- */

typedef struct {
    const char  *name;       /* "processor:completed", custom names, ... */
    const char  *json;       /* payload as JSON text, may be NULL */
    am2z_exec_t *exec;       /* may be NULL */
} am2z_event_t;

typedef void (*am2z_event_cb)(void *ud, const am2z_event_t *ev);

/* Subscribers are called synchronously, in subscription order. */
int  am2z_engine_subscribe(am2z_engine_t *e, am2z_event_cb cb, void *ud, uint64_t *id);
int  am2z_engine_unsubscribe(am2z_engine_t *e, uint64_t id);
int  am2z_engine_subscribers(const am2z_engine_t *e);
void am2z_engine_emit(am2z_engine_t *e, const am2z_event_t *ev);

/* ---- embedding: an engine with its Lua runtime in a C/C++ program -------
 * Implemented in bindings/embed.c (libam2z links LuaJIT); docs/embedding.md.
 * Everything runs on the loop's thread. Every int function returns 0
 * (AM2Z_OK) or a negative am2z_err_t and leaves a message readable with
 * am2z_host_error(); none raises or aborts on bad arguments. */
typedef struct am2z_host_s am2z_host_t;
typedef struct am2z_call_s am2z_call_t;

typedef struct {
    uv_loop_t  *loop;               /* the host's loop; NULL: the engine owns one */
    const char *lua_dir;            /* where am2z/init.lua is; NULL: installed, else source tree */
    const char *redis_url;          /* non-NULL: QueueRuntime on this Redis, else LocalRuntime */
    const char *queue_prefix;       /* QueueRuntime queuePrefix; NULL: "am2z" */
    int         max_call_depth;     /* 0: 10 */
    uint32_t    default_timeout_ms; /* 0: 60000 */
    int         concurrency;        /* QueueRuntime worker concurrency; 0: 5 */
    const char *log_level;          /* "debug" | "info" | "warn" | "error" | "silent"; NULL: AM2Z_LOG_LEVEL or info */
} am2z_host_opts_t;

#define AM2Z_EXECUTION_ID_MAX 128

/* An execution's result as JSON { success, state, error, executionTime,
 * metadata } (error serialized as am2z.errors.serialize does); ok is 1 for
 * a success. Called once per am2z_host_execute, on the loop thread. */
typedef void (*am2z_result_fn)(void *ud, const char *execution_id, int ok, const char *result_json);
/* An event (processor:started|completed|failed|retrying, reload:*, custom)
 * with its payload as JSON. */
typedef void (*am2z_event_fn)(void *ud, const char *event, const char *payload_json);
/* A native processor: called with the input state as JSON; completes the
 * call with am2z_call_succeed/am2z_call_fail, before returning or later (on
 * the loop thread). */
typedef void (*am2z_native_fn)(am2z_call_t *call, const char *state_json, void *ud);
/* The result of am2z_host_eval: ok 1 with the chunk's first result as JSON,
 * or 0 with { "error": message and traceback }. */
typedef void (*am2z_eval_fn)(void *ud, int ok, const char *json);
/* Called once when the execution of a pending native call is aborted
 * (timeout, cancel); the call must still be completed (its result is then
 * ignored). */
typedef void (*am2z_cancel_fn)(am2z_call_t *call, void *ud);

/* Creates a host; *out is set even on failure (read am2z_host_error, then
 * am2z_host_free it). */
int  am2z_host_new(const am2z_host_opts_t *opts, am2z_host_t **out);
const char *am2z_host_error(const am2z_host_t *h);
uv_loop_t  *am2z_host_loop(am2z_host_t *h);
/* Loads a Lua workflow file or directory (runtime:load); watch != 0 reloads
 * it on change. */
int  am2z_host_load(am2z_host_t *h, const char *path, int watch);
/* Registers a native processor; timeout_ms 0: the runtime's default. */
int  am2z_host_register_native(am2z_host_t *h, const char *name, am2z_native_fn fn, void *ud,
                               uint32_t timeout_ms);
int  am2z_host_start(am2z_host_t *h);
/* Starts an execution; cb gets its result later (never from inside this
 * call). execution_id (may be NULL) receives its id. */
int  am2z_host_execute(am2z_host_t *h, const char *processor, const char *state_json,
                       const char *session_id, am2z_result_fn cb, void *ud,
                       char execution_id[AM2Z_EXECUTION_ID_MAX]);
/* AM2Z_ENOTFOUND when no such execution runs. */
int  am2z_host_cancel(am2z_host_t *h, const char *execution_id);
/* *json: runtime:getStats() as JSON, to free() by the caller. */
int  am2z_host_stats_json(am2z_host_t *h, char **json);
int  am2z_host_on(am2z_host_t *h, const char *event, am2z_event_fn cb, void *ud);
/* Everything the Lua API can do, from C: runs lua_code as a chunk in an
 * engine coroutine (it may wait), with `am2z` and `runtime` (the host's
 * runtime) in scope, e.g. "return runtime:getState('s1')". cb gets its
 * first result as JSON, later, once. A syntax error is AM2Z_EINVAL. */
int  am2z_host_eval(am2z_host_t *h, const char *lua_code, am2z_eval_fn cb, void *ud);
/* Runs the engine's loop (only when the engine owns it). */
int  am2z_host_run(am2z_host_t *h, uv_run_mode mode);
/* Graceful stop: executions in flight finish or are cancelled at grace_ms;
 * their callbacks still run. Returns at once; the loop does the rest. */
int  am2z_host_stop(am2z_host_t *h, uint32_t grace_ms);
/* Frees everything (call it outside the loop's callbacks). */
void am2z_host_free(am2z_host_t *h);

int  am2z_call_succeed(am2z_call_t *call, const char *state_json);
/* code: an error code (e.g. "PAYMENT_DECLINED"), message, retryable: 1, 0,
 * or -1 for the default rule. */
int  am2z_call_fail(am2z_call_t *call, const char *code, const char *message, int retryable);
int  am2z_call_on_cancel(am2z_call_t *call, am2z_cancel_fn fn, void *ud);
const char *am2z_call_execution_id(const am2z_call_t *call);
int  am2z_call_is_cancelled(const am2z_call_t *call);

#ifdef __cplusplus
}
#endif
#endif /* AM2Z_H */
