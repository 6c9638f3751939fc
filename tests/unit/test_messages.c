/*
 * Unit tests of messages: the in-memory message list (adding, copying,
 * the text cap, reset, roles).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "messages.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

static void
test_add_and_read(void **state)
{
    struct messages h;

    (void)state;
    messages_init(&h, 1024);
    assert_int_equal(h.count, 0);
    assert_int_equal(messages_add(&h, MESSAGE_USER, "hello", 5), 0);
    assert_int_equal(messages_add(&h, MESSAGE_ASSISTANT, "hi there", 8), 0);
    assert_int_equal(messages_add(&h, MESSAGE_USER, "", 0), 0);
    assert_int_equal(messages_add(&h, MESSAGE_ASSISTANT, "a\0b", 3), 0);
    assert_int_equal(h.count, 4);
    assert_int_equal(h.msgs[0].role, MESSAGE_USER);
    assert_int_equal(h.msgs[1].role, MESSAGE_ASSISTANT);
    assert_string_equal(messages_content(&h, 0), "hello");
    assert_int_equal(h.msgs[0].len, 5);
    assert_string_equal(messages_content(&h, 1), "hi there");
    assert_string_equal(messages_content(&h, 2), "");
    assert_int_equal(h.msgs[2].len, 0);
    assert_int_equal(h.msgs[3].len, 3);
    assert_memory_equal(messages_content(&h, 3), "a\0b", 4);
    messages_cleanup(&h);
}

/* The content is copied: changing the source later changes nothing. */
static void
test_add_copies(void **state)
{
    struct messages h;
    char text[] = "original";

    (void)state;
    messages_init(&h, 1024);
    assert_int_equal(messages_add(&h, MESSAGE_USER, text, strlen(text)), 0);
    memcpy(text, "changed!", 8);
    assert_string_equal(messages_content(&h, 0), "original");
    messages_cleanup(&h);
}

/* Many messages: past the first allocation of the message array, and
 * every content still where it was. */
static void
test_add_many(void **state)
{
    struct messages h;
    char text[32];

    (void)state;
    messages_init(&h, 1 << 20);
    for (int i = 0; i < 1000; i++) {
        snprintf(text, sizeof(text), "message %d", i);
        assert_int_equal(messages_add(&h, i % 2 ? MESSAGE_ASSISTANT
                                                : MESSAGE_USER,
                                     text, strlen(text)),
                         0);
    }
    assert_int_equal(h.count, 1000);
    for (int i = 0; i < 1000; i++) {
        snprintf(text, sizeof(text), "message %d", i);
        assert_string_equal(messages_content(&h, (size_t)i), text);
        assert_int_equal(h.msgs[i].role,
                         i % 2 ? MESSAGE_ASSISTANT : MESSAGE_USER);
    }
    messages_cleanup(&h);
}

/* Over the text cap: refused, and the history is as it was. */
static void
test_add_over_cap(void **state)
{
    struct messages h;

    (void)state;
    messages_init(&h, 10); /* each content costs its length + 1 (NUL) */
    assert_int_equal(messages_add(&h, MESSAGE_USER, "12345", 5), 0);
    assert_int_equal(messages_add(&h, MESSAGE_ASSISTANT, "1234", 4), -1);
    assert_int_equal(h.count, 1);
    assert_int_equal(messages_add(&h, MESSAGE_ASSISTANT, "123", 3), 0);
    assert_int_equal(h.count, 2);
    assert_string_equal(messages_content(&h, 0), "12345");
    assert_string_equal(messages_content(&h, 1), "123");
    assert_int_equal(messages_add(&h, MESSAGE_USER, "", 0), -1);
    assert_int_equal(h.count, 2);
    messages_cleanup(&h);
}

/* When the content fits but its NUL does not, nothing is kept either. */
static void
test_add_over_cap_by_nul(void **state)
{
    struct messages h;

    (void)state;
    messages_init(&h, 8);
    assert_int_equal(messages_add(&h, MESSAGE_USER, "ab", 2), 0); /* 3 */
    assert_int_equal(messages_add(&h, MESSAGE_USER, "cdefg", 5), -1);
    assert_int_equal(h.count, 1);
    assert_int_equal(messages_add(&h, MESSAGE_USER, "cdef", 4), 0); /* 8 */
    assert_string_equal(messages_content(&h, 1), "cdef");
    messages_cleanup(&h);
}

static void
test_reset(void **state)
{
    struct messages h;

    (void)state;
    messages_init(&h, 64);
    assert_int_equal(messages_add(&h, MESSAGE_USER, "one", 3), 0);
    messages_reset(&h);
    assert_int_equal(h.count, 0);
    assert_int_equal(messages_add(&h, MESSAGE_ASSISTANT, "two", 3), 0);
    assert_int_equal(h.count, 1);
    assert_int_equal(h.msgs[0].role, MESSAGE_ASSISTANT);
    assert_string_equal(messages_content(&h, 0), "two");
    messages_cleanup(&h);
    assert_int_equal(h.count, 0);
    messages_cleanup(&h); /* twice is harmless */
}

static void
test_role_names(void **state)
{
    (void)state;
    assert_string_equal(messages_role_name(MESSAGE_USER), "user");
    assert_string_equal(messages_role_name(MESSAGE_ASSISTANT), "assistant");
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
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
