/*
 * am2z_int.h -- internal structures of the core. Not installed.
 *
 * Ownership words: "owned" means this struct frees it, "borrowed" means
 * somebody else keeps it alive for at least as long as this pointer is used.
 */
#ifndef AM2Z_INT_H
#define AM2Z_INT_H

#include "am2z.h"

#include <assert.h>
#include <stdint.h>

/* Engine timers. All sleeps and deadlines share one uv_timer_t: a libuv
 * handle per execution would cost an allocation and a close-callback round
 * trip each, and 100k sleepers would be 100k handles on the loop.
 *
 * Timers are kept in one FIFO list per duration (most deadlines share the
 * runtime's default timeout, most sleeps a few fixed values): with a
 * monotonic clock a list is already in due order, so arming and disarming
 * are O(1); only the lists' heads sit in a min-heap. */
typedef struct am2z_timer_s am2z_timer_t;
typedef struct am2z_tlist_s am2z_tlist_t;
typedef void (*am2z_timer_cb)(am2z_timer_t *t);
struct am2z_timer_s {
    double        due;        /* am2z_now_ms() time */
    uint64_t      seq;        /* arming order: ties fire FIFO, and a pass
                               * never fires timers armed during that pass */
    uint32_t      heap_idx;   /* UINT32_MAX when not armed, else 0 */
    am2z_timer_cb cb;
    am2z_tlist_t *list;       /* borrowed: the list it is armed in */
    am2z_timer_t *prev, *next;
};
struct am2z_tlist_s {
    double        dur;        /* key: the timers' duration in ms */
    am2z_timer_t *head, *tail;
    uint32_t      heap_idx;   /* position in the engine's list heap */
    uint32_t      slot;       /* position in the engine's list table */
};

enum { AM2Z_REQ_NONE = 0, AM2Z_REQ_SLEEP, AM2Z_REQ_CHILD, AM2Z_REQ_EXEC,
       AM2Z_REQ_HOST, AM2Z_REQ_YIELD, AM2Z_REQ_EXTERN };

/* The one pending request of a suspended execution. It is embedded in the
 * execution: every request kind the core has today completes on the loop
 * thread and never outlives the suspension, so a heap object would only add
 * an allocation. `gen` is what makes it safe: a completion stamped with an
 * older generation is ignored. */
typedef struct {
    int           kind;
    uint64_t      gen;        /* exec->gen when the request was made */
    am2z_timer_t  timer;      /* SLEEP */
    am2z_exec_t  *target;     /* EXEC: owned reference */
    am2z_exec_t  *wnext;      /* EXEC: next waiter on target's list (borrowed) */
    uint64_t      token;      /* HOST */
    void         *ext;        /* EXTERN: the I/O layer's operation (borrowed) */
    am2z_detach_fn detach;    /* EXTERN */
} am2z_req_t;

struct am2z_exec_s {
    am2z_engine_t *engine;    /* borrowed */
    uint64_t       id;
    int            refs;      /* body (until finish) + inbox + waiters + host */
    int            state;     /* am2z_exec_state_t */
    int            depth;
    int            attempt;

    /* Settlement: decided once, by the body's finish, a deadline or a
     * cancel, whichever comes first. The parent hears of it at that moment,
     * not when a cancelled body finally returns. */
    int            settled;       /* 0/1 */
    int            status;        /* valid when settled */
    int            aborted;       /* 0 or the reason; the abort hook ran */

    /* Incremented on every suspension and every wake. A completion carries
     * the gen it was made for, so a late timer or a second completion of
     * the same request can never resume the execution twice. */
    uint64_t       gen;
    am2z_req_t     req;           /* pending request when req.kind != NONE */
    am2z_wake_t    wake;
    uint64_t       wake_gen;      /* gen the wake was posted for */

    am2z_timer_t   deadline;
    double         created_at;    /* am2z_now_ms() when created */
    int            started;       /* the body has been resumed at least once */

    /* Tree. parent is borrowed: a parent that is freed first detaches its
     * children (parent = NULL). */
    am2z_exec_t   *parent;
    am2z_exec_t   *first_child, *next_sib, *prev_sib;
    int            unsettled_children;

    /* Settled children not yet taken by the parent: each holds a ref. */
    am2z_exec_t   *inbox_head, *inbox_tail, *inbox_next;
    int            in_inbox;

    /* Executions suspended in am2z_exec_wait_exec on this one. */
    am2z_exec_t   *waiters;

    am2z_exec_t   *ready_next;    /* ready queue link */
    int            queued;

    am2z_exec_t   *all_prev, *all_next;  /* every live record, for shutdown */
    int            notify_parent;
    /* exec_host_size bytes of host space follow the struct. */
};

typedef struct {
    uint64_t      id;
    am2z_event_cb cb;             /* NULL once unsubscribed */
    void         *ud;
} am2z_sub_t;

struct am2z_engine_s {
    uv_loop_t     *loop;          /* owned when own_loop, else borrowed */
    uv_loop_t      own_loop_storage;
    int            own_loop;
    am2z_hooks_t   hooks;
    void          *host;          /* borrowed */

    uv_idle_t      drain_idle;    /* active only while the ready queue is non-empty */
    uv_timer_t     heap_timer;    /* armed for the earliest heap timer */
    int            handles_open;  /* handles whose close callback is pending */
    double         heap_timer_due;

    am2z_exec_t   *ready_head, *ready_tail;
    unsigned       drain_budget;
    /* Set while the resume hook runs: a resume inside a resume would run two
     * bodies on one C stack and corrupt the host's interpreter state. */
    int            resuming;
    int            closing;
    int            killing;       /* am2z__exec_kill_all is freeing every record */

    am2z_tlist_t **heap;          /* owned array: non-empty lists by head due */
    uint32_t       heap_len, heap_cap;
    am2z_tlist_t **tlists;        /* owned array of owned lists (open addressing by dur) */
    uint32_t       tlists_cap, tlists_len;
    uint64_t       timer_seq;

    size_t         exec_host_size;
    /* id -> record, open addressing with linear probing; ids are never
     * reused, so a stale id simply finds nothing. */
    am2z_exec_t  **idmap;         /* owned array of borrowed records */
    uint32_t       idmap_cap, idmap_len;
    uint64_t       next_exec_id;
    uint64_t       next_token;
    am2z_exec_t   *all;           /* list of live records */
    /* Freed records kept for reuse (linked through all_next): an attempt
     * is created per step, and malloc/free showed in profiles. */
    am2z_exec_t   *spare;
    unsigned       spare_n;
    am2z_stats_t   stats;

    am2z_sub_t    *subs;          /* owned */
    int            subs_len, subs_cap, subs_live;
    am2z_redis_t  *redis;         /* list of open connections (closed at free) */
    am2z_watch_t  *watches;       /* list of open file watches (closed at free) */
    uint64_t       next_sub_id;
    int            emitting;      /* unsubscribe during emit only marks */
};

/* engine.c */
void am2z__post(am2z_exec_t *x);
void am2z__timer_start(am2z_engine_t *e, am2z_timer_t *t, double ms, am2z_timer_cb cb);
/* Same, with the current time already read by the caller. */
void am2z__timer_start_at(am2z_engine_t *e, am2z_timer_t *t, double now, double ms,
                          am2z_timer_cb cb);
void am2z__timer_stop(am2z_engine_t *e, am2z_timer_t *t);

int  am2z__idmap_put(am2z_engine_t *e, am2z_exec_t *x);
void am2z__idmap_del(am2z_engine_t *e, am2z_exec_t *x);

/* exec.c */
void am2z__exec_kill_all(am2z_engine_t *e);

/* redis.c */
void am2z__redis_close_all(am2z_engine_t *e);
void am2z__watch_close_all(am2z_engine_t *e);

#define AM2Z_CONTAINER_OF(ptr, type, field) \
    ((type *) ((char *) (ptr) - offsetof(type, field)))

#endif /* AM2Z_INT_H */
