/*
 * lockkeeper.c -- renews a worker's job locks from a thread of its own.
 *
 * A job's lock must be renewed every lockDuration/2 even while its
 * processor runs Lua for a long time without yielding: the loop thread is
 * busy then, so nothing on the loop can renew it. The keeper thread has its
 * own blocking Redis connection and touches no engine state; the loop thread
 * only adds and removes entries under the mutex.
 */
#include "am2z_int.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct lk_entry_s {
    char               *lock_key;   /* owned */
    char               *token;      /* owned */
    char               *id;         /* owned */
    struct lk_entry_s  *next;
} lk_entry_t;

struct am2z_lockkeeper_s {
    pthread_t        thread;
    pthread_mutex_t  mu;
    pthread_cond_t   cv;
    int              stop;
    lk_entry_t      *entries;       /* owned list, guarded by mu */
    char            *host, *password, *username, *stalled_key;  /* owned */
    int              port, db;
    uint32_t         interval_ms, lock_ms;
    unsigned long    renewed, failed;   /* guarded by mu */
    redisContext    *rc;            /* the thread's own */
};

/* Same check-and-renew as core/redis-scripts/extendLock.lua, sent with EVAL
 * so the thread needs no script cache handling. */
static const char EXTEND_LOCK[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2])) "
    "redis.call('SREM', KEYS[2], ARGV[3]) return 1 end return 0";

static void lk_entry_free(lk_entry_t *e)
{
    free(e->lock_key);
    free(e->token);
    free(e->id);
    free(e);
}

static void lk_connect(am2z_lockkeeper_t *k)
{
    struct timeval tv = { 2, 0 };
    redisReply *r;
    if (k->rc)
        return;
    k->rc = redisConnectWithTimeout(k->host, k->port, tv);
    if (k->rc == NULL || k->rc->err) {
        if (k->rc)
            redisFree(k->rc);
        k->rc = NULL;
        return;
    }
    redisSetTimeout(k->rc, tv);
    if (k->password) {
        r = k->username ? redisCommand(k->rc, "AUTH %s %s", k->username, k->password)
                        : redisCommand(k->rc, "AUTH %s", k->password);
        if (r)
            freeReplyObject(r);
    }
    if (k->db) {
        r = redisCommand(k->rc, "SELECT %d", k->db);
        if (r)
            freeReplyObject(r);
    }
}

static void lk_renew_all(am2z_lockkeeper_t *k)
{
    lk_entry_t *copy = NULL, *e, *n;
    char dur[32];

    /* Work on a copy so the loop thread is never blocked by Redis. */
    pthread_mutex_lock(&k->mu);
    for (e = k->entries; e; e = e->next) {
        n = calloc(1, sizeof(*n));
        if (n == NULL)
            break;
        n->lock_key = strdup(e->lock_key);
        n->token = strdup(e->token);
        n->id = strdup(e->id);
        n->next = copy;
        copy = n;
    }
    pthread_mutex_unlock(&k->mu);
    if (copy == NULL)
        return;
    lk_connect(k);
    snprintf(dur, sizeof(dur), "%u", k->lock_ms);
    unsigned long ok = 0, bad = 0;
    for (e = copy; e; e = n) {
        n = e->next;
        if (k->rc && e->lock_key && e->token && e->id) {
            redisReply *r = redisCommand(k->rc, "EVAL %s 2 %s %s %s %s %s", EXTEND_LOCK,
                                         e->lock_key, k->stalled_key, e->token, dur, e->id);
            if (r == NULL) {
                redisFree(k->rc);      /* broken: reconnect next round */
                k->rc = NULL;
                bad++;
            } else {
                if (r->type == REDIS_REPLY_INTEGER && r->integer == 1)
                    ok++;
                else
                    bad++;
                freeReplyObject(r);
            }
        }
        lk_entry_free(e);
    }
    pthread_mutex_lock(&k->mu);
    k->renewed += ok;
    k->failed += bad;
    pthread_mutex_unlock(&k->mu);
}

static void *lk_main(void *arg)
{
    am2z_lockkeeper_t *k = arg;
    pthread_mutex_lock(&k->mu);
    while (!k->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += k->interval_ms / 1000;
        ts.tv_nsec += (long) (k->interval_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&k->cv, &k->mu, &ts);
        if (k->stop)
            break;
        pthread_mutex_unlock(&k->mu);
        lk_renew_all(k);
        pthread_mutex_lock(&k->mu);
    }
    pthread_mutex_unlock(&k->mu);
    if (k->rc)
        redisFree(k->rc);
    k->rc = NULL;
    return NULL;
}

int am2z_lockkeeper_new(const am2z_lockkeeper_opts_t *o, am2z_lockkeeper_t **out)
{
    am2z_lockkeeper_t *k;
    if (o == NULL || out == NULL || o->stalled_key == NULL || o->lock_ms == 0)
        return AM2Z_EINVAL;
    k = calloc(1, sizeof(*k));
    if (k == NULL)
        return AM2Z_ENOMEM;
    k->host = strdup(o->host ? o->host : "127.0.0.1");
    k->password = o->password ? strdup(o->password) : NULL;
    k->username = o->username ? strdup(o->username) : NULL;
    k->stalled_key = strdup(o->stalled_key);
    k->port = o->port ? o->port : 6379;
    k->db = o->db;
    k->lock_ms = o->lock_ms;
    k->interval_ms = o->interval_ms ? o->interval_ms : o->lock_ms / 2;
    if (k->interval_ms == 0)
        k->interval_ms = 1;
    pthread_mutex_init(&k->mu, NULL);
    pthread_cond_init(&k->cv, NULL);
    if (k->host == NULL || k->stalled_key == NULL
        || pthread_create(&k->thread, NULL, lk_main, k) != 0) {
        pthread_mutex_destroy(&k->mu);
        pthread_cond_destroy(&k->cv);
        free(k->host);
        free(k->password);
        free(k->username);
        free(k->stalled_key);
        free(k);
        return AM2Z_ENOMEM;
    }
    *out = k;
    return AM2Z_OK;
}

int am2z_lockkeeper_add(am2z_lockkeeper_t *k, const char *lock_key, const char *token,
                        const char *id)
{
    lk_entry_t *e;
    if (k == NULL || lock_key == NULL || token == NULL || id == NULL)
        return AM2Z_EINVAL;
    e = calloc(1, sizeof(*e));
    if (e == NULL)
        return AM2Z_ENOMEM;
    e->lock_key = strdup(lock_key);
    e->token = strdup(token);
    e->id = strdup(id);
    if (!e->lock_key || !e->token || !e->id) {
        lk_entry_free(e);
        return AM2Z_ENOMEM;
    }
    pthread_mutex_lock(&k->mu);
    e->next = k->entries;
    k->entries = e;
    pthread_mutex_unlock(&k->mu);
    return AM2Z_OK;
}

int am2z_lockkeeper_remove(am2z_lockkeeper_t *k, const char *lock_key)
{
    lk_entry_t **pp, *e;
    int found = 0;
    if (k == NULL || lock_key == NULL)
        return AM2Z_EINVAL;
    pthread_mutex_lock(&k->mu);
    for (pp = &k->entries; (e = *pp) != NULL; pp = &e->next) {
        if (strcmp(e->lock_key, lock_key) == 0) {
            *pp = e->next;
            lk_entry_free(e);
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&k->mu);
    return found ? AM2Z_OK : AM2Z_ENOTFOUND;
}

void am2z_lockkeeper_counts(am2z_lockkeeper_t *k, unsigned long *renewed, unsigned long *failed)
{
    pthread_mutex_lock(&k->mu);
    if (renewed)
        *renewed = k->renewed;
    if (failed)
        *failed = k->failed;
    pthread_mutex_unlock(&k->mu);
}

void am2z_lockkeeper_free(am2z_lockkeeper_t *k)
{
    lk_entry_t *e;
    if (k == NULL)
        return;
    pthread_mutex_lock(&k->mu);
    k->stop = 1;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
    pthread_join(k->thread, NULL);
    while ((e = k->entries) != NULL) {
        k->entries = e->next;
        lk_entry_free(e);
    }
    pthread_mutex_destroy(&k->mu);
    pthread_cond_destroy(&k->cv);
    free(k->host);
    free(k->password);
    free(k->username);
    free(k->stalled_key);
    free(k);
}
