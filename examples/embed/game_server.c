/*
 * A game-server-shaped host for the am2z engine (docs/embedding.md).
 *
 * The server owns its libuv loop and ticks at a fixed rate (50 Hz). Game
 * events start Lua workflows; the workflows call native C processors the
 * server registers; halfway through, the server rewrites a workflow file and
 * the engine reloads it without restarting; a player leaving cancels that
 * player's matchmaking. Every tick the server measures how long its loop was
 * busy (engine work included) and prints a summary at the end.
 *
 *   game_server [workflows-dir] [ticks]
 *
 * Exit status 0 when every execution ended as expected, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "am2z.h"

#define TICK_MS 20

typedef struct {
    am2z_host_t *host;
    uv_loop_t    loop;
    uv_timer_t   tick;
    int          ticks, max_ticks;
    char         wfdir[256];
    /* per-tick loop busy time */
    uint64_t     last_ns, last_idle_ns;
    double       busy_total_ms, busy_max_ms;
    int          busy_samples;
    /* outcomes */
    int          started, completed, failed, cancelled, greeted_v1, greeted_v2, reloads;
    int          reload_failed, saves_pending;
    char         match_id[AM2Z_EXECUTION_ID_MAX];
    int          match_cancel_cb;
} server_t;

/* ---- native processors ----------------------------------------------------- */

/* "score": synchronous, completes before returning. */
static void score_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    int level = 1, kills = 0;
    const char *p;
    char out[1024];
    size_t n;
    (void) ud;
    if ((p = strstr(state_json, "\"level\":")) != NULL)
        level = atoi(p + 8);
    if ((p = strstr(state_json, "\"kills\":")) != NULL)
        kills = atoi(p + 8);
    /* the state is a JSON object: add a field before its closing brace */
    n = strlen(state_json);
    if (n < 2 || n > sizeof(out) - 64 || state_json[n - 1] != '}') {
        am2z_call_fail(call, "BAD_STATE", "score: unexpected state", 0);
        return;
    }
    snprintf(out, sizeof(out), "%.*s,\"score\":%d}", (int) (n - 1), state_json, level * 100 + kills * 10);
    am2z_call_succeed(call, out);
}

/* "db_save": asynchronous, completes 3 ms later from a timer, like a
 * database write would. */
typedef struct {
    uv_timer_t   t;
    am2z_call_t *call;
    char        *json;
} save_t;

static void save_closed(uv_handle_t *h)
{
    save_t *s = h->data;
    free(s->json);
    free(s);
}

static void save_done(uv_timer_t *t)
{
    save_t *s = t->data;
    am2z_call_succeed(s->call, s->json);
    uv_close((uv_handle_t *) &s->t, save_closed);
}

static void db_save_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    server_t *srv = ud;
    save_t *s = calloc(1, sizeof(*s));
    if (s == NULL || (s->json = strdup(state_json)) == NULL) {
        free(s);
        am2z_call_fail(call, "ENOMEM", "db_save: out of memory", 1);
        return;
    }
    s->call = call;
    uv_timer_init(&srv->loop, &s->t);
    s->t.data = s;
    uv_timer_start(&s->t, save_done, 3, 0);
}

/* "find_match": never completes by itself; its cancellation callback is
 * how it ends. */
typedef struct {
    server_t    *srv;
    am2z_call_t *call;
} match_t;

static void match_cancelled(am2z_call_t *call, void *ud)
{
    match_t *m = ud;
    m->srv->match_cancel_cb++;
    am2z_call_fail(call, "MATCH_ABORTED", "the player left", 0);
    free(m);
}

static void find_match_fn(am2z_call_t *call, const char *state_json, void *ud)
{
    match_t *m = calloc(1, sizeof(*m));
    (void) state_json;
    if (m == NULL) {
        am2z_call_fail(call, "ENOMEM", "find_match: out of memory", 1);
        return;
    }
    m->srv = ud;
    m->call = call;
    am2z_call_on_cancel(call, match_cancelled, m);
}

/* ---- results and events ---------------------------------------------------- */

static void on_result(void *ud, const char *eid, int ok, const char *json)
{
    server_t *srv = ud;
    if (ok) {
        srv->completed++;
        if (strstr(json, "\"greeting\":\"Welcome back"))
            srv->greeted_v2++;
        else if (strstr(json, "\"greeting\":\"Welcome,"))
            srv->greeted_v1++;
    } else if (strstr(json, "OPERATION_CANCELLED")) {
        srv->cancelled++;
        printf("execution %s cancelled\n", eid);
    } else {
        srv->failed++;
        printf("execution %s failed: %.200s\n", eid, json);
    }
}

static void on_reload(void *ud, const char *event, const char *json)
{
    server_t *srv = ud;
    if (strcmp(event, "reload:succeeded") == 0) {
        srv->reloads++;
        printf("tick %d: workflows reloaded: %s\n", srv->ticks, json);
    } else {
        srv->reload_failed++;
        printf("tick %d: reload failed: %s\n", srv->ticks, json);
    }
}

/* ---- the game loop ------------------------------------------------------- */

static void rewrite_workflow(server_t *srv)
{
    char path[300], tmp[310], *src;
    FILE *f;
    long n;
    snprintf(path, sizeof(path), "%s/player.lua", srv->wfdir);
    f = fopen(path, "rb");
    if (f == NULL)
        return;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    src = malloc((size_t) n + 64);
    if (src && fread(src, 1, (size_t) n, f) == (size_t) n) {
        char *at;
        src[n] = '\0';
        fclose(f);
        f = NULL;
        /* v2 of the greeting, saved the way editors do: write, then rename */
        at = strstr(src, "\"Welcome, \"");
        snprintf(tmp, sizeof(tmp), "%s.tmp", path);
        FILE *o = fopen(tmp, "wb");
        if (at && o) {
            fwrite(src, 1, (size_t) (at - src), o);
            fputs("\"Welcome back, \"", o);
            fputs(at + strlen("\"Welcome, \""), o);
            fclose(o);
            rename(tmp, path);
        } else if (o) {
            fclose(o);
        }
    }
    if (f)
        fclose(f);
    free(src);
}

static void start_join(server_t *srv, int player)
{
    char state[256], eid[AM2Z_EXECUTION_ID_MAX];
    snprintf(state, sizeof(state), "{\"name\":\"player-%d\",\"level\":%d,\"kills\":%d}", player,
             1 + player % 7, player % 5);
    if (am2z_host_execute(srv->host, "on-player-joined", state, NULL, on_result, srv, eid) == 0)
        srv->started++;
    else
        printf("execute failed: %s\n", am2z_host_error(srv->host));
}

static void on_tick(uv_timer_t *t)
{
    server_t *srv = t->data;
    uint64_t now = uv_hrtime(), idle = uv_metrics_idle_time(&srv->loop);
    if (srv->last_ns) {
        double wall = (double) (now - srv->last_ns) / 1e6;
        double idle_ms = (double) (idle - srv->last_idle_ns) / 1e6;
        double busy = wall - idle_ms;
        if (busy < 0)
            busy = 0;
        srv->busy_total_ms += busy;
        srv->busy_samples++;
        if (busy > srv->busy_max_ms)
            srv->busy_max_ms = busy;
    }
    srv->last_ns = now;
    srv->last_idle_ns = idle;
    srv->ticks++;

    /* game events */
    if (srv->ticks % 2 == 0 && srv->ticks <= srv->max_ticks - 10)
        start_join(srv, srv->ticks);
    if (srv->ticks == 10) {
        if (am2z_host_execute(srv->host, "matchmaking", "{\"name\":\"player-10\"}", NULL, on_result,
                              srv, srv->match_id) == 0)
            srv->started++;
    }
    if (srv->ticks == 30) {
        printf("tick 30: player-10 left; cancelling matchmaking %s\n", srv->match_id);
        if (am2z_host_cancel(srv->host, srv->match_id) != 0)
            printf("cancel failed: %s\n", am2z_host_error(srv->host));
    }
    if (srv->ticks == srv->max_ticks / 2)
        rewrite_workflow(srv);
    if (srv->ticks >= srv->max_ticks) {
        uv_timer_stop(&srv->tick);
        uv_close((uv_handle_t *) &srv->tick, NULL);
        am2z_host_stop(srv->host, 2000);
    }
}

static int copy_dir(const char *from, const char *to)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "cp '%s'/*.lua '%s'/", from, to);
    return system(cmd);
}

int main(int argc, char **argv)
{
    server_t srv;
    am2z_host_opts_t o;
    const char *src = argc > 1 ? argv[1] : "examples/embed/workflows";
    char tmpl[] = "/tmp/am2z-game-XXXXXX";
    char *stats = NULL;
    int rc, ok;

    memset(&srv, 0, sizeof(srv));
    srv.max_ticks = argc > 2 ? atoi(argv[2]) : 100;
    if (srv.max_ticks < 40)
        srv.max_ticks = 40;
    if (mkdtemp(tmpl) == NULL || copy_dir(src, tmpl) != 0) {
        fprintf(stderr, "game_server: cannot copy the workflows from %s\n", src);
        return 1;
    }
    snprintf(srv.wfdir, sizeof(srv.wfdir), "%s", tmpl);

    uv_loop_init(&srv.loop);
    uv_loop_configure(&srv.loop, UV_METRICS_IDLE_TIME);

    memset(&o, 0, sizeof(o));
    o.loop = &srv.loop;
    o.lua_dir = getenv("AM2Z_LUA_DIR");
    o.log_level = "warn";
    rc = am2z_host_new(&o, &srv.host);
    if (rc != 0) {
        fprintf(stderr, "game_server: %s\n", am2z_host_error(srv.host));
        am2z_host_free(srv.host);
        return 1;
    }
    if (am2z_host_register_native(srv.host, "score", score_fn, &srv, 0) != 0
        || am2z_host_register_native(srv.host, "db_save", db_save_fn, &srv, 1000) != 0
        || am2z_host_register_native(srv.host, "find_match", find_match_fn, &srv, 0) != 0
        || am2z_host_load(srv.host, srv.wfdir, 1) != 0
        || am2z_host_on(srv.host, "reload:succeeded", on_reload, &srv) != 0
        || am2z_host_on(srv.host, "reload:failed", on_reload, &srv) != 0
        || am2z_host_start(srv.host) != 0) {
        fprintf(stderr, "game_server: %s\n", am2z_host_error(srv.host));
        am2z_host_free(srv.host);
        return 1;
    }

    uv_timer_init(&srv.loop, &srv.tick);
    srv.tick.data = &srv;
    uv_timer_start(&srv.tick, on_tick, TICK_MS, TICK_MS);
    printf("game server: %d ticks at %d ms, workflows in %s\n", srv.max_ticks, TICK_MS, srv.wfdir);
    uv_run(&srv.loop, UV_RUN_DEFAULT);

    am2z_host_stats_json(srv.host, &stats);
    am2z_host_free(srv.host);
    /* the host's handles are closed; let libuv finish their callbacks */
    uv_run(&srv.loop, UV_RUN_NOWAIT);
    uv_loop_close(&srv.loop);

    printf("ticks: %d, engine+server busy per tick: avg %.3f ms, max %.3f ms (tick budget %d ms)\n",
           srv.ticks, srv.busy_samples ? srv.busy_total_ms / srv.busy_samples : 0.0, srv.busy_max_ms,
           TICK_MS);
    printf("executions: %d started, %d completed, %d failed, %d cancelled\n", srv.started,
           srv.completed, srv.failed, srv.cancelled);
    printf("greetings: %d before the reload, %d after; reloads: %d\n", srv.greeted_v1, srv.greeted_v2,
           srv.reloads);
    printf("matchmaking cancellation callback ran %d time(s)\n", srv.match_cancel_cb);
    if (stats)
        printf("stats: %.300s\n", stats);
    free(stats);

    ok = srv.completed + srv.cancelled == srv.started && srv.failed == 0 && srv.cancelled == 1
         && srv.match_cancel_cb == 1 && srv.reloads >= 1 && srv.greeted_v1 > 0 && srv.greeted_v2 > 0;
    {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", srv.wfdir);
        if (system(cmd) != 0)
            fprintf(stderr, "game_server: could not remove %s\n", srv.wfdir);
    }
    printf("%s\n", ok ? "game server: OK" : "game server: FAILED");
    return ok ? 0 : 1;
}
