/*
 * Unit tests of chat's pure helpers: chat_session_id_valid (1-128 of
 * [A-Za-z0-9_-]) and chat_content_type_ok (application/json, charset
 * utf-8 only).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "chat.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

static void
test_session_id_lengths(void **state)
{
    char id[CHAT_SESSION_ID_MAX + 2];

    (void)state;
    memset(id, 'a', sizeof(id));
    assert_int_equal(chat_session_id_valid(id, 0), 0);
    assert_int_equal(chat_session_id_valid("", 0), 0);
    assert_int_equal(chat_session_id_valid(id, 1), 1);
    assert_int_equal(chat_session_id_valid(id, 64), 1);
    assert_int_equal(chat_session_id_valid(id, 127), 1);
    assert_int_equal(chat_session_id_valid(id, 128), 1);
    assert_int_equal(chat_session_id_valid(id, 129), 0);
    assert_int_equal(chat_session_id_valid(id, 130), 0);
}

/* Every byte value: exactly the 64 of [A-Za-z0-9_-] are allowed, alone
 * and inside an otherwise valid id. */
static void
test_session_id_every_byte(void **state)
{
    (void)state;
    for (int c = 0; c < 256; c++) {
        int want = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                   (c >= '0' && c <= '9') || c == '_' || c == '-';
        char one = (char)c;
        char mid[5] = {'a', 'b', (char)c, 'd', 'e'};

        if (chat_session_id_valid(&one, 1) != want)
            fail_msg("byte 0x%02x alone: expected %d", c, want);
        if (chat_session_id_valid(mid, 5) != want)
            fail_msg("byte 0x%02x inside: expected %d", c, want);
    }
}

struct id_case {
    const char *id;
    int valid;
};

static void
test_session_id_cases(void **state)
{
    static const struct id_case cases[] = {
        {"abc", 1},
        {"ABC", 1},
        {"0123456789", 1},
        {"_", 1},
        {"-", 1},
        {"a-b_C9", 1},
        {"9f2c1e0b7a6d4c3b2a19f8e7d6c5b4a3", 1},
        {"a b", 0},
        {" abc", 0},
        {"abc ", 0},
        {"a.b", 0},
        {"..", 0},
        {"a/b", 0},
        {"../etc", 0},
        {"a:b", 0},
        {"a{b}", 0},
        {"a*", 0},
        {"a\tb", 0},
        {"a\nb", 0},
        {"caf\xc3\xa9", 0},
        {"\xef\xbc\xa1", 0}, /* fullwidth A */
        {"a+b", 0},
        {"a%20b", 0},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++)
        if (chat_session_id_valid(cases[i].id, strlen(cases[i].id)) !=
            cases[i].valid)
            fail_msg("\"%s\": expected %d", cases[i].id, cases[i].valid);
}

/* The length is what counts, not a NUL: an id with a NUL inside is
 * refused, and bytes past n are not looked at. */
static void
test_session_id_uses_length(void **state)
{
    (void)state;
    assert_int_equal(chat_session_id_valid("ab\0cd", 5), 0);
    assert_int_equal(chat_session_id_valid("ab/cd", 2), 1);
    assert_int_equal(chat_session_id_valid("ab", 3), 0); /* its NUL */
}

static void
test_content_type(void **state)
{
    static const struct {
        const char *ct;
        int ok;
    } cases[] = {
        {"application/json", 1},
        {"Application/JSON", 1},
        {"APPLICATION/JSON", 1},
        {"application/json; charset=utf-8", 1},
        {"application/json;charset=UTF-8", 1},
        {"application/json; charset=Utf-8", 1},
        {"application/json; CHARSET=utf-8", 1},
        {"application/json; charset=\"utf-8\"", 1},
        {"application/json; charset=\"UTF-8\"", 1},
        {"application/json ; charset=utf-8", 1},
        {"application/json;  charset=utf-8  ", 1},
        {"application/json\t;\tcharset=utf-8", 1},
        {" application/json", 1},
        {"application/json ", 1},
        /* parameters other than charset are allowed */
        {"application/json; foo=bar", 1},
        {"application/json; foo=bar; charset=utf-8", 1},
        {"application/json; charset=utf-8; foo=bar", 1},
        /* refused */
        {"", 0},
        {" ", 0},
        {"text/plain", 0},
        {"text/json", 0},
        {"application/jso", 0},
        {"application/jsonx", 0},
        {"application/json-patch+json", 0},
        {"application/json5", 0},
        {"application/x-www-form-urlencoded", 0},
        {"multipart/form-data; boundary=x", 0},
        {"application/ json", 0},
        {"xapplication/json", 0},
        {"application/json charset=utf-8", 0},
        {"application/json, text/plain", 0},
        {"application/json; charset=latin1", 0},
        {"application/json; charset=iso-8859-1", 0},
        {"application/json; charset=utf-16", 0},
        {"application/json; charset=utf8x", 0},
        {"application/json; charset=utf-88", 0},
        {"application/json; charset=", 0},
        {"application/json; charset=\"utf-8", 0},
        {"application/json; charset='utf-8'", 0},
        {"application/json; charset=utf-8; charset=latin1", 0},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++)
        if (chat_content_type_ok(cases[i].ct) != cases[i].ok)
            fail_msg("\"%s\": expected %d", cases[i].ct, cases[i].ok);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_session_id_lengths),
        cmocka_unit_test(test_session_id_every_byte),
        cmocka_unit_test(test_session_id_cases),
        cmocka_unit_test(test_session_id_uses_length),
        cmocka_unit_test(test_content_type),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
