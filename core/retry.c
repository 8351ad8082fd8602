/*
 * retry.c -- the retry arithmetic both runtimes share, so that a processor's
 * backoff is the same whether it runs locally or on a queue worker.
 */
#include "am2z.h"

#include <math.h>

int am2z_retry_policy_check(const am2z_retry_policy_t *p, const char **why)
{
    const char *w = NULL;
    if (p == NULL)
        w = "policy is NULL";
    else if (p->max_attempts < 1)
        w = "maxAttempts must be >= 1";
    else if (!(p->backoff_ms >= 0) || isinf(p->backoff_ms))
        w = "backoffMs must be a finite number >= 0";
    else if (!(p->multiplier >= 1) || isinf(p->multiplier))
        w = "backoffMultiplier must be a finite number >= 1";
    else if (!(p->max_backoff_ms >= 0))
        w = "maxBackoffMs must be >= 0";
    if (why)
        *why = w;
    return w ? AM2Z_EINVAL : AM2Z_OK;
}

double am2z_retry_delay(const am2z_retry_policy_t *p, int failed_attempt,
                        double unit_random)
{
    if (p == NULL || failed_attempt < 1 || failed_attempt >= p->max_attempts)
        return -1;
    double d = p->backoff_ms * pow(p->multiplier, failed_attempt - 1);
    if (p->max_backoff_ms > 0 && d > p->max_backoff_ms)
        d = p->max_backoff_ms;
    if (!isfinite(d))
        d = p->max_backoff_ms > 0 ? p->max_backoff_ms : 0;
    if (p->jitter) {
        /* Equal jitter: keeps at least half the delay, so retries stay
         * spaced out while a thundering herd still spreads over [d/2, d]. */
        if (unit_random < 0)
            unit_random = 0;
        if (unit_random >= 1)
            unit_random = 0.999999;
        d = d / 2 + unit_random * d / 2;
    }
    return d;
}
