/*
 * Unit tests of listener's arithmetic: the listen backlog sized to the pool
 * (listen_backlog = 0), an explicit one, the cap at net.core.somaxconn and
 * what it says then, and the backlog a reload compares.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "conf.h"
#include "listener.h"

static void
test_sized_to_the_pool(void **state)
{
    int wanted;

    (void)state;
    /* Never below 511, the usual default, even for a small pool. */
    assert_int_equal(listener_backlog(0, 8, 4096, &wanted), 511);
    assert_int_equal(wanted, 511);
    assert_int_equal(listener_backlog(0, 511, 4096, &wanted), 511);
    /* A bigger pool: a connection for every worker that may be busy. */
    assert_int_equal(listener_backlog(0, 512, 4096, &wanted), 512);
    assert_int_equal(listener_backlog(0, 1000, 4096, &wanted), 1000);
    assert_int_equal(wanted, 1000);
    assert_int_equal(listener_backlog(0, 4096, 4096, &wanted), 4096);
}

static void
test_capped_by_somaxconn(void **state)
{
    int wanted;

    (void)state;
    assert_int_equal(listener_backlog(0, 10000, 4096, &wanted), 4096);
    assert_int_equal(wanted, 10000);
    /* Kernels before 5.4 default to 128: even the floor is capped. */
    assert_int_equal(listener_backlog(0, 8, 128, &wanted), 128);
    assert_int_equal(wanted, 511);
    /* somaxconn unknown (unreadable): no cap. */
    assert_int_equal(listener_backlog(0, 10000, -1, &wanted), 10000);
    assert_int_equal(listener_backlog(0, 10000, 0, &wanted), 10000);
    /* A raised somaxconn: the whole pool. */
    assert_int_equal(listener_backlog(0, 16384, 65535, &wanted), 16384);
}

static void
test_explicit_value_is_honoured(void **state)
{
    int wanted;

    (void)state;
    /* Below the pool too: the administrator said so. */
    assert_int_equal(listener_backlog(64, 1000, 4096, &wanted), 64);
    assert_int_equal(wanted, 64);
    assert_int_equal(listener_backlog(2048, 8, 4096, &wanted), 2048);
    /* ... but the kernel still caps it. */
    assert_int_equal(listener_backlog(8192, 8, 4096, &wanted), 4096);
    assert_int_equal(wanted, 8192);
    assert_int_equal(listener_backlog(65535, 8, -1, &wanted), 65535);
}

static void
defaults(struct conf *c)
{
    char err[CONF_ERR_LEN];

    assert_int_equal(conf_defaults(c, err), 0);
}

/* The note against this machine's own somaxconn, whatever it is. */
static void
test_note_names_the_fix(void **state)
{
    long somaxconn = listener_somaxconn();
    char note[LISTENER_NOTE_LEN], fix[64];
    struct conf c;
    int backlog;

    (void)state;
    defaults(&c);
    assert_int_equal(c.listen_backlog, 0);
    if (somaxconn <= 0)
        skip();
    c.workers = (long long)somaxconn + 1;
    backlog = listener_backlog_of(&c, note);
    assert_int_equal(backlog, (int)somaxconn);
    snprintf(fix, sizeof(fix), "sysctl -w net.core.somaxconn=%ld",
             somaxconn + 1);
    assert_non_null(strstr(note, fix));
    assert_non_null(strstr(note, "sized to the pool"));
    /* An explicit value over the cap is named as such. */
    c.listen_backlog = somaxconn + 7;
    c.workers = 2;
    assert_int_equal(listener_backlog_of(&c, note), (int)somaxconn);
    assert_non_null(strstr(note, "listen_backlog = "));
    /* Within the cap: nothing to say. */
    c.listen_backlog = 0;
    if (somaxconn >= LISTENER_BACKLOG_MIN) {
        assert_int_equal(listener_backlog_of(&c, note),
                         LISTENER_BACKLOG_MIN);
        assert_string_equal(note, "");
    }
    conf_free(&c);
}

/* A reload compares the backlog asked for: a pool sized anew under
 * listen_backlog = 0 is a change, the same number spelled out is not. */
static void
test_reload_compares_the_backlog_asked_for(void **state)
{
    struct listener_keys k;
    struct conf c;

    (void)state;
    defaults(&c);
    listener_keys_of(&k, &c);
    assert_string_equal(k.value[LISTENER_BACKLOG], "511");
    c.workers = 1000;
    listener_keys_of(&k, &c);
    assert_string_equal(k.value[LISTENER_BACKLOG], "1000");
    c.listen_backlog = 1000;
    listener_keys_of(&k, &c);
    assert_string_equal(k.value[LISTENER_BACKLOG], "1000");
    c.workers = 20000; /* over what conf allows: the arithmetic holds */
    c.listen_backlog = 0;
    listener_keys_of(&k, &c);
    assert_string_equal(k.value[LISTENER_BACKLOG], "20000");
    conf_free(&c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sized_to_the_pool),
        cmocka_unit_test(test_capped_by_somaxconn),
        cmocka_unit_test(test_explicit_value_is_honoured),
        cmocka_unit_test(test_note_names_the_fix),
        cmocka_unit_test(test_reload_compares_the_backlog_asked_for),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
