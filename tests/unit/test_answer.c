/*
 * Unit tests of answer: answer_tokens (the upstream's usage when it
 * reports both counts, else about 4 bytes a token of the message and the
 * reply), answer_error_kind (every status to its scoreboard kind), and
 * answer_init (an empty answer whose reply is capped at the max given).
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
#include "buf.h"
#include "scoreboard.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))
#define REPLY_MAX 4096

struct tokens_case {
    const char *what;
    size_t message_len, reply_len;
    long long prompt, completion; /* -1: not reported */
    long long want;
};

static const struct tokens_case tokens_cases[] = {
    /* both counts reported: their sum, whatever the lengths */
    {"usage reported", 100, 50, 12, 7, 19},
    {"usage reported, nothing sent", 0, 0, 30, 5, 35},
    {"usage of zero", 4000, 4000, 0, 0, 0},
    {"usage of zero prompt", 40, 40, 0, 9, 9},
    {"usage of zero completion", 40, 40, 9, 0, 9},
    {"large usage", 0, 0, 3000000000LL, 4000000000LL, 7000000000LL},
    /* neither: about 4 bytes a token, at least 1 */
    {"nothing at all", 0, 0, -1, -1, 1},
    {"3 bytes", 3, 0, -1, -1, 1},
    {"4 bytes of message", 4, 0, -1, -1, 2},
    {"4 bytes of reply", 0, 4, -1, -1, 2},
    {"7 bytes", 3, 4, -1, -1, 2},
    {"8 bytes", 5, 3, -1, -1, 3},
    {"100 + 300 bytes", 100, 300, -1, -1, 101},
    {"403 bytes", 400, 3, -1, -1, 101},
    {"a long message", 1000000, 0, -1, -1, 250001},
    /* one count missing: the estimate too */
    {"prompt missing", 40, 40, -1, 7, 21},
    {"completion missing", 40, 40, 12, -1, 21},
    {"prompt missing, zero completion", 0, 8, -1, 0, 3},
    {"completion missing, zero prompt", 8, 0, 0, -1, 3},
};

static void
test_tokens(void **state)
{
    static char bytes[REPLY_MAX];

    (void)state;
    memset(bytes, 'r', sizeof(bytes));
    for (size_t i = 0; i < NELEM(tokens_cases); i++) {
        const struct tokens_case *c = &tokens_cases[i];
        struct answer a;
        long long got;

        answer_init(&a, REPLY_MAX);
        assert_true(c->reply_len <= sizeof(bytes));
        assert_int_equal(buf_append(&a.reply, bytes, c->reply_len), 0);
        a.prompt_tokens = c->prompt;
        a.completion_tokens = c->completion;
        got = answer_tokens(c->message_len, &a);
        if (got != c->want)
            fail_msg("%s: %lld tokens, want %lld", c->what, got, c->want);
        answer_cleanup(&a);
    }
}

struct kind_case {
    const char *what;
    enum answer_status status;
    enum scoreboard_upstream_error kind;
};

/* In the order of enum answer_status, one case each. */
static const struct kind_case kind_cases[] = {
    {"ANSWER_OK", ANSWER_OK, SCOREBOARD_UP_FAILED},
    {"ANSWER_CLIENT_GONE", ANSWER_CLIENT_GONE, SCOREBOARD_UP_CLIENT_GONE},
    {"ANSWER_TIMEOUT", ANSWER_TIMEOUT, SCOREBOARD_UP_TIMEOUT},
    {"ANSWER_UNREACHABLE", ANSWER_UNREACHABLE, SCOREBOARD_UP_UNREACHABLE},
    {"ANSWER_HTTP_ERROR", ANSWER_HTTP_ERROR, SCOREBOARD_UP_HTTP_ERROR},
    {"ANSWER_BAD", ANSWER_BAD, SCOREBOARD_UP_BAD_ANSWER},
    {"ANSWER_FAILED", ANSWER_FAILED, SCOREBOARD_UP_FAILED},
};

static void
test_error_kind(void **state)
{
    (void)state;
    /* A status added to the enum needs a case here. */
    assert_int_equal(NELEM(kind_cases), ANSWER_FAILED + 1);
    for (size_t i = 0; i < NELEM(kind_cases); i++) {
        const struct kind_case *c = &kind_cases[i];
        enum scoreboard_upstream_error got = answer_error_kind(c->status);

        if ((size_t)c->status != i)
            fail_msg("%s: the table is out of order", c->what);
        if (got != c->kind)
            fail_msg("%s: kind %d, want %d", c->what, (int)got,
                     (int)c->kind);
        if ((unsigned)got >= SCOREBOARD_UP_KINDS)
            fail_msg("%s: kind %d out of range", c->what, (int)got);
    }
}

/* An answer made over garbage is empty: OK, no reply, no model, no
 * message; its reply takes exactly max bytes, refuses one more and keeps
 * what it had. After answer_cleanup the same holds again. */
static void
test_init_cap(void **state)
{
    static const size_t maxes[] = {0, 1, 2, 16, 255, 256, 257, 1000,
                                   REPLY_MAX};
    static char bytes[REPLY_MAX + 1];

    (void)state;
    memset(bytes, 'z', sizeof(bytes));
    for (size_t i = 0; i < NELEM(maxes); i++) {
        size_t max = maxes[i];
        struct answer a;

        memset(&a, 0xa5, sizeof(a));
        answer_init(&a, max);
        for (int round = 0; round < 2; round++) {
            if (a.status != ANSWER_OK || a.reply.len != 0 ||
                a.model[0] != '\0' || a.message[0] != '\0')
                fail_msg("max %zu, round %d: not empty", max, round);
            if (a.reply.max != max)
                fail_msg("max %zu, round %d: reply max %zu", max, round,
                         a.reply.max);
            if (buf_append(&a.reply, bytes, max) != 0)
                fail_msg("max %zu, round %d: %zu bytes refused", max, round,
                         max);
            if (buf_append(&a.reply, bytes, 1) != -1)
                fail_msg("max %zu, round %d: a byte over accepted", max,
                         round);
            if (a.reply.len != max ||
                (max && memcmp(a.reply.data, bytes, max) != 0))
                fail_msg("max %zu, round %d: reply changed to %zu bytes",
                         max, round, a.reply.len);
            answer_cleanup(&a);
        }
    }
}

/* One append larger than the cap fails whole, not in part. */
static void
test_init_cap_one_append(void **state)
{
    static const char text[] = "0123456789";
    struct answer a;

    (void)state;
    answer_init(&a, 8);
    assert_int_equal(buf_append(&a.reply, text, 3), 0);
    assert_int_equal(buf_append(&a.reply, text, 6), -1);
    assert_int_equal(a.reply.len, 3);
    assert_int_equal(buf_append(&a.reply, text, 5), 0);
    assert_int_equal(a.reply.len, 8);
    assert_memory_equal(a.reply.data, "01201234", 8);
    answer_cleanup(&a);
}

/* Fragments join into their calls; a provider that numbers every call 0
 * (some Ollama versions) gets each new id or name its own call, and the
 * fragments after it follow it. */
static void
test_pieces(void **state)
{
    struct answer_piece steps[] = {
        {.index = 0, .id = "a", .name = "f", .arguments = "", 0},
        {.index = 0, .arguments = "{\"x\"", .arguments_len = 4},
        {.index = 0, .arguments = ":1}", .arguments_len = 3},
        {.index = 0, .id = "b", .name = "g", .arguments = "{", 1},
        {.index = 0, .arguments = "}", .arguments_len = 1},
        {.index = 2, .name = "h", .arguments = "[]", .arguments_len = 2},
    };
    static const long long want_index[] = {0, 0, 0, 1, 1, 2};
    struct answer a;

    (void)state;
    answer_init(&a, 64);
    for (size_t i = 0; i < sizeof(steps) / sizeof(*steps); i++) {
        assert_int_equal(answer_add_piece(&a, &steps[i]), 0);
        assert_int_equal(steps[i].index, want_index[i]);
    }
    assert_int_equal(a.ncalls, 3);
    assert_string_equal(a.calls[0].id, "a");
    assert_memory_equal(a.calls[0].arguments.data, "{\"x\":1}", 7);
    assert_string_equal(a.calls[1].id, "b");
    assert_string_equal(a.calls[1].name, "g");
    assert_memory_equal(a.calls[1].arguments.data, "{}", 2);
    assert_string_equal(a.calls[2].id, "");
    answer_reset(&a);
    assert_int_equal(a.ncalls, 0);
    answer_cleanup(&a);
}

/* Bounds: the call count, an index gap, the name's length, UTF-8, the
 * arguments' cap. */
static void
test_pieces_refused(void **state)
{
    char long_name[ANSWER_TOOL_NAME_LEN + 1];
    struct answer a;
    struct answer_piece p = {.index = 5, .name = "f"};

    (void)state;
    answer_init(&a, 8);
    assert_int_equal(answer_add_piece(&a, &p), -1);
    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    p = (struct answer_piece){.index = 0, .name = long_name};
    assert_int_equal(answer_add_piece(&a, &p), -1);
    p = (struct answer_piece){.index = 0, .name = "\xc0\xaf"};
    assert_int_equal(answer_add_piece(&a, &p), -1);
    p = (struct answer_piece){.index = 0, .arguments = "123456789",
                              .arguments_len = 9};
    assert_int_equal(answer_add_piece(&a, &p), -1);
    answer_reset(&a);
    for (long long i = 0; i <= ANSWER_MAX_CALLS; i++) {
        p = (struct answer_piece){.index = i, .name = "f"};
        assert_int_equal(answer_add_piece(&a, &p),
                         i < ANSWER_MAX_CALLS ? 0 : -1);
    }
    answer_cleanup(&a);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens),
        cmocka_unit_test(test_pieces),
        cmocka_unit_test(test_pieces_refused),
        cmocka_unit_test(test_error_kind),
        cmocka_unit_test(test_init_cap),
        cmocka_unit_test(test_init_cap_one_append),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
