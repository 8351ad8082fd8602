/*
 * The embedding API (am2z_host_*, am2z_call_*) as a C program uses it: bad
 * arguments give error codes with messages, executions report through their
 * callbacks, native processors compose with Lua ones, time out like any
 * processor, see their cancellation, and everything is freed.
 * Workflow files are written into a temporary directory by the test.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "am2z.h"

static int failures, checks;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        checks++;                                                              \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, "\n");                                             \
        }                                                                      \
    } while (0)

typedef struct {
    int   n, ok;
    char  eid[AM2Z_EXECUTION_ID_MAX];
    char *json;
} result_t;

static void on_result(void *ud, const char *eid, int ok, const char *json)
{
    result_t *r = ud;
    r->n++;
    r->ok = ok;
    snprintf(r->eid, sizeof(r->eid), "%s", eid);
    free(r->json);
    r->json = strdup(json);
}

static void on_eval(void *ud, int ok, const char *json)
{
    result_t *r = ud;
    r->n++;
    r->ok = ok;
    free(r->json);
    r->json = strdup(json);
}

static int events_seen;
static void on_event(void *ud, const char *event, const char *json)
{
    (void) ud;
    (void) json;
    if (strcmp(event, "processor:completed") == 0)
        events_seen++;
}

/* native: doubles "n" synchronously */
static void double_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    const char *p = strstr(state_json, "\"n\":");
    char out[64];
    (void) ud;
    snprintf(out, sizeof(out), "{\"n\":%d}", p ? atoi(p + 4) * 2 : -1);
    am2z_call_succeed(call, out);
}

/* native: fails with a business code */
static void decline_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    (void) state_json;
    (void) ud;
    am2z_call_fail(call, "PAYMENT_DECLINED", "card declined", 0);
}

/* native: never completes; remembers its call and whether it was cancelled */
static am2z_call_t *hung_call;
static int hung_cancelled;
static void hung_cancel(am2z_call_t *call, void *ud)
{
    (void) ud;
    hung_cancelled++;
    CHECK(am2z_call_is_cancelled(call), "cancelled call should say so");
}
static void hang_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    (void) state_json;
    (void) ud;
    hung_call = call;
    am2z_call_on_cancel(call, hung_cancel, NULL);
}

/* native: returns something that is not JSON */
static void garbage_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    (void) state_json;
    (void) ud;
    am2z_call_succeed(call, "not json");
}

static void run_until(am2z_host_t *h, const int *flag, int want)
{
    for (int i = 0; i < 2000 && *flag < want; i++)
        am2z_host_run(h, UV_RUN_ONCE);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

int main(void)
{
    am2z_host_t *h = NULL;
    am2z_host_opts_t o;
    char dir[] = "/tmp/am2z-embed-test-XXXXXX", path[128], eid[AM2Z_EXECUTION_ID_MAX];
    result_t r = { 0 };
    char *stats = NULL;
    int rc;

    /* ---- NULL and invalid arguments: codes and messages, no crash */
    CHECK(am2z_host_new(NULL, NULL) == AM2Z_EINVAL, "new(NULL, NULL)");
    CHECK(am2z_host_load(NULL, "x", 0) == AM2Z_EINVAL, "load(NULL)");
    CHECK(am2z_host_execute(NULL, "p", "{}", NULL, on_result, &r, NULL) == AM2Z_EINVAL, "execute(NULL)");
    CHECK(am2z_host_cancel(NULL, "x") == AM2Z_EINVAL, "cancel(NULL)");
    CHECK(strstr(am2z_host_error(NULL), "NULL") != NULL, "error(NULL): %s", am2z_host_error(NULL));
    CHECK(am2z_call_succeed(NULL, "{}") == AM2Z_EINVAL, "succeed(NULL)");
    CHECK(am2z_call_fail(NULL, "X", "m", 0) == AM2Z_EINVAL, "fail(NULL)");
    am2z_host_free(NULL);

    memset(&o, 0, sizeof(o));
    o.lua_dir = "/nonexistent";
    rc = am2z_host_new(&o, &h);
    CHECK(rc == AM2Z_ENOTFOUND, "new with a bad lua_dir: %d", rc);
    CHECK(strstr(am2z_host_error(h), "/nonexistent") != NULL, "message: %s", am2z_host_error(h));
    CHECK(am2z_host_start(h) == AM2Z_ESTATE, "start on a failed host");
    am2z_host_free(h);

    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(path, sizeof(path), "%s/flow.lua", dir);
    write_file(path,
        "local am2z = require('am2z')\n"
        "local embed = require('am2z.embed')\n"
        "local inc = am2z.createProcessor('inc'):process(function(s) s.n = s.n + 1 return am2z.Success(s) end)\n"
        "return { inc, am2z.chainProcessors{ name = 'mixed', processors = { inc, embed.native('double'), inc } },\n"
        "         am2z.chainProcessors{ name = 'declined', processors = { inc, embed.native('decline') } } }\n");

    memset(&o, 0, sizeof(o));
    o.log_level = "silent";
    o.default_timeout_ms = 5000;
    rc = am2z_host_new(&o, &h);
    CHECK(rc == AM2Z_OK, "new: %s", am2z_host_error(h));
    CHECK(am2z_host_loop(h) != NULL, "loop");
    CHECK(am2z_host_execute(h, "inc", "{}", NULL, on_result, &r, NULL) == AM2Z_ESTATE, "execute before start");
    CHECK(strstr(am2z_host_error(h), "not started") != NULL, "%s", am2z_host_error(h));
    CHECK(am2z_host_register_native(h, NULL, double_fn, NULL, 0) == AM2Z_EINVAL, "native NULL name");
    CHECK(am2z_host_register_native(h, "x", NULL, NULL, 0) == AM2Z_EINVAL, "native NULL fn");
    CHECK(am2z_host_register_native(h, "double", double_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
    CHECK(am2z_host_register_native(h, "decline", decline_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
    CHECK(am2z_host_register_native(h, "hang", hang_fn, NULL, 100) == AM2Z_OK, "%s", am2z_host_error(h));
    CHECK(am2z_host_register_native(h, "hang_long", hang_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
    CHECK(am2z_host_register_native(h, "garbage", garbage_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
    CHECK(am2z_host_load(h, NULL, 0) == AM2Z_EINVAL, "load NULL path");
    CHECK(am2z_host_load(h, "/nonexistent/flow.lua", 0) == AM2Z_EINVAL, "load missing");
    CHECK(strstr(am2z_host_error(h), "/nonexistent/flow.lua") != NULL, "%s", am2z_host_error(h));
    CHECK(am2z_host_load(h, path, 0) == AM2Z_OK, "load: %s", am2z_host_error(h));
    CHECK(am2z_host_on(h, "processor:completed", on_event, NULL) == AM2Z_OK, "on");
    CHECK(am2z_host_on(h, NULL, on_event, NULL) == AM2Z_EINVAL, "on NULL");
    CHECK(am2z_host_start(h) == AM2Z_OK, "start: %s", am2z_host_error(h));

    /* ---- bad input to execute */
    CHECK(am2z_host_execute(h, "inc", NULL, NULL, on_result, &r, NULL) == AM2Z_EINVAL, "NULL state");
    CHECK(am2z_host_execute(h, "inc", "[1,", NULL, on_result, &r, NULL) == AM2Z_EINVAL, "bad JSON");
    CHECK(strstr(am2z_host_error(h), "state_json") != NULL, "%s", am2z_host_error(h));
    CHECK(am2z_host_execute(h, "", "{}", NULL, on_result, &r, NULL) == AM2Z_EINVAL, "empty name");

    /* ---- a chain of Lua, C, Lua */
    CHECK(am2z_host_execute(h, "mixed", "{\"n\":1}", "sess-1", on_result, &r, eid) == AM2Z_OK,
          "execute: %s", am2z_host_error(h));
    CHECK(strlen(eid) > 0, "execution id");
    CHECK(r.n == 0, "the callback never runs inside execute");
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && r.ok, "mixed: %s", r.json ? r.json : "(none)");
    CHECK(r.json && strstr(r.json, "\"n\":5"), "(1+1)*2+1 = 5: %s", r.json ? r.json : "");
    CHECK(strcmp(r.eid, eid) == 0, "callback id %s vs %s", r.eid, eid);
    CHECK(events_seen >= 4, "processor:completed events: %d", events_seen);

    /* ---- anything else the Lua API does, through am2z_host_eval */
    {
        result_t ev = { 0 };
        CHECK(am2z_host_eval(h, "return runtime:getState('sess-1')", on_eval, &ev) == AM2Z_OK,
              "eval: %s", am2z_host_error(h));
        run_until(h, &ev.n, 1);
        CHECK(ev.n == 1 && ev.ok && ev.json && strstr(ev.json, "\"n\":5") && strstr(ev.json, "\"version\":1"),
              "getState through eval: %s", ev.json ? ev.json : "(none)");
        ev.n = 0;
        CHECK(am2z_host_eval(h, "error('boom')", on_eval, &ev) == AM2Z_OK, "eval raising");
        run_until(h, &ev.n, 1);
        CHECK(ev.n == 1 && !ev.ok && ev.json && strstr(ev.json, "boom"), "%s", ev.json ? ev.json : "(none)");
        CHECK(am2z_host_eval(h, "return (", on_eval, &ev) == AM2Z_EINVAL, "eval syntax error");
        CHECK(strstr(am2z_host_error(h), "syntax error") != NULL, "%s", am2z_host_error(h));
        CHECK(am2z_host_eval(h, NULL, on_eval, &ev) == AM2Z_EINVAL, "eval NULL");
        free(ev.json);
    }

    /* ---- an unknown processor: a failed result, not an error code */
    r.n = 0;
    CHECK(am2z_host_execute(h, "nope", "{}", NULL, on_result, &r, NULL) == AM2Z_OK, "execute unknown");
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && !r.ok && strstr(r.json, "PROCESSOR_NOT_FOUND"), "%s", r.json ? r.json : "");

    /* ---- a native failure keeps its code, inside a chain */
    r.n = 0;
    CHECK(am2z_host_execute(h, "declined", "{\"n\":1}", NULL, on_result, &r, NULL) == AM2Z_OK, "declined");
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && !r.ok && strstr(r.json, "PAYMENT_DECLINED") && strstr(r.json, "card declined"),
          "%s", r.json ? r.json : "");

    /* ---- a native that returns no JSON fails with a ValidationError */
    r.n = 0;
    CHECK(am2z_host_execute(h, "garbage", "{}", NULL, on_result, &r, NULL) == AM2Z_OK, "garbage");
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && !r.ok && strstr(r.json, "VALIDATION"), "%s", r.json ? r.json : "");

    /* ---- a native that never completes is timed out; its cancel callback runs */
    r.n = 0;
    hung_call = NULL;
    CHECK(am2z_host_execute(h, "hang", "{}", NULL, on_result, &r, NULL) == AM2Z_OK, "hang");
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && !r.ok && strstr(r.json, "OPERATION_TIMEOUT"), "%s", r.json ? r.json : "");
    CHECK(hung_cancelled == 1, "cancel callback ran %d times", hung_cancelled);
    /* completing it late is harmless: the result is dropped */
    CHECK(hung_call && am2z_call_succeed(hung_call, "{}") == AM2Z_ESTALE, "late completion");

    /* ---- cancel by id */
    r.n = 0;
    hung_cancelled = 0;
    hung_call = NULL;
    CHECK(am2z_host_execute(h, "hang_long", "{}", NULL, on_result, &r, eid) == AM2Z_OK, "hang_long");
    for (int i = 0; i < 50 && hung_call == NULL; i++)
        am2z_host_run(h, UV_RUN_NOWAIT);
    CHECK(hung_call != NULL, "the native processor started");
    CHECK(am2z_host_cancel(h, eid) == AM2Z_OK, "cancel: %s", am2z_host_error(h));
    run_until(h, &r.n, 1);
    CHECK(r.n == 1 && !r.ok && strstr(r.json, "OPERATION_CANCELLED"), "%s", r.json ? r.json : "");
    CHECK(hung_cancelled == 1, "cancel callback ran %d times", hung_cancelled);
    CHECK(am2z_host_cancel(h, "no-such-id") == AM2Z_ENOTFOUND, "cancel unknown");

    /* ---- stats */
    CHECK(am2z_host_stats_json(h, NULL) == AM2Z_EINVAL, "stats NULL");
    CHECK(am2z_host_stats_json(h, &stats) == AM2Z_OK && stats && strstr(stats, "\"registeredProcessors\""),
          "stats: %s", stats ? stats : "(none)");
    free(stats);

    /* ---- stop and free: nothing left (valgrind checks the rest) */
    CHECK(am2z_host_stop(h, 100) == AM2Z_OK, "stop");
    am2z_host_run(h, UV_RUN_DEFAULT);
    am2z_host_free(h);
    free(r.json);
    r.json = NULL;
    unlink(path);
    rmdir(dir);

    /* ---- free with executions still running (a native call pending, a Lua
     * sleep): no callback afterwards, nothing leaked (valgrind) */
    {
        memset(&o, 0, sizeof(o));
        o.log_level = "silent";
        CHECK(mkdtemp(strcpy(dir, "/tmp/am2z-embed-test-XXXXXX")) != NULL, "mkdtemp");
        snprintf(path, sizeof(path), "%s/nap.lua", dir);
        write_file(path,
            "local am2z = require('am2z')\n"
            "return am2z.createProcessor('nap'):process(function(s, ctx) ctx:sleep(60000) return am2z.Success(s) end)\n");
        rc = am2z_host_new(&o, &h);
        CHECK(rc == AM2Z_OK, "%s", am2z_host_error(h));
        CHECK(am2z_host_register_native(h, "hang_long", hang_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
        CHECK(am2z_host_load(h, path, 0) == AM2Z_OK, "%s", am2z_host_error(h));
        CHECK(am2z_host_start(h) == AM2Z_OK, "%s", am2z_host_error(h));
        r.n = 0;
        hung_call = NULL;
        CHECK(am2z_host_execute(h, "hang_long", "{}", NULL, on_result, &r, NULL) == AM2Z_OK, "hang_long");
        CHECK(am2z_host_execute(h, "nap", "{}", NULL, on_result, &r, NULL) == AM2Z_OK, "nap");
        for (int i = 0; i < 50 && hung_call == NULL; i++)
            am2z_host_run(h, UV_RUN_NOWAIT);
        CHECK(hung_call != NULL, "the native call is pending");
        am2z_host_free(h);
        CHECK(r.n == 0, "no result callback after free (%d)", r.n);
        unlink(path);
        rmdir(dir);
    }

    /* ---- the same through QueueRuntime, when the suite's Redis is there:
     * a Lua-C-Lua chain where every step is a job */
    {
        const char *url = getenv("AM2Z_TEST_REDIS_URL");
        if (url && *url) {
            char prefix[64];
            snprintf(prefix, sizeof(prefix), "embed%ld", (long) getpid());
            CHECK(mkdtemp(strcpy(dir, "/tmp/am2z-embed-test-XXXXXX")) != NULL, "mkdtemp");
            snprintf(path, sizeof(path), "%s/flow.lua", dir);
            write_file(path,
                "local am2z = require('am2z')\n"
                "local embed = require('am2z.embed')\n"
                "local inc = am2z.createProcessor('inc'):process(function(s) s.n = s.n + 1 return am2z.Success(s) end)\n"
                "return { inc, am2z.chainProcessors{ name = 'mixed', processors = { inc, embed.native('double'), inc } } }\n");
            memset(&o, 0, sizeof(o));
            o.log_level = "silent";
            o.redis_url = url;
            o.queue_prefix = prefix;
            rc = am2z_host_new(&o, &h);
            CHECK(rc == AM2Z_OK, "queue host: %s", am2z_host_error(h));
            CHECK(am2z_host_register_native(h, "double", double_fn, NULL, 0) == AM2Z_OK, "%s", am2z_host_error(h));
            CHECK(am2z_host_load(h, path, 0) == AM2Z_OK, "%s", am2z_host_error(h));
            CHECK(am2z_host_start(h) == AM2Z_OK, "%s", am2z_host_error(h));
            r.n = 0;
            CHECK(am2z_host_execute(h, "mixed", "{\"n\":1}", NULL, on_result, &r, NULL) == AM2Z_OK,
                  "%s", am2z_host_error(h));
            run_until(h, &r.n, 1);
            CHECK(r.n == 1 && r.ok && r.json && strstr(r.json, "\"n\":5"), "queue mixed: %s",
                  r.json ? r.json : "(none)");
            CHECK(am2z_host_stop(h, 1000) == AM2Z_OK, "stop");
            am2z_host_run(h, UV_RUN_DEFAULT);
            am2z_host_free(h);
            free(r.json);
            r.json = NULL;
            unlink(path);
            rmdir(dir);
        } else {
            printf("QueueRuntime part skipped: AM2Z_TEST_REDIS_URL is not set\n");
        }
    }

    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
