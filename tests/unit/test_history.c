/*
 * Unit tests of history: adding messages (as they are and from their
 * stored JSON form) and history_trim_start, the rule that keeps a session
 * under its message and byte limits by whole pairs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "history.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

static void
test_add_and_read(void **state)
{
    struct history h;

    (void)state;
    history_init(&h, 1024);
    assert_int_equal(h.count, 0);
    assert_int_equal(history_add(&h, HISTORY_USER, "hello", 5), 0);
    assert_int_equal(history_add(&h, HISTORY_ASSISTANT, "hi there", 8), 0);
    assert_int_equal(history_add(&h, HISTORY_USER, "", 0), 0);
    assert_int_equal(history_add(&h, HISTORY_ASSISTANT, "a\0b", 3), 0);
    assert_int_equal(h.count, 4);
    assert_int_equal(h.msgs[0].role, HISTORY_USER);
    assert_int_equal(h.msgs[1].role, HISTORY_ASSISTANT);
    assert_string_equal(history_content(&h, 0), "hello");
    assert_int_equal(h.msgs[0].len, 5);
    assert_string_equal(history_content(&h, 1), "hi there");
    assert_string_equal(history_content(&h, 2), "");
    assert_int_equal(h.msgs[2].len, 0);
    assert_int_equal(h.msgs[3].len, 3);
    assert_memory_equal(history_content(&h, 3), "a\0b", 4);
    history_cleanup(&h);
}

/* The content is copied: changing the source later changes nothing. */
static void
test_add_copies(void **state)
{
    struct history h;
    char text[] = "original";

    (void)state;
    history_init(&h, 1024);
    assert_int_equal(history_add(&h, HISTORY_USER, text, strlen(text)), 0);
    memcpy(text, "changed!", 8);
    assert_string_equal(history_content(&h, 0), "original");
    history_cleanup(&h);
}

/* Many messages: past the first allocation of the message array, and
 * every content still where it was. */
static void
test_add_many(void **state)
{
    struct history h;
    char text[32];

    (void)state;
    history_init(&h, 1 << 20);
    for (int i = 0; i < 1000; i++) {
        snprintf(text, sizeof(text), "message %d", i);
        assert_int_equal(history_add(&h, i % 2 ? HISTORY_ASSISTANT
                                                : HISTORY_USER,
                                     text, strlen(text)),
                         0);
    }
    assert_int_equal(h.count, 1000);
    for (int i = 0; i < 1000; i++) {
        snprintf(text, sizeof(text), "message %d", i);
        assert_string_equal(history_content(&h, (size_t)i), text);
        assert_int_equal(h.msgs[i].role,
                         i % 2 ? HISTORY_ASSISTANT : HISTORY_USER);
    }
    history_cleanup(&h);
}

/* Over the text cap: refused, and the history is as it was. */
static void
test_add_over_cap(void **state)
{
    struct history h;

    (void)state;
    history_init(&h, 10); /* each content costs its length + 1 (NUL) */
    assert_int_equal(history_add(&h, HISTORY_USER, "12345", 5), 0);
    assert_int_equal(history_add(&h, HISTORY_ASSISTANT, "1234", 4), -1);
    assert_int_equal(h.count, 1);
    assert_int_equal(history_add(&h, HISTORY_ASSISTANT, "123", 3), 0);
    assert_int_equal(h.count, 2);
    assert_string_equal(history_content(&h, 0), "12345");
    assert_string_equal(history_content(&h, 1), "123");
    assert_int_equal(history_add(&h, HISTORY_USER, "", 0), -1);
    assert_int_equal(h.count, 2);
    history_cleanup(&h);
}

/* When the content fits but its NUL does not, nothing is kept either. */
static void
test_add_over_cap_by_nul(void **state)
{
    struct history h;

    (void)state;
    history_init(&h, 8);
    assert_int_equal(history_add(&h, HISTORY_USER, "ab", 2), 0); /* 3 */
    assert_int_equal(history_add(&h, HISTORY_USER, "cdefg", 5), -1);
    assert_int_equal(h.count, 1);
    assert_int_equal(history_add(&h, HISTORY_USER, "cdef", 4), 0); /* 8 */
    assert_string_equal(history_content(&h, 1), "cdef");
    history_cleanup(&h);
}

static void
test_reset(void **state)
{
    struct history h;

    (void)state;
    history_init(&h, 64);
    assert_int_equal(history_add(&h, HISTORY_USER, "one", 3), 0);
    history_reset(&h);
    assert_int_equal(h.count, 0);
    assert_int_equal(history_add(&h, HISTORY_ASSISTANT, "two", 3), 0);
    assert_int_equal(h.count, 1);
    assert_int_equal(h.msgs[0].role, HISTORY_ASSISTANT);
    assert_string_equal(history_content(&h, 0), "two");
    history_cleanup(&h);
    assert_int_equal(h.count, 0);
    history_cleanup(&h); /* twice is harmless */
}

static void
test_role_names(void **state)
{
    (void)state;
    assert_string_equal(history_role_name(HISTORY_USER), "user");
    assert_string_equal(history_role_name(HISTORY_ASSISTANT), "assistant");
}

struct json_item {
    const char *json;
    enum history_role role;
    const char *content;
    size_t len;
};

static void
test_add_json_accepted(void **state)
{
    static const struct json_item items[] = {
        {"{\"role\":\"user\",\"content\":\"hello\"}", HISTORY_USER, "hello",
         5},
        {"{\"role\":\"assistant\",\"content\":\"hi\"}", HISTORY_ASSISTANT,
         "hi", 2},
        {"{\"content\":\"order\",\"role\":\"user\"}", HISTORY_USER, "order",
         5},
        {" { \"role\" : \"user\" , \"content\" : \"\" } ", HISTORY_USER, "",
         0},
        {"{\"role\":\"user\",\"content\":\"a\\nb \\\"q\\\" \\u00e9\"}",
         HISTORY_USER, "a\nb \"q\" \xc3\xa9", 10},
        {"{\"role\":\"user\",\"content\":\"nul\\u0000in\"}", HISTORY_USER,
         "nul\0in", 6},
        {"{\"role\":\"user\",\"content\":\"\\ud83d\\ude00\"}", HISTORY_USER,
         "\xf0\x9f\x98\x80", 4},
        /* later versions may store more fields */
        {"{\"role\":\"assistant\",\"content\":\"x\",\"ts\":1,\"meta\":{}}",
         HISTORY_ASSISTANT, "x", 1},
    };
    struct history h;

    (void)state;
    history_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items); i++) {
        if (history_add_json(&h, items[i].json, strlen(items[i].json)) != 0)
            fail_msg("refused: %s", items[i].json);
        assert_int_equal(h.count, i + 1);
        assert_int_equal(h.msgs[i].role, items[i].role);
        assert_int_equal(h.msgs[i].len, items[i].len);
        assert_memory_equal(history_content(&h, i), items[i].content,
                            items[i].len);
    }
    history_cleanup(&h);
}

static void
test_add_json_refused(void **state)
{
    static const char *const items[] = {
        "{\"role\":\"system\",\"content\":\"x\"}",
        "{\"role\":\"tool\",\"content\":\"x\"}",
        "{\"role\":\"User\",\"content\":\"x\"}",
        "{\"role\":\"user \",\"content\":\"x\"}",
        "{\"role\":\"\",\"content\":\"x\"}",
        "{\"role\":\"user\"}",
        "{\"content\":\"x\"}",
        "{}",
        "{\"role\":\"user\",\"content\":null}",
        "{\"role\":\"user\",\"content\":42}",
        "{\"role\":\"user\",\"content\":[\"x\"]}",
        "{\"role\":\"user\",\"content\":{\"text\":\"x\"}}",
        "{\"role\":1,\"content\":\"x\"}",
        "{\"role\":null,\"content\":\"x\"}",
        "[\"user\",\"x\"]",
        "[{\"role\":\"user\",\"content\":\"x\"}]",
        "{\"msg\":{\"role\":\"user\",\"content\":\"x\"}}",
        "\"user\"",
        "",
        "{",
        "{\"role\":\"user\",\"content\":\"x\"",
        "{\"role\":\"user\",\"content\":\"x\"}}",
        "{\"role\":\"user\",\"content\":\"x\"} trailing",
        "{\"role\":\"user\",\"content\":\"x\",}",
        "{role:\"user\",content:\"x\"}",
        "{\"role\":\"user\",\"content\":\"\xff\"}",
        "{\"role\":\"user\",\"content\":\"x\" /* c */}",
    };
    struct history h;

    (void)state;
    history_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items); i++) {
        if (history_add_json(&h, items[i], strlen(items[i])) != -1)
            fail_msg("accepted: %s", items[i]);
        assert_int_equal(h.count, 0);
    }
    history_cleanup(&h);
}

/* The role is compared whole, with its length: "user" followed by an
 * escaped NUL is not "user". */
static void
test_add_json_role_with_nul_refused(void **state)
{
    static const char *const items[] = {
        "{\"role\":\"user\\u0000\",\"content\":\"x\"}",
        "{\"role\":\"assistant\\u0000junk\",\"content\":\"x\"}",
    };
    const char *accepted = NULL;
    struct history h;

    (void)state;
    history_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items) && accepted == NULL; i++)
        if (history_add_json(&h, items[i], strlen(items[i])) != -1)
            accepted = items[i];
    history_cleanup(&h); /* before failing, so that ASan reports no leak */
    if (accepted != NULL)
        fail_msg("BUG history.c history_add_json: role compared with "
                 "strcmp, accepted: %s", accepted);
}

/* The JSON length is the bound: bytes after it are not part of the item,
 * and the text need not be NUL-terminated. */
static void
test_add_json_uses_length(void **state)
{
    static const char text[] = "{\"role\":\"user\",\"content\":\"ok\"}XYZ";
    struct history h;

    (void)state;
    history_init(&h, 64);
    assert_int_equal(history_add_json(&h, text, sizeof(text) - 4), 0);
    assert_string_equal(history_content(&h, 0), "ok");
    assert_int_equal(history_add_json(&h, text, sizeof(text) - 1), -1);
    assert_int_equal(h.count, 1);
    history_cleanup(&h);
}

/* A content larger than the history's text cap is refused. */
static void
test_add_json_over_cap(void **state)
{
    static const char item[] =
        "{\"role\":\"user\",\"content\":\"0123456789\"}";
    struct history h;

    (void)state;
    history_init(&h, 10);
    assert_int_equal(history_add_json(&h, item, sizeof(item) - 1), -1);
    assert_int_equal(h.count, 0);
    history_cleanup(&h);
}

/* Build a history of n messages, user first, of the given lengths. */
static void
fill(struct history *h, const size_t *lens, size_t n)
{
    static const char text[256] = {0};

    history_init(h, 1 << 16);
    for (size_t i = 0; i < n; i++) {
        assert_true(lens[i] < sizeof(text));
        assert_int_equal(history_add(h, i % 2 ? HISTORY_ASSISTANT
                                              : HISTORY_USER,
                                     text, lens[i]),
                         0);
    }
}

struct trim_case {
    size_t lens[12];
    size_t n;
    size_t max_messages, max_bytes;
    size_t drop;
    const char *what;
};

static const struct trim_case trim_cases[] = {
    {{0}, 0, 20, 1000, 0, "empty"},
    {{5, 5}, 2, 20, 1000, 0, "one pair, under both"},
    {{5, 5, 5, 5}, 4, 4, 20, 0, "exactly at both limits"},
    {{5, 5, 5, 5, 5, 5}, 6, 20, 1000, 0, "under both"},
    /* over the message count */
    {{1, 1, 1, 1, 1, 1}, 6, 4, 1000, 2, "6 messages, max 4"},
    {{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 10, 4, 1000, 6, "10 messages, max 4"},
    {{1, 1, 1, 1, 1, 1}, 6, 2, 1000, 4, "6 messages, max 2"},
    {{1, 1, 1, 1, 1, 1}, 6, 5, 1000, 2, "odd max: 6 messages, max 5"},
    {{1, 1, 1, 1, 1, 1, 1, 1}, 8, 5, 1000, 4, "odd max: 8 messages, max 5"},
    {{1, 1, 1, 1, 1, 1}, 6, 3, 1000, 4, "odd max: 6 messages, max 3"},
    {{1, 1, 1, 1, 1, 1}, 6, 1, 1000, 4, "max 1 keeps the newest pair"},
    {{1, 1, 1, 1, 1, 1}, 6, 0, 1000, 4, "max 0 keeps the newest pair"},
    /* over max_bytes */
    {{10, 10, 10, 10, 10, 10}, 6, 20, 59, 2, "60 bytes, max 59"},
    {{10, 10, 10, 10, 10, 10}, 6, 20, 40, 2, "60 bytes, max 40"},
    {{10, 10, 10, 10, 10, 10}, 6, 20, 39, 4, "60 bytes, max 39"},
    {{100, 1, 1, 1, 1, 1}, 6, 20, 50, 2, "one big old message"},
    {{1, 1, 100, 1, 1, 1}, 6, 20, 50, 4, "big message in the middle pair"},
    {{1, 100, 1, 1}, 4, 20, 5, 2, "big old answer"},
    /* the newest pair stays even when it alone is over */
    {{1, 1, 100, 100}, 4, 20, 50, 2, "newest pair alone over max_bytes"},
    {{100, 100}, 2, 20, 50, 0, "only the newest pair, over max_bytes"},
    {{1, 1, 1, 1, 200, 0}, 6, 20, 10, 4, "newest user message over"},
    {{5, 5, 5, 5}, 4, 20, 0, 2, "max_bytes 0"},
    /* both limits: the stricter one decides */
    {{1, 1, 1, 1, 50, 50, 1, 1}, 8, 6, 1000, 2, "count decides"},
    {{1, 1, 50, 50, 1, 1, 1, 1}, 8, 6, 20, 4, "bytes decide"},
};

static void
test_trim_start(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(trim_cases); i++) {
        const struct trim_case *c = &trim_cases[i];
        struct history h;
        size_t drop;

        fill(&h, c->lens, c->n);
        drop = history_trim_start(&h, c->max_messages, c->max_bytes);
        if (drop != c->drop)
            fail_msg("%s: dropped %zu, want %zu", c->what, drop, c->drop);
        assert_int_equal(drop % 2, 0);
        history_cleanup(&h);
    }
}

/* The result is whole pairs, never the newest pair, and after it the
 * history is within both limits unless only the newest pair is left. */
static void
test_trim_start_properties(void **state)
{
    size_t lens[40];

    (void)state;
    for (size_t n = 2; n <= 40; n += 2) {
        for (size_t i = 0; i < n; i++)
            lens[i] = (i * 7 + n) % 23;
        for (size_t maxm = 0; maxm <= 42; maxm += 3) {
            for (size_t maxb = 0; maxb <= 300; maxb += 37) {
                struct history h;
                size_t drop, bytes = 0;

                fill(&h, lens, n);
                drop = history_trim_start(&h, maxm, maxb);
                assert_int_equal(drop % 2, 0);
                assert_true(drop + 2 <= n);
                for (size_t i = drop; i < n; i++)
                    bytes += lens[i];
                if (n - drop > 2)
                    assert_true(n - drop <= maxm && bytes <= maxb);
                /* minimal: keeping one more pair would break a limit */
                if (drop > 0)
                    assert_true(n - drop + 2 > maxm ||
                                bytes + lens[drop - 1] + lens[drop - 2] >
                                    maxb);
                history_cleanup(&h);
            }
        }
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_and_read),
        cmocka_unit_test(test_add_copies),
        cmocka_unit_test(test_add_many),
        cmocka_unit_test(test_add_over_cap),
        cmocka_unit_test(test_add_over_cap_by_nul),
        cmocka_unit_test(test_reset),
        cmocka_unit_test(test_role_names),
        cmocka_unit_test(test_add_json_accepted),
        cmocka_unit_test(test_add_json_refused),
        cmocka_unit_test(test_add_json_role_with_nul_refused),
        cmocka_unit_test(test_add_json_uses_length),
        cmocka_unit_test(test_add_json_over_cap),
        cmocka_unit_test(test_trim_start),
        cmocka_unit_test(test_trim_start_properties),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
