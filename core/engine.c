/*
 * engine.c -- engine lifetime, the ready queue and its drain, the timer heap.
 *
 * The drain is the only place a body is resumed. Completions (timers, child
 * settlement, cancellation) only post an execution to the ready queue; the
 * drain runs from a uv_idle_t, so a resume never happens inside a libuv or
 * hiredis callback, nor inside another resume.
 */
#include "am2z_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AM2Z_DEFAULT_DRAIN_BUDGET 4096u

double am2z_now_ms(void)
{
    return (double) uv_hrtime() / 1e6;
}

/* ---- timers: per-duration FIFO lists, heads in a min-heap ---------------- */

static int list_before(const am2z_tlist_t *a, const am2z_tlist_t *b)
{
    if (a->head->due != b->head->due)
        return a->head->due < b->head->due;
    return a->head->seq < b->head->seq;
}

static void heap_swap(am2z_engine_t *e, uint32_t i, uint32_t j)
{
    am2z_tlist_t *t = e->heap[i];
    e->heap[i] = e->heap[j];
    e->heap[j] = t;
    e->heap[i]->heap_idx = i;
    e->heap[j]->heap_idx = j;
}

static void heap_up(am2z_engine_t *e, uint32_t i)
{
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (!list_before(e->heap[i], e->heap[p]))
            break;
        heap_swap(e, i, p);
        i = p;
    }
}

static void heap_down(am2z_engine_t *e, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < e->heap_len && list_before(e->heap[l], e->heap[m]))
            m = l;
        if (r < e->heap_len && list_before(e->heap[r], e->heap[m]))
            m = r;
        if (m == i)
            break;
        heap_swap(e, i, m);
        i = m;
    }
}

static void heap_remove(am2z_engine_t *e, uint32_t i)
{
    uint32_t last = --e->heap_len;
    if (i != last) {
        e->heap[i] = e->heap[last];
        e->heap[i]->heap_idx = i;
        heap_down(e, i);
        heap_up(e, i);
    }
}

static void heap_timer_cb(uv_timer_t *h);

/* Re-arms the one libuv timer for the earliest timer of all. */
static void heap_rearm(am2z_engine_t *e)
{
    if (e->heap_len == 0) {
        if (e->heap_timer_due >= 0) {
            uv_timer_stop(&e->heap_timer);
            e->heap_timer_due = -1;
        }
        return;
    }
    double due = e->heap[0]->head->due;
    /* Armed for the same time or earlier: leave it. An early firing finds
     * nothing due and re-arms; that is cheaper than re-arming (a clock read
     * and a libuv heap operation) every time the earliest timer moves. */
    if (e->heap_timer_due >= 0 && e->heap_timer_due <= due)
        return;
    double wait = due - am2z_now_ms();
    /* libuv timers have millisecond resolution and fire at or after their
     * due time; rounding up keeps a sleep from returning early. */
    /* Clamped: a conversion of 2^64 ms or more is undefined and came out as
     * 0 here, re-arming a zero timer for ever. */
    uint64_t ms = wait <= 0 ? 0 : wait >= 1e15 ? (uint64_t) 1e15 : (uint64_t) ceil(wait);
    uv_update_time(e->loop);
    uv_timer_start(&e->heap_timer, heap_timer_cb, ms, 0);
    e->heap_timer_due = due;
}

static uint32_t dur_slot(double dur, uint32_t mask)
{
    uint64_t k = (uint64_t) (dur * 1024.0);
    k *= 0x9E3779B97F4A7C15ull;
    return (uint32_t) (k >> 40) & mask;
}

static int tlists_grow(am2z_engine_t *e)
{
    uint32_t cap = e->tlists_cap ? e->tlists_cap * 2 : 16;
    am2z_tlist_t **t = calloc(cap, sizeof(*t));
    if (t == NULL)
        return AM2Z_ENOMEM;
    for (uint32_t i = 0; i < e->tlists_cap; i++) {
        am2z_tlist_t *l = e->tlists[i];
        if (l == NULL)
            continue;
        uint32_t j = dur_slot(l->dur, cap - 1);
        while (t[j])
            j = (j + 1) & (cap - 1);
        t[j] = l;
        l->slot = j;
    }
    free(e->tlists);
    e->tlists = t;
    e->tlists_cap = cap;
    return AM2Z_OK;
}

static am2z_tlist_t *tlist_get(am2z_engine_t *e, double dur)
{
    uint32_t mask, j;
    if ((e->tlists_len + 1) * 2 > e->tlists_cap && tlists_grow(e) != AM2Z_OK)
        return NULL;
    mask = e->tlists_cap - 1;
    for (j = dur_slot(dur, mask); e->tlists[j]; j = (j + 1) & mask)
        if (e->tlists[j]->dur == dur)
            return e->tlists[j];
    am2z_tlist_t *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    l->dur = dur;
    l->heap_idx = UINT32_MAX;
    l->slot = j;
    e->tlists[j] = l;
    e->tlists_len++;
    return l;
}

/* An empty list is freed, so one-off durations (jittered backoffs) do not
 * accumulate; the table uses backward-shift deletion to stay tombstone-free. */
static void tlist_drop(am2z_engine_t *e, am2z_tlist_t *l)
{
    uint32_t mask = e->tlists_cap - 1, i = l->slot;
    e->tlists[i] = NULL;
    e->tlists_len--;
    for (uint32_t j = (i + 1) & mask; e->tlists[j]; j = (j + 1) & mask) {
        uint32_t home = dur_slot(e->tlists[j]->dur, mask);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            e->tlists[i] = e->tlists[j];
            e->tlists[i]->slot = i;
            e->tlists[j] = NULL;
            i = j;
        }
    }
    free(l);
}

void am2z__timer_start(am2z_engine_t *e, am2z_timer_t *t, double ms, am2z_timer_cb cb)
{
    am2z__timer_start_at(e, t, am2z_now_ms(), ms, cb);
}

void am2z__timer_start_at(am2z_engine_t *e, am2z_timer_t *t, double now, double ms,
                          am2z_timer_cb cb)
{
    if (t->heap_idx != UINT32_MAX)
        am2z__timer_stop(e, t);
    if (ms < 0)
        ms = 0;
    am2z_tlist_t *l = tlist_get(e, ms);
    if (l == NULL)
        abort();            /* a lost timer would hang an execution forever */
    if (e->heap_len == e->heap_cap) {
        uint32_t cap = e->heap_cap ? e->heap_cap * 2 : 64;
        am2z_tlist_t **h = realloc(e->heap, cap * sizeof(*h));
        if (h == NULL)
            abort();
        e->heap = h;
        e->heap_cap = cap;
    }
    t->due = now + ms;
    t->seq = e->timer_seq++;
    t->cb = cb;
    t->heap_idx = 0;
    t->list = l;
    t->next = NULL;
    t->prev = l->tail;
    /* The clock is monotonic, so appending keeps the list in due order. */
    if (l->tail)
        l->tail->next = t;
    else
        l->head = t;
    l->tail = t;
    e->stats.timers++;
    if (l->heap_idx == UINT32_MAX) {
        l->heap_idx = e->heap_len;
        e->heap[e->heap_len++] = l;
        heap_up(e, l->heap_idx);
        if (e->heap[0] == l)
            heap_rearm(e);
    }
}

void am2z__timer_stop(am2z_engine_t *e, am2z_timer_t *t)
{
    am2z_tlist_t *l = t->list;
    if (t->heap_idx == UINT32_MAX)
        return;
    int was_head = l->head == t;
    if (t->prev)
        t->prev->next = t->next;
    else
        l->head = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else
        l->tail = t->prev;
    t->prev = t->next = NULL;
    t->list = NULL;
    t->heap_idx = UINT32_MAX;
    e->stats.timers--;
    if (!was_head)
        return;
    int was_top = l->heap_idx == 0;
    if (l->head == NULL) {
        heap_remove(e, l->heap_idx);
        l->heap_idx = UINT32_MAX;
        tlist_drop(e, l);
    } else {
        heap_down(e, l->heap_idx);
    }
    if (was_top)
        heap_rearm(e);
}

static void heap_timer_cb(uv_timer_t *h)
{
    am2z_engine_t *e = h->data;
    /* Only timers armed before this pass may fire in it, so a callback that
     * arms a zero-delay timer cannot keep the pass going forever. */
    uint64_t seq_limit = e->timer_seq;
    double now = am2z_now_ms();

    e->heap_timer_due = -1;
    while (e->heap_len > 0) {
        am2z_timer_t *t = e->heap[0]->head;
        if (t->due > now || t->seq >= seq_limit)
            break;
        am2z__timer_stop(e, t);
        t->cb(t);
    }
    heap_rearm(e);
}

/* ---- ready queue and drain ---------------------------------------------- */

static void drain_cb(uv_idle_t *h);

void am2z__post(am2z_exec_t *x)
{
    am2z_engine_t *e = x->engine;
    if (x->queued)
        return;
    /* The queue holds a reference: a record must not be freed (and
     * recycled, cutting the list) while it is still linked here. */
    am2z_exec_ref(x);
    x->queued = 1;
    x->ready_next = NULL;
    if (e->ready_tail)
        e->ready_tail->ready_next = x;
    else
        e->ready_head = x;
    e->ready_tail = x;
    e->stats.ready++;
    if (!uv_is_active((uv_handle_t *) &e->drain_idle))
        uv_idle_start(&e->drain_idle, drain_cb);
}

static am2z_exec_t *ready_pop(am2z_engine_t *e)
{
    am2z_exec_t *x = e->ready_head;
    if (x == NULL)
        return NULL;
    e->ready_head = x->ready_next;
    if (e->ready_head == NULL)
        e->ready_tail = NULL;
    x->ready_next = NULL;
    x->queued = 0;
    e->stats.ready--;
    return x;
}

/* Runs queued executions in FIFO order, including ones posted while
 * draining, up to the budget: a chain of steps then completes within one
 * loop turn instead of paying a poll per step, and the budget still lets
 * timers and I/O in under a flood of work. */
static void drain_cb(uv_idle_t *h)
{
    am2z_engine_t *e = h->data;
    unsigned n = 0;
    am2z_exec_t *x;

    while (n < e->drain_budget && (x = ready_pop(e)) != NULL) {
        /* Posted for an older suspension (a stale wake), or killed since. */
        if (x->state == AM2Z_EXEC_DONE
            || (x->state != AM2Z_EXEC_NEW && x->state != AM2Z_EXEC_READY)
            || (x->state == AM2Z_EXEC_READY && x->wake_gen != x->gen)) {
            am2z_exec_unref(x);           /* the queue's reference */
            continue;
        }
        assert(!e->resuming);
        if (x->state == AM2Z_EXEC_NEW) {
            x->started = 1;
            e->stats.started++;
            e->stats.running++;
        }
        x->state = AM2Z_EXEC_RUNNING;
        x->gen++;
        e->resuming = 1;
        e->hooks.resume(e->host, x);
        e->resuming = 0;
        am2z_exec_unref(x);               /* the queue's reference */
        n++;
    }
    if (e->ready_head == NULL)
        uv_idle_stop(&e->drain_idle);
}

/* ---- id map ------------------------------------------------------------- */

static uint32_t id_slot(uint64_t id, uint32_t mask)
{
    id *= 0x9E3779B97F4A7C15ull;         /* ids are sequential: spread them */
    return (uint32_t) (id >> 32) & mask;
}

static int idmap_grow(am2z_engine_t *e)
{
    uint32_t cap = e->idmap_cap ? e->idmap_cap * 2 : 1024;
    am2z_exec_t **m = calloc(cap, sizeof(*m));
    if (m == NULL)
        return AM2Z_ENOMEM;
    for (uint32_t i = 0; i < e->idmap_cap; i++) {
        am2z_exec_t *x = e->idmap[i];
        if (x == NULL)
            continue;
        uint32_t j = id_slot(x->id, cap - 1);
        while (m[j])
            j = (j + 1) & (cap - 1);
        m[j] = x;
    }
    free(e->idmap);
    e->idmap = m;
    e->idmap_cap = cap;
    return AM2Z_OK;
}

int am2z__idmap_put(am2z_engine_t *e, am2z_exec_t *x)
{
    if ((e->idmap_len + 1) * 2 > e->idmap_cap && idmap_grow(e) != AM2Z_OK)
        return AM2Z_ENOMEM;
    uint32_t mask = e->idmap_cap - 1, j = id_slot(x->id, mask);
    while (e->idmap[j])
        j = (j + 1) & mask;
    e->idmap[j] = x;
    e->idmap_len++;
    return AM2Z_OK;
}

void am2z__idmap_del(am2z_engine_t *e, am2z_exec_t *x)
{
    uint32_t mask = e->idmap_cap - 1, i = id_slot(x->id, mask);
    while (e->idmap[i] && e->idmap[i] != x)
        i = (i + 1) & mask;
    if (e->idmap[i] == NULL)
        return;
    e->idmap[i] = NULL;
    e->idmap_len--;
    /* Backward-shift deletion keeps every probe chain unbroken without
     * tombstones. */
    for (uint32_t j = (i + 1) & mask; e->idmap[j]; j = (j + 1) & mask) {
        uint32_t home = id_slot(e->idmap[j]->id, mask);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            e->idmap[i] = e->idmap[j];
            e->idmap[j] = NULL;
            i = j;
        }
    }
}

am2z_exec_t *am2z_exec_find(am2z_engine_t *e, uint64_t id)
{
    if (e == NULL || e->idmap_cap == 0)
        return NULL;
    uint32_t mask = e->idmap_cap - 1, j = id_slot(id, mask);
    while (e->idmap[j]) {
        if (e->idmap[j]->id == id)
            return e->idmap[j];
        j = (j + 1) & mask;
    }
    return NULL;
}

/* ---- engine ------------------------------------------------------------- */

static void engine_handle_close_cb(uv_handle_t *h)
{
    am2z_engine_t *e = h->data;
    e->handles_open--;
}

int am2z_engine_new(const am2z_engine_opts_t *opts, am2z_engine_t **out)
{
    am2z_engine_t *e;
    int rc;

    if (opts == NULL || out == NULL || opts->hooks.resume == NULL)
        return AM2Z_EINVAL;
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return AM2Z_ENOMEM;
    e->hooks = opts->hooks;
    e->host = opts->host;
    e->drain_budget = opts->drain_budget ? opts->drain_budget : AM2Z_DEFAULT_DRAIN_BUDGET;
    e->exec_host_size = (opts->exec_host_size + 15) & ~(size_t) 15;
    e->heap_timer_due = -1;
    e->next_exec_id = 1;
    e->next_token = 1;
    e->next_sub_id = 1;

    if (opts->loop) {
        e->loop = opts->loop;
    } else {
        rc = uv_loop_init(&e->own_loop_storage);
        if (rc != 0)
            goto fail_loop;
        e->loop = &e->own_loop_storage;
        e->own_loop = 1;
    }
    rc = uv_idle_init(e->loop, &e->drain_idle);
    if (rc != 0)
        goto fail_idle;
    e->drain_idle.data = e;
    rc = uv_timer_init(e->loop, &e->heap_timer);
    if (rc != 0)
        goto fail_timer;
    e->heap_timer.data = e;
    *out = e;
    return AM2Z_OK;

fail_timer:
    e->handles_open++;
    uv_close((uv_handle_t *) &e->drain_idle, engine_handle_close_cb);
    while (e->handles_open > 0)
        uv_run(e->loop, UV_RUN_NOWAIT);
fail_idle:
    if (e->own_loop)
        uv_loop_close(e->loop);
fail_loop:
    free(e);
    return AM2Z_EUV;
}

static void close_leftover_cb(uv_handle_t *h, void *arg)
{
    (void) arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void am2z_engine_free(am2z_engine_t *e)
{
    if (e == NULL)
        return;
    e->closing = 1;
    am2z__exec_kill_all(e);
    /* After the executions: freeing a connection runs every pending reply
     * callback, and those must find their executions already detached. */
    am2z__redis_close_all(e);
    am2z__watch_close_all(e);
    e->handles_open += 2;
    uv_close((uv_handle_t *) &e->drain_idle, engine_handle_close_cb);
    uv_close((uv_handle_t *) &e->heap_timer, engine_handle_close_cb);
    /* Our handles' memory is inside e: it may be freed only after libuv has
     * run their close callbacks. */
    while (e->handles_open > 0)
        uv_run(e->loop, UV_RUN_NOWAIT);
    if (e->own_loop) {
        /* Anything an embedder or the host left open on our loop is closed
         * here, or uv_loop_close would stay busy for ever. */
        while (uv_loop_close(e->loop) == UV_EBUSY) {
            uv_walk(e->loop, close_leftover_cb, NULL);
            uv_run(e->loop, UV_RUN_NOWAIT);
        }
    }
    while (e->spare) {
        am2z_exec_t *x = e->spare;
        e->spare = x->all_next;
        free(x);
    }
    free(e->heap);
    for (uint32_t i = 0; i < e->tlists_cap; i++)
        free(e->tlists[i]);
    free(e->tlists);
    free(e->subs);
    free(e->idmap);
    free(e);
}

uv_loop_t *am2z_engine_loop(am2z_engine_t *e)
{
    return e ? e->loop : NULL;
}

int am2z_engine_run(am2z_engine_t *e, uv_run_mode mode)
{
    if (e == NULL)
        return AM2Z_EINVAL;
    return uv_run(e->loop, mode);
}

void am2z_engine_stats(am2z_engine_t *e, am2z_stats_t *out)
{
    if (e && out)
        *out = e->stats;
}

/* ---- events ------------------------------------------------------------- */

int am2z_engine_subscribe(am2z_engine_t *e, am2z_event_cb cb, void *ud, uint64_t *id)
{
    if (e == NULL || cb == NULL)
        return AM2Z_EINVAL;
    if (e->subs_len == e->subs_cap) {
        int cap = e->subs_cap ? e->subs_cap * 2 : 4;
        am2z_sub_t *s = realloc(e->subs, (size_t) cap * sizeof(*s));
        if (s == NULL)
            return AM2Z_ENOMEM;
        e->subs = s;
        e->subs_cap = cap;
    }
    am2z_sub_t *s = &e->subs[e->subs_len++];
    s->id = e->next_sub_id++;
    s->cb = cb;
    s->ud = ud;
    e->subs_live++;
    if (id)
        *id = s->id;
    return AM2Z_OK;
}

static void subs_compact(am2z_engine_t *e)
{
    int j = 0;
    for (int i = 0; i < e->subs_len; i++)
        if (e->subs[i].cb)
            e->subs[j++] = e->subs[i];
    e->subs_len = j;
}

int am2z_engine_unsubscribe(am2z_engine_t *e, uint64_t id)
{
    if (e == NULL)
        return AM2Z_EINVAL;
    for (int i = 0; i < e->subs_len; i++) {
        if (e->subs[i].id == id && e->subs[i].cb) {
            e->subs[i].cb = NULL;
            e->subs_live--;
            if (!e->emitting)
                subs_compact(e);
            return AM2Z_OK;
        }
    }
    return AM2Z_ENOTFOUND;
}

int am2z_engine_subscribers(const am2z_engine_t *e)
{
    return e ? e->subs_live : 0;
}

void am2z_engine_emit(am2z_engine_t *e, const am2z_event_t *ev)
{
    if (e == NULL || ev == NULL || e->subs_live == 0)
        return;
    /* Subscribers added during this emit are not called for it; ones
     * removed during it are skipped and compacted afterwards. */
    int n = e->subs_len;
    e->emitting++;
    for (int i = 0; i < n; i++)
        if (e->subs[i].cb)
            e->subs[i].cb(e->subs[i].ud, ev);
    if (--e->emitting == 0)
        subs_compact(e);
}
