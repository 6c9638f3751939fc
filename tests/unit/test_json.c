/*
 * Unit tests of json: the UTF-8 validator, json_pick (paths, types, strict
 * mode, depth, escapes, duplicate keys) and the generator helpers.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "clock.h"
#include "json.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

/* ---- json_utf8_valid ---- */

struct utf8_case {
    const char *bytes;
    size_t len;
    int valid;
    const char *what;
};

#define U8(s, v, what) {s, sizeof(s) - 1, v, what}

static const struct utf8_case utf8_cases[] = {
    U8("", 1, "empty"),
    U8("plain ASCII", 1, "ascii"),
    U8("nul \0 inside", 1, "NUL is allowed"),
    U8("\x7f", 1, "U+007F"),
    U8("\xc2\x80", 1, "U+0080, first 2-byte"),
    U8("\xc3\xa9t\xc3\xa9", 1, "ete with accents"),
    U8("\xdf\xbf", 1, "U+07FF, last 2-byte"),
    U8("\xe0\xa0\x80", 1, "U+0800, first 3-byte"),
    U8("\xe2\x82\xac", 1, "euro sign"),
    U8("\xed\x9f\xbf", 1, "U+D7FF, just below the surrogates"),
    U8("\xee\x80\x80", 1, "U+E000, just above the surrogates"),
    U8("\xef\xbf\xbf", 1, "U+FFFF"),
    U8("\xf0\x90\x80\x80", 1, "U+10000, first 4-byte"),
    U8("\xf0\x9f\x98\x80", 1, "emoji"),
    U8("\xf4\x8f\xbf\xbf", 1, "U+10FFFF, the last code point"),
    /* overlong forms */
    U8("\xc0\x80", 0, "overlong NUL C0 80"),
    U8("\xc1\xbf", 0, "overlong C1 BF"),
    U8("\xe0\x80\x80", 0, "overlong E0 80 80"),
    U8("\xe0\x9f\xbf", 0, "overlong E0 9F BF"),
    U8("\xf0\x80\x80\x80", 0, "overlong F0 80 80 80"),
    U8("\xf0\x8f\xbf\xbf", 0, "overlong F0 8F BF BF"),
    /* surrogates */
    U8("\xed\xa0\x80", 0, "U+D800 high surrogate"),
    U8("\xed\xbf\xbf", 0, "U+DFFF low surrogate"),
    U8("\xed\xa0\xbd\xed\xb8\x80", 0, "CESU-8 pair"),
    /* above U+10FFFF */
    U8("\xf4\x90\x80\x80", 0, "U+110000"),
    U8("\xf5\x80\x80\x80", 0, "F5 lead"),
    U8("\xf7\xbf\xbf\xbf", 0, "F7 lead"),
    U8("\xf8\x88\x80\x80\x80", 0, "5-byte form"),
    U8("\xfc\x84\x80\x80\x80\x80", 0, "6-byte form"),
    /* truncated sequences */
    U8("\xc3", 0, "2-byte missing 1"),
    U8("\xe2\x82", 0, "3-byte missing 1"),
    U8("\xe2", 0, "3-byte missing 2"),
    U8("\xf0\x9f\x98", 0, "4-byte missing 1"),
    U8("abc\xf0", 0, "4-byte lead at the end"),
    U8("\xc3" "a", 0, "2-byte, ASCII continuation"),
    U8("\xe2\x82" "a", 0, "3-byte, ASCII continuation"),
    U8("\xf0\x9f\x98" "a", 0, "4-byte, ASCII continuation"),
    U8("\xe2\xc3\xa9", 0, "lead followed by a lead"),
    /* stray continuation bytes */
    U8("\x80", 0, "lone 80"),
    U8("\xbf", 0, "lone BF"),
    U8("a\x80z", 0, "80 between ASCII"),
    U8("\xc3\xa9\xa9", 0, "extra continuation"),
    /* never in UTF-8 */
    U8("\xfe", 0, "FE"),
    U8("\xff", 0, "FF"),
    U8("ab\xff\xfe", 0, "BOM of UTF-16LE"),
};

static void
test_utf8_valid(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(utf8_cases); i++) {
        const struct utf8_case *c = &utf8_cases[i];

        if (json_utf8_valid(c->bytes, c->len) != c->valid)
            fail_msg("%s: expected %s", c->what,
                     c->valid ? "valid" : "invalid");
    }
}

/* The length is respected: bytes past n are not looked at. */
static void
test_utf8_uses_length(void **state)
{
    (void)state;
    assert_int_equal(json_utf8_valid("ab\xff", 2), 1);
    assert_int_equal(json_utf8_valid("\xe2\x82\xac", 2), 0);
    assert_int_equal(json_utf8_valid(NULL, 0), 1);
}

/* ---- json_pick ---- */

/* One json_pick call with its arena. */
struct pick_run {
    struct buf arena;
    char err[JSON_ERR_LEN];
    int rc;
};

static void
run_pick(struct pick_run *r, const char *doc, size_t len,
         struct json_field *f, size_t n, unsigned depth, unsigned flags)
{
    buf_init(&r->arena, 1 << 20);
    strcpy(r->err, "(unset)");
    r->rc = json_pick(doc, len, f, n, &r->arena, depth, flags, r->err);
}

static void
run_done(struct pick_run *r)
{
    buf_cleanup(&r->arena);
}

/* A document that json_pick must refuse; err must mention want. */
static void
expect_refused(const char *doc, size_t len, unsigned depth, unsigned flags,
               const char *want)
{
    struct json_field f = {.path = "x", .accept = JSON_ANY};
    struct pick_run r;

    run_pick(&r, doc, len, &f, 1, depth, flags);
    if (r.rc != -1)
        fail_msg("accepted: %.*s", (int)len, doc);
    if (want != NULL && strstr(r.err, want) == NULL)
        fail_msg("%.*s: err \"%s\" lacks \"%s\"", (int)len, doc, r.err,
                 want);
    run_done(&r);
}

static void
expect_accepted(const char *doc, size_t len, unsigned depth, unsigned flags)
{
    struct json_field f = {.path = "x", .accept = JSON_ANY};
    struct pick_run r;

    run_pick(&r, doc, len, &f, 1, depth, flags);
    if (r.rc != 0)
        fail_msg("refused (%s): %.*s", r.err, (int)len, doc);
    run_done(&r);
}

#define REFUSED(doc, depth, flags, want)                                      \
    expect_refused(doc, sizeof(doc) - 1, depth, flags, want)
#define ACCEPTED(doc, depth, flags)                                           \
    expect_accepted(doc, sizeof(doc) - 1, depth, flags)

static void
test_pick_scalars(void **state)
{
    static const char doc[] =
        "{\"s\":\"hello\",\"n\":-12.5e3,\"i\":42,\"t\":true,\"f\":false,"
        "\"z\":null,\"e\":\"\"}";
    struct json_field f[] = {
        {.path = "s", .accept = JSON_STRING},
        {.path = "n", .accept = JSON_NUMBER},
        {.path = "i", .accept = JSON_NUMBER},
        {.path = "t", .accept = JSON_BOOL},
        {.path = "f", .accept = JSON_BOOL},
        {.path = "z", .accept = JSON_NULL | JSON_STRING},
        {.path = "e", .accept = JSON_STRING},
        {.path = "absent", .accept = JSON_STRING},
    };
    struct pick_run r;

    (void)state;
    run_pick(&r, doc, sizeof(doc) - 1, f, NELEM(f), 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_int_equal(f[0].type, JSON_STRING);
    assert_int_equal(f[0].len, 5);
    assert_string_equal(json_field_text(&f[0], &r.arena), "hello");
    assert_int_equal(f[1].type, JSON_NUMBER);
    assert_string_equal(json_field_text(&f[1], &r.arena), "-12.5e3");
    assert_int_equal(f[1].len, 7);
    assert_int_equal(f[2].type, JSON_NUMBER);
    assert_string_equal(json_field_text(&f[2], &r.arena), "42");
    assert_int_equal(f[3].type, JSON_BOOL);
    assert_int_equal(f[3].boolean, 1);
    assert_int_equal(f[4].type, JSON_BOOL);
    assert_int_equal(f[4].boolean, 0);
    assert_int_equal(f[5].type, JSON_NULL);
    assert_int_equal(f[6].type, JSON_STRING);
    assert_int_equal(f[6].len, 0);
    assert_string_equal(json_field_text(&f[6], &r.arena), "");
    assert_int_equal(f[7].type, 0);
    run_done(&r);
}

/* The document need not be NUL-terminated: only len bytes are read. */
static void
test_pick_not_nul_terminated(void **state)
{
    static const char text[] = "{\"a\":\"b\"}GARBAGE";
    char *doc = malloc(9);
    struct json_field f = {.path = "a", .accept = JSON_STRING};
    struct pick_run r;

    (void)state;
    assert_non_null(doc);
    memcpy(doc, text, 9); /* no NUL: ASan catches a read past the end */
    run_pick(&r, doc, 9, &f, 1, 4, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_string_equal(json_field_text(&f, &r.arena), "b");
    run_done(&r);
    free(doc);
}

static void
test_pick_paths(void **state)
{
    static const char doc[] =
        "{\"id\":\"c1\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
        "\"assistant\",\"content\":\"first\"}},{\"index\":1,\"message\":{"
        "\"content\":\"second\"}}],\"usage\":{\"prompt_tokens\":12,"
        "\"completion_tokens\":7},\"deep\":{\"a\":{\"b\":{\"c\":[[1,2],[3,"
        "[4,\"four\"]]]}}},\"message\":{\"content\":\"top\"}}";
    struct json_field f[] = {
        {.path = "choices.0.message.content", .accept = JSON_STRING},
        {.path = "choices.1.message.content", .accept = JSON_STRING},
        {.path = "choices.2.message.content", .accept = JSON_STRING},
        {.path = "usage.prompt_tokens", .accept = JSON_NUMBER},
        {.path = "usage.completion_tokens", .accept = JSON_NUMBER},
        {.path = "deep.a.b.c.1.1.1", .accept = JSON_STRING},
        {.path = "deep.a.b.c.0.1", .accept = JSON_NUMBER},
        {.path = "message.content", .accept = JSON_STRING},
        {.path = "choices", .accept = JSON_ARRAY},
        {.path = "usage", .accept = JSON_OBJECT},
        {.path = "", .accept = JSON_OBJECT},
        {.path = "choices.0.message.role", .accept = JSON_STRING},
        {.path = "content", .accept = JSON_STRING},
    };
    struct pick_run r;

    (void)state;
    run_pick(&r, doc, sizeof(doc) - 1, f, NELEM(f), 16, JSON_STRICT);
    if (r.rc != 0)
        fail_msg("refused: %s", r.err);
    assert_string_equal(json_field_text(&f[0], &r.arena), "first");
    assert_string_equal(json_field_text(&f[1], &r.arena), "second");
    assert_int_equal(f[2].type, 0);
    assert_string_equal(json_field_text(&f[3], &r.arena), "12");
    assert_string_equal(json_field_text(&f[4], &r.arena), "7");
    assert_string_equal(json_field_text(&f[5], &r.arena), "four");
    assert_string_equal(json_field_text(&f[6], &r.arena), "2");
    assert_string_equal(json_field_text(&f[7], &r.arena), "top");
    assert_int_equal(f[8].type, JSON_ARRAY);
    assert_int_equal(f[9].type, JSON_OBJECT);
    assert_int_equal(f[10].type, JSON_OBJECT);
    assert_string_equal(json_field_text(&f[11], &r.arena), "assistant");
    assert_int_equal(f[12].type, 0); /* only "message.content" exists */
    run_done(&r);
}

/* Path forms that must not match: a prefix, a longer path, a trailing or
 * doubled dot, an index written differently. */
static void
test_pick_path_no_false_match(void **state)
{
    static const char doc[] =
        "{\"ab\":1,\"a\":{\"b\":2},\"list\":[\"x\",\"y\"],\"k\":{\"\":3}}";
    static const char *const paths[] = {
        "a.b.c", "a.", "a..b", ".a", "list.00", "list.+1", "list.-1",
        "list.2", "ab.c", "b", "k.x", "list.0.x", "a.bb", "a.b.",
    };

    (void)state;
    for (size_t i = 0; i < NELEM(paths); i++) {
        struct json_field f = {.path = paths[i], .accept = JSON_ANY};
        struct pick_run r;

        run_pick(&r, doc, sizeof(doc) - 1, &f, 1, 8, JSON_STRICT);
        assert_int_equal(r.rc, 0);
        if (f.type != 0)
            fail_msg("path \"%s\" matched type %u", paths[i], f.type);
        run_done(&r);
    }
}

/* A key that contains a dot is one segment: it does not match the path of
 * two nested keys, and nested keys do not match it. */
static void
test_pick_dotted_key(void **state)
{
    static const char dotted[] = "{\"a.b\":\"flat\"}";
    static const char nested[] = "{\"a\":{\"b\":\"nested\"}}";
    static const char both[] = "{\"a.b\":\"flat\",\"a\":{\"b\":\"nested\"}}";
    struct json_field f = {.path = "a.b", .accept = JSON_STRING};
    struct pick_run r;

    (void)state;
    run_pick(&r, dotted, sizeof(dotted) - 1, &f, 1, 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_int_equal(f.type, 0);
    run_done(&r);

    run_pick(&r, nested, sizeof(nested) - 1, &f, 1, 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_int_equal(f.type, JSON_STRING);
    assert_string_equal(json_field_text(&f, &r.arena), "nested");
    run_done(&r);

    /* with both present, the path picks the nested one only */
    run_pick(&r, both, sizeof(both) - 1, &f, 1, 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_string_equal(json_field_text(&f, &r.arena), "nested");
    run_done(&r);
}

/* The path "" is the document itself and nothing else. The document's
 * own empty key "" is one level down: it must not match "" as well. The
 * byte before the path is made a non-dot, as it may be in any program. */
static void
test_pick_empty_path_is_document_only(void **state)
{
    static const char doc[] = "{\"\":\"inner\"}";
    char storage[2] = {'x', '\0'};
    struct json_field f = {.path = storage + 1, .accept = JSON_OBJECT};
    struct pick_run r;

    (void)state;
    run_pick(&r, doc, sizeof(doc) - 1, &f, 1, 8, JSON_STRICT);
    run_done(&r); /* before failing, so that ASan reports no leak */
    if (r.rc != 0)
        fail_msg("BUG json.c path_matches: path \"\" also matched the value "
                 "of key \"\" (reads path[-1]): %s",
                 r.err);
    assert_int_equal(f.type, JSON_OBJECT);
}

struct type_case {
    const char *doc;
    unsigned accept;
};

/* A value of a type the field does not accept is an error naming the
 * path. */
static void
test_pick_wrong_type(void **state)
{
    static const struct type_case cases[] = {
        {"{\"v\":1}", JSON_STRING},
        {"{\"v\":\"1\"}", JSON_NUMBER},
        {"{\"v\":true}", JSON_STRING | JSON_NULL},
        {"{\"v\":null}", JSON_STRING},
        {"{\"v\":{}}", JSON_STRING},
        {"{\"v\":[]}", JSON_OBJECT},
        {"{\"v\":\"s\"}", JSON_BOOL | JSON_NUMBER | JSON_NULL},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct json_field f = {.path = "v", .accept = cases[i].accept};
        struct pick_run r;

        run_pick(&r, cases[i].doc, strlen(cases[i].doc), &f, 1, 8,
                 JSON_STRICT);
        assert_int_equal(r.rc, -1);
        if (strstr(r.err, "'v'") == NULL || strstr(r.err, "type") == NULL)
            fail_msg("%s: err \"%s\"", cases[i].doc, r.err);
        run_done(&r);
    }

    /* and a nested path is named whole */
    {
        static const char doc[] = "{\"choices\":[{\"message\":{\"content\":"
                                  "5}}]}";
        struct json_field f = {.path = "choices.0.message.content",
                               .accept = JSON_STRING};
        struct pick_run r;

        run_pick(&r, doc, sizeof(doc) - 1, &f, 1, 8, 0);
        assert_int_equal(r.rc, -1);
        assert_non_null(strstr(r.err, "choices.0.message.content"));
        run_done(&r);
    }
}

/* Types: the document-level check of strict mode. */
static void
test_pick_strict_needs_object(void **state)
{
    (void)state;
    REFUSED("[1,2]", 8, JSON_STRICT, "object");
    REFUSED("\"str\"", 8, JSON_STRICT, "object");
    REFUSED("42", 8, JSON_STRICT, "object");
    REFUSED("true", 8, JSON_STRICT, "object");
    REFUSED("null", 8, JSON_STRICT, "object");
    ACCEPTED("{}", 8, JSON_STRICT);
    ACCEPTED(" \n\t{ } \n", 8, JSON_STRICT);
    /* without strict mode any document is fine */
    ACCEPTED("[1,2]", 8, 0);
    ACCEPTED("42", 8, 0);
    ACCEPTED("\"str\"", 8, 0);
}

static void
test_pick_malformed(void **state)
{
    static const char *const docs[] = {
        "",
        " ",
        "{",
        "{\"a\":}",
        "{\"a\" 1}",
        "{\"a\":1,}",
        "{a:1}",
        "{'a':1}",
        "{\"a\":01}",
        "{\"a\":1.}",
        "{\"a\":tru}",
        "{\"a\":\"unterminated}",
        "{\"a\":\"bad \\q escape\"}",
        "{\"a\":\"raw\ncontrol\"}",
        "{\"a\":NaN}",
        "[1,]",
    };

    (void)state;
    for (size_t i = 0; i < NELEM(docs); i++) {
        expect_refused(docs[i], strlen(docs[i]), 8, JSON_STRICT, NULL);
        expect_refused(docs[i], strlen(docs[i]), 8, 0, NULL);
    }
}

static void
test_pick_comments_refused(void **state)
{
    (void)state;
    REFUSED("{\"a\":1 /* c */}", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1} // c", 8, JSON_STRICT, NULL);
    REFUSED("/* c */ {\"a\":1}", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1 /* c */}", 8, 0, NULL);
    REFUSED("{\"a\":1}\n// c\n", 8, 0, NULL);
}

static void
test_pick_trailing_garbage_refused(void **state)
{
    (void)state;
    REFUSED("{\"a\":1} x", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1}{}", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1},", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1}]", 8, JSON_STRICT, NULL);
    REFUSED("{\"a\":1} 1", 8, 0, NULL);
    REFUSED("[1] [2]", 8, 0, NULL);
    ACCEPTED("{\"a\":1} \r\n\t ", 8, JSON_STRICT);
    /* a NUL byte after the document is garbage too */
    expect_refused("{\"a\":1}\0", 8, 8, JSON_STRICT, NULL);
}

static void
test_pick_duplicate_keys(void **state)
{
    (void)state;
    REFUSED("{\"x\":1,\"x\":2}", 8, JSON_STRICT, "duplicate key \"x\"");
    REFUSED("{\"a\":1,\"b\":2,\"a\":3}", 8, JSON_STRICT, "duplicate");
    REFUSED("{\"o\":{\"k\":1,\"k\":1}}", 8, JSON_STRICT,
            "duplicate key \"k\"");
    REFUSED("{\"o\":[{\"k\":1},{\"j\":1,\"k\":2,\"k\":3}]}", 8, JSON_STRICT,
            "duplicate");
    REFUSED("{\"o\":{\"i\":{\"k\":1}},\"o\":2}", 8, JSON_STRICT, "duplicate");
    REFUSED("{\"\":1,\"\":2}", 8, JSON_STRICT, "duplicate key \"\"");
    /* escapes name the same key as their literal form */
    REFUSED("{\"ab\":1,\"a\\u0062\":2}", 8, JSON_STRICT, "duplicate");
    /* the same key in different objects is fine, and after a nested
     * object closes its keys do not count for the parent */
    ACCEPTED("{\"k\":1,\"o\":{\"k\":2},\"p\":{\"k\":3,\"o\":{\"k\":4}}}", 8,
             JSON_STRICT);
    ACCEPTED("{\"l\":[{\"k\":1},{\"k\":2},{\"k\":3}]}", 8, JSON_STRICT);
    ACCEPTED("{\"a\":1,\"A\":2,\"a \":3,\"\":4}", 8, JSON_STRICT);
    /* keys that are prefixes of each other are different keys */
    ACCEPTED("{\"ab\":1,\"a\":2,\"abc\":3}", 8, JSON_STRICT);
    /* not strict: the last one wins */
    {
        static const char doc[] = "{\"x\":\"first\",\"x\":\"last\"}";
        struct json_field f = {.path = "x", .accept = JSON_STRING};
        struct pick_run r;

        run_pick(&r, doc, sizeof(doc) - 1, &f, 1, 8, 0);
        assert_int_equal(r.rc, 0);
        assert_string_equal(json_field_text(&f, &r.arena), "last");
        run_done(&r);
    }
}

/* Build {"k0":0,"k1":1,...}; dup >= 0 adds "k<dup>" once more at the end.
 * Returns a heap string. */
static char *
many_keys_doc(size_t nkeys, long dup, size_t *len)
{
    struct buf b;
    char item[48];
    char *out;

    buf_init(&b, 1 << 22);
    assert_int_equal(buf_append_str(&b, "{"), 0);
    for (size_t i = 0; i < nkeys; i++) {
        snprintf(item, sizeof(item), "%s\"k%zu\":%zu", i ? "," : "", i, i);
        assert_int_equal(buf_append_str(&b, item), 0);
    }
    if (dup >= 0) {
        snprintf(item, sizeof(item), ",\"k%ld\":0", dup);
        assert_int_equal(buf_append_str(&b, item), 0);
    }
    assert_int_equal(buf_append_str(&b, "}"), 0);
    *len = b.len;
    out = malloc(b.len);
    assert_non_null(out);
    memcpy(out, b.data, b.len);
    buf_cleanup(&b);
    return out;
}

static void
test_pick_many_keys(void **state)
{
    struct json_field f[] = {
        {.path = "k0", .accept = JSON_NUMBER},
        {.path = "k4999", .accept = JSON_NUMBER},
        {.path = "k2500", .accept = JSON_NUMBER},
    };
    static const long dups[] = {0, 1, 63, 64, 2500, 4999};
    struct pick_run r;
    size_t len;
    char *doc;

    (void)state;
    doc = many_keys_doc(5000, -1, &len);
    run_pick(&r, doc, len, f, NELEM(f), 8, JSON_STRICT);
    if (r.rc != 0)
        fail_msg("5000 distinct keys refused: %s", r.err);
    assert_string_equal(json_field_text(&f[0], &r.arena), "0");
    assert_string_equal(json_field_text(&f[1], &r.arena), "4999");
    assert_string_equal(json_field_text(&f[2], &r.arena), "2500");
    run_done(&r);
    free(doc);

    for (size_t i = 0; i < NELEM(dups); i++) {
        char want[32];

        doc = many_keys_doc(5000, dups[i], &len);
        run_pick(&r, doc, len, f, NELEM(f), 8, JSON_STRICT);
        snprintf(want, sizeof(want), "duplicate key \"k%ld\"", dups[i]);
        assert_int_equal(r.rc, -1);
        if (strstr(r.err, want) == NULL)
            fail_msg("dup k%ld: err \"%s\"", dups[i], r.err);
        run_done(&r);
        free(doc);
    }
}

/* Many small objects, each with the same keys: none is a duplicate. */
static void
test_pick_many_objects_same_keys(void **state)
{
    struct buf b;
    struct pick_run r;
    struct json_field f = {.path = "l.1999.b", .accept = JSON_NUMBER};

    (void)state;
    buf_init(&b, 1 << 20);
    assert_int_equal(buf_append_str(&b, "{\"l\":["), 0);
    for (int i = 0; i < 2000; i++) {
        char item[64];

        snprintf(item, sizeof(item), "%s{\"a\":%d,\"b\":%d}", i ? "," : "",
                 i, i * 2);
        assert_int_equal(buf_append_str(&b, item), 0);
    }
    assert_int_equal(buf_append_str(&b, "]}"), 0);
    run_pick(&r, b.data, b.len, &f, 1, 8, JSON_STRICT);
    if (r.rc != 0)
        fail_msg("refused: %s", r.err);
    assert_string_equal(json_field_text(&f, &r.arena), "3998");
    run_done(&r);
    buf_cleanup(&b);
}

/* ---- duplicate keys chosen to collide ---- */

#define FNV_BASIS 2166136261u
#define FNV_PRIME 16777619u
#define KEY_LEN 5 /* a 3-character prefix and a 2-character suffix */
#define FLOOD_KEYS 6000 /* "abcde":0, is 10 bytes: under 64 KiB */

static const char key_chars[] =
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
#define NCHARS (sizeof(key_chars) - 1)

/* FNV_PRIME's inverse mod 2^32: Newton's iteration, right in 3 bits at
 * the start (an odd number is its own inverse mod 8), doubling each step. */
static uint32_t
fnv_prime_inverse(void)
{
    uint32_t x = FNV_PRIME;

    for (int i = 0; i < 4; i++)
        x *= 2 - FNV_PRIME * x;
    return x;
}

/* FNV-1a from the offset basis: the hash json.c's duplicate check once
 * used, unseeded, for the keys of a document's object (its frame 0). */
static uint32_t
fnv1a(const char *s, size_t n)
{
    uint32_t h = FNV_BASIS;

    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * FNV_PRIME;
    return h;
}

/* Fill keys with n distinct keys whose FNV-1a hashes agree in the low 16
 * bits: the same slot in any table of up to 65536 entries, so that each
 * key probes past all the keys before it. Meet in the middle: the states
 * from which each suffix leads to the target, then every prefix that
 * reaches one. Low bits of (h ^ c) * p depend only on low bits of h, so
 * 16-bit states do. */
static void
colliding_keys(char (*keys)[KEY_LEN], size_t n)
{
    static int suffix_of[1 << 16];
    const uint32_t inv = fnv_prime_inverse(), target = 0x5eed;
    size_t found = 0;

    for (size_t s = 0; s < NELEM(suffix_of); s++)
        suffix_of[s] = -1;
    for (size_t a = 0; a < NCHARS; a++)
        for (size_t b = 0; b < NCHARS; b++) {
            uint32_t h = ((target * inv) ^ (unsigned char)key_chars[b]) * inv;

            suffix_of[(h ^ (unsigned char)key_chars[a]) & 0xffff] =
                (int)(a * NCHARS + b);
        }
    for (size_t i = 0; i < NCHARS * NCHARS * NCHARS && found < n; i++) {
        char *k = keys[found];
        int sfx;

        k[0] = key_chars[i / NCHARS / NCHARS];
        k[1] = key_chars[i / NCHARS % NCHARS];
        k[2] = key_chars[i % NCHARS];
        sfx = suffix_of[fnv1a(k, 3) & 0xffff];
        if (sfx < 0)
            continue;
        k[3] = key_chars[sfx / NCHARS];
        k[4] = key_chars[sfx % NCHARS];
        assert_int_equal(fnv1a(k, KEY_LEN) & 0xffff, target);
        found++;
    }
    assert_int_equal(found, n);
}

/* The same number of keys of the same length, in counting order. */
static void
plain_keys(char (*keys)[KEY_LEN], size_t n)
{
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0, v = i; j < KEY_LEN; j++, v /= NCHARS)
            keys[i][KEY_LEN - 1 - j] = key_chars[v % NCHARS];
}

/* {"<key>":0,...} as a heap string; *len is its length. */
static char *
keys_doc(char (*keys)[KEY_LEN], size_t n, size_t *len)
{
    struct buf b;
    char *out;

    buf_init(&b, 1 << 20);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(buf_printf(&b, "%s\"%.*s\":0", i ? "," : "{",
                                    KEY_LEN, keys[i]),
                         0);
    assert_int_equal(buf_append_str(&b, "}"), 0);
    *len = b.len;
    out = malloc(b.len);
    assert_non_null(out);
    memcpy(out, b.data, b.len);
    buf_cleanup(&b);
    return out;
}

/* One strict pick of doc, in milliseconds. */
static double
pick_ms(const char *doc, size_t len)
{
    struct json_field f = {.path = "x", .accept = JSON_ANY};
    struct pick_run r;
    double t0 = clock_ms(), ms;

    run_pick(&r, doc, len, &f, 1, 8, JSON_STRICT);
    ms = clock_ms() - t0;
    if (r.rc != 0)
        fail_msg("refused: %s", r.err);
    run_done(&r);
    return ms;
}

/* Keys that collide under the duplicate check's hash must not make a body
 * slower to check than ordinary keys: a 64 KiB body of them once took ten
 * times as long (quadratic probing), and more keys, longer. The two bodies
 * take turns and each keeps its best time, so that other work on the
 * machine slows neither more than the other. */
static void
test_pick_colliding_keys_not_slower(void **state)
{
    static char flood[FLOOD_KEYS][KEY_LEN], plain[FLOOD_KEYS][KEY_LEN];
    size_t flood_len, plain_len;
    char *flood_doc, *plain_doc;
    double flood_ms = 1e9, plain_ms = 1e9;

    (void)state;
    colliding_keys(flood, FLOOD_KEYS);
    plain_keys(plain, FLOOD_KEYS);
    flood_doc = keys_doc(flood, FLOOD_KEYS, &flood_len);
    plain_doc = keys_doc(plain, FLOOD_KEYS, &plain_len);
    assert_int_equal(flood_len, plain_len);
    for (int round = 0; round < 15; round++) {
        double ms = pick_ms(plain_doc, plain_len);

        plain_ms = ms < plain_ms ? ms : plain_ms;
        ms = pick_ms(flood_doc, flood_len);
        flood_ms = ms < flood_ms ? ms : flood_ms;
    }
    if (flood_ms > 2 * plain_ms)
        fail_msg("%d colliding keys took %.2f ms, ordinary ones %.2f ms",
                 FLOOD_KEYS, flood_ms, plain_ms);
    free(flood_doc);
    free(plain_doc);
}

/* Nest n containers: {"a":{"a":...{}...}} (objects) or [[...]]. */
static char *
nested_doc(unsigned n, int arrays, size_t *len)
{
    size_t open = arrays ? 1 : 5; /* "[" or "{\"a\":" */
    char *s = malloc(n * (open + 1) + 1);
    size_t o = 0;

    assert_non_null(s);
    for (unsigned i = 0; i < n; i++) {
        if (arrays || i + 1 == n) {
            memcpy(s + o, arrays ? "[" : "{", 1);
            o += 1;
        } else {
            memcpy(s + o, "{\"a\":", 5);
            o += 5;
        }
    }
    for (unsigned i = 0; i < n; i++)
        s[o++] = arrays ? ']' : '}';
    *len = o;
    return s;
}

static void
check_depth(unsigned n, int arrays, unsigned max_depth, unsigned flags,
            int want_ok)
{
    struct json_field f = {.path = "a", .accept = JSON_ANY};
    struct pick_run r;
    size_t len;
    char *doc = nested_doc(n, arrays, &len);

    run_pick(&r, doc, len, &f, 1, max_depth, flags);
    if (want_ok && r.rc != 0)
        fail_msg("depth %u (max %u, %s) refused: %s", n, max_depth,
                 arrays ? "arrays" : "objects", r.err);
    if (!want_ok && (r.rc != -1 || strstr(r.err, "deep") == NULL))
        fail_msg("depth %u (max %u, %s): rc %d err \"%s\"", n, max_depth,
                 arrays ? "arrays" : "objects", r.rc, r.err);
    run_done(&r);
    free(doc);
}

static void
test_pick_depth_limit(void **state)
{
    (void)state;
    for (unsigned max = 1; max <= 20; max++) {
        check_depth(max, 0, max, JSON_STRICT, 1);
        check_depth(max + 1, 0, max, JSON_STRICT, 0);
        check_depth(max, 1, max, 0, 1);
        check_depth(max + 1, 1, max, 0, 0);
    }
    /* a mix: object > array > object is depth 3 */
    ACCEPTED("{\"x\":[{\"y\":1}]}", 3, JSON_STRICT);
    REFUSED("{\"x\":[{\"y\":[]}]}", 3, JSON_STRICT, "deep");
    /* max_depth 0: not even the document's own object */
    REFUSED("{}", 0, JSON_STRICT, "deep");
    /* scalars have no depth */
    ACCEPTED("{\"x\":1}", 1, JSON_STRICT);
    ACCEPTED("42", 0, 0);
}

/* A huge max_depth neither overflows anything nor lets a very deep
 * document through unbounded. */
static void
test_pick_depth_huge_max(void **state)
{
    (void)state;
    check_depth(40, 0, UINT_MAX, JSON_STRICT, 1);
    check_depth(5000, 1, UINT_MAX, 0, 0);
    check_depth(5000, 0, UINT_MAX, JSON_STRICT, 0);
}

static void
test_pick_surrogate_escapes(void **state)
{
    (void)state;
    REFUSED("{\"x\":\"\\ud800\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\udc00\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\ud800x\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\uDBFF\\u0041\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\ud800\\ud800\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\ude00\\ud83d\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"a\\ud83d\"}", 8, JSON_STRICT, "escape");
    REFUSED("{\"\\ud800\":1}", 8, JSON_STRICT, "escape");
    REFUSED("{\"x\":\"\\ud83d\\n\"}", 8, JSON_STRICT, "escape");
    /* an escaped backslash before "u" is not an escape */
    ACCEPTED("{\"x\":\"\\\\ud800\"}", 8, JSON_STRICT);
    ACCEPTED("{\"x\":\"\\\\\\u00e9\"}", 8, JSON_STRICT);
    /* an escaped quote does not end the string */
    REFUSED("{\"x\":\"\\\" \\ud800\"}", 8, JSON_STRICT, "escape");
}

struct decode_case {
    const char *doc;
    const char *bytes;
    size_t len;
};

/* Escapes decode to the right bytes; the length counts NULs. */
static void
test_pick_escapes_decoded(void **state)
{
    static const struct decode_case cases[] = {
        {"{\"x\":\"\\ud83d\\ude00\"}", "\xf0\x9f\x98\x80", 4},
        {"{\"x\":\"\\uD83D\\uDE00!\"}", "\xf0\x9f\x98\x80!", 5},
        {"{\"x\":\"\\udbff\\udfff\"}", "\xf4\x8f\xbf\xbf", 4},
        {"{\"x\":\"\\ud800\\udc00\"}", "\xf0\x90\x80\x80", 4},
        {"{\"x\":\"a\\u0000b\"}", "a\0b", 3},
        {"{\"x\":\"\\u0000\"}", "\0", 1},
        {"{\"x\":\"\\u00e9\\u20ac\"}", "\xc3\xa9\xe2\x82\xac", 5},
        {"{\"x\":\"\\uffff\"}", "\xef\xbf\xbf", 3},
        {"{\"x\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"}", "\"\\/\b\f\n\r\t", 8},
        {"{\"x\":\"\xc3\xa9t\xc3\xa9\"}", "\xc3\xa9t\xc3\xa9", 5},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        struct json_field f = {.path = "x", .accept = JSON_STRING};
        struct pick_run r;

        run_pick(&r, cases[i].doc, strlen(cases[i].doc), &f, 1, 8,
                 JSON_STRICT);
        if (r.rc != 0)
            fail_msg("%s refused: %s", cases[i].doc, r.err);
        assert_int_equal(f.len, cases[i].len);
        assert_memory_equal(json_field_text(&f, &r.arena), cases[i].bytes,
                            cases[i].len);
        /* NUL after the text */
        assert_int_equal(json_field_text(&f, &r.arena)[f.len], '\0');
        run_done(&r);
    }
}

/* Raw bytes that are not UTF-8 are refused in strict mode, wherever they
 * are. */
static void
test_pick_strict_raw_utf8(void **state)
{
    static const char *const docs[] = {
        "{\"x\":\"\xc0\x80\"}",
        "{\"x\":\"\xed\xa0\x80\"}",
        "{\"x\":\"\xf4\x90\x80\x80\"}",
        "{\"x\":\"\xe0\x80\x80\"}",
        "{\"x\":\"\xff\"}",
        "{\"x\":\"\x80\"}",
        "{\"x\":\"\xe2\x82\"}",
        "{\"\xc0\xaf\":1}",
        "{\"x\":1}\xff",
    };

    (void)state;
    for (size_t i = 0; i < NELEM(docs); i++)
        expect_refused(docs[i], strlen(docs[i]), 8, JSON_STRICT, "UTF-8");
    ACCEPTED("{\"x\":\"\xf0\x9f\x98\x80 \xe2\x82\xac\"}", 8, JSON_STRICT);
}

/* The arena is the only place picked text goes: when it is full, the
 * pick fails instead of truncating. */
static void
test_pick_arena_full(void **state)
{
    static const char doc[] = "{\"x\":\"0123456789\"}";
    struct json_field f = {.path = "x", .accept = JSON_STRING};
    char err[JSON_ERR_LEN];
    struct buf arena;

    (void)state;
    buf_init(&arena, 10); /* 10 bytes of text, but the NUL needs one more */
    assert_int_equal(json_pick(doc, sizeof(doc) - 1, &f, 1, &arena, 8,
                               JSON_STRICT, err),
                     -1);
    assert_non_null(strstr(err, "large"));
    buf_cleanup(&arena);

    buf_init(&arena, 11);
    assert_int_equal(json_pick(doc, sizeof(doc) - 1, &f, 1, &arena, 8,
                               JSON_STRICT, err),
                     0);
    assert_string_equal(json_field_text(&f, &arena), "0123456789");
    buf_cleanup(&arena);
}

/* A field's type is reset by every call, so a reused table does not keep
 * the previous document's values. */
static void
test_pick_resets_types(void **state)
{
    static const char one[] = "{\"x\":\"a\"}";
    static const char two[] = "{\"y\":\"b\"}";
    struct json_field f = {.path = "x", .accept = JSON_STRING};
    struct pick_run r;

    (void)state;
    run_pick(&r, one, sizeof(one) - 1, &f, 1, 8, JSON_STRICT);
    assert_int_equal(f.type, JSON_STRING);
    run_done(&r);
    run_pick(&r, two, sizeof(two) - 1, &f, 1, 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_int_equal(f.type, 0);
    run_done(&r);
}

struct int_case {
    const char *num;
    long long min, max;
    int rc;
    long long want;
};

static void
test_field_int(void **state)
{
    static const struct int_case cases[] = {
        {"0", 0, 10, 0, 0},
        {"10", 0, 10, 0, 10},
        {"11", 0, 10, -1, 0},
        {"-1", 0, 10, -1, 0},
        {"-5", -10, 10, 0, -5},
        {"-10", -10, 10, 0, -10},
        {"9223372036854775807", 0, LLONG_MAX, 0, LLONG_MAX},
        {"-9223372036854775808", LLONG_MIN, 0, 0, LLONG_MIN},
        {"9223372036854775808", 0, LLONG_MAX, -1, 0},
        {"-9223372036854775809", LLONG_MIN, 0, -1, 0},
        {"99999999999999999999999", LLONG_MIN, LLONG_MAX, -1, 0},
        {"1.5", 0, 10, -1, 0},
        {"1.0", 0, 10, -1, 0},
        {"1e2", 0, 1000, -1, 0},
        {"1E2", 0, 1000, -1, 0},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        char doc[64];
        struct json_field f = {.path = "n", .accept = JSON_NUMBER};
        struct pick_run r;
        long long out = 12345;

        snprintf(doc, sizeof(doc), "{\"n\":%s}", cases[i].num);
        run_pick(&r, doc, strlen(doc), &f, 1, 8, JSON_STRICT);
        if (r.rc != 0)
            fail_msg("%s refused: %s", doc, r.err);
        if (json_field_int(&f, &r.arena, cases[i].min, cases[i].max, &out) !=
            cases[i].rc)
            fail_msg("%s in [%lld, %lld]: expected %d", cases[i].num,
                     cases[i].min, cases[i].max, cases[i].rc);
        if (cases[i].rc == 0)
            assert_true(out == cases[i].want);
        else
            assert_true(out == 12345); /* untouched on failure */
        run_done(&r);
    }
}

/* Not a number (absent, or a string holding digits): -1. */
static void
test_field_int_wrong_type(void **state)
{
    static const char doc[] = "{\"s\":\"12\",\"n\":3}";
    struct json_field f[] = {
        {.path = "s", .accept = JSON_STRING},
        {.path = "absent", .accept = JSON_NUMBER},
        {.path = "n", .accept = JSON_NUMBER},
    };
    struct pick_run r;
    long long out = 7;

    (void)state;
    run_pick(&r, doc, sizeof(doc) - 1, f, NELEM(f), 8, JSON_STRICT);
    assert_int_equal(r.rc, 0);
    assert_int_equal(json_field_int(&f[0], &r.arena, 0, 100, &out), -1);
    assert_int_equal(json_field_int(&f[1], &r.arena, 0, 100, &out), -1);
    assert_true(out == 7);
    assert_int_equal(json_field_int(&f[2], &r.arena, 0, 100, &out), 0);
    assert_true(out == 3);
    run_done(&r);
}

/* ---- generator ---- */

static void
expect_gen(yajl_gen g, const char *want)
{
    const unsigned char *out;
    size_t len;

    assert_int_equal(yajl_gen_get_buf(g, &out, &len), yajl_gen_status_ok);
    if (len != strlen(want) || memcmp(out, want, len) != 0)
        fail_msg("generated \"%.*s\", want \"%s\"", (int)len,
                 (const char *)out, want);
}

static void
test_gen_object(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_key_cstr(g, "session_id", "abc-1"), 0);
    assert_int_equal(json_gen_key_str(g, "reply", "hi\0there", 8), 0);
    assert_int_equal(json_gen_key_int(g, "n", -42), 0);
    assert_int_equal(json_gen_key_int(g, "big", LLONG_MAX), 0);
    assert_int_equal(json_gen_cstr(g, "list"), 0);
    assert_int_equal(yajl_gen_array_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_cstr(g, "a"), 0);
    assert_int_equal(json_gen_str(g, "bc", 1), 0);
    assert_int_equal(json_gen_int(g, 0), 0);
    assert_int_equal(yajl_gen_array_close(g), yajl_gen_status_ok);
    assert_int_equal(yajl_gen_map_close(g), yajl_gen_status_ok);
    expect_gen(g, "{\"session_id\":\"abc-1\",\"reply\":\"hi\\u0000there\","
                  "\"n\":-42,\"big\":9223372036854775807,"
                  "\"list\":[\"a\",\"b\",0]}");
    yajl_gen_free(g);
}

/* Escaping: quotes, backslash, control characters; '/' and UTF-8 as they
 * are (compact output, no escaping of non-ASCII). */
static void
test_gen_escapes(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_key_cstr(g, "k\"ey", "a\"b\\c/d\n\r\t\x01"
                                                   "\xc3\xa9\xf0\x9f\x98\x80"),
                     0);
    assert_int_equal(yajl_gen_map_close(g), yajl_gen_status_ok);
    expect_gen(g, "{\"k\\\"ey\":\"a\\\"b\\\\c/d\\n\\r\\t\\u0001"
                  "\xc3\xa9\xf0\x9f\x98\x80\"}");
    yajl_gen_free(g);
}

static void
test_gen_restart(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_key_int(g, "a", 1), 0);
    assert_int_equal(yajl_gen_map_close(g), yajl_gen_status_ok);
    expect_gen(g, "{\"a\":1}");
    json_gen_restart(g);
    expect_gen(g, "");
    assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_key_cstr(g, "b", "2"), 0);
    assert_int_equal(yajl_gen_map_close(g), yajl_gen_status_ok);
    expect_gen(g, "{\"b\":\"2\"}");
    yajl_gen_free(g);
}

/* Writing in the wrong state is an error: a value where a key must be. */
static void
test_gen_wrong_state(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_int(g, 1), -1); /* a key must be a string */
    assert_int_equal(json_gen_key_int(g, "k", 1), 0);
    assert_int_equal(yajl_gen_map_close(g), yajl_gen_status_ok);
    /* the document is complete: nothing more may be written */
    assert_int_equal(json_gen_cstr(g, "more"), -1);
    assert_int_equal(json_gen_int(g, 2), -1);
    expect_gen(g, "{\"k\":1}");
    yajl_gen_free(g);
}

/* Bytes yajl's own check already refuses. */
static void
test_gen_refuses_bad_utf8(void **state)
{
    static const struct {
        const char *s;
        size_t n;
    } bad[] = {
        {"\xff", 1}, {"a\xfe", 2}, {"\x80", 1}, {"\xc3", 1},
        {"\xe2\x82", 2}, {"\xc3(", 2},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(bad); i++) {
        yajl_gen g = json_gen_new();

        assert_non_null(g);
        assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
        if (json_gen_key_str(g, "k", bad[i].s, bad[i].n) != -1)
            fail_msg("case %zu: invalid UTF-8 value accepted", i);
        yajl_gen_free(g);

        g = json_gen_new();
        assert_non_null(g);
        if (json_gen_str(g, bad[i].s, bad[i].n) != -1)
            fail_msg("case %zu: invalid UTF-8 string accepted", i);
        yajl_gen_free(g);
    }
    /* and a key that is not UTF-8 */
    {
        yajl_gen g = json_gen_new();

        assert_non_null(g);
        assert_int_equal(yajl_gen_map_open(g), yajl_gen_status_ok);
        assert_int_equal(json_gen_key_cstr(g, "\xff", "v"), -1);
        assert_int_equal(json_gen_key_int(g, "\xff", 1), -1);
        yajl_gen_free(g);
    }
}

/* What the generator writes must be well-formed UTF-8 by json.h's own
 * definition (json_utf8_valid): no overlong forms, no surrogates, nothing
 * above U+10FFFF. yajl's check (yajl_gen_validate_utf8) only looks at the
 * bit patterns, so json_gen_str must not rely on it alone. */
static void
test_gen_refuses_overlong_and_surrogates(void **state)
{
    static const struct {
        const char *s;
        size_t n;
        const char *what;
    } bad[] = {
        {"\xc0\x80", 2, "overlong NUL C0 80"},
        {"\xc1\xbf", 2, "overlong C1 BF"},
        {"\xe0\x80\xaf", 3, "overlong E0 80 AF"},
        {"\xf0\x80\x80\x80", 4, "overlong F0 80 80 80"},
        {"\xed\xa0\x80", 3, "surrogate ED A0 80"},
        {"\xf4\x90\x80\x80", 4, "U+110000"},
    };

    char accepted[256] = "";
    size_t used = 0;

    (void)state;
    for (size_t i = 0; i < NELEM(bad); i++) {
        yajl_gen g = json_gen_new();

        assert_true(json_utf8_valid(bad[i].s, bad[i].n) == 0);
        assert_non_null(g);
        if (json_gen_str(g, bad[i].s, bad[i].n) != -1 &&
            used < sizeof(accepted))
            used += (size_t)snprintf(accepted + used, sizeof(accepted) - used,
                                     "%s%s", used ? ", " : "", bad[i].what);
        yajl_gen_free(g);
    }
    if (used > 0)
        fail_msg("BUG json.c json_gen_str: written as valid UTF-8: %s",
                 accepted);
}

/* A generator that wrote a large document is replaced by a new one; one
 * that wrote a small one is kept. Both go on working. */
static void
test_gen_shrink(void **state)
{
    static char big[BUF_KEEP_BYTES + 1];
    yajl_gen g = json_gen_new(), before = g;
    const unsigned char *doc;
    size_t len;

    (void)state;
    assert_int_equal(json_gen_str(g, "small", 5), 0);
    assert_int_equal(json_gen_shrink(&g), 0);
    assert_ptr_equal(g, before);
    json_gen_restart(g);
    memset(big, 'a', sizeof(big) - 1);
    assert_int_equal(json_gen_str(g, big, sizeof(big) - 1), 0);
    assert_int_equal(json_gen_shrink(&g), 1);
    assert_ptr_not_equal(g, NULL);
    assert_int_equal(json_gen_str(g, "next", 4), 0);
    yajl_gen_get_buf(g, &doc, &len);
    assert_int_equal(len, 6);
    assert_memory_equal(doc, "\"next\"", 6);
    yajl_gen_free(g);
}

/* ---- json_string_decode ---- */

struct string_case {
    const char *in; /* after the opening quote */
    size_t in_len;
    size_t took;    /* 0: refused */
    const char *out;
    size_t out_len;
};

#define DEC(in, took, out) {in, sizeof(in) - 1, took, out, sizeof(out) - 1}
#define BAD(in) {in, sizeof(in) - 1, 0, "", 0}

static const struct string_case string_cases[] = {
    DEC("\"", 1, ""),
    DEC("plain\"", 6, "plain"),
    DEC("stops\" at the quote\"", 6, "stops"),
    DEC("\\\"\\\\\\/\\b\\f\\n\\r\\t\"", 17, "\"\\/\b\f\n\r\t"),
    DEC("\\u00e9t\\u00E9\"", 14, "\xc3\xa9t\xc3\xa9"),
    DEC("\\u0000\"", 7, "\0"),
    DEC("\\u20ac\"", 7, "\xe2\x82\xac"),
    DEC("\\ud83d\\ude00\"", 13, "\xf0\x9f\x98\x80"),
    DEC("\\udbff\\udfff\"", 13, "\xf4\x8f\xbf\xbf"),
    DEC("raw \xc3\xa9 \xf0\x9f\x98\x80\"", 12, "raw \xc3\xa9 \xf0\x9f\x98\x80"),
    BAD(""),
    BAD("no closing quote"),
    BAD("ends in an escape\\"),
    BAD("\\x\""),
    BAD("\\u12\""),
    BAD("\\u12g4\""),
    BAD("\\ud83d\""),
    BAD("\\ud83d\\u0041\""),
    BAD("\\ude00\""),
    BAD("tab\tinside\""),
    BAD("newline\ninside\""),
    BAD("\x01\""),
    BAD("\xff\""),
    BAD("\xc0\x80\""),
    BAD("\xed\xa0\x80\""),
    BAD("\xe2\x82\""),
};

static void
test_string_decode(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(string_cases); i++) {
        const struct string_case *c = &string_cases[i];
        struct buf out;
        size_t took;

        buf_init(&out, 64);
        took = json_string_decode(c->in, c->in_len, &out);
        if (took != c->took)
            fail_msg("case %zu: took %zu bytes, not %zu", i, took, c->took);
        if (took > 0 && (out.len != c->out_len ||
                         memcmp(out.data, c->out, out.len) != 0))
            fail_msg("case %zu: decoded wrong", i);
        buf_cleanup(&out);
    }
}

/* One escape, decoded by json_string_decode and by yajl: the same
 * verdict and the same bytes. */
static void
agree_with_yajl(const char *escape)
{
    char in[32], doc[48];
    int n = snprintf(in, sizeof(in), "a%sz\"", escape);
    struct buf out;
    size_t took;
    yajl_val v;

    snprintf(doc, sizeof(doc), "[\"%s]", in);
    v = yajl_tree_parse(doc, NULL, 0);
    buf_init(&out, 64);
    took = json_string_decode(in, (size_t)n, &out);
    if ((took > 0) != (v != NULL))
        fail_msg("\"%s: decoder %s, yajl %s", in, took ? "takes" : "refuses",
                 v ? "takes" : "refuses");
    if (v != NULL && (strlen(v->u.array.values[0]->u.string) != out.len ||
                      memcmp(v->u.array.values[0]->u.string, out.data,
                             out.len) != 0))
        fail_msg("\"%s: decoded unlike yajl", in);
    buf_cleanup(&out);
    yajl_tree_free(v);
}

/* Every byte after a backslash, and \u escapes across the BMP. yajl turns
 * lone surrogates into '?' and \u0000 into a NUL strlen cannot see, which
 * the table above covers. */
static void
test_string_decode_agrees_with_yajl(void **state)
{
    char escape[8];

    (void)state;
    for (unsigned c = 1; c < 256; c++) {
        if (c == 'u')
            continue;
        snprintf(escape, sizeof(escape), "\\%c", (char)c);
        agree_with_yajl(escape);
    }
    for (unsigned u = 1; u < 0x10000; u += 0x57) {
        if (u >= 0xD800 && u <= 0xDFFF)
            continue;
        snprintf(escape, sizeof(escape), "\\u%04x", u);
        agree_with_yajl(escape);
    }
}

/* Over the cap is a refusal, not a cut string. */
static void
test_string_decode_cap(void **state)
{
    struct buf out;

    (void)state;
    buf_init(&out, 4);
    assert_int_equal(json_string_decode("12345\"", 6, &out), 0);
    buf_reset(&out);
    assert_int_equal(json_string_decode("1234\"", 5, &out), 5);
    buf_cleanup(&out);
}

/* A prepared value goes in as it is, with the separator its place needs. */
static void
test_gen_raw(void **state)
{
    yajl_gen g = json_gen_new();
    const unsigned char *doc;
    size_t len;

    (void)state;
    assert_int_equal(yajl_gen_array_open(g), yajl_gen_status_ok);
    assert_int_equal(json_gen_raw(g, "{\"a\":1}", 7), 0);
    assert_int_equal(json_gen_raw(g, "\"b\\n\"", 5), 0);
    assert_int_equal(yajl_gen_array_close(g), yajl_gen_status_ok);
    yajl_gen_get_buf(g, &doc, &len);
    assert_int_equal(len, 15);
    assert_memory_equal(doc, "[{\"a\":1},\"b\\n\"]", 15);
    yajl_gen_free(g);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_valid),
        cmocka_unit_test(test_utf8_uses_length),
        cmocka_unit_test(test_pick_scalars),
        cmocka_unit_test(test_pick_not_nul_terminated),
        cmocka_unit_test(test_pick_paths),
        cmocka_unit_test(test_pick_path_no_false_match),
        cmocka_unit_test(test_pick_dotted_key),
        cmocka_unit_test(test_pick_empty_path_is_document_only),
        cmocka_unit_test(test_pick_wrong_type),
        cmocka_unit_test(test_pick_strict_needs_object),
        cmocka_unit_test(test_pick_malformed),
        cmocka_unit_test(test_pick_comments_refused),
        cmocka_unit_test(test_pick_trailing_garbage_refused),
        cmocka_unit_test(test_pick_duplicate_keys),
        cmocka_unit_test(test_pick_many_keys),
        cmocka_unit_test(test_pick_many_objects_same_keys),
        cmocka_unit_test(test_pick_colliding_keys_not_slower),
        cmocka_unit_test(test_pick_depth_limit),
        cmocka_unit_test(test_pick_depth_huge_max),
        cmocka_unit_test(test_pick_surrogate_escapes),
        cmocka_unit_test(test_pick_escapes_decoded),
        cmocka_unit_test(test_pick_strict_raw_utf8),
        cmocka_unit_test(test_pick_arena_full),
        cmocka_unit_test(test_pick_resets_types),
        cmocka_unit_test(test_field_int),
        cmocka_unit_test(test_field_int_wrong_type),
        cmocka_unit_test(test_gen_object),
        cmocka_unit_test(test_gen_escapes),
        cmocka_unit_test(test_gen_restart),
        cmocka_unit_test(test_gen_wrong_state),
        cmocka_unit_test(test_gen_refuses_bad_utf8),
        cmocka_unit_test(test_gen_refuses_overlong_and_surrogates),
        cmocka_unit_test(test_gen_shrink),
        cmocka_unit_test(test_string_decode),
        cmocka_unit_test(test_string_decode_agrees_with_yajl),
        cmocka_unit_test(test_string_decode_cap),
        cmocka_unit_test(test_gen_raw),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
