/*
 * exec.c -- execution records: the tree, settlement, cancellation and the
 * one pending request of each execution.
 *
 * Two things end an execution and they are kept apart on purpose:
 *   settlement -- its outcome is decided (body returned, deadline, cancel);
 *                 the parent or waiter hears of it at this moment;
 *   finish     -- its body has actually returned.
 * A timed-out body may go on running (cooperative cancellation) after its
 * parent has already moved on; whatever it returns then is ignored.
 */
#include "am2z_int.h"

#include <stdlib.h>
#include <string.h>

static void exec_free(am2z_exec_t *x);
static void deadline_cb(am2z_timer_t *t);
static void sleep_cb(am2z_timer_t *t);

void am2z_exec_ref(am2z_exec_t *x)
{
    x->refs++;
}

void am2z_exec_unref(am2z_exec_t *x)
{
    /* During shutdown kill_all frees every record itself, after all release
     * hooks ran: a hook dropping a reference must not free early. */
    if (x->engine->killing) {
        if (x->refs > 0)
            x->refs--;
        return;
    }
    assert(x->refs > 0);
    if (--x->refs == 0)
        exec_free(x);
}

uint64_t am2z_exec_id(const am2z_exec_t *x) { return x->id; }
int      am2z_exec_state(const am2z_exec_t *x) { return x->state; }
int      am2z_exec_depth(const am2z_exec_t *x) { return x->depth; }
int      am2z_exec_attempt(const am2z_exec_t *x) { return x->attempt; }
void    *am2z_exec_host_data(const am2z_exec_t *x)
{
    return x->engine->exec_host_size ? (void *) (x + 1) : NULL;
}
am2z_exec_t *am2z_exec_parent(const am2z_exec_t *x) { return x->parent; }
int      am2z_exec_settled_status(const am2z_exec_t *x) { return x->settled ? x->status : 0; }
int      am2z_exec_is_settled(const am2z_exec_t *x) { return x->settled; }
int      am2z_exec_aborted(const am2z_exec_t *x) { return x->aborted; }

double am2z_exec_elapsed_ms(const am2z_exec_t *x)
{
    return am2z_now_ms() - x->created_at;
}

static void child_link(am2z_exec_t *parent, am2z_exec_t *c)
{
    c->parent = parent;
    if (c->notify_parent)
        parent->unsettled_children++;
    c->prev_sib = NULL;
    c->next_sib = parent->first_child;
    if (parent->first_child)
        parent->first_child->prev_sib = c;
    parent->first_child = c;
}

static void child_unlink(am2z_exec_t *c)
{
    am2z_exec_t *p = c->parent;
    if (p == NULL)
        return;
    if (!c->settled && c->notify_parent)
        p->unsettled_children--;
    if (c->prev_sib)
        c->prev_sib->next_sib = c->next_sib;
    else
        p->first_child = c->next_sib;
    if (c->next_sib)
        c->next_sib->prev_sib = c->prev_sib;
    c->parent = c->prev_sib = c->next_sib = NULL;
}

int am2z_exec_new(am2z_engine_t *e, am2z_exec_t *parent,
                  const am2z_exec_opts_t *opts, am2z_exec_t **out)
{
    am2z_exec_t *x;

    if (e == NULL || out == NULL)
        return AM2Z_EINVAL;
    if (e->closing)
        return AM2Z_ECLOSED;
    if (parent && (parent->engine != e || parent->state == AM2Z_EXEC_DONE))
        return AM2Z_ESTATE;
    if (e->spare) {
        x = e->spare;
        e->spare = x->all_next;
        e->spare_n--;
        memset(x, 0, sizeof(*x) + e->exec_host_size);
    } else {
        x = calloc(1, sizeof(*x) + e->exec_host_size);
        if (x == NULL)
            return AM2Z_ENOMEM;
    }
    x->engine = e;
    x->id = e->next_exec_id++;
    if (am2z__idmap_put(e, x) != AM2Z_OK) {
        free(x);
        return AM2Z_ENOMEM;
    }
    x->refs = 1;                          /* the body's */
    x->state = AM2Z_EXEC_NEW;
    x->deadline.heap_idx = UINT32_MAX;
    x->req.timer.heap_idx = UINT32_MAX;
    x->created_at = am2z_now_ms();
    if (opts) {
        x->depth = opts->depth;
        x->attempt = opts->attempt;
        x->notify_parent = opts->notify_parent;
    }
    x->all_next = e->all;
    if (e->all)
        e->all->all_prev = x;
    e->all = x;
    e->stats.live++;
    if (parent)
        child_link(parent, x);
    if (opts && opts->timeout_ms)
        am2z__timer_start_at(e, &x->deadline, x->created_at, opts->timeout_ms, deadline_cb);
    *out = x;
    am2z__post(x);
    /* A parent that is already aborted must not get fresh work done on its
     * behalf: the child is born cancelled and its body will not run. */
    if (parent && parent->aborted)
        am2z_exec_cancel(x, AM2Z_ECANCELED);
    return AM2Z_OK;
}

int am2z_exec_set_deadline(am2z_exec_t *x, uint32_t ms)
{
    if (x == NULL)
        return AM2Z_EINVAL;
    if (x->state == AM2Z_EXEC_DONE || x->settled)
        return AM2Z_ESTATE;
    if (ms == 0)
        am2z__timer_stop(x->engine, &x->deadline);
    else
        am2z__timer_start(x->engine, &x->deadline, ms, deadline_cb);
    return AM2Z_OK;
}

/* ---- requests ----------------------------------------------------------- */

static void waiter_unlink(am2z_exec_t *w)
{
    am2z_exec_t *t = w->req.target, **pp;
    for (pp = &t->waiters; *pp; pp = &(*pp)->req.wnext) {
        if (*pp == w) {
            *pp = w->req.wnext;
            break;
        }
    }
    w->req.wnext = NULL;
}

/* The single completion path of every request kind: moves the outcome into
 * the wake record, detaches the request and posts the execution. It never
 * resumes (we may be inside a timer callback or inside another body). */
static void req_complete(am2z_exec_t *w, int status)
{
    am2z_req_t *r = &w->req;

    if (r->kind == AM2Z_REQ_NONE || r->gen != w->gen)
        return;
    w->wake.status = status;
    w->wake.target = NULL;
    switch (r->kind) {
    case AM2Z_REQ_SLEEP:
        am2z__timer_stop(w->engine, &r->timer);
        w->wake.kind = AM2Z_WAKE_SLEEP;
        break;
    case AM2Z_REQ_CHILD:
        w->wake.kind = AM2Z_WAKE_CHILD;
        break;
    case AM2Z_REQ_EXEC:
        waiter_unlink(w);
        w->wake.kind = AM2Z_WAKE_EXEC;
        w->wake.target = r->target;       /* the request's reference moves */
        r->target = NULL;
        break;
    case AM2Z_REQ_HOST:
        w->wake.kind = AM2Z_WAKE_HOST;
        break;
    case AM2Z_REQ_YIELD:
        w->wake.kind = AM2Z_WAKE_YIELD;
        break;
    case AM2Z_REQ_EXTERN:
        /* Completed by the I/O layer: it set the payload and forgot us.
         * Anything else (cancel, deadline): tell it to forget us. */
        if (r->ext && r->detach)
            r->detach(r->ext);
        r->ext = NULL;
        w->wake.kind = AM2Z_WAKE_EXTERN;
        break;
    }
    r->kind = AM2Z_REQ_NONE;
    w->wake_gen = w->gen;
    w->state = AM2Z_EXEC_READY;
    am2z__post(w);
}

static int req_begin(am2z_exec_t *x, int kind)
{
    if (x == NULL)
        return AM2Z_EINVAL;
    if (x->state != AM2Z_EXEC_RUNNING)
        return AM2Z_ESTATE;
    if (x->req.kind != AM2Z_REQ_NONE)
        return AM2Z_EBUSY;
    x->req.kind = kind;
    x->req.gen = x->gen;
    x->state = AM2Z_EXEC_SUSPENDED;
    return AM2Z_OK;
}

int am2z_exec_sleep(am2z_exec_t *x, double ms)
{
    int rc;
    if (!(ms >= 0) || ms > 4294967295.0)
        return AM2Z_EINVAL;               /* NaN would break the timer order */
    rc = req_begin(x, AM2Z_REQ_SLEEP);
    if (rc != AM2Z_OK)
        return rc;
    am2z__timer_start(x->engine, &x->req.timer, ms, sleep_cb);
    /* An aborted body still goes round the loop on every wait: a processor
     * that ignores the error and loops must not starve everyone else. */
    if (x->aborted)
        req_complete(x, x->aborted);
    return AM2Z_OK;
}

static void sleep_cb(am2z_timer_t *t)
{
    am2z_exec_t *x = AM2Z_CONTAINER_OF(t, am2z_exec_t, req.timer);
    req_complete(x, AM2Z_OK);
}

int am2z_exec_wait_child(am2z_exec_t *x)
{
    if (x == NULL)
        return AM2Z_EINVAL;
    if (x->inbox_head)
        return AM2Z_READY;
    if (x->unsettled_children == 0)
        return AM2Z_ENOTFOUND;            /* nothing could ever wake it */
    int rc = req_begin(x, AM2Z_REQ_CHILD);
    if (rc != AM2Z_OK)
        return rc;
    if (x->aborted)
        req_complete(x, x->aborted);
    return AM2Z_OK;
}

am2z_exec_t *am2z_exec_take_child(am2z_exec_t *x)
{
    am2z_exec_t *c = x ? x->inbox_head : NULL;
    if (c == NULL)
        return NULL;
    x->inbox_head = c->inbox_next;
    if (x->inbox_head == NULL)
        x->inbox_tail = NULL;
    c->inbox_next = NULL;
    c->in_inbox = 0;
    return c;                             /* the inbox's reference moves */
}

int am2z_exec_wait_exec(am2z_exec_t *x, am2z_exec_t *target)
{
    if (target == NULL || target == x)
        return AM2Z_EINVAL;
    if (target->settled)
        return AM2Z_READY;
    int rc = req_begin(x, AM2Z_REQ_EXEC);
    if (rc != AM2Z_OK)
        return rc;
    am2z_exec_ref(target);
    x->req.target = target;
    x->req.wnext = target->waiters;
    target->waiters = x;
    if (x->aborted)
        req_complete(x, x->aborted);
    return AM2Z_OK;
}

int am2z_exec_wait_host(am2z_exec_t *x, uint64_t token)
{
    int rc = req_begin(x, AM2Z_REQ_HOST);
    if (rc != AM2Z_OK)
        return rc;
    x->req.token = token;
    if (x->aborted)
        req_complete(x, x->aborted);
    return AM2Z_OK;
}

int am2z_exec_complete_host(am2z_exec_t *x, uint64_t token, int status)
{
    if (x == NULL)
        return AM2Z_EINVAL;
    if (x->req.kind != AM2Z_REQ_HOST || x->req.token != token)
        return AM2Z_ESTATE;               /* late or duplicate: ignored */
    req_complete(x, status);
    return AM2Z_OK;
}

int am2z_exec_wait_extern(am2z_exec_t *x, void *ext, am2z_detach_fn detach, uint64_t *gen)
{
    int rc = req_begin(x, AM2Z_REQ_EXTERN);
    if (rc != AM2Z_OK)
        return rc;
    x->req.ext = ext;
    x->req.detach = detach;
    if (gen)
        *gen = x->gen;
    if (x->aborted)
        req_complete(x, x->aborted);
    return AM2Z_OK;
}

int am2z_exec_complete_extern(am2z_exec_t *x, uint64_t gen, int status,
                              void *payload, void (*payload_free)(void *))
{
    if (x == NULL || x->req.kind != AM2Z_REQ_EXTERN || x->req.gen != gen) {
        if (payload && payload_free)
            payload_free(payload);
        return AM2Z_ESTATE;
    }
    x->req.ext = NULL;                    /* completed by its owner: no detach */
    if (x->wake.payload && x->wake.payload_free)
        x->wake.payload_free(x->wake.payload);
    x->wake.payload = payload;
    x->wake.payload_free = payload_free;
    req_complete(x, status);
    return AM2Z_OK;
}

int am2z_exec_yield(am2z_exec_t *x)
{
    int rc = req_begin(x, AM2Z_REQ_YIELD);
    if (rc != AM2Z_OK)
        return rc;
    req_complete(x, x->aborted ? x->aborted : AM2Z_OK);
    return AM2Z_OK;
}

void am2z_exec_take_wake(am2z_exec_t *x, am2z_wake_t *out)
{
    *out = x->wake;
    x->wake.target = NULL;
    x->wake.payload = NULL;
    x->wake.payload_free = NULL;
    x->wake.kind = AM2Z_WAKE_START;
    x->wake.status = AM2Z_OK;
}

/* ---- settlement and cancellation ---------------------------------------- */

void am2z_exec_settle(am2z_exec_t *x, int status)
{
    am2z_engine_t *e = x->engine;

    if (x->settled)
        return;
    x->settled = 1;
    x->status = status;
    am2z__timer_stop(e, &x->deadline);
    switch (status) {
    case AM2Z_OK:        e->stats.succeeded++; break;
    case AM2Z_ETIMEDOUT: e->stats.timed_out++; break;
    case AM2Z_ECANCELED: e->stats.cancelled++; break;
    default:             e->stats.failed++;    break;
    }

    am2z_exec_t *p = x->notify_parent ? x->parent : NULL;
    if (p)
        p->unsettled_children--;
    if (p && p->state != AM2Z_EXEC_DONE) {
        am2z_exec_ref(x);                 /* the inbox's reference */
        x->in_inbox = 1;
        if (p->inbox_tail)
            p->inbox_tail->inbox_next = x;
        else
            p->inbox_head = x;
        p->inbox_tail = x;
        if (p->req.kind == AM2Z_REQ_CHILD)
            req_complete(p, AM2Z_OK);
    }
    while (x->waiters) {
        am2z_exec_t *w = x->waiters;      /* req_complete unlinks it */
        req_complete(w, AM2Z_OK);
    }
    if (e->hooks.settled && !e->closing)
        e->hooks.settled(e->host, x);
}

void am2z_exec_cancel(am2z_exec_t *x, int reason)
{
    am2z_engine_t *e;

    if (x == NULL || x->aborted || x->state == AM2Z_EXEC_DONE)
        return;
    e = x->engine;
    if (reason != AM2Z_ETIMEDOUT)
        reason = AM2Z_ECANCELED;
    x->aborted = reason;
    /* Keep x alive across the hook and the recursion: both may drop
     * references (a parent taking x out of its inbox, say). */
    am2z_exec_ref(x);
    am2z_exec_settle(x, reason);
    if (e->hooks.abort && !e->closing)
        e->hooks.abort(e->host, x, reason);
    if (x->req.kind != AM2Z_REQ_NONE)
        req_complete(x, reason);
    /* The abort hook runs user code that may take or drop children, so each
     * one is held while it is cancelled and its successor is read. */
    am2z_exec_t *c = x->first_child, *n;
    if (c)
        am2z_exec_ref(c);
    while (c) {
        am2z_exec_cancel(c, AM2Z_ECANCELED);
        n = c->next_sib;
        if (n)
            am2z_exec_ref(n);
        am2z_exec_unref(c);
        c = n;
    }
    am2z_exec_unref(x);
}

static void deadline_cb(am2z_timer_t *t)
{
    am2z_exec_t *x = AM2Z_CONTAINER_OF(t, am2z_exec_t, deadline);
    am2z_exec_cancel(x, AM2Z_ETIMEDOUT);
}

static void inbox_clear(am2z_exec_t *x)
{
    am2z_exec_t *c;
    while ((c = am2z_exec_take_child(x)) != NULL)
        am2z_exec_unref(c);
}

static void children_detach(am2z_exec_t *x)
{
    while (x->first_child)
        child_unlink(x->first_child);
}

void am2z_exec_finish(am2z_exec_t *x, int status)
{
    am2z_engine_t *e = x->engine;

    if (x->state == AM2Z_EXEC_DONE)
        return;
    am2z_exec_settle(x, status == AM2Z_OK ? AM2Z_OK : AM2Z_EFAILED);
    if (x->req.kind != AM2Z_REQ_NONE) {
        /* Abandoned while suspended (host shutdown): cut the request loose. */
        if (x->req.kind == AM2Z_REQ_SLEEP)
            am2z__timer_stop(e, &x->req.timer);
        if (x->req.kind == AM2Z_REQ_EXEC) {
            waiter_unlink(x);
            am2z_exec_unref(x->req.target);
            x->req.target = NULL;
        }
        if (x->req.kind == AM2Z_REQ_EXTERN && x->req.ext && x->req.detach)
            x->req.detach(x->req.ext);
        x->req.ext = NULL;
        x->req.kind = AM2Z_REQ_NONE;
    }
    if (x->wake.target) {
        am2z_exec_unref(x->wake.target);
        x->wake.target = NULL;
    }
    if (x->wake.payload && x->wake.payload_free)
        x->wake.payload_free(x->wake.payload);
    x->wake.payload = NULL;
    if (x->started)
        e->stats.running--;
    x->state = AM2Z_EXEC_DONE;
    am2z__timer_stop(e, &x->deadline);
    /* Children that are still running carry on unsupervised; their
     * settlement has nobody to notify. */
    children_detach(x);
    inbox_clear(x);
    am2z_exec_unref(x);                   /* the body's reference */
}

static void exec_free(am2z_exec_t *x)
{
    am2z_engine_t *e = x->engine;

    assert(x->state == AM2Z_EXEC_DONE);
    assert(!x->queued);
    child_unlink(x);
    children_detach(x);
    if (x->all_prev)
        x->all_prev->all_next = x->all_next;
    else
        e->all = x->all_next;
    if (x->all_next)
        x->all_next->all_prev = x->all_prev;
    am2z__idmap_del(e, x);
    if (e->hooks.release)
        e->hooks.release(e->host, x);
    e->stats.live--;
    if (e->spare_n < 4096 && !e->closing) {
        x->all_next = e->spare;
        e->spare = x;
        e->spare_n++;
    } else {
        free(x);
    }
}

/* Engine shutdown: every body is abandoned (the host drops its coroutine in
 * the release hook) and every record freed, whoever still refers to it.
 * First every link between records is cut, so that no free walks into a
 * record freed before it; then each record is released and freed. */
void am2z__exec_kill_all(am2z_engine_t *e)
{
    am2z_exec_t *x;

    e->ready_head = e->ready_tail = NULL;
    e->stats.ready = 0;
    for (x = e->all; x; x = x->all_next) {
        x->queued = 0;
        x->ready_next = NULL;
        am2z__timer_stop(e, &x->req.timer);
        am2z__timer_stop(e, &x->deadline);
        if (x->req.kind == AM2Z_REQ_EXTERN && x->req.ext && x->req.detach)
            x->req.detach(x->req.ext);
        x->req.ext = NULL;
        if (x->wake.payload && x->wake.payload_free)
            x->wake.payload_free(x->wake.payload);
        x->wake.payload = NULL;
        x->req.kind = AM2Z_REQ_NONE;
        x->req.target = x->req.wnext = NULL;
        x->wake.target = NULL;
        x->waiters = NULL;
        x->inbox_head = x->inbox_tail = x->inbox_next = NULL;
        x->parent = x->first_child = x->next_sib = x->prev_sib = NULL;
        if (x->state != AM2Z_EXEC_DONE && x->started)
            e->stats.running--;
        x->state = AM2Z_EXEC_DONE;
    }
    /* Every release hook runs while all records are still alive (a hook may
     * drop references to others), then everything is freed. */
    e->killing = 1;
    for (x = e->all; x; x = x->all_next)
        if (e->hooks.release)
            e->hooks.release(e->host, x);
    while ((x = e->all) != NULL) {
        e->all = x->all_next;
        am2z__idmap_del(e, x);
        e->stats.live--;
        free(x);
    }
    e->killing = 0;
}
