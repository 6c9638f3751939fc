/*
 * Unit tests of plan: the order of providers in a round (cooling ones
 * skipped, unless all are), the jittered exponential backoff, which
 * failures end the plan or earn a retry, Retry-After and the deadline,
 * and each provider's health in the pool's shared scoreboard slots
 * (failures in a row, cooldowns, counters).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "answer.h"
#include "clock.h"
#include "conf.h"
#include "log.h"
#include "plan.h"
#include "scoreboard.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))
#define SEED 0x9E3779B97F4A7C15ULL
#define MINUTE_MS 60000

/* A provider's cooldown is logged as a warning; keep the test output to
 * the test results. */
static int
quiet_log(void **state)
{
    char err[LOG_ERR_LEN];

    (void)state;
    return log_open("stderr", "off", LOG_ERROR, err);
}

/* Defaults and nproviders named providers ("p0", "p1", ...), which
 * conf_free() frees. */
static void
make_conf(struct conf *c, size_t nproviders)
{
    char err[CONF_ERR_LEN] = "";
    char name[CONF_PROVIDER_NAME_MAX];

    assert_int_equal(conf_defaults(c, err), 0);
    assert_true(nproviders <= CONF_PROVIDERS_MAX);
    for (size_t i = 0; i < nproviders; i++) {
        snprintf(name, sizeof(name), "p%zu", i);
        c->providers[i].name = strdup(name);
        assert_non_null(c->providers[i].name);
        c->nproviders = i + 1;
    }
    c->upstream.retries = 2;
    c->upstream.retry_base_ms = 100;
    c->upstream.cooldown_failures = 3;
    c->upstream.cooldown_s = 30;
}

static void
clear_health(struct scoreboard_provider health[SCOREBOARD_PROVIDERS])
{
    memset(health, 0, sizeof(*health) * SCOREBOARD_PROVIDERS);
}

/* The lower and upper bounds of plan_backoff_ms for round. */
static void
backoff_bounds(const struct conf *c, long long round, double *lo, double *hi)
{
    double step = (double)c->upstream.retry_base_ms *
                  (double)(1LL << (round < 10 ? round : 10));

    *lo = 0.5 * step;
    *hi = step;
    if (*lo > PLAN_BACKOFF_MAX_MS)
        *lo = PLAN_BACKOFF_MAX_MS;
    if (*hi > PLAN_BACKOFF_MAX_MS)
        *hi = PLAN_BACKOFF_MAX_MS;
}

struct order_case {
    const char *what;
    size_t nproviders;
    unsigned cooling; /* bit i: provider i cools down for a minute */
    unsigned expired; /* bit i: its cooldown ended a minute ago */
    size_t want[CONF_PROVIDERS_MAX];
    size_t nwant;
};

static const struct order_case order_cases[] = {
    {"one provider", 1, 0, 0, {0}, 1},
    {"config order", 3, 0, 0, {0, 1, 2}, 3},
    {"all eight", 8, 0, 0, {0, 1, 2, 3, 4, 5, 6, 7}, 8},
    {"first cools down", 3, 1u << 0, 0, {1, 2}, 2},
    {"middle cools down", 3, 1u << 1, 0, {0, 2}, 2},
    {"last cools down", 3, 1u << 2, 0, {0, 1}, 2},
    {"two of four cool down", 4, (1u << 0) | (1u << 2), 0, {1, 3}, 2},
    {"all but one cool down", 3, (1u << 0) | (1u << 1), 0, {2}, 1},
    {"all cool down: all are probed", 3, 7, 0, {0, 1, 2}, 3},
    {"the only one cools down: probed", 1, 1, 0, {0}, 1},
    {"expired cooldown is not skipped", 3, 0, 1u << 1, {0, 1, 2}, 3},
    {"expired and cooling", 3, 1u << 0, 1u << 1, {1, 2}, 2},
};

static void
test_begin_order_table(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;

    (void)state;
    for (size_t i = 0; i < NELEM(order_cases); i++) {
        const struct order_case *o = &order_cases[i];
        int64_t now = clock_wall_ms();
        struct conf c;
        struct plan p;

        make_conf(&c, o->nproviders);
        clear_health(health);
        for (size_t k = 0; k < o->nproviders; k++) {
            if (o->cooling & (1u << k))
                health[k].cooldown_until_ms = now + MINUTE_MS;
            if (o->expired & (1u << k))
                health[k].cooldown_until_ms = now - MINUTE_MS;
        }
        plan_begin(&p, &c, health, &rng);
        if (p.n != o->nwant)
            fail_msg("%s: %zu providers in the round, want %zu", o->what,
                     p.n, o->nwant);
        for (size_t k = 0; k < o->nwant; k++)
            if (p.order[k] != o->want[k])
                fail_msg("%s: provider %zu of the round is %zu, want %zu",
                         o->what, k, p.order[k], o->want[k]);
        for (size_t k = 0; k < o->nproviders; k++)
            if (plan_cooling_down(&p, k) != !!(o->cooling & (1u << k)))
                fail_msg("%s: plan_cooling_down(%zu) is wrong", o->what, k);
        if (p.round != 0 || p.next != 0 || p.done || p.retryable ||
            p.retry_at_ms != 0 || p.retry_after_ms != 0)
            fail_msg("%s: round 0 does not start clean", o->what);
        conf_free(&c);
    }
}

/* Without shared health, nothing cools down. */
static void
test_begin_without_health(void **state)
{
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 4);
    plan_begin(&p, &c, NULL, &rng);
    assert_int_equal(p.n, 4);
    for (size_t k = 0; k < 4; k++) {
        assert_int_equal(p.order[k], k);
        assert_int_equal(plan_cooling_down(&p, k), 0);
    }
    /* the health notes have nowhere to go, and do nothing */
    plan_note_start(&p, 0, 1);
    plan_note_failure(&p, 0, ANSWER_FAILED, "test");
    plan_note_success(&p, 0, 1);
    conf_free(&c);
}

/* plan_take walks the round in order; plan_has_next says when it ends. */
static void
test_take_walks_round(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 4);
    clear_health(health);
    health[2].cooldown_until_ms = clock_wall_ms() + MINUTE_MS;
    plan_begin(&p, &c, health, &rng);
    assert_true(plan_has_next(&p));
    assert_int_equal(plan_take(&p), 0);
    assert_true(plan_has_next(&p));
    assert_int_equal(plan_take(&p), 1);
    assert_true(plan_has_next(&p));
    assert_int_equal(plan_take(&p), 3);
    assert_false(plan_has_next(&p));
    conf_free(&c);

    /* a single provider: one take and the round is over */
    make_conf(&c, 1);
    plan_begin(&p, &c, NULL, &rng);
    assert_true(plan_has_next(&p));
    assert_int_equal(plan_take(&p), 0);
    assert_false(plan_has_next(&p));
    conf_free(&c);
}

struct backoff_case {
    const char *what;
    long long base;
};

static const struct backoff_case backoff_cases[] = {
    {"smallest base", 1},
    {"base 100", 100},
    {"default base", 200},
    {"base 3000, capped from round 1", 3000},
    {"base above the cap", 20000},
    {"largest base", 60000},
};

#define DRAWS 1000

/* retry_base_ms * 2^min(round, 10), then half to all of it, at most
 * PLAN_BACKOFF_MAX_MS; the jitter spreads over its range. */
static void
test_backoff_table(void **state)
{
    uint64_t rng = SEED;

    (void)state;
    for (size_t i = 0; i < NELEM(backoff_cases); i++) {
        const struct backoff_case *b = &backoff_cases[i];
        struct conf c;

        make_conf(&c, 1);
        c.upstream.retry_base_ms = b->base;
        for (long long round = 0; round <= 12; round++) {
            double lo, hi, min = 1e300, max = -1;

            backoff_bounds(&c, round, &lo, &hi);
            for (int d = 0; d < DRAWS; d++) {
                double v = plan_backoff_ms(&c, round, &rng);

                if (v < lo || v > hi)
                    fail_msg("%s, round %lld: %.3f not in [%.3f, %.3f]",
                             b->what, round, v, lo, hi);
                if (v < min)
                    min = v;
                if (v > max)
                    max = v;
            }
            /* Where the range is not collapsed by the cap, the draws
             * must cover most of it: jitter, not a constant. */
            if (hi - lo >= 1.0 &&
                (min > lo + 0.1 * (hi - lo) || max < hi - 0.1 * (hi - lo)))
                fail_msg("%s, round %lld: draws in [%.3f, %.3f] of "
                         "[%.3f, %.3f]", b->what, round, min, max, lo, hi);
        }
        conf_free(&c);
    }
}

/* The doubling itself, at the points that tell it apart from others. */
static void
test_backoff_doubles(void **state)
{
    static const struct {
        long long round;
        double step; /* retry_base_ms 1 */
    } steps[] = {{0, 1}, {1, 2}, {2, 4}, {3, 8}, {9, 512},
                 {10, 1024}, {11, 1024}, {12, 1024}, {40, 1024}};
    uint64_t rng = SEED;
    struct conf c;

    (void)state;
    make_conf(&c, 1);
    c.upstream.retry_base_ms = 1;
    for (size_t i = 0; i < NELEM(steps); i++) {
        for (int d = 0; d < 100; d++) {
            double v = plan_backoff_ms(&c, steps[i].round, &rng);

            if (v < 0.5 * steps[i].step || v > steps[i].step)
                fail_msg("round %lld: %.4f, want within [%.1f, %.1f]",
                         steps[i].round, v, 0.5 * steps[i].step,
                         steps[i].step);
        }
    }
    conf_free(&c);
}

/* The jitter comes from the caller's state: the same seed gives the same
 * waits, another seed other waits, and each draw moves the state on. */
static void
test_backoff_seeded(void **state)
{
    uint64_t a = SEED, b = SEED, other = SEED ^ 0xdeadbeef;
    int differ = 0;
    struct conf c;

    (void)state;
    make_conf(&c, 1);
    c.upstream.retry_base_ms = 1000;
    for (int d = 0; d < 50; d++) {
        uint64_t before = a;
        double va = plan_backoff_ms(&c, 0, &a);
        double vb = plan_backoff_ms(&c, 0, &b);
        double vo = plan_backoff_ms(&c, 0, &other);

        if (va != vb)
            fail_msg("draw %d: %.3f and %.3f from the same seed", d, va, vb);
        if (a == before)
            fail_msg("draw %d: the state did not move", d);
        differ += va != vo;
    }
    assert_true(differ > 25);
    conf_free(&c);
}

struct failed_case {
    const char *what;
    enum answer_status status;
    long http_status;
    long retry_after_s;
    int done;
    int retryable;
    double retry_after_ms;
};

static const struct failed_case failed_cases[] = {
    /* The request's own fault: no provider would answer better. */
    {"400", ANSWER_HTTP_ERROR, 400, 0, 1, 0, 0},
    {"401", ANSWER_HTTP_ERROR, 401, 0, 1, 0, 0},
    {"403", ANSWER_HTTP_ERROR, 403, 0, 1, 0, 0},
    {"404", ANSWER_HTTP_ERROR, 404, 0, 1, 0, 0},
    {"413", ANSWER_HTTP_ERROR, 413, 0, 1, 0, 0},
    {"422", ANSWER_HTTP_ERROR, 422, 0, 1, 0, 0},
    {"499", ANSWER_HTTP_ERROR, 499, 0, 1, 0, 0},
    /* 408 moves on to the next provider. Per plan.c's retryable(), the
     * manual and conf/chatfcgi.conf ("unreachable, 429, 5xx, a broken
     * transfer; not a timeout") it does not earn another round. */
    {"408", ANSWER_HTTP_ERROR, 408, 0, 0, 0, 0},
    /* Overloaded or broken: worth another round. */
    {"429", ANSWER_HTTP_ERROR, 429, 0, 0, 1, 0},
    {"500", ANSWER_HTTP_ERROR, 500, 0, 0, 1, 0},
    {"502", ANSWER_HTTP_ERROR, 502, 0, 0, 1, 0},
    {"503", ANSWER_HTTP_ERROR, 503, 0, 0, 1, 0},
    {"504", ANSWER_HTTP_ERROR, 504, 0, 0, 1, 0},
    {"599", ANSWER_HTTP_ERROR, 599, 0, 0, 1, 0},
    /* An error object in a 200 stream: the provider's failure, as a 5xx
     * is, not the request's. */
    {"an error mid-stream", ANSWER_HTTP_ERROR, 200, 0, 0, 1, 0},
    {"unreachable", ANSWER_UNREACHABLE, 0, 0, 0, 1, 0},
    {"broken transfer", ANSWER_FAILED, 0, 0, 0, 1, 0},
    /* Waiting again would only double the wait, or get the same. */
    {"timeout", ANSWER_TIMEOUT, 0, 0, 0, 0, 0},
    {"bad answer", ANSWER_BAD, 200, 0, 0, 0, 0},
    /* Only an HTTP error's status can end the plan. */
    {"timeout with a 400 status", ANSWER_TIMEOUT, 400, 0, 0, 0, 0},
    {"bad answer with a 400 status", ANSWER_BAD, 400, 0, 0, 0, 0},
    /* Retry-After, in seconds, kept in milliseconds. */
    {"429 with Retry-After", ANSWER_HTTP_ERROR, 429, 7, 0, 1, 7000},
    {"503 with Retry-After", ANSWER_HTTP_ERROR, 503, 120, 0, 1, 120000},
    {"Retry-After 0", ANSWER_HTTP_ERROR, 503, 0, 0, 1, 0},
    {"negative Retry-After ignored", ANSWER_HTTP_ERROR, 503, -5, 0, 1, 0},
};

static void
test_failed_table(void **state)
{
    uint64_t rng = SEED;
    struct conf c;

    (void)state;
    make_conf(&c, 2);
    for (size_t i = 0; i < NELEM(failed_cases); i++) {
        const struct failed_case *f = &failed_cases[i];
        struct plan p;

        plan_begin(&p, &c, NULL, &rng);
        plan_failed(&p, f->status, f->http_status, f->retry_after_s);
        if (p.done != f->done)
            fail_msg("%s: done %d, want %d", f->what, p.done, f->done);
        if (!f->done && p.retryable != f->retryable)
            fail_msg("%s: retryable %d, want %d", f->what, p.retryable,
                     f->retryable);
        if (!f->done && p.retry_after_ms != f->retry_after_ms)
            fail_msg("%s: retry_after_ms %.0f, want %.0f", f->what,
                     p.retry_after_ms, f->retry_after_ms);
        /* a failure never changes where the round is */
        if (p.next != 0 || p.n != 2 || p.retry_at_ms != 0)
            fail_msg("%s: the round moved", f->what);
    }
    conf_free(&c);
}

/* Several failures in one round: one worth a retry is enough, the
 * longest Retry-After wins, and a final failure ends it all. */
static void
test_failed_accumulates(void **state)
{
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 3);
    plan_begin(&p, &c, NULL, &rng);
    plan_failed(&p, ANSWER_TIMEOUT, 0, 0);
    assert_int_equal(p.retryable, 0);
    plan_failed(&p, ANSWER_HTTP_ERROR, 503, 3);
    assert_int_equal(p.retryable, 1);
    plan_failed(&p, ANSWER_BAD, 200, 0);
    assert_int_equal(p.retryable, 1); /* stays */
    plan_failed(&p, ANSWER_HTTP_ERROR, 429, 10);
    plan_failed(&p, ANSWER_HTTP_ERROR, 429, 5);
    assert_true(p.retry_after_ms == 10000);
    assert_int_equal(p.done, 0);
    plan_failed(&p, ANSWER_HTTP_ERROR, 400, 0);
    assert_int_equal(p.done, 1);
    conf_free(&c);
}

#define NOW 1000000.0

struct schedule_case {
    const char *what;
    long long retries;
    long long base;
    long long round; /* rounds run before this one */
    enum answer_status status;
    long http_status;
    long retry_after_s;
    double deadline; /* after NOW; 0: none */
    int done;
    double exact; /* retry_at_ms - NOW when it must be exact; 0: backoff */
};

static const struct schedule_case schedule_cases[] = {
    {"retryable, round 0", 2, 100, 0, ANSWER_HTTP_ERROR, 503, 0, 0, 0, 0},
    {"retryable, round 1", 2, 100, 1, ANSWER_UNREACHABLE, 0, 0, 0, 0, 0},
    {"broken transfer", 1, 100, 0, ANSWER_FAILED, 0, 0, 0, 0, 0},
    {"not retryable: timeout", 2, 100, 0, ANSWER_TIMEOUT, 0, 0, 0, 1, 0},
    {"not retryable: bad answer", 2, 100, 0, ANSWER_BAD, 200, 0, 0, 1, 0},
    {"not retryable, even with Retry-After", 2, 100, 0, ANSWER_TIMEOUT, 0,
     5, 0, 1, 0},
    {"no retries configured", 0, 100, 0, ANSWER_HTTP_ERROR, 503, 0, 0, 1, 0},
    {"retries spent", 2, 100, 2, ANSWER_HTTP_ERROR, 503, 0, 0, 1, 0},
    {"last retry left", 2, 100, 1, ANSWER_HTTP_ERROR, 503, 0, 0, 0, 0},
    {"one retry, spent", 1, 100, 1, ANSWER_HTTP_ERROR, 503, 0, 0, 1, 0},
    /* A longer Retry-After wins, exactly. */
    {"Retry-After longer than backoff", 2, 100, 0, ANSWER_HTTP_ERROR, 429,
     3, 0, 0, 3000},
    {"Retry-After at round 1", 2, 100, 1, ANSWER_HTTP_ERROR, 503, 2, 0, 0,
     2000},
    {"Retry-After beyond the cap", 2, 100, 0, ANSWER_HTTP_ERROR, 429, 60, 0,
     0, 60000},
    {"Retry-After shorter than backoff", 2, 4000, 0, ANSWER_HTTP_ERROR, 429,
     1, 0, 0, 0},
    /* The deadline: 0 is none; else the wait must end before it. */
    {"deadline far off", 2, 100, 0, ANSWER_HTTP_ERROR, 503, 0, 100000, 0, 0},
    {"deadline before the shortest backoff", 2, 100, 0, ANSWER_HTTP_ERROR,
     503, 0, 49, 1, 0},
    {"deadline at the shortest backoff", 2, 100, 0, ANSWER_HTTP_ERROR, 503,
     0, 50, 1, 0},
    {"deadline past the longest backoff", 2, 100, 0, ANSWER_HTTP_ERROR, 503,
     0, 101, 0, 0},
    {"Retry-After passes the deadline", 2, 100, 0, ANSWER_HTTP_ERROR, 429,
     30, 10000, 1, 0},
    {"Retry-After within the deadline", 2, 100, 0, ANSWER_HTTP_ERROR, 429,
     30, 31000, 0, 30000},
    {"no deadline, a long Retry-After", 2, 100, 0, ANSWER_HTTP_ERROR, 429,
     86400, 0, 0, 86400000},
};

static void
test_schedule_retry_table(void **state)
{
    uint64_t rng = SEED;

    (void)state;
    for (size_t i = 0; i < NELEM(schedule_cases); i++) {
        const struct schedule_case *s = &schedule_cases[i];
        double deadline = s->deadline > 0 ? NOW + s->deadline : 0;
        double lo, hi;
        struct conf c;
        struct plan p;

        make_conf(&c, 2);
        c.upstream.retries = s->retries;
        c.upstream.retry_base_ms = s->base;
        plan_begin(&p, &c, NULL, &rng);
        for (long long r = 0; r < s->round; r++)
            plan_next_round(&p);
        while (plan_has_next(&p)) {
            plan_take(&p);
            plan_failed(&p, s->status, s->http_status, s->retry_after_s);
        }
        plan_schedule_retry(&p, NOW, deadline);
        if (p.done != s->done)
            fail_msg("%s: done %d, want %d", s->what, p.done, s->done);
        if (s->done) {
            if (p.retry_at_ms != 0)
                fail_msg("%s: done, yet a retry at %.0f", s->what,
                         p.retry_at_ms);
            conf_free(&c);
            continue;
        }
        backoff_bounds(&c, s->round, &lo, &hi);
        if (s->exact > 0 && p.retry_at_ms != NOW + s->exact)
            fail_msg("%s: retry after %.3f ms, want exactly %.0f", s->what,
                     p.retry_at_ms - NOW, s->exact);
        if (s->exact == 0 &&
            (p.retry_at_ms < NOW + lo || p.retry_at_ms > NOW + hi))
            fail_msg("%s: retry after %.3f ms, want within [%.0f, %.0f]",
                     s->what, p.retry_at_ms - NOW, lo, hi);
        conf_free(&c);
    }
}

/* The next round: counted, its retry state cleared, its order worked out
 * again from the providers' health now. */
static void
test_next_round(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 3);
    clear_health(health);
    health[0].cooldown_until_ms = clock_wall_ms() + MINUTE_MS;
    plan_begin(&p, &c, health, &rng);
    assert_int_equal(p.n, 2);
    while (plan_has_next(&p)) {
        plan_take(&p);
        plan_failed(&p, ANSWER_HTTP_ERROR, 503, 1);
    }
    plan_schedule_retry(&p, NOW, 0);
    assert_int_equal(p.done, 0);
    assert_true(p.retry_at_ms > 0);

    /* meanwhile provider 1 cools down, and provider 0 recovers */
    health[1].cooldown_until_ms = clock_wall_ms() + MINUTE_MS;
    health[0].cooldown_until_ms = 0;
    plan_next_round(&p);
    assert_int_equal(p.round, 1);
    assert_true(p.retry_at_ms == 0);
    assert_true(p.retry_after_ms == 0);
    assert_int_equal(p.retryable, 0);
    assert_int_equal(p.done, 0);
    assert_int_equal(p.next, 0);
    assert_int_equal(p.n, 2);
    assert_int_equal(plan_take(&p), 0);
    assert_int_equal(plan_take(&p), 2);
    assert_false(plan_has_next(&p));

    /* every provider cooling: all are probed */
    health[0].cooldown_until_ms = health[2].cooldown_until_ms =
        clock_wall_ms() + MINUTE_MS;
    plan_next_round(&p);
    assert_int_equal(p.round, 2);
    assert_int_equal(p.n, 3);
    conf_free(&c);
}

static const enum scoreboard_upstream_error kinds[] = {
    [ANSWER_TIMEOUT] = SCOREBOARD_UP_TIMEOUT,
    [ANSWER_UNREACHABLE] = SCOREBOARD_UP_UNREACHABLE,
    [ANSWER_HTTP_ERROR] = SCOREBOARD_UP_HTTP_ERROR,
    [ANSWER_BAD] = SCOREBOARD_UP_BAD_ANSWER,
    [ANSWER_FAILED] = SCOREBOARD_UP_FAILED,
};

static const struct {
    const char *what;
    enum answer_status status;
} failure_kinds[] = {
    {"timeout", ANSWER_TIMEOUT},
    {"unreachable", ANSWER_UNREACHABLE},
    {"HTTP error", ANSWER_HTTP_ERROR},
    {"bad answer", ANSWER_BAD},
    {"failed", ANSWER_FAILED},
};

/* Each failure is counted under its kind, and only there; it counts
 * towards the row whatever its kind. */
static void
test_note_failure_kinds(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    c.upstream.cooldown_failures = 100;
    for (size_t i = 0; i < NELEM(failure_kinds); i++) {
        enum answer_status status = failure_kinds[i].status;

        clear_health(health);
        plan_begin(&p, &c, health, &rng);
        plan_note_failure(&p, 1, status, "test");
        assert_int_equal(answer_error_kind(status), kinds[status]);
        for (size_t k = 0; k < SCOREBOARD_UP_KINDS; k++)
            if (health[1].errors[k] != (uint64_t)(k == kinds[status]))
                fail_msg("%s: errors[%zu] is %llu", failure_kinds[i].what,
                         k, (unsigned long long)health[1].errors[k]);
        if (health[1].failures != 1)
            fail_msg("%s: failures %u, want 1", failure_kinds[i].what,
                     health[1].failures);
        /* the other provider's health is its own */
        if (health[0].failures != 0 ||
            health[0].errors[kinds[status]] != 0)
            fail_msg("%s: provider 0 was charged", failure_kinds[i].what);
    }
    conf_free(&c);
}

/* cooldown_failures in a row: skipped by everyone for cooldown_s. */
static void
test_note_failure_cooldown(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    int64_t before, after;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 3);
    clear_health(health);
    plan_begin(&p, &c, health, &rng);
    plan_note_failure(&p, 1, ANSWER_HTTP_ERROR, "503");
    plan_note_failure(&p, 1, ANSWER_UNREACHABLE, "refused");
    assert_int_equal(health[1].failures, 2);
    assert_true(health[1].cooldown_until_ms == 0);
    assert_true(health[1].cooldowns == 0);
    assert_false(plan_cooling_down(&p, 1));

    before = clock_wall_ms();
    plan_note_failure(&p, 1, ANSWER_TIMEOUT, "timeout");
    after = clock_wall_ms();
    assert_int_equal(health[1].failures, 3);
    assert_true(health[1].cooldown_until_ms >= before + 30000);
    assert_true(health[1].cooldown_until_ms <= after + 30000);
    assert_true(health[1].cooldowns == 1);
    assert_true(plan_cooling_down(&p, 1));
    assert_false(plan_cooling_down(&p, 0));
    assert_false(plan_cooling_down(&p, 2));

    /* every worker's next plan skips it */
    plan_begin(&p, &c, health, &rng);
    assert_int_equal(p.n, 2);
    assert_int_equal(p.order[0], 0);
    assert_int_equal(p.order[1], 2);

    /* a probe that fails again cools it down again */
    plan_note_failure(&p, 1, ANSWER_TIMEOUT, "timeout");
    assert_int_equal(health[1].failures, 4);
    assert_true(health[1].cooldowns == 2);
    assert_true(plan_cooling_down(&p, 1));
    conf_free(&c);
}

/* cooldown_failures 1: the first failure cools down. */
static void
test_note_failure_cooldown_at_once(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    c.upstream.cooldown_failures = 1;
    c.upstream.cooldown_s = 5;
    clear_health(health);
    plan_begin(&p, &c, health, &rng);
    plan_note_failure(&p, 0, ANSWER_FAILED, "broken");
    assert_true(health[0].cooldowns == 1);
    assert_true(health[0].cooldown_until_ms > clock_wall_ms() + 4000);
    assert_true(health[0].cooldown_until_ms <= clock_wall_ms() + 5000);
    assert_true(plan_cooling_down(&p, 0));
    conf_free(&c);
}

/* cooldown_s 0 turns cooldowns off, however long the row. */
static void
test_note_failure_no_cooldown(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    c.upstream.cooldown_s = 0;
    clear_health(health);
    plan_begin(&p, &c, health, &rng);
    for (int i = 0; i < 10; i++)
        plan_note_failure(&p, 0, ANSWER_HTTP_ERROR, "500");
    assert_int_equal(health[0].failures, 10);
    assert_true(health[0].errors[SCOREBOARD_UP_HTTP_ERROR] == 10);
    assert_true(health[0].cooldown_until_ms == 0);
    assert_true(health[0].cooldowns == 0);
    assert_false(plan_cooling_down(&p, 0));
    conf_free(&c);
}

/* A request the client cancelled says nothing about the provider. */
static void
test_note_failure_client_gone(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    struct scoreboard_provider zero;
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    c.upstream.cooldown_failures = 1;
    clear_health(health);
    memset(&zero, 0, sizeof(zero));
    plan_begin(&p, &c, health, &rng);
    for (int i = 0; i < 5; i++)
        plan_note_failure(&p, 0, ANSWER_CLIENT_GONE, "client gone");
    assert_memory_equal(&health[0], &zero, sizeof(zero));
    assert_false(plan_cooling_down(&p, 0));
    conf_free(&c);
}

/* A success ends the row and any cooldown, and is counted (a hedge's win
 * also as such). */
static void
test_note_success(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    clear_health(health);
    plan_begin(&p, &c, health, &rng);
    for (int i = 0; i < 3; i++)
        plan_note_failure(&p, 0, ANSWER_HTTP_ERROR, "503");
    assert_true(plan_cooling_down(&p, 0));

    plan_note_success(&p, 0, 0);
    assert_int_equal(health[0].failures, 0);
    assert_true(health[0].cooldown_until_ms == 0);
    assert_false(plan_cooling_down(&p, 0));
    assert_true(health[0].successes == 1);
    assert_true(health[0].hedges_won == 0);
    assert_true(health[0].cooldowns == 1); /* a count, not a state */

    plan_note_success(&p, 0, 1);
    assert_true(health[0].successes == 2);
    assert_true(health[0].hedges_won == 1);

    /* the row starts again: two failures do not cool it down */
    plan_note_failure(&p, 0, ANSWER_HTTP_ERROR, "503");
    plan_note_failure(&p, 0, ANSWER_HTTP_ERROR, "503");
    assert_int_equal(health[0].failures, 2);
    assert_false(plan_cooling_down(&p, 0));
    assert_true(health[0].cooldowns == 1);

    /* provider 1 untouched throughout */
    assert_true(health[1].successes == 0);
    assert_int_equal(health[1].failures, 0);
    conf_free(&c);
}

/* Every request started is an attempt; in a later round also a retry; a
 * hedge is counted as one. */
static void
test_note_start(void **state)
{
    struct scoreboard_provider health[SCOREBOARD_PROVIDERS];
    uint64_t rng = SEED;
    struct conf c;
    struct plan p;

    (void)state;
    make_conf(&c, 2);
    clear_health(health);
    plan_begin(&p, &c, health, &rng);
    plan_note_start(&p, 0, 0);
    assert_true(health[0].attempts == 1);
    assert_true(health[0].retries == 0);
    assert_true(health[0].hedges == 0);

    plan_note_start(&p, 1, 1);
    assert_true(health[1].attempts == 1);
    assert_true(health[1].retries == 0);
    assert_true(health[1].hedges == 1);

    plan_next_round(&p);
    plan_note_start(&p, 0, 0);
    assert_true(health[0].attempts == 2);
    assert_true(health[0].retries == 1);
    assert_true(health[0].hedges == 0);

    plan_next_round(&p);
    plan_note_start(&p, 1, 1);
    assert_true(health[1].attempts == 2);
    assert_true(health[1].retries == 1);
    assert_true(health[1].hedges == 2);

    /* starting is neither a success nor a failure */
    assert_true(health[0].successes == 0 && health[1].successes == 0);
    assert_int_equal(health[0].failures, 0);
    conf_free(&c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_begin_order_table),
        cmocka_unit_test(test_begin_without_health),
        cmocka_unit_test(test_take_walks_round),
        cmocka_unit_test(test_backoff_table),
        cmocka_unit_test(test_backoff_doubles),
        cmocka_unit_test(test_backoff_seeded),
        cmocka_unit_test(test_failed_table),
        cmocka_unit_test(test_failed_accumulates),
        cmocka_unit_test(test_schedule_retry_table),
        cmocka_unit_test(test_next_round),
        cmocka_unit_test(test_note_failure_kinds),
        cmocka_unit_test(test_note_failure_cooldown),
        cmocka_unit_test(test_note_failure_cooldown_at_once),
        cmocka_unit_test(test_note_failure_no_cooldown),
        cmocka_unit_test(test_note_failure_client_gone),
        cmocka_unit_test(test_note_success),
        cmocka_unit_test(test_note_start),
    };

    return cmocka_run_group_tests(tests, quiet_log, NULL);
}
