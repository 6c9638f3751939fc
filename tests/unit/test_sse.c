/*
 * Unit tests of the incremental SSE parser: line endings, comments, fields,
 * multi-line data, caps, and cuts anywhere (including the regressions the
 * fuzzer found: an empty feed between a CR and its LF).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "sse.h"

#define MAX_EVENTS 16

struct events {
    char text[1024]; /* the events' data, each followed by '|' */
    size_t len;
    int count;
    int stop_after; /* return -1 after this many (0: never) */
};

static int
collect(void *arg, const char *data, size_t len)
{
    struct events *e = arg;

    assert_true(e->len + len + 1 < sizeof(e->text));
    memcpy(e->text + e->len, data, len);
    e->len += len;
    e->text[e->len++] = '|';
    e->text[e->len] = '\0';
    e->count++;
    return e->stop_after && e->count >= e->stop_after ? -1 : 0;
}

/* Feed the pieces (NULL-terminated) and return what came out. */
static int
feed(struct events *e, size_t max_line, const char *const *pieces)
{
    struct sse_parser p;
    int rc = 0;

    sse_init(&p, max_line, 4096, collect, e);
    for (size_t i = 0; pieces[i] && rc == 0; i++)
        rc = sse_feed(&p, pieces[i], strlen(pieces[i]));
    sse_cleanup(&p);
    return rc;
}

static void
test_events_and_line_endings(void **state)
{
    static const struct {
        const char *const pieces[6];
        const char *want;
    } cases[] = {
        {{"data: a\n\n", NULL}, "a|"},
        {{"data: a\r\n\r\n", NULL}, "a|"},
        {{"data: a\r\r", NULL}, "a|"},
        {{"data:a\n\ndata: b\n\n", NULL}, "a|b|"},
        {{"data: a\ndata: b\n\n", NULL}, "a\nb|"},
        {{": keep-alive\n\ndata: x\n\n", NULL}, "x|"},
        {{"event: delta\nid: 1\nretry: 5\ndata: x\n\n", NULL}, "x|"},
        {{"data\n\n", NULL}, "|"},
        {{"data:  two spaces\n\n", NULL}, " two spaces|"},
        {{"event: only\n\n", NULL}, ""},
        {{"dat", "a: sp", "lit\n", "\n", NULL}, "split|"},
        {{"data: a\r", "\ndata: b\r\n\r\n", NULL}, "a\nb|"},
        /* Regressions from the fuzzer: an empty feed keeps a pending CR. */
        {{"data: a\r", "", "\ndata: b\r\n\r\n", NULL}, "a\nb|"},
        {{"data\r", "", "\n", NULL}, ""},
        {{"data: no end", NULL}, ""},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        struct events e = {.len = 0};

        assert_int_equal(feed(&e, 256, cases[i].pieces), 0);
        if (strcmp(e.text, cases[i].want) != 0)
            fail_msg("case %zu: got '%s', want '%s'", i, e.text,
                     cases[i].want);
    }
}

/* Cutting a stream anywhere gives the events of feeding it whole. */
static void
test_any_cut_gives_the_same_events(void **state)
{
    static const char stream[] =
        ": hi\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\nevent: e\r"
        "data: z\r\r";
    struct events whole = {.len = 0};
    const char *const all[] = {stream, NULL};

    (void)state;
    assert_int_equal(feed(&whole, 256, all), 0);
    assert_string_equal(whole.text, "{\"a\":1}|x\ny|z|");
    for (size_t a = 0; a <= strlen(stream); a++) {
        for (size_t b = a; b <= strlen(stream); b += 3) {
            char p1[128], p2[128], p3[128];
            const char *const pieces[] = {p1, p2, p3, NULL};
            struct events e = {.len = 0};

            snprintf(p1, sizeof(p1), "%.*s", (int)a, stream);
            snprintf(p2, sizeof(p2), "%.*s", (int)(b - a), stream + a);
            snprintf(p3, sizeof(p3), "%s", stream + b);
            assert_int_equal(feed(&e, 256, pieces), 0);
            assert_string_equal(e.text, whole.text);
        }
    }
}

static void
test_caps_and_stop(void **state)
{
    const char *const long_line[] = {"data: 0123456789abcdef\n\n", NULL};
    const char *const long_split[] = {"data: 01234567", "89abcdef", NULL};
    const char *const two[] = {"data: a\n\ndata: b\n\n", NULL};
    struct events e = {.len = 0};

    (void)state;
    assert_int_equal(feed(&e, 16, long_line), -1);
    memset(&e, 0, sizeof(e));
    assert_int_equal(feed(&e, 16, long_split), -1);
    memset(&e, 0, sizeof(e));
    e.stop_after = 1;
    assert_int_equal(feed(&e, 16, two), -1);
    assert_string_equal(e.text, "a|");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_events_and_line_endings),
        cmocka_unit_test(test_any_cut_gives_the_same_events),
        cmocka_unit_test(test_caps_and_stop),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
