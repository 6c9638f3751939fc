/* plan: the order of providers, retries, backoff and cooldowns of a call. */
#include "plan.h"

#include "clock.h"
#include "log.h"
#include "scoreboard.h"

static struct scoreboard_provider *
health(const struct plan *p, size_t provider)
{
    return p->health != NULL && provider < SCOREBOARD_PROVIDERS
               ? &p->health[provider]
               : NULL;
}

int
plan_cooling_down(const struct plan *p, size_t provider)
{
    const struct scoreboard_provider *h = health(p, provider);

    return h != NULL && __atomic_load_n(&h->cooldown_until_ms,
                                        __ATOMIC_RELAXED) > clock_wall_ms();
}

/* The providers not cooling down, in order; all of them when every one
 * is (a probe beats a certain failure). */
static void
order_round(struct plan *p)
{
    size_t n = p->conf->nproviders;

    p->n = p->next = 0;
    for (size_t i = 0; i < n; i++)
        if (!plan_cooling_down(p, i))
            p->order[p->n++] = i;
    if (p->n == 0)
        for (size_t i = 0; i < n; i++)
            p->order[p->n++] = i;
}

void
plan_begin(struct plan *p, const struct conf *c,
           struct scoreboard_provider *health_slots, uint64_t *rng)
{
    *p = (struct plan){.conf = c, .health = health_slots, .rng = rng};
    order_round(p);
}

void
plan_next_round(struct plan *p)
{
    p->retry_at_ms = p->retry_after_ms = 0;
    p->retryable = 0;
    p->round++;
    order_round(p);
}

size_t
plan_peek(const struct plan *p)
{
    return p->order[p->next];
}

int
plan_has_next(const struct plan *p)
{
    return p->next < p->n;
}

size_t
plan_take(struct plan *p)
{
    return p->order[p->next++];
}

/* A failure the request caused itself: no other provider would do better. */
static int
final_failure(enum answer_status status, long http_status)
{
    return status == ANSWER_HTTP_ERROR && http_status >= 400 &&
           http_status < 500 && http_status != 408 && http_status != 429;
}

/* Worth asking the same provider again after a pause: it could not be
 * reached, was overloaded (429, 5xx), broke off, or reported an error in
 * the middle of a 2xx stream (its failure, as a 5xx is). A timeout or a
 * nonsense answer is not: waiting again would only double the wait. */
static int
retryable(enum answer_status status, long http_status)
{
    switch (status) {
    case ANSWER_UNREACHABLE:
    case ANSWER_FAILED:
        return 1;
    case ANSWER_HTTP_ERROR:
        return http_status == 429 || http_status >= 500 ||
               (http_status >= 200 && http_status < 300);
    default:
        return 0;
    }
}

void
plan_failed(struct plan *p, enum answer_status status, long http_status,
            long retry_after_s)
{
    if (final_failure(status, http_status)) {
        p->done = 1;
        return;
    }
    if ((double)retry_after_s * 1000.0 > p->retry_after_ms)
        p->retry_after_ms = (double)retry_after_s * 1000.0;
    p->retryable |= retryable(status, http_status);
}

double
plan_backoff_ms(const struct conf *c, long long round, uint64_t *rng)
{
    double step = (double)c->upstream.retry_base_ms *
                  (double)(1LL << (round < 10 ? round : 10));

    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    step *= 0.5 + (double)(*rng % 1000) / 2000.0;
    return step < PLAN_BACKOFF_MAX_MS ? step : PLAN_BACKOFF_MAX_MS;
}

void
plan_schedule_retry(struct plan *p, double now_ms, double deadline_ms)
{
    double wait = plan_backoff_ms(p->conf, p->round, p->rng);

    if (p->retry_after_ms > wait)
        wait = p->retry_after_ms;
    if (!p->retryable || p->round >= p->conf->upstream.retries ||
        (deadline_ms > 0 && now_ms + wait >= deadline_ms)) {
        p->done = 1;
        return;
    }
    p->retry_at_ms = now_ms + wait;
}

void
plan_note_start(struct plan *p, size_t provider, int hedge)
{
    struct scoreboard_provider *h = health(p, provider);

    if (h == NULL)
        return;
    scoreboard_add(&h->attempts, 1);
    scoreboard_add(&h->retries, p->round > 0);
    scoreboard_add(&h->hedges, hedge != 0);
}

void
plan_note_success(struct plan *p, size_t provider, int hedge)
{
    struct scoreboard_provider *h = health(p, provider);

    if (h == NULL)
        return;
    __atomic_store_n(&h->failures, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&h->cooldown_until_ms, 0, __ATOMIC_RELAXED);
    scoreboard_add(&h->successes, 1);
    if (hedge)
        scoreboard_add(&h->hedges_won, 1);
}

void
plan_note_local_failure(struct plan *p, size_t provider,
                        enum answer_status status)
{
    struct scoreboard_provider *h = health(p, provider);

    if (h != NULL && status != ANSWER_CLIENT_GONE)
        scoreboard_add(&h->errors[answer_error_kind(status)], 1);
}

void
plan_note_failure(struct plan *p, size_t provider, enum answer_status status,
                  const char *why)
{
    const struct conf *c = p->conf;
    struct scoreboard_provider *h = health(p, provider);
    uint32_t row;

    plan_note_local_failure(p, provider, status);
    if (h == NULL || status == ANSWER_CLIENT_GONE)
        return;
    row = __atomic_add_fetch(&h->failures, 1, __ATOMIC_RELAXED);
    if (row < (uint32_t)c->upstream.cooldown_failures ||
        c->upstream.cooldown_s == 0)
        return;
    __atomic_store_n(&h->cooldown_until_ms,
                     clock_wall_ms() + c->upstream.cooldown_s * 1000,
                     __ATOMIC_RELAXED);
    scoreboard_add(&h->cooldowns, 1);
    log_warnx("llm", "provider %s failed %u times in a row (%s); every "
              "worker skips it for %lld s", c->providers[provider].name,
              row, why, c->upstream.cooldown_s);
}
