/*
 * redis.c -- Redis connections for the engine: hiredis's async API driven
 * by the engine's libuv loop, every command a suspension of the calling
 * execution.
 *
 * hiredis 0.14 has no command timeouts and frees a reply when its callback
 * returns, so each command is a heap request with its own engine timer, and
 * the reply is copied inside the callback. A request whose execution
 * stopped waiting (cancel, deadline) is detached: hiredis still calls it
 * exactly once (with NULL on teardown), and it then frees itself.
 *
 * We attach hiredis to libuv ourselves rather than through
 * adapters/libuv.h: the 0.14 adapter leaks its struct when uv_poll_init
 * fails, and we need the poll handle's close to be part of our teardown.
 */
#include "am2z_int.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { RS_CONNECTING = 1, RS_READY, RS_DOWN, RS_CLOSED };

/* The libuv side of one hiredis context. Freed by the poll's close
 * callback (libuv may touch the handle until then). */
typedef struct {
    uv_poll_t          poll;
    redisAsyncContext *ac;         /* borrowed; NULL once hiredis cleaned up */
    int                events;     /* what hiredis wants */
    int                applied;    /* what the poll handle watches now */
    int                flushing;   /* inside our own write flush */
} rpoll_t;

/* An execution waiting for the connection to become ready. */
typedef struct rwait_s {
    am2z_exec_t     *exec;         /* borrowed; NULL once detached */
    uint64_t         gen;
    struct rwait_s  *next;
} rwait_t;

/* One command in flight. */
typedef struct {
    am2z_redis_t  *r;              /* borrowed: r outlives its requests */
    am2z_exec_t   *exec;           /* borrowed; NULL once detached or completed */
    uint64_t       gen;
    am2z_timer_t   timer;          /* the command's own deadline */
    int            flags;          /* AM2Z_REDIS_* */
} rreq_t;

struct am2z_redis_s {
    am2z_engine_t     *e;          /* borrowed */
    redisAsyncContext *ac;         /* owned by hiredis; NULL when down */
    int                state;
    char              *host, *username, *password, *client_name;   /* owned */
    int                port, db;
    uint32_t           connect_timeout_ms, reconnect_max_ms;
    void             (*log)(void *ud, int level, const char *msg);
    void              *log_ud;

    uv_timer_t         retry_timer;     /* reconnect backoff */
    am2z_timer_t       connect_timer;   /* engine timer: connect deadline */
    uint32_t           backoff_ms;
    unsigned           attempts;        /* failed connects in a row */

    rwait_t           *waiters;         /* owned list */
    /* Commands are written from a prepare handle (just before the loop
     * polls) instead of by watching the socket for writability after each
     * one: two epoll changes and an extra loop turn per command showed in
     * the queue benchmark. Watching for WRITABLE is left for connecting
     * and for a socket buffer that is full. */
    uv_prepare_t       flush;
    int                dirty;
    unsigned           inflight;        /* rreq_t not yet called back */
    int                handles_open;    /* retry_timer, and at most one poll */
    am2z_redis_t      *next, *prev;     /* engine's list */
};

static void rlog(am2z_redis_t *r, int level, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    if (r->log == NULL)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    r->log(r->log_ud, level, buf);
}

/* ---- replies ------------------------------------------------------------ */

void am2z_reply_free(void *p)
{
    am2z_reply_t *r = p;
    if (r == NULL)
        return;
    if (r->block) {
        free(r);
        return;
    }
    for (size_t i = 0; i < r->elements; i++)
        am2z_reply_free(r->element[i]);
    free(r->element);
    free(r->str);
    free(r);
}

/* A reply is copied into one allocation (one malloc and one free per reply,
 * instead of one per node and string: allocation showed at about a tenth of
 * a busy worker's CPU). reply_lay runs twice: without a base it only
 * measures, with one it builds, at the same offsets. */
typedef struct {
    char  *base;
    size_t off;
} bump_t;

static void *bump(bump_t *b, size_t n, size_t align)
{
    size_t o = (b->off + align - 1) & ~(align - 1);
    b->off = o + n;
    return b->base ? b->base + o : NULL;
}

static am2z_reply_t *reply_lay(bump_t *b, const redisReply *src)
{
    am2z_reply_t *r = bump(b, sizeof(*r), _Alignof(am2z_reply_t));
    if (r) {
        memset(r, 0, sizeof(*r));
        r->type = src->type;
        r->integer = src->integer;
    }
    if (src->type == REDIS_REPLY_STRING || src->type == REDIS_REPLY_STATUS
        || src->type == REDIS_REPLY_ERROR) {
        char *s = bump(b, src->len + 1, 1);
        if (r) {
            memcpy(s, src->str, src->len);
            s[src->len] = '\0';
            r->str = s;
            r->len = src->len;
        }
    } else if (src->type == REDIS_REPLY_ARRAY && src->elements > 0) {
        am2z_reply_t **el = bump(b, src->elements * sizeof(*el), _Alignof(am2z_reply_t *));
        if (r) {
            r->element = el;
            r->elements = src->elements;
        }
        for (size_t i = 0; i < src->elements; i++) {
            am2z_reply_t *c = reply_lay(b, src->element[i]);
            if (el)
                el[i] = c;
        }
    }
    return r;
}

static am2z_reply_t *reply_dup(const redisReply *src)
{
    bump_t b = { NULL, 0 };
    am2z_reply_t *r;
    reply_lay(&b, src);
    b.base = malloc(b.off);
    if (b.base == NULL)
        return NULL;
    b.off = 0;
    r = reply_lay(&b, src);
    r->block = 1;
    return r;
}

/* ---- libuv glue for hiredis --------------------------------------------- */

static void rpoll_cb(uv_poll_t *h, int status, int events)
{
    rpoll_t *p = h->data;
    /* An error on the socket: let hiredis read it and find out. */
    if (status < 0)
        events = UV_READABLE | UV_WRITABLE;
    if (p->ac && (events & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
}

static void rpoll_update(rpoll_t *p)
{
    if (uv_is_closing((uv_handle_t *) &p->poll) || p->events == p->applied)
        return;
    if (p->events)
        uv_poll_start(&p->poll, p->events, rpoll_cb);
    else
        uv_poll_stop(&p->poll);
    p->applied = p->events;
}

/* The poll plus the connection it belongs to, so the close callback can
 * tell the connection its handle is gone (the rpoll_t comes first, so
 * hiredis's ev.data and the handle's data both point at this). */
typedef struct {
    rpoll_t       p;
    am2z_redis_t *r;
} rpoll_owned_t;

static void ev_add_read(void *d)  { rpoll_t *p = d; p->events |= UV_READABLE;  rpoll_update(p); }
static void ev_del_read(void *d)  { rpoll_t *p = d; p->events &= ~UV_READABLE; rpoll_update(p); }
static void ev_del_write(void *d) { rpoll_t *p = d; p->events &= ~UV_WRITABLE; rpoll_update(p); }

/* Writes whatever commands this loop turn queued, in one go. */
static void flush_cb(uv_prepare_t *h)
{
    am2z_redis_t *r = h->data;
    uv_prepare_stop(h);
    if (!r->dirty)
        return;
    r->dirty = 0;
    if (r->ac == NULL)
        return;
    rpoll_t *p = r->ac->ev.data;
    p->flushing = 1;
    /* May find the link broken and free the context: pending callbacks
     * then run with NULL and post their executions; nothing is resumed. The
     * rpoll_t itself lives until its close callback, so touching it after
     * is safe. */
    redisAsyncHandleWrite(r->ac);
    p->flushing = 0;
}

static void ev_add_write(void *d)
{
    rpoll_t *p = d;
    am2z_redis_t *r = ((rpoll_owned_t *) p)->r;
    /* Connecting (hiredis learns the connect finished from writability) or
     * our flush could not write everything: really watch the socket. */
    if (p->flushing || p->ac == NULL || !(p->ac->c.flags & REDIS_CONNECTED) || r == NULL) {
        p->events |= UV_WRITABLE;
        rpoll_update(p);
        return;
    }
    if (!r->dirty) {
        r->dirty = 1;
        uv_prepare_start(&r->flush, flush_cb);
    }
}

static void redis_maybe_free(am2z_redis_t *r);

/* hiredis is freeing the context: the poll goes, asynchronously. The
 * redis struct counts the close as pending until the callback has run. */
static void poll_handle_closed(uv_handle_t *h);
static void ev_cleanup(void *d)
{
    rpoll_t *p = d;
    am2z_redis_t *r = p->ac ? p->ac->data : NULL;
    p->ac = NULL;
    p->events = 0;
    if (r)
        r->ac = NULL;
    uv_close((uv_handle_t *) &p->poll, poll_handle_closed);
}

static void poll_handle_closed(uv_handle_t *h)
{
    rpoll_owned_t *po = h->data;
    am2z_redis_t *r = po->r;
    free(po);
    if (r) {
        r->handles_open--;
        redis_maybe_free(r);
    }
}

static int attach(am2z_redis_t *r, redisAsyncContext *ac)
{
    rpoll_owned_t *po = calloc(1, sizeof(*po));
    if (po == NULL)
        return AM2Z_ENOMEM;
    if (uv_poll_init(r->e->loop, &po->p.poll, ac->c.fd) != 0) {
        free(po);
        return AM2Z_EUV;
    }
    po->p.poll.data = po;
    po->p.ac = ac;
    po->r = r;
    r->handles_open++;
    ac->ev.data = &po->p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return AM2Z_OK;
}

/* ---- waiters for readiness ---------------------------------------------- */

static void rwait_detach(void *ext)
{
    rwait_t *w = ext;
    w->exec = NULL;
}

static void wake_waiters(am2z_redis_t *r, int status)
{
    rwait_t *w = r->waiters;
    r->waiters = NULL;
    while (w) {
        rwait_t *next = w->next;
        if (w->exec) {
            am2z_exec_t *x = w->exec;
            w->exec = NULL;
            am2z_exec_complete_extern(x, w->gen, status, NULL, NULL);
        }
        free(w);
        w = next;
    }
}

/* ---- connecting ----------------------------------------------------------- */

static void start_connect(am2z_redis_t *r);

static void retry_cb(uv_timer_t *h)
{
    start_connect(h->data);
}

static void schedule_reconnect(am2z_redis_t *r)
{
    if (r->state == RS_CLOSED)
        return;
    r->state = RS_DOWN;
    uint32_t d = r->backoff_ms ? r->backoff_ms : 100;
    r->backoff_ms = d * 2 > r->reconnect_max_ms ? r->reconnect_max_ms : d * 2;
    uv_timer_start(&r->retry_timer, retry_cb, d, 0);
}

static void on_noreply(redisAsyncContext *ac, void *reply, void *priv)
{
    (void) ac; (void) priv;
    redisReply *rep = reply;
    am2z_redis_t *r = ac->data;
    if (r && rep && rep->type == REDIS_REPLY_ERROR)
        rlog(r, AM2Z_LOG_ERROR, "redis %s:%d: set-up command failed: %s", r->host, r->port, rep->str);
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    redisAsyncContext *ac = (redisAsyncContext *) cac;
    am2z_redis_t *r = ac->data;
    if (r == NULL)
        return;
    am2z__timer_stop(r->e, &r->connect_timer);
    if (status != REDIS_OK) {
        r->attempts++;
        rlog(r, r->attempts == 1 ? AM2Z_LOG_WARN : AM2Z_LOG_DEBUG,
             "redis %s:%d: connect failed (%s); retrying", r->host, r->port,
             ac->errstr[0] ? ac->errstr : "error");
        /* hiredis frees the context after this callback. */
        r->ac = NULL;
        wake_waiters(r, AM2Z_ECONNREFUSED);
        schedule_reconnect(r);
        return;
    }
    /* Set-up commands go first on the wire; anything sent after them runs
     * in the right database and as the right user. */
    if (r->password) {
        if (r->username)
            redisAsyncCommand(ac, on_noreply, NULL, "AUTH %s %s", r->username, r->password);
        else
            redisAsyncCommand(ac, on_noreply, NULL, "AUTH %s", r->password);
    }
    if (r->db)
        redisAsyncCommand(ac, on_noreply, NULL, "SELECT %d", r->db);
    if (r->client_name)
        redisAsyncCommand(ac, on_noreply, NULL, "CLIENT SETNAME %s", r->client_name);
    if (r->attempts > 0)
        rlog(r, AM2Z_LOG_INFO, "redis %s:%d: connected again after %u failed attempt(s)",
             r->host, r->port, r->attempts);
    r->attempts = 0;
    r->backoff_ms = 0;
    r->state = RS_READY;
    wake_waiters(r, AM2Z_OK);
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
    redisAsyncContext *ac = (redisAsyncContext *) cac;
    am2z_redis_t *r = ac->data;
    if (r == NULL)
        return;
    r->ac = NULL;                       /* hiredis frees it after this */
    if (r->state == RS_CLOSED)
        return;
    rlog(r, AM2Z_LOG_WARN, "redis %s:%d: connection lost (%s); reconnecting", r->host, r->port,
         status == REDIS_OK ? "closed" : (ac->errstr[0] ? ac->errstr : "error"));
    schedule_reconnect(r);
}

static void connect_timeout_cb(am2z_timer_t *t)
{
    am2z_redis_t *r = AM2Z_CONTAINER_OF(t, am2z_redis_t, connect_timer);
    if (r->state != RS_CONNECTING || r->ac == NULL)
        return;
    rlog(r, AM2Z_LOG_WARN, "redis %s:%d: connect timed out after %u ms", r->host, r->port,
         r->connect_timeout_ms);
    redisAsyncContext *ac = r->ac;
    ac->data = NULL;                    /* its callbacks must not find us */
    r->ac = NULL;
    redisAsyncFree(ac);
    r->attempts++;
    wake_waiters(r, AM2Z_ETIMEDOUT);
    schedule_reconnect(r);
}

static void start_connect(am2z_redis_t *r)
{
    redisAsyncContext *ac;
    if (r->state == RS_CLOSED)
        return;
    r->state = RS_CONNECTING;
    ac = redisAsyncConnect(r->host, r->port);
    if (ac == NULL || ac->err) {
        rlog(r, AM2Z_LOG_WARN, "redis %s:%d: %s", r->host, r->port,
             ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        r->attempts++;
        wake_waiters(r, AM2Z_ECONNREFUSED);
        schedule_reconnect(r);
        return;
    }
    ac->data = r;
    if (attach(r, ac) != AM2Z_OK) {
        ac->data = NULL;
        redisAsyncFree(ac);
        wake_waiters(r, AM2Z_ECONNREFUSED);
        schedule_reconnect(r);
        return;
    }
    r->ac = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    am2z__timer_start(r->e, &r->connect_timer, r->connect_timeout_ms, connect_timeout_cb);
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static void retry_timer_closed(uv_handle_t *h)
{
    am2z_redis_t *r = h->data;
    r->handles_open--;
    redis_maybe_free(r);
}

static void flush_closed(uv_handle_t *h)
{
    am2z_redis_t *r = h->data;
    r->handles_open--;
    redis_maybe_free(r);
}

int am2z_redis_new(am2z_engine_t *e, const am2z_redis_opts_t *o, am2z_redis_t **out)
{
    am2z_redis_t *r;
    if (e == NULL || o == NULL || out == NULL)
        return AM2Z_EINVAL;
    if (e->closing)
        return AM2Z_ECLOSED;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return AM2Z_ENOMEM;
    r->e = e;
    r->host = strdup(o->host ? o->host : "127.0.0.1");
    r->username = dup_or_null(o->username);
    r->password = dup_or_null(o->password);
    r->client_name = dup_or_null(o->client_name);
    r->port = o->port ? o->port : 6379;
    r->db = o->db;
    r->connect_timeout_ms = o->connect_timeout_ms ? o->connect_timeout_ms : 5000;
    r->reconnect_max_ms = o->reconnect_max_ms ? o->reconnect_max_ms : 5000;
    r->log = o->log;
    r->log_ud = o->log_ud;
    r->connect_timer.heap_idx = UINT32_MAX;
    if (r->host == NULL || uv_timer_init(e->loop, &r->retry_timer) != 0) {
        free(r->host);
        free(r->username);
        free(r->password);
        free(r->client_name);
        free(r);
        return AM2Z_ENOMEM;
    }
    r->retry_timer.data = r;
    r->handles_open = 1;
    /* Reconnecting alone must not keep a program alive. */
    uv_unref((uv_handle_t *) &r->retry_timer);
    uv_prepare_init(e->loop, &r->flush);
    r->flush.data = r;
    r->handles_open++;
    uv_unref((uv_handle_t *) &r->flush);
    r->next = e->redis;
    if (e->redis)
        e->redis->prev = r;
    e->redis = r;
    start_connect(r);
    *out = r;
    return AM2Z_OK;
}

int am2z_redis_ready(const am2z_redis_t *r)
{
    return r && r->state == RS_READY;
}

int am2z_redis_wait_ready(am2z_redis_t *r, am2z_exec_t *x)
{
    rwait_t *w;
    int rc;
    if (r == NULL || x == NULL)
        return AM2Z_EINVAL;
    if (r->state == RS_READY)
        return AM2Z_READY;
    if (r->state == RS_CLOSED)
        return AM2Z_ECLOSED;
    if (r->state == RS_DOWN)
        return AM2Z_ECONNREFUSED;     /* the last attempt failed: say so now */
    w = calloc(1, sizeof(*w));
    if (w == NULL)
        return AM2Z_ENOMEM;
    rc = am2z_exec_wait_extern(x, w, rwait_detach, &w->gen);
    if (rc != AM2Z_OK) {
        free(w);
        return rc;
    }
    /* Aborted already: wait_extern completed it and called detach. */
    w->exec = x->req.kind == AM2Z_REQ_EXTERN ? x : NULL;
    w->next = r->waiters;
    r->waiters = w;
    return AM2Z_OK;
}

/* ---- commands --------------------------------------------------------------- */

static void rreq_detach(void *ext)
{
    rreq_t *q = ext;
    q->exec = NULL;
    am2z__timer_stop(q->r->e, &q->timer);
}

static void rreq_timeout_cb(am2z_timer_t *t)
{
    rreq_t *q = AM2Z_CONTAINER_OF(t, rreq_t, timer);
    am2z_exec_t *x = q->exec;
    q->exec = NULL;                     /* the reply, when it comes, is dropped */
    if (x)
        am2z_exec_complete_extern(x, q->gen, AM2Z_ETIMEDOUT, NULL, NULL);
}

/* ---- XREAD replies reduced to results ----------------------------------- */

static int rstr_is(const redisReply *r, const char *s)
{
    size_t n = strlen(s);
    return r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) && r->len == n
           && memcmp(r->str, s, n) == 0;
}

static int entry_wanted(const redisReply *e)
{
    const redisReply *f;
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2)
        return 0;
    f = e->element[1];
    if (f->type != REDIS_REPLY_ARRAY)
        return 0;
    for (size_t k = 0; k + 1 < f->elements; k += 2) {
        if (rstr_is(f->element[k], "event")) {
            const redisReply *v = f->element[k + 1];
            return rstr_is(v, "completed") || rstr_is(v, "failed") || rstr_is(v, "cancel");
        }
    }
    return 0;
}

/* An XREAD reply with only the completed/failed/cancel entries of each
 * stream, plus its last entry's id (as an entry without fields) so the
 * reader's cursor still moves: copying every event of every queue into our
 * own reply (an allocation per element) was most of the reader's cost. */
static am2z_reply_t *xread_results_dup(const redisReply *src)
{
    am2z_reply_t *out;
    if (src->type != REDIS_REPLY_ARRAY)
        return reply_dup(src);
    out = calloc(1, sizeof(*out));
    if (out == NULL)
        return NULL;
    out->type = AM2Z_REPLY_ARRAY;
    if (src->elements == 0)
        return out;
    out->element = calloc(src->elements, sizeof(*out->element));
    if (out->element == NULL)
        goto fail;
    out->elements = src->elements;
    for (size_t i = 0; i < src->elements; i++) {
        const redisReply *s = src->element[i], *entries;
        am2z_reply_t *st, *kept;
        size_t n = 0, want = 0;
        if (s->type != REDIS_REPLY_ARRAY || s->elements < 2 || s->element[1]->type != REDIS_REPLY_ARRAY) {
            if ((out->element[i] = reply_dup(s)) == NULL)
                goto fail;
            continue;
        }
        entries = s->element[1];
        for (size_t j = 0; j < entries->elements; j++)
            want += entry_wanted(entries->element[j]);
        st = out->element[i] = calloc(1, sizeof(*st));
        if (st == NULL)
            goto fail;
        st->type = AM2Z_REPLY_ARRAY;
        st->element = calloc(2, sizeof(*st->element));
        if (st->element == NULL)
            goto fail;
        st->elements = 2;
        if ((st->element[0] = reply_dup(s->element[0])) == NULL)
            goto fail;
        kept = st->element[1] = calloc(1, sizeof(*kept));
        if (kept == NULL)
            goto fail;
        kept->type = AM2Z_REPLY_ARRAY;
        if (entries->elements == 0)
            continue;
        kept->element = calloc(want + 1, sizeof(*kept->element));
        if (kept->element == NULL)
            goto fail;
        for (size_t j = 0; j < entries->elements; j++) {
            const redisReply *e = entries->element[j];
            am2z_reply_t *c;
            if (entry_wanted(e)) {
                c = reply_dup(e);
            } else if (j + 1 == entries->elements && e->type == REDIS_REPLY_ARRAY && e->elements > 0) {
                c = calloc(1, sizeof(*c));        /* the cursor: { id, {} } */
                if (c) {
                    c->type = AM2Z_REPLY_ARRAY;
                    c->element = calloc(2, sizeof(*c->element));
                    if (c->element) {
                        c->elements = 2;
                        c->element[0] = reply_dup(e->element[0]);
                        c->element[1] = calloc(1, sizeof(*c->element[1]));
                        if (c->element[1])
                            c->element[1]->type = AM2Z_REPLY_ARRAY;
                    }
                    if (!c->element || !c->element[0] || !c->element[1]) {
                        am2z_reply_free(c);
                        c = NULL;
                    }
                }
            } else {
                continue;
            }
            if (c == NULL)
                goto fail;
            kept->element[n++] = c;
            kept->elements = n;
        }
    }
    return out;
fail:
    am2z_reply_free(out);
    return NULL;
}

static void reply_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    rreq_t *q = priv;
    am2z_redis_t *r = q->r;
    (void) ac;
    am2z__timer_stop(r->e, &q->timer);
    if (q->exec) {
        am2z_exec_t *x = q->exec;
        am2z_reply_t *copy = reply == NULL ? NULL
                             : (q->flags & AM2Z_REDIS_XREAD_RESULTS) ? xread_results_dup(reply)
                             : reply_dup(reply);
        int status = reply == NULL ? AM2Z_ECONNRESET : (copy ? AM2Z_OK : AM2Z_ENOMEM);
        q->exec = NULL;
        am2z_exec_complete_extern(x, q->gen, status, copy, am2z_reply_free);
    }
    free(q);
    r->inflight--;
    redis_maybe_free(r);
}

int am2z_redis_command(am2z_redis_t *r, am2z_exec_t *x, uint32_t timeout_ms,
                       int argc, const char **argv, const size_t *argvlen)
{
    return am2z_redis_command_ex(r, x, timeout_ms, argc, argv, argvlen, 0);
}

/* The command in Redis's wire format, built in one pass. hiredis's own
 * formatter appends piece by piece through sdscatfmt, which showed at about
 * 6% of a busy worker's CPU. Small commands use the caller's buffer. */
static size_t resp_digits(size_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

static char *resp_header(char *p, char type, size_t v)
{
    char tmp[24];
    int n = 0;
    *p++ = type;
    do {
        tmp[n++] = (char) ('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

static char *resp_format(int argc, const char **argv, const size_t *argvlen, char *small,
                         size_t small_size, size_t *len_out)
{
    size_t total = 1 + resp_digits((size_t) argc) + 2;
    char *buf, *p;
    for (int i = 0; i < argc; i++) {
        size_t l = argvlen ? argvlen[i] : strlen(argv[i]);
        total += 1 + resp_digits(l) + 2 + l + 2;
    }
    /* hiredis peeks one byte past a one-argument command (its own
     * formatter's sds strings end in a NUL): keep one there. */
    buf = total + 1 <= small_size ? small : malloc(total + 1);
    if (buf == NULL)
        return NULL;
    buf[total] = '\0';
    p = resp_header(buf, '*', (size_t) argc);
    for (int i = 0; i < argc; i++) {
        size_t l = argvlen ? argvlen[i] : strlen(argv[i]);
        p = resp_header(p, '$', l);
        memcpy(p, argv[i], l);
        p += l;
        *p++ = '\r';
        *p++ = '\n';
    }
    *len_out = total;
    return buf;
}

int am2z_redis_command_ex(am2z_redis_t *r, am2z_exec_t *x, uint32_t timeout_ms,
                          int argc, const char **argv, const size_t *argvlen, int flags)
{
    rreq_t *q;
    int rc, queued;
    char small[4096], *cmd;
    size_t cmdlen = 0;
    if (r == NULL || x == NULL || argc < 1 || argv == NULL)
        return AM2Z_EINVAL;
    if (r->state == RS_CLOSED)
        return AM2Z_ECLOSED;
    if (r->state != RS_READY || r->ac == NULL)
        return AM2Z_ENOTCONN;
    q = calloc(1, sizeof(*q));
    if (q == NULL)
        return AM2Z_ENOMEM;
    q->r = r;
    q->flags = flags;
    q->timer.heap_idx = UINT32_MAX;
    rc = am2z_exec_wait_extern(x, q, rreq_detach, &q->gen);
    if (rc != AM2Z_OK) {
        free(q);
        return rc;
    }
    cmd = resp_format(argc, argv, argvlen, small, sizeof(small), &cmdlen);
    queued = cmd != NULL
        && redisAsyncFormattedCommand(r->ac, reply_cb, q, cmd, cmdlen) == REDIS_OK;
    if (cmd != NULL && cmd != small)
        free(cmd);
    if (!queued) {
        int why = cmd == NULL ? AM2Z_ENOMEM : AM2Z_ENOTCONN;
        /* Not queued: hiredis will never call us for it. */
        q->exec = NULL;
        if (x->req.kind == AM2Z_REQ_EXTERN && x->req.ext == q)
            am2z_exec_complete_extern(x, q->gen, why, NULL, NULL);
        free(q);
        return AM2Z_OK;                 /* suspended; wakes with the error */
    }
    r->inflight++;
    if (x->req.kind == AM2Z_REQ_EXTERN && x->req.ext == q) {
        q->exec = x;
        if (timeout_ms)
            am2z__timer_start(r->e, &q->timer, timeout_ms, rreq_timeout_cb);
    }
    return AM2Z_OK;
}

/* ---- closing -------------------------------------------------------------- */

static void redis_maybe_free(am2z_redis_t *r)
{
    if (r->state != RS_CLOSED || r->handles_open > 0 || r->inflight > 0 || r->ac)
        return;
    free(r->host);
    free(r->username);
    free(r->password);
    free(r->client_name);
    free(r);
}

void am2z_redis_close(am2z_redis_t *r)
{
    am2z_engine_t *e;
    if (r == NULL || r->state == RS_CLOSED)
        return;
    e = r->e;
    r->state = RS_CLOSED;
    r->log = NULL;                      /* its owner may be gone after this */
    if (r->prev)
        r->prev->next = r->next;
    else
        e->redis = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->next = r->prev = NULL;
    am2z__timer_stop(e, &r->connect_timer);
    wake_waiters(r, AM2Z_ECLOSED);
    uv_timer_stop(&r->retry_timer);
    uv_close((uv_handle_t *) &r->retry_timer, retry_timer_closed);
    uv_prepare_stop(&r->flush);
    uv_close((uv_handle_t *) &r->flush, flush_closed);
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        /* Frees the context now: every pending reply callback runs with
         * NULL (ECONNRESET for whoever still waits), then ev_cleanup closes
         * the poll. */
        redisAsyncFree(ac);
        r->ac = NULL;
    }
    redis_maybe_free(r);
}

void am2z__redis_close_all(am2z_engine_t *e)
{
    while (e->redis)
        am2z_redis_close(e->redis);
}
