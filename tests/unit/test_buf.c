/*
 * Unit tests of buf: the hard maximum set at init, refusals that leave the
 * content as it was, and buf_cstr.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"

static void
test_init_is_empty(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 100);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.max, 100);
    assert_null(b.data);
    buf_cleanup(&b);
}

static void
test_append_keeps_bytes(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 100);
    assert_int_equal(buf_append(&b, "abc", 3), 0);
    assert_int_equal(buf_append(&b, "\0de", 3), 0);
    assert_int_equal(buf_append_str(&b, "fg"), 0);
    assert_int_equal(b.len, 8);
    assert_memory_equal(b.data, "abc\0defg", 8);
    buf_cleanup(&b);
}

static void
test_append_zero_bytes(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 4);
    assert_int_equal(buf_append(&b, "", 0), 0);
    assert_int_equal(b.len, 0);
    assert_int_equal(buf_append_str(&b, ""), 0);
    assert_int_equal(b.len, 0);
    buf_cleanup(&b);
}

/* Exactly max fits; one more byte is refused and changes nothing. */
static void
test_max_is_exact(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 10);
    assert_int_equal(buf_append(&b, "0123456789", 10), 0);
    assert_int_equal(b.len, 10);
    assert_int_equal(buf_append(&b, "x", 1), -1);
    assert_int_equal(b.len, 10);
    assert_memory_equal(b.data, "0123456789", 10);
    /* the NUL of buf_cstr is not counted in max */
    assert_true(b.cap <= b.max + 1);
    buf_cleanup(&b);

    buf_init(&b, 10);
    assert_int_equal(buf_append(&b, "01234567890", 11), -1);
    assert_int_equal(b.len, 0);
    buf_cleanup(&b);
}

static void
test_refusal_leaves_content(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 8);
    assert_int_equal(buf_append_str(&b, "hello"), 0);
    assert_int_equal(buf_append_str(&b, "world"), -1);
    assert_int_equal(b.len, 5);
    assert_memory_equal(b.data, "hello", 5);
    /* and what still fits is taken afterwards */
    assert_int_equal(buf_append_str(&b, "!!!"), 0);
    assert_int_equal(b.len, 8);
    assert_memory_equal(b.data, "hello!!!", 8);
    buf_cleanup(&b);
}

/* A huge n must not wrap around the max check. */
static void
test_append_huge_n_refused(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 16);
    assert_int_equal(buf_append_str(&b, "ab"), 0);
    assert_int_equal(buf_append(&b, "x", SIZE_MAX), -1);
    assert_int_equal(buf_append(&b, "x", SIZE_MAX - 1), -1);
    assert_int_equal(b.len, 2);
    assert_memory_equal(b.data, "ab", 2);
    buf_cleanup(&b);
}

/* Growth across many appends (past the first allocation) keeps the bytes
 * and never allocates more than max + 1. */
static void
test_growth_capped(void **state)
{
    struct buf b;
    size_t max = 5000;

    (void)state;
    buf_init(&b, max);
    for (size_t i = 0; i < max; i++) {
        char c = (char)('a' + i % 26);

        assert_int_equal(buf_append(&b, &c, 1), 0);
        assert_true(b.cap <= max + 1);
        assert_true(b.cap > b.len);
    }
    assert_int_equal(b.len, max);
    assert_int_equal(buf_append(&b, "z", 1), -1);
    for (size_t i = 0; i < max; i++)
        assert_int_equal(b.data[i], 'a' + i % 26);
    buf_cleanup(&b);
}

static void
test_max_zero(void **state)
{
    struct buf b;
    const char *s;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(buf_append(&b, "x", 1), -1);
    assert_int_equal(buf_append(&b, "", 0), 0);
    s = buf_cstr(&b);
    assert_non_null(s);
    assert_string_equal(s, "");
    buf_cleanup(&b);
}

static void
test_reset_keeps_memory(void **state)
{
    struct buf b;
    char *data;

    (void)state;
    buf_init(&b, 64);
    assert_int_equal(buf_append_str(&b, "some text"), 0);
    data = b.data;
    buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_ptr_equal(b.data, data);
    assert_int_equal(b.max, 64);
    assert_int_equal(buf_append_str(&b, "new"), 0);
    assert_memory_equal(b.data, "new", 3);
    buf_cleanup(&b);
}

/* What one large request needed goes back at the reset; the growth is
 * counted, so that the worker knows to trim the heap. */
static void
test_reset_gives_back_a_large_buffer(void **state)
{
    static char big[BUF_KEEP_BYTES + 1];
    unsigned long grown = buf_large_growths();
    struct buf b;

    (void)state;
    buf_init(&b, 4 * BUF_KEEP_BYTES);
    assert_int_equal(buf_append(&b, big, BUF_KEEP_BYTES / 2), 0);
    assert_int_equal(buf_large_growths(), grown);
    assert_int_equal(buf_append(&b, big, sizeof(big)), 0);
    assert_true(buf_large_growths() > grown);
    buf_reset(&b);
    assert_null(b.data);
    assert_int_equal(b.cap, 0);
    assert_int_equal(b.max, 4 * BUF_KEEP_BYTES);
    assert_int_equal(buf_append_str(&b, "small"), 0);
    assert_memory_equal(b.data, "small", 5);
    buf_cleanup(&b);
}

static void
test_cleanup_keeps_max(void **state)
{
    struct buf b;

    (void)state;
    buf_init(&b, 32);
    assert_int_equal(buf_append_str(&b, "x"), 0);
    buf_cleanup(&b);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
    assert_int_equal(b.max, 32);
    /* usable again after cleanup, and cleanup twice is harmless */
    assert_int_equal(buf_append_str(&b, "again"), 0);
    buf_cleanup(&b);
    buf_cleanup(&b);
}

static void
test_cstr(void **state)
{
    struct buf b;
    const char *s;

    (void)state;
    buf_init(&b, 16);
    s = buf_cstr(&b);
    assert_non_null(s);
    assert_string_equal(s, "");
    assert_int_equal(b.len, 0);

    assert_int_equal(buf_append(&b, "abc", 3), 0);
    s = buf_cstr(&b);
    assert_non_null(s);
    assert_string_equal(s, "abc");
    assert_int_equal(b.len, 3); /* the NUL is not counted */

    /* appending goes on after the NUL's place, which is overwritten */
    assert_int_equal(buf_append(&b, "de", 2), 0);
    s = buf_cstr(&b);
    assert_string_equal(s, "abcde");
    buf_cleanup(&b);
}

/* A buffer filled to exactly max still gets its terminating NUL: the NUL
 * is kept outside max (buf_reserve: "plus one for a terminating NUL"). */
static void
test_cstr_at_max(void **state)
{
    struct buf b;
    const char *s;

    (void)state;
    buf_init(&b, 5);
    assert_int_equal(buf_append(&b, "12345", 5), 0);
    s = buf_cstr(&b);
    assert_non_null(s);
    assert_string_equal(s, "12345");
    assert_int_equal(b.len, 5);
    buf_cleanup(&b);

    /* the same past the first allocation size */
    buf_init(&b, 300);
    for (int i = 0; i < 300; i++)
        assert_int_equal(buf_append(&b, "x", 1), 0);
    s = buf_cstr(&b);
    assert_non_null(s);
    assert_int_equal(strlen(s), 300);
    buf_cleanup(&b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_is_empty),
        cmocka_unit_test(test_append_keeps_bytes),
        cmocka_unit_test(test_append_zero_bytes),
        cmocka_unit_test(test_max_is_exact),
        cmocka_unit_test(test_refusal_leaves_content),
        cmocka_unit_test(test_append_huge_n_refused),
        cmocka_unit_test(test_growth_capped),
        cmocka_unit_test(test_max_zero),
        cmocka_unit_test(test_reset_keeps_memory),
        cmocka_unit_test(test_reset_gives_back_a_large_buffer),
        cmocka_unit_test(test_cleanup_keeps_max),
        cmocka_unit_test(test_cstr),
        cmocka_unit_test(test_cstr_at_max),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
