/*
 * Unit tests of guard's pure functions: client keys checked against the
 * SHA-256 digests of client_keys, the client's address behind trusted
 * proxies, Idempotency-Key syntax and CORS origins; and of the list
 * syntax of conf they all rely on (conf_list_next, conf_list_has,
 * conf_parse_digests).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>

#include "conf.h"
#include "guard.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))
#define HEX_LEN (2 * CONF_DIGEST_LEN)
#define UNTOUCHED "untouched"

/* The lowercase hex SHA-256 of key, as client_keys holds it. */
static void
digest_hex(const char *key, size_t n, char out[HEX_LEN + 1])
{
    unsigned char d[CONF_DIGEST_LEN];
    unsigned int len = 0;

    assert_int_equal(EVP_Digest(key, n, d, &len, EVP_sha256(), NULL), 1);
    assert_int_equal(len, CONF_DIGEST_LEN);
    for (size_t i = 0; i < CONF_DIGEST_LEN; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* "key:" and the first 16 hex digits of the key's digest. */
static void
key_client(const char *key, size_t n, char out[HTTP_CLIENT_LEN])
{
    char hex[HEX_LEN + 1];

    digest_hex(key, n, hex);
    snprintf(out, HTTP_CLIENT_LEN, "key:%.16s", hex);
}

/* Defaults, with the digests of keys (separated by sep) as client_keys. */
static void
conf_with_keys(struct conf *c, const char *const *keys, size_t nkeys,
               const char *sep)
{
    char err[CONF_ERR_LEN] = "";
    char list[1024] = "";
    char hex[HEX_LEN + 1];
    size_t used = 0;

    assert_int_equal(conf_defaults(c, err), 0);
    assert_true(nkeys * (HEX_LEN + strlen(sep)) < sizeof(list));
    for (size_t i = 0; i < nkeys; i++) {
        digest_hex(keys[i], strlen(keys[i]), hex);
        used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s",
                                 i > 0 ? sep : "", hex);
    }
    assert_int_equal(conf_parse_digests(list, &c->client_digests,
                                        &c->nclient_digests),
                     0);
    assert_int_equal(c->nclient_digests, nkeys);
}

/* No client_keys: every request passes, and its identity is left to
 * guard_client_address. */
static void
test_check_key_none_configured(void **state)
{
    static const char *const auths[] = {"", "Bearer anything",
                                        "Basic dXNlcjpwYXNz", "Bearer "};
    char err[CONF_ERR_LEN] = "";
    char client[HTTP_CLIENT_LEN];
    struct conf c;

    (void)state;
    assert_int_equal(conf_defaults(&c, err), 0);
    assert_int_equal(c.nclient_digests, 0);
    for (size_t i = 0; i < NELEM(auths); i++) {
        snprintf(client, sizeof(client), "%s", UNTOUCHED);
        if (guard_check_key(&c, auths[i], client) != 1)
            fail_msg("\"%s\": refused with no keys configured", auths[i]);
        if (strcmp(client, UNTOUCHED) != 0)
            fail_msg("\"%s\": client became \"%s\"", auths[i], client);
    }
    conf_free(&c);
}

static const char *const client_keys[] = {"sk-alpha", "sk-beta",
                                          "sk-gamma-0123456789"};

struct key_case {
    const char *what;
    const char *authorization;
    int want;
    int key; /* index into client_keys of the identity; -1 when refused */
};

static const struct key_case key_cases[] = {
    {"first key", "Bearer sk-alpha", 1, 0},
    {"second key", "Bearer sk-beta", 1, 1},
    {"third key", "Bearer sk-gamma-0123456789", 1, 2},
    {"bearer in lower case", "bearer sk-alpha", 1, 0},
    {"bearer in upper case", "BEARER sk-beta", 1, 1},
    {"bearer in mixed case", "bEaReR sk-gamma-0123456789", 1, 2},
    {"wrong key", "Bearer sk-delta", 0, -1},
    {"key in another case", "Bearer SK-ALPHA", 0, -1},
    {"prefix of a key", "Bearer sk-alph", 0, -1},
    {"key with a suffix", "Bearer sk-alphaX", 0, -1},
    {"key with a trailing space", "Bearer sk-alpha ", 0, -1},
    {"two spaces after Bearer", "Bearer  sk-alpha", 0, -1},
    {"two keys at once", "Bearer sk-alpha,sk-beta", 0, -1},
    {"empty key", "Bearer ", 0, -1},
    {"Bearer without space", "Bearer", 0, -1},
    {"no space before the key", "Bearersk-alpha", 0, -1},
    {"no header", "", 0, -1},
    {"key without Bearer", "sk-alpha", 0, -1},
    {"another scheme", "Basic sk-alpha", 0, -1},
    {"the digest instead of the key", "Bearer "
     "0000000000000000000000000000000000000000000000000000000000000000",
     0, -1},
};

static void
test_check_key_table(void **state)
{
    static const char *const seps[] = {",", ", ", " "};
    char client[HTTP_CLIENT_LEN], want[HTTP_CLIENT_LEN];
    struct conf c;

    (void)state;
    for (size_t s = 0; s < NELEM(seps); s++) {
        conf_with_keys(&c, client_keys, NELEM(client_keys), seps[s]);
        for (size_t i = 0; i < NELEM(key_cases); i++) {
            const struct key_case *k = &key_cases[i];
            int got;

            snprintf(client, sizeof(client), "%s", UNTOUCHED);
            got = guard_check_key(&c, k->authorization, client);
            if (got != k->want)
                fail_msg("%s (keys separated by \"%s\"): got %d, want %d",
                         k->what, seps[s], got, k->want);
            if (k->key < 0)
                continue;
            key_client(client_keys[k->key], strlen(client_keys[k->key]),
                       want);
            if (strcmp(client, want) != 0)
                fail_msg("%s: client \"%s\", want \"%s\"", k->what, client,
                         want);
        }
        conf_free(&c);
    }
}

/* One key configured: only it passes, and the identity is its own. */
static void
test_check_key_single(void **state)
{
    static const char *const one[] = {"sk-beta"};
    char client[HTTP_CLIENT_LEN], want[HTTP_CLIENT_LEN];
    struct conf c;

    (void)state;
    conf_with_keys(&c, one, 1, ",");
    assert_int_equal(guard_check_key(&c, "Bearer sk-alpha", client), 0);
    assert_int_equal(guard_check_key(&c, "Bearer sk-beta", client), 1);
    key_client("sk-beta", 7, want);
    assert_string_equal(client, want);
    /* "key:" and 16 hex digits, nothing more. */
    assert_int_equal(strlen(client), 4 + 16);
    assert_int_equal(strspn(client + 4, "0123456789abcdef"), 16);
    conf_free(&c);
}

/* Keys up to 512 bytes are checked; a longer one is refused before it is
 * hashed, even when its digest is configured. */
static void
test_check_key_length(void **state)
{
    enum { LONG = 513 };
    char key512[512 + 1], key513[LONG + 1];
    char auth[sizeof("Bearer ") + LONG];
    char client[HTTP_CLIENT_LEN], want[HTTP_CLIENT_LEN];
    const char *keys[2];
    struct conf c;

    (void)state;
    memset(key512, 'k', 512);
    key512[512] = '\0';
    memset(key513, 'k', LONG);
    key513[LONG] = '\0';
    keys[0] = key512;
    keys[1] = key513;
    conf_with_keys(&c, keys, 2, ",");

    snprintf(auth, sizeof(auth), "Bearer %s", key512);
    if (guard_check_key(&c, auth, client) != 1)
        fail_msg("a configured key of 512 bytes: refused");
    key_client(key512, 512, want);
    assert_string_equal(client, want);

    snprintf(auth, sizeof(auth), "Bearer %s", key513);
    snprintf(client, sizeof(client), "%s", UNTOUCHED);
    if (guard_check_key(&c, auth, client) != 0)
        fail_msg("a configured key of 513 bytes: accepted");
    assert_string_equal(client, UNTOUCHED);
    conf_free(&c);
}

/* An empty key is refused before it is hashed, even when the digest of
 * "" is configured. */
static void
test_check_key_empty(void **state)
{
    static const char *const keys[] = {"", "sk-alpha"};
    char client[HTTP_CLIENT_LEN];
    struct conf c;

    (void)state;
    conf_with_keys(&c, keys, NELEM(keys), ",");
    snprintf(client, sizeof(client), "%s", UNTOUCHED);
    if (guard_check_key(&c, "Bearer ", client) != 0)
        fail_msg("\"Bearer \" accepted with the digest of \"\" configured");
    if (guard_check_key(&c, "bearer ", client) != 0)
        fail_msg("\"bearer \" accepted with the digest of \"\" configured");
    assert_string_equal(client, UNTOUCHED);
    assert_int_equal(guard_check_key(&c, "Bearer sk-alpha", client), 1);
    conf_free(&c);
}

struct address_case {
    const char *what;
    const char *remote;
    const char *forwarded_for;
    const char *trusted;
    const char *want;
};

static const struct address_case address_cases[] = {
    /* An untrusted peer's X-Forwarded-For is the client's own word. */
    {"no proxy trusted", "203.0.113.5", "198.51.100.1", "",
     "addr:203.0.113.5"},
    {"remote not trusted", "203.0.113.5", "198.51.100.1", "10.0.0.1",
     "addr:203.0.113.5"},
    {"remote a prefix of a trusted one", "10.0.0.1", "198.51.100.1",
     "10.0.0.10", "addr:10.0.0.1"},
    {"remote extends a trusted one", "10.0.0.10", "198.51.100.1",
     "10.0.0.1", "addr:10.0.0.10"},
    {"no X-Forwarded-For, untrusted", "203.0.113.5", "", "10.0.0.1",
     "addr:203.0.113.5"},

    /* A trusted proxy vouches for the hop before it. */
    {"trusted proxy, one entry", "10.0.0.1", "198.51.100.1", "10.0.0.1",
     "addr:198.51.100.1"},
    {"rightmost entry, the left one spoofed", "10.0.0.1",
     "1.1.1.1, 2.2.2.2", "10.0.0.1", "addr:2.2.2.2"},
    {"rightmost entry, no spaces", "10.0.0.1", "1.1.1.1,2.2.2.2,3.3.3.3",
     "10.0.0.1", "addr:3.3.3.3"},
    {"trusted proxy, no X-Forwarded-For", "10.0.0.1", "", "10.0.0.1",
     "addr:10.0.0.1"},
    {"trusted among several", "10.0.0.2", "198.51.100.1",
     "10.0.0.1, 10.0.0.2 10.0.0.3", "addr:198.51.100.1"},

    /* Chains of trusted proxies are walked from the right. */
    {"chain of two", "10.0.0.1", "1.1.1.1, 2.2.2.2, 10.0.0.2",
     "10.0.0.1,10.0.0.2", "addr:2.2.2.2"},
    {"chain of three", "10.0.0.1", "2.2.2.2, 10.0.0.3, 10.0.0.2",
     "10.0.0.1 10.0.0.2 10.0.0.3", "addr:2.2.2.2"},
    {"untrusted hop stops the walk", "10.0.0.1",
     "10.0.0.2, 5.5.5.5, 10.0.0.3", "10.0.0.1,10.0.0.2,10.0.0.3",
     "addr:5.5.5.5"},
    {"every hop trusted: the leftmost", "10.0.0.1", "10.0.0.2, 10.0.0.3",
     "10.0.0.1,10.0.0.2,10.0.0.3", "addr:10.0.0.2"},
    {"one entry, itself trusted", "10.0.0.1", "10.0.0.2",
     "10.0.0.1,10.0.0.2", "addr:10.0.0.2"},

    /* Spaces around entries are not part of the address. */
    {"spaces around entries", "10.0.0.1", "  1.1.1.1  ,   2.2.2.2   ",
     "10.0.0.1", "addr:2.2.2.2"},
    {"spaces around a trusted hop", "10.0.0.1", "2.2.2.2 ,  10.0.0.2  ",
     "10.0.0.1,10.0.0.2", "addr:2.2.2.2"},
    {"leading spaces only", "10.0.0.1", "   7.7.7.7", "10.0.0.1",
     "addr:7.7.7.7"},

    /* "*" trusts every hop, so the leftmost entry is reached: the reason
     * conf_check refuses it in trusted_proxies. These pin what guard
     * would do with such a list, not a supported configuration. */
    {"star, several entries", "203.0.113.5", "1.1.1.1, 2.2.2.2, 3.3.3.3",
     "*", "addr:1.1.1.1"},
    {"star, one entry", "203.0.113.5", "9.9.9.9", "*", "addr:9.9.9.9"},
    {"star, no X-Forwarded-For", "203.0.113.5", "", "*",
     "addr:203.0.113.5"},
    {"star among other entries", "203.0.113.5", "1.1.1.1, 2.2.2.2",
     "10.0.0.1, *", "addr:1.1.1.1"},

    {"IPv6", "::1", "2001:db8::7", "::1", "addr:2001:db8::7"},
    {"IPv6 untrusted", "2001:db8::1", "2001:db8::7", "::1",
     "addr:2001:db8::1"},
};

static void
test_client_address_table(void **state)
{
    char client[HTTP_CLIENT_LEN];

    (void)state;
    for (size_t i = 0; i < NELEM(address_cases); i++) {
        const struct address_case *a = &address_cases[i];

        memset(client, 'x', sizeof(client));
        guard_client_address(a->remote, a->forwarded_for, a->trusted,
                             client);
        if (memchr(client, '\0', sizeof(client)) == NULL)
            fail_msg("%s: client not terminated", a->what);
        if (strcmp(client, a->want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", a->what, client,
                     a->want);
    }
}

/* A forwarded entry or a remote address longer than the identity is cut
 * to HTTP_CLIENT_LEN - 1 bytes; nothing past the buffer is written. */
static void
test_client_address_bounded(void **state)
{
    struct {
        char client[HTTP_CLIENT_LEN];
        char canary[32];
    } out;
    char longaddr[4 * HTTP_CLIENT_LEN];
    char xff[sizeof(longaddr) + 32];
    char want[HTTP_CLIENT_LEN];
    size_t keep = HTTP_CLIENT_LEN - 1 - strlen("addr:");
    char canary[sizeof(out.canary)];

    (void)state;
    for (size_t i = 0; i < sizeof(longaddr) - 1; i++)
        longaddr[i] = (char)('0' + i % 10);
    longaddr[sizeof(longaddr) - 1] = '\0';
    snprintf(want, sizeof(want), "addr:%.*s", (int)keep, longaddr);
    memset(canary, 0x5a, sizeof(canary));

    /* a long rightmost entry behind a trusted proxy */
    snprintf(xff, sizeof(xff), "1.1.1.1, %s", longaddr);
    memset(&out, 0x5a, sizeof(out));
    guard_client_address("10.0.0.1", xff, "10.0.0.1", out.client);
    assert_string_equal(out.client, want);
    assert_int_equal(strlen(out.client), HTTP_CLIENT_LEN - 1);
    assert_memory_equal(out.canary, canary, sizeof(canary));

    /* the same as the leftmost entry, reached through "*" */
    snprintf(xff, sizeof(xff), "%s, 2.2.2.2", longaddr);
    memset(&out, 0x5a, sizeof(out));
    guard_client_address("10.0.0.1", xff, "*", out.client);
    assert_string_equal(out.client, want);
    assert_memory_equal(out.canary, canary, sizeof(canary));

    /* a long remote address, untrusted */
    memset(&out, 0x5a, sizeof(out));
    guard_client_address(longaddr, "1.1.1.1", "", out.client);
    assert_string_equal(out.client, want);
    assert_memory_equal(out.canary, canary, sizeof(canary));
}

struct idem_case {
    const char *what;
    const char *key;
    int want;
};

static const struct idem_case idem_cases[] = {
    {"one character", "a", 1},
    {"a UUID", "0f8fad5b-d9cb-469f-a165-70867728950e", 1},
    {"punctuation", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", 1},
    {"space is printable", "key with spaces", 1},
    {"a lone space", " ", 1},
    {"tilde, the last printable", "~", 1},
    {"empty", "", 0},
    {"tab", "a\tb", 0},
    {"newline", "a\nb", 0},
    {"carriage return", "a\rb", 0},
    {"escape", "\x1b[0m", 0},
    {"unit separator 0x1f", "a\x1f", 0},
    {"DEL 0x7f", "a\x7f", 0},
    {"byte 0x80", "a\x80", 0},
    {"byte 0xff", "\xff", 0},
    {"UTF-8 letter", "caf\xc3\xa9", 0},
    {"UTF-8 emoji", "\xf0\x9f\x98\x80", 0},
};

static void
test_idempotency_key_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(idem_cases); i++) {
        const struct idem_case *k = &idem_cases[i];
        int got = guard_idempotency_key_valid(k->key);

        if (got != k->want)
            fail_msg("%s: got %d, want %d", k->what, got, k->want);
    }
}

/* 1 to 128 characters; every byte from 0x20 to 0x7e, and no other. */
static void
test_idempotency_key_bounds(void **state)
{
    char s[GUARD_IDEMPOTENCY_MAX + 2];
    char one[4];

    (void)state;
    assert_int_equal(GUARD_IDEMPOTENCY_MAX, 128);
    memset(s, 'k', sizeof(s));
    s[128] = '\0';
    assert_int_equal(guard_idempotency_key_valid(s), 1);
    s[128] = 'k';
    s[129] = '\0';
    assert_int_equal(guard_idempotency_key_valid(s), 0);

    for (int b = 1; b < 256; b++) {
        int want = b >= 0x20 && b <= 0x7e;

        /* alone, and in the middle of a valid key */
        snprintf(one, sizeof(one), "%c", b);
        if (guard_idempotency_key_valid(one) != want)
            fail_msg("byte 0x%02x alone: want %d", b, want);
        snprintf(one, sizeof(one), "a%cb", b);
        if (guard_idempotency_key_valid(one) != want)
            fail_msg("byte 0x%02x inside: want %d", b, want);
    }
}

struct origin_case {
    const char *what;
    const char *list;
    const char *origin;
    int want;
};

static const struct origin_case origin_cases[] = {
    {"exact", "https://a.example", "https://a.example", 1},
    {"second of two, comma", "https://a.example,https://b.example",
     "https://b.example", 1},
    {"second of two, space", "https://a.example https://b.example",
     "https://b.example", 1},
    {"second of two, comma and spaces",
     "  https://a.example ,  https://b.example  ", "https://b.example", 1},
    {"first of two", "https://a.example, https://b.example",
     "https://a.example", 1},
    {"with a port", "http://localhost:8080", "http://localhost:8080", 1},
    {"not listed", "https://a.example", "https://c.example", 0},
    {"prefix of an entry", "https://a.example", "https://a.exampl", 0},
    {"entry is a prefix", "https://a.example", "https://a.example.evil", 0},
    {"suffix of an entry", "https://a.example", "a.example", 0},
    {"entry is a suffix", "https://a.example", "https://xa.example", 0},
    {"other scheme", "https://a.example", "http://a.example", 0},
    {"other port", "https://a.example", "https://a.example:8443", 0},
    {"trailing slash", "https://a.example", "https://a.example/", 0},
    {"case differs", "https://a.example", "HTTPS://A.EXAMPLE", 0},
    {"origin spanning two entries", "https://a.example,https://b.example",
     "https://a.example,https://b.example", 0},
    {"empty list", "", "https://a.example", 0},
    {"empty origin", "https://a.example", "", 0},
    {"empty origin, empty list", "", "", 0},
    {"star allows any", "*", "https://anything.example", 1},
    {"star allows null", "*", "null", 1},
    {"star among entries", "https://a.example, *", "https://z.example", 1},
    {"star never allows empty", "*", "", 0},
    {"star is not a glob", "https://*.example", "https://a.example", 0},
    {"double star is not star", "**", "https://a.example", 0},
};

static void
test_origin_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(origin_cases); i++) {
        const struct origin_case *o = &origin_cases[i];
        int got = guard_origin_allowed(o->list, o->origin);

        if (got != o->want)
            fail_msg("%s: \"%s\" in \"%s\": got %d, want %d", o->what,
                     o->origin, o->list, got, o->want);
    }
}

struct list_case {
    const char *what;
    const char *list;
    const char *s;
    int n; /* bytes of s; -1: all */
    int want;
};

static const struct list_case list_cases[] = {
    {"empty list", "", "a", -1, 0},
    {"empty list, empty entry", "", "", -1, 0},
    {"separators only", " ,, , ", "", -1, 0},
    {"only entry", "a", "a", -1, 1},
    {"comma", "a,b", "b", -1, 1},
    {"space", "a b", "b", -1, 1},
    {"runs of separators", " , a ,, b , ", "b", -1, 1},
    {"entry longer", "ab", "a", -1, 0},
    {"entry shorter", "a", "ab", -1, 0},
    {"empty s is no entry", "a,,b", "", -1, 0},
    {"s counted by n", "ab", "abc", 2, 1},
    {"n stops short", "abc", "abc", 2, 0},
    {"star matches any", "*", "anything", -1, 1},
    {"star matches empty", "*", "", -1, 1},
    {"star among entries", "a, *", "z", -1, 1},
    {"double star", "**", "z", -1, 0},
    {"star suffix is literal", "a*", "ab", -1, 0},
    {"star itself, literal list", "a", "*", -1, 0},
    {"tab is not a separator", "a\tb", "b", -1, 0},
};

static void
test_list_has_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(list_cases); i++) {
        const struct list_case *l = &list_cases[i];
        size_t n = l->n < 0 ? strlen(l->s) : (size_t)l->n;
        int got = conf_list_has(l->list, l->s, n);

        if (got != l->want)
            fail_msg("%s: \"%.*s\" in \"%s\": got %d, want %d", l->what,
                     (int)n, l->s, l->list, got, l->want);
    }
}

struct next_case {
    const char *what;
    const char *list;
    const char *want[4]; /* the entries, then NULL */
};

static const struct next_case next_cases[] = {
    {"empty", "", {NULL}},
    {"separators only", " , ,,", {NULL}},
    {"one", "abc", {"abc", NULL}},
    {"commas", "a,bb,ccc", {"a", "bb", "ccc", NULL}},
    {"spaces", "a bb ccc", {"a", "bb", "ccc", NULL}},
    {"mixed runs", "  a, bb ,,ccc  ", {"a", "bb", "ccc", NULL}},
    {"star", "*", {"*", NULL}},
};

static void
test_list_next_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(next_cases); i++) {
        const struct next_case *t = &next_cases[i];
        const char *p = t->list, *entry;
        size_t len = 0, k = 0;

        while ((entry = conf_list_next(&p, &len)) != NULL) {
            if (t->want[k] == NULL)
                fail_msg("%s: extra entry \"%.*s\"", t->what, (int)len,
                         entry);
            if (len != strlen(t->want[k]) ||
                memcmp(entry, t->want[k], len) != 0)
                fail_msg("%s: entry %zu is \"%.*s\", want \"%s\"", t->what,
                         k, (int)len, entry, t->want[k]);
            /* the entry points into the list, not into a copy */
            if (entry < t->list || entry + len > t->list + strlen(t->list))
                fail_msg("%s: entry %zu outside the list", t->what, k);
            k++;
        }
        if (t->want[k] != NULL)
            fail_msg("%s: %zu entries, want more", t->what, k);
        /* at the end it stays at the end */
        if (conf_list_next(&p, &len) != NULL)
            fail_msg("%s: an entry after the end", t->what);
    }
}

/* 00 01 ... 1f */
#define HEX_SEQ                                                                \
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
#define HEX_FF                                                                 \
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"

struct digests_case {
    const char *what;
    const char *list;
    int want_rc;
    size_t want_n;
};

static const struct digests_case digests_cases[] = {
    {"empty list", "", 0, 0},
    {"separators only", " , ,", 0, 0},
    {"one", HEX_SEQ, 0, 1},
    {"upper case hex", "000102030405060708090A0B0C0D0E0F"
                       "101112131415161718191A1B1C1D1E1F", 0, 1},
    {"two, comma", HEX_SEQ "," HEX_FF, 0, 2},
    {"two, comma and spaces", "  " HEX_SEQ " ,  " HEX_FF "  ", 0, 2},
    {"two, space", HEX_SEQ " " HEX_FF, 0, 2},
    {"63 hex digits",
     "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1", -1,
     0},
    {"65 hex digits", HEX_SEQ "0", -1, 0},
    {"non-hex digit g",
     "0g0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", -1,
     0},
    {"non-hex digit at the end",
     "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1z", -1,
     0},
    {"0x prefix", "0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b"
                  "1c1d1e1f", -1, 0},
    {"good then bad", HEX_SEQ ",abc", -1, 0},
    {"bad then good", "abc," HEX_SEQ, -1, 0},
    {"a key, not a digest", "sk-alpha", -1, 0},
};

static void
test_parse_digests_table(void **state)
{
    static unsigned char sentinel[1][CONF_DIGEST_LEN];

    (void)state;
    for (size_t i = 0; i < NELEM(digests_cases); i++) {
        const struct digests_case *d = &digests_cases[i];
        unsigned char (*out)[CONF_DIGEST_LEN] = sentinel;
        size_t n = 99;
        int rc = conf_parse_digests(d->list, &out, &n);

        if (rc != d->want_rc)
            fail_msg("%s: rc %d, want %d", d->what, rc, d->want_rc);
        if (n != d->want_n)
            fail_msg("%s: n %zu, want %zu", d->what, n, d->want_n);
        if (d->want_n == 0 && out != NULL)
            fail_msg("%s: out not NULL", d->what);
        if (d->want_n > 0 && (out == NULL || out == sentinel))
            fail_msg("%s: no digests", d->what);
        if (d->want_n > 0) {
            for (size_t b = 0; b < CONF_DIGEST_LEN; b++)
                if (out[0][b] != b)
                    fail_msg("%s: byte %zu is %02x", d->what, b, out[0][b]);
        }
        if (d->want_n > 1) {
            for (size_t b = 0; b < CONF_DIGEST_LEN; b++)
                if (out[1][b] != 0xff)
                    fail_msg("%s: second digest byte %zu is %02x", d->what,
                             b, out[1][b]);
        }
        free(out == sentinel ? NULL : out);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_key_none_configured),
        cmocka_unit_test(test_check_key_table),
        cmocka_unit_test(test_check_key_single),
        cmocka_unit_test(test_check_key_length),
        cmocka_unit_test(test_check_key_empty),
        cmocka_unit_test(test_client_address_table),
        cmocka_unit_test(test_client_address_bounded),
        cmocka_unit_test(test_idempotency_key_table),
        cmocka_unit_test(test_idempotency_key_bounds),
        cmocka_unit_test(test_origin_table),
        cmocka_unit_test(test_list_has_table),
        cmocka_unit_test(test_list_next_table),
        cmocka_unit_test(test_parse_digests_table),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
