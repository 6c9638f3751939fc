/*
 * Unit tests of pool: when a starting pool is whole or ready anyway, and
 * how a dynamic pool grows in doubling rounds from its floor to a burst,
 * never beyond its most, and shrinks to its spares; how often its idle
 * workers wake.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "pool.h"

static void
test_readiness(void **state)
{
    (void)state;
    assert_int_equal(pool_readiness(300, 300, 300, 5, 1000), POOL_WHOLE);
    assert_int_equal(pool_readiness(299, 300, 299, 5, 1000), POOL_NOT_YET);
    assert_int_equal(pool_readiness(0, 300, 0, 5, 1000), POOL_NOT_YET);
    /* Whole is whole, late or not. */
    assert_int_equal(pool_readiness(300, 300, 300, 5000, 1000), POOL_WHOLE);
    /* At the bound: ready with what serves, or not at all. */
    assert_int_equal(pool_readiness(299, 300, 299, 1000, 1000),
                     POOL_PARTIAL);
    assert_int_equal(pool_readiness(1, 300, 1, 1500, 1000), POOL_PARTIAL);
    assert_int_equal(pool_readiness(0, 300, 0, 1500, 1000), POOL_EMPTY);
    /* The control worker alone serves no chat. */
    assert_int_equal(pool_readiness(1, 301, 0, 1500, 1000), POOL_EMPTY);
}

static const struct pool_limits shipped = {.min_spare = 1, .max_spare = 3,
                                           .most = 1000};

static void
test_quiet_pool_forks_nothing(void **state)
{
    struct pool_counts n = {.total = 2, .idle = 2};
    unsigned rate = 8;

    (void)state;
    assert_int_equal(pool_grow(&n, 0, &shipped, &rate), 0);
    assert_int_equal(rate, 1);
    /* Waiting with an idle worker: it takes the connection at once. */
    rate = 4;
    assert_int_equal(pool_grow(&n, 1, &shipped, &rate), 0);
    assert_int_equal(rate, 4);
}

static void
test_spares_missing(void **state)
{
    struct pool_limits l = {.min_spare = 3, .max_spare = 6, .most = 50};
    struct pool_counts n = {.total = 5, .idle = 1};
    unsigned rate = 1;

    (void)state;
    assert_int_equal(pool_grow(&n, 0, &l, &rate), 2);
    assert_int_equal(rate, 1);
    /* Starting workers count as spares: they are about to be idle. */
    n.starting = 2;
    assert_int_equal(pool_grow(&n, 0, &l, &rate), 0);
}

/* A round waits for the workers it forked: no fork while some start,
 * and the rate is kept for the round after. */
static void
test_round_waits_for_its_workers(void **state)
{
    struct pool_counts n = {.total = 10, .idle = 0, .starting = 8};
    unsigned rate = 16;

    (void)state;
    assert_int_equal(pool_grow(&n, 1, &shipped, &rate), 0);
    assert_int_equal(rate, 16);
    assert_int_equal(pool_grow(&n, 0, &shipped, &rate), 0);
    assert_int_equal(rate, 16);
    n.starting = 0;
    assert_int_equal(pool_grow(&n, 1, &shipped, &rate), 16);
    assert_int_equal(rate, 32);
}

/* A burst of 1000 held connections on a pool of 2: every round's workers
 * take a connection each, until none waits. */
static void
test_burst_grows_in_doubling_rounds(void **state)
{
    struct pool_counts n = {.total = 2};
    unsigned rate = 1, rounds = 0, burst = 1000;

    (void)state;
    while (n.total < burst) {
        unsigned forked = pool_grow(&n, 1, &shipped, &rate);

        assert_true(forked > 0);
        rounds++;
        n.total += forked; /* they start, and each takes a connection */
        assert_true(n.total <= shipped.most);
    }
    assert_int_equal(n.total, 1000);
    assert_true(rounds <= 10);
    /* At the top, nothing more, and the next shortage starts over. */
    assert_int_equal(pool_grow(&n, 1, &shipped, &rate), 0);
    assert_int_equal(rate, 1);
}

static void
test_rate_has_a_ceiling(void **state)
{
    struct pool_limits l = {.min_spare = 1, .max_spare = 3, .most = 16384};
    struct pool_counts n = {.total = 100};
    unsigned rate = POOL_SPAWN_RATE_MAX;

    (void)state;
    assert_int_equal(pool_grow(&n, 1, &l, &rate), POOL_SPAWN_RATE_MAX);
    assert_int_equal(rate, POOL_SPAWN_RATE_MAX);
    /* The last round fills the room left, no more. */
    n.total = 16000;
    assert_int_equal(pool_grow(&n, 1, &l, &rate), 384);
    assert_int_equal(rate, 1);
}

static void
test_min_spare_above_the_rate(void **state)
{
    struct pool_limits l = {.min_spare = 5, .max_spare = 10, .most = 100};
    struct pool_counts n = {.total = 20};
    unsigned rate = 1;

    (void)state;
    assert_int_equal(pool_grow(&n, 1, &l, &rate), 5);
    assert_int_equal(rate, 2);
    rate = 0; /* never below 1 */
    n.total = 25;
    assert_int_equal(pool_grow(&n, 1, &l, &rate), 5);
}

static void
test_shrink(void **state)
{
    struct pool_counts n = {.total = 40, .idle = 10, .starting = 5};

    (void)state;
    assert_int_equal(pool_shrink(&n, &shipped), 7);
    n.idle = 3;
    assert_int_equal(pool_shrink(&n, &shipped), 0);
    n.idle = 0;
    assert_int_equal(pool_shrink(&n, &shipped), 0);
}

/* The pool wakes about POOL_WAKES_PER_S times a second in all: 1 s for
 * small pools, longer for big ones, never past 60 s. */
static void
test_idle_wake(void **state)
{
    (void)state;
    assert_int_equal(pool_idle_wake_ms(1), 1000);
    assert_int_equal(pool_idle_wake_ms(8), 1000);
    assert_int_equal(pool_idle_wake_ms(100), 1000);
    assert_int_equal(pool_idle_wake_ms(250), 2500);
    assert_int_equal(pool_idle_wake_ms(4000), 40000);
    assert_int_equal(pool_idle_wake_ms(6000), 60000);
    assert_int_equal(pool_idle_wake_ms(10000), 60000);
    assert_int_equal(pool_idle_wake_ms(0xffffffffu), 60000);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_readiness),
        cmocka_unit_test(test_quiet_pool_forks_nothing),
        cmocka_unit_test(test_spares_missing),
        cmocka_unit_test(test_round_waits_for_its_workers),
        cmocka_unit_test(test_burst_grows_in_doubling_rounds),
        cmocka_unit_test(test_rate_has_a_ceiling),
        cmocka_unit_test(test_min_spare_above_the_rate),
        cmocka_unit_test(test_shrink),
        cmocka_unit_test(test_idle_wake),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
