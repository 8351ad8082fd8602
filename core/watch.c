/*
 * File-system watches for hot reload: a uv_fs_event_t on the engine's loop
 * whose events queue up until an execution asks for the next one
 * (am2z_watch_next suspends it like any other wait). Events are delivered as
 * a reply array { filename, flags } so the binding's reply conversion serves.
 *
 * Ownership: the watch is freed by its close callback, never in place; a
 * waiting execution that goes away (cancel, deadline) is detached and the
 * watch forgets it.
 */
#include <stdlib.h>
#include <string.h>

#include "am2z_int.h"

typedef struct wevent_s {
    struct wevent_s *next;
    char            *name;
    int              flags;
} wevent_t;

struct am2z_watch_s {
    uv_fs_event_t  h;
    am2z_engine_t *e;
    am2z_watch_t  *prev, *next;  /* the engine's list of open watches */
    am2z_exec_t   *exec;        /* borrowed; NULL when nobody waits */
    uint64_t       gen;
    wevent_t      *head, *tail;
    size_t         queued;
    int            closed;
};

/* A storm of events (a whole tree rewritten) is bounded: the reader only
 * needs to know that something changed, not every instance of it. */
#define WATCH_MAX_QUEUED 1024

static am2z_reply_t *event_reply(const wevent_t *ev)
{
    am2z_reply_t *r = calloc(1, sizeof(*r));
    am2z_reply_t *name = calloc(1, sizeof(*name));
    am2z_reply_t *flags = calloc(1, sizeof(*flags));
    am2z_reply_t **els = calloc(2, sizeof(*els));
    size_t len = ev->name ? strlen(ev->name) : 0;
    char *s = malloc(len + 1);
    if (!r || !name || !flags || !els || !s) {
        free(r); free(name); free(flags); free(els); free(s);
        return NULL;
    }
    if (len)
        memcpy(s, ev->name, len);
    s[len] = '\0';
    name->type = AM2Z_REPLY_STRING;
    name->str = s;
    name->len = len;
    flags->type = AM2Z_REPLY_INTEGER;
    flags->integer = ev->flags;
    els[0] = name;
    els[1] = flags;
    r->type = AM2Z_REPLY_ARRAY;
    r->elements = 2;
    r->element = els;
    return r;
}

static void event_free(wevent_t *ev)
{
    free(ev->name);
    free(ev);
}

/* Hands the oldest queued event to the waiting execution, if both exist. */
static void deliver(am2z_watch_t *w)
{
    wevent_t *ev;
    am2z_reply_t *r;
    am2z_exec_t *x;
    if (w->exec == NULL || w->head == NULL)
        return;
    ev = w->head;
    w->head = ev->next;
    if (w->head == NULL)
        w->tail = NULL;
    w->queued--;
    r = event_reply(ev);
    event_free(ev);
    x = w->exec;
    w->exec = NULL;
    am2z_exec_complete_extern(x, w->gen, r ? AM2Z_OK : AM2Z_ENOMEM, r, am2z_reply_free);
}

static void on_event(uv_fs_event_t *h, const char *filename, int events, int status)
{
    am2z_watch_t *w = h->data;
    wevent_t *ev;
    if (w->closed)
        return;
    if (w->queued >= WATCH_MAX_QUEUED)
        return;
    ev = calloc(1, sizeof(*ev));
    if (ev == NULL)
        return;
    ev->name = filename ? strdup(filename) : NULL;
    ev->flags = status < 0 ? -1 : events;
    if (w->tail)
        w->tail->next = ev;
    else
        w->head = ev;
    w->tail = ev;
    w->queued++;
    deliver(w);
}

static void free_on_close(uv_handle_t *h)
{
    free(h->data);
}

am2z_watch_t *am2z_watch_new(am2z_engine_t *e, const char *path, int *rc)
{
    am2z_watch_t *w;
    int r;
    if (rc)
        *rc = AM2Z_OK;
    if (e == NULL || path == NULL || *path == '\0') {
        if (rc)
            *rc = AM2Z_EINVAL;
        return NULL;
    }
    w = calloc(1, sizeof(*w));
    if (w == NULL) {
        if (rc)
            *rc = AM2Z_ENOMEM;
        return NULL;
    }
    r = uv_fs_event_init(am2z_engine_loop(e), &w->h);
    if (r == 0) {
        w->h.data = w;
        r = uv_fs_event_start(&w->h, on_event, path, 0);
        if (r != 0) {
            /* initialised: must be closed, not freed */
            w->closed = 1;
            uv_close((uv_handle_t *) &w->h, free_on_close);
            if (rc)
                *rc = r == UV_ENOENT ? AM2Z_ENOTFOUND : AM2Z_EUV;
            return NULL;
        }
    } else {
        free(w);
        if (rc)
            *rc = AM2Z_EUV;
        return NULL;
    }
    w->e = e;
    w->next = e->watches;
    if (e->watches)
        e->watches->prev = w;
    e->watches = w;
    return w;
}

static void watch_detach(void *ext)
{
    am2z_watch_t *w = ext;
    w->exec = NULL;
}

int am2z_watch_next(am2z_watch_t *w, am2z_exec_t *x)
{
    int rc;
    if (w == NULL || x == NULL)
        return AM2Z_EINVAL;
    if (w->closed)
        return AM2Z_ECLOSED;
    if (w->exec != NULL)
        return AM2Z_EBUSY;
    rc = am2z_exec_wait_extern(x, w, watch_detach, &w->gen);
    if (rc != AM2Z_OK)
        return rc;
    /* Aborted already: wait_extern completed it and called detach. */
    w->exec = x->req.kind == AM2Z_REQ_EXTERN ? x : NULL;
    deliver(w);
    return AM2Z_OK;
}

static void on_close(uv_handle_t *h)
{
    am2z_watch_t *w = h->data;
    wevent_t *ev = w->head;
    while (ev) {
        wevent_t *next = ev->next;
        event_free(ev);
        ev = next;
    }
    free(w);
}

void am2z_watch_close(am2z_watch_t *w)
{
    if (w == NULL || w->closed)
        return;
    w->closed = 1;
    if (w->prev)
        w->prev->next = w->next;
    else
        w->e->watches = w->next;
    if (w->next)
        w->next->prev = w->prev;
    if (w->exec) {
        am2z_exec_t *x = w->exec;
        w->exec = NULL;
        am2z_exec_complete_extern(x, w->gen, AM2Z_ECLOSED, NULL, NULL);
    }
    uv_fs_event_stop(&w->h);
    uv_close((uv_handle_t *) &w->h, on_close);
}

void am2z__watch_close_all(am2z_engine_t *e)
{
    while (e->watches)
        am2z_watch_close(e->watches);
}
