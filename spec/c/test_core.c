/*
 * test_core.c -- the core on a loop the test owns, with a tiny host whose
 * "bodies" are step functions instead of Lua coroutines.
 */
#include "am2z.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    failures++; } } while (0)

typedef struct body_s body_t;
typedef void (*step_fn)(body_t *b, am2z_exec_t *x, am2z_wake_t *w);
struct body_s {
    step_fn step;
    int     steps;
    int     aborts;
    int     abort_reason;
    double  t0;
    double  woke_after;
    int     wake_status;
    int     released;
    am2z_engine_t *e;
    body_t *child;
    uint32_t child_timeout;
    int     child_status;
};

typedef struct { int resumes; int releases; } host_t;

static void h_resume(void *hp, am2z_exec_t *x)
{
    host_t *h = hp;
    body_t *b = *(body_t **) am2z_exec_host_data(x);
    am2z_wake_t w;
    h->resumes++;
    am2z_exec_take_wake(x, &w);
    b->steps++;
    b->step(b, x, &w);
}

static void h_release(void *hp, am2z_exec_t *x)
{
    host_t *h = hp;
    body_t *b = *(body_t **) am2z_exec_host_data(x);
    h->releases++;
    if (b)
        b->released++;
}

static void h_abort(void *hp, am2z_exec_t *x, int reason)
{
    body_t *b = *(body_t **) am2z_exec_host_data(x);
    b->aborts++;
    b->abort_reason = reason;
}

static am2z_exec_t *spawn(am2z_engine_t *e, am2z_exec_t *parent, body_t *b,
                          uint32_t timeout, int notify)
{
    am2z_exec_opts_t o = { timeout, 0, 1, notify };
    am2z_exec_t *x = NULL;
    int rc = am2z_exec_new(e, parent, &o, &x);
    CHECK(rc == AM2Z_OK);
    *(body_t **) am2z_exec_host_data(x) = b;
    b->t0 = am2z_now_ms();
    return x;
}

/* sleeps 15 ms once, then finishes OK */
static void sleeper(body_t *b, am2z_exec_t *x, am2z_wake_t *w)
{
    if (b->steps == 1) {
        CHECK(am2z_exec_sleep(x, 15) == AM2Z_OK);
        return;
    }
    b->woke_after = am2z_now_ms() - b->t0;
    b->wake_status = w->status;
    am2z_exec_finish(x, w->status == AM2Z_OK ? AM2Z_OK : AM2Z_EFAILED);
}

static am2z_engine_t *new_engine(uv_loop_t *loop, host_t *h)
{
    am2z_engine_opts_t o;
    am2z_engine_t *e = NULL;
    memset(&o, 0, sizeof(o));
    o.loop = loop;
    o.host = h;
    o.hooks.resume = h_resume;
    o.hooks.release = h_release;
    o.hooks.abort = h_abort;
    o.exec_host_size = sizeof(body_t *);
    CHECK(am2z_engine_new(&o, &e) == AM2Z_OK);
    return e;
}

static void test_sleep_on_caller_loop(void)
{
    uv_loop_t loop;
    host_t h = { 0, 0 };
    body_t b = { sleeper };
    uv_loop_init(&loop);
    am2z_engine_t *e = new_engine(&loop, &h);
    am2z_exec_t *x = spawn(e, NULL, &b, 0, 0);
    am2z_exec_ref(x);
    CHECK(b.steps == 0);               /* posted, never run inline */
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(b.steps == 2);
    CHECK(b.woke_after >= 15.0);
    CHECK(am2z_exec_is_settled(x) && am2z_exec_settled_status(x) == AM2Z_OK);
    CHECK(b.aborts == 0);
    am2z_exec_unref(x);
    CHECK(b.released == 1);
    am2z_engine_free(e);
    CHECK(uv_loop_close(&loop) == 0);  /* the engine closed all its handles */
}


/* parent: spawns b->child (notify), waits for it, records its status */
static void parent_step(body_t *b, am2z_exec_t *x, am2z_wake_t *w)
{
    if (b->steps == 1) {
        spawn(b->e, x, b->child, b->child_timeout, 1);
        CHECK(am2z_exec_wait_child(x) == AM2Z_OK);
        return;
    }
    b->wake_status = w->status;
    am2z_exec_t *c = am2z_exec_take_child(x);
    if (c) {
        b->child_status = am2z_exec_settled_status(c);
        am2z_exec_unref(c);
    }
    b->woke_after = am2z_now_ms() - b->t0;
    am2z_exec_finish(x, AM2Z_OK);
}

/* sleeps far longer than any deadline, twice if it gets the chance */
static void long_sleeper(body_t *b, am2z_exec_t *x, am2z_wake_t *w)
{
    if (b->steps == 1) {
        CHECK(am2z_exec_sleep(x, 60000) == AM2Z_OK);
        return;
    }
    b->wake_status = w->status;
    b->woke_after = am2z_now_ms() - b->t0;
    am2z_exec_finish(x, AM2Z_OK);
}

static void test_child_deadline(void)
{
    uv_loop_t loop;
    host_t h = { 0, 0 };
    body_t c = { long_sleeper };
    body_t p = { parent_step };
    uv_loop_init(&loop);
    am2z_engine_t *e = new_engine(&loop, &h);
    p.e = e;
    p.child = &c;
    p.child_timeout = 20;
    spawn(e, NULL, &p, 0, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(p.child_status == AM2Z_ETIMEDOUT);
    CHECK(p.woke_after >= 20.0 && p.woke_after < 5000.0);
    CHECK(c.aborts == 1 && c.abort_reason == AM2Z_ETIMEDOUT);
    CHECK(c.wake_status == AM2Z_ETIMEDOUT);   /* its sleep returned at once */
    CHECK(c.steps == 2);
    CHECK(c.released == 1 && p.released == 1);
    am2z_engine_free(e);
    CHECK(uv_loop_close(&loop) == 0);
}

/* A parent's deadline cancels its child (which then reports ECANCELED). */
static void test_parent_deadline_cancels_child(void)
{
    host_t h = { 0, 0 };
    body_t c = { long_sleeper };
    body_t p = { parent_step };
    am2z_engine_t *e = new_engine(NULL, &h);   /* engine-owned loop */
    p.e = e;
    p.child = &c;
    p.child_timeout = 0;
    spawn(e, NULL, &p, 25, 0);
    am2z_engine_run(e, UV_RUN_DEFAULT);
    CHECK(p.aborts == 1 && p.abort_reason == AM2Z_ETIMEDOUT);
    CHECK(p.wake_status == AM2Z_ETIMEDOUT);   /* woken by its own abort */
    CHECK(c.aborts == 1 && c.abort_reason == AM2Z_ECANCELED);
    CHECK(c.steps == 2 && c.wake_status == AM2Z_ECANCELED);
    am2z_engine_free(e);
}

static void test_stale_host_completion(void)
{
    host_t h = { 0, 0 };
    am2z_engine_t *e = new_engine(NULL, &h);
    body_t b = { sleeper };
    am2z_exec_t *x = spawn(e, NULL, &b, 0, 0);
    am2z_exec_ref(x);
    am2z_engine_run(e, UV_RUN_NOWAIT);          /* step 1: asleep */
    CHECK(b.steps == 1 && am2z_exec_state(x) == AM2Z_EXEC_SUSPENDED);
    CHECK(am2z_exec_complete_host(x, 12345, AM2Z_OK) == AM2Z_ESTATE);
    CHECK(am2z_exec_sleep(x, 1) == AM2Z_ESTATE); /* not running: refused */
    am2z_engine_run(e, UV_RUN_DEFAULT);
    CHECK(b.steps == 2);
    am2z_exec_unref(x);
    am2z_engine_free(e);
}

static void test_free_with_live_executions(void)
{
    host_t h = { 0, 0 };
    am2z_engine_t *e = new_engine(NULL, &h);
    body_t c = { long_sleeper }, p = { parent_step };
    p.e = e;
    p.child = &c;
    spawn(e, NULL, &p, 0, 0);
    am2z_engine_run(e, UV_RUN_NOWAIT);
    am2z_engine_run(e, UV_RUN_NOWAIT);
    CHECK(c.steps == 1);
    am2z_engine_free(e);                         /* must release both, no leak */
    CHECK(c.released == 1 && p.released == 1);
    CHECK(h.releases == 2);
}

static void test_retry_delay(void)
{
    am2z_retry_policy_t p = { 4, 100, 2, 0, 0 };
    CHECK(am2z_retry_delay(&p, 1, 0) == 100);
    CHECK(am2z_retry_delay(&p, 2, 0) == 200);
    CHECK(am2z_retry_delay(&p, 3, 0) == 400);
    CHECK(am2z_retry_delay(&p, 4, 0) < 0);       /* no 5th attempt */
    p.max_backoff_ms = 250;
    CHECK(am2z_retry_delay(&p, 3, 0) == 250);
    p.jitter = 1;
    double d = am2z_retry_delay(&p, 3, 0.5);
    CHECK(d >= 125 && d <= 250);
    p.multiplier = 0.5;
    CHECK(am2z_retry_policy_check(&p, NULL) == AM2Z_EINVAL);
}

static int ev_count;
static void on_event(void *ud, const am2z_event_t *ev)
{
    ev_count += strcmp(ev->name, "x") == 0;
    if (ud)
        am2z_engine_unsubscribe((am2z_engine_t *) ud, 1);
}

static void test_events(void)
{
    host_t h = { 0, 0 };
    am2z_engine_t *e = new_engine(NULL, &h);
    uint64_t id1, id2;
    am2z_event_t ev = { "x", NULL, NULL };
    CHECK(am2z_engine_subscribe(e, on_event, e, &id1) == AM2Z_OK);  /* removes itself */
    CHECK(am2z_engine_subscribe(e, on_event, NULL, &id2) == AM2Z_OK);
    am2z_engine_emit(e, &ev);
    CHECK(ev_count == 2);
    am2z_engine_emit(e, &ev);
    CHECK(ev_count == 3);
    CHECK(am2z_engine_subscribers(e) == 1);
    CHECK(am2z_engine_unsubscribe(e, id1) == AM2Z_ENOTFOUND);
    am2z_engine_free(e);
}

static void test_errors(void)
{
    CHECK(strcmp(am2z_err_name(AM2Z_ETIMEDOUT), "ETIMEDOUT") == 0);
    CHECK(am2z_err_from_name("ECANCELED") == AM2Z_ECANCELED);
    CHECK(strlen(am2z_strerror(AM2Z_ENOMEM)) > 0);
    CHECK(am2z_engine_new(NULL, NULL) == AM2Z_EINVAL);
}

int main(void)
{
    test_sleep_on_caller_loop();
    test_child_deadline();
    test_parent_deadline_cancels_child();
    test_stale_host_completion();
    test_free_with_live_executions();
    test_retry_delay();
    test_events();
    test_errors();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("core: all checks passed\n");
    return 0;
}
