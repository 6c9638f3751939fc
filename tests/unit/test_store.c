/*
 * Unit tests of store_addr_parse, the Redis URL parser (pure: no Redis is
 * needed): redis://[user[:password]@]host[:port][/db] and
 * unix:///path[?db=N]; of store_sentinels_parse, the [redis] sentinels
 * list; and of the [redis] rules store_init applies.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "store.h"

#include "conf.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

struct url_case {
    const char *url;
    const char *host;
    int port;
    const char *socket_path;
    const char *user;
    const char *password;
    int db;
};

static const struct url_case good[] = {
    {"redis://localhost", "localhost", 6379, "", "", "", 0},
    {"redis://127.0.0.1", "127.0.0.1", 6379, "", "", "", 0},
    {"redis://redis.internal:6380", "redis.internal", 6380, "", "", "", 0},
    {"redis://h:1", "h", 1, "", "", "", 0},
    {"redis://h:65535", "h", 65535, "", "", "", 0},
    {"redis://h/0", "h", 6379, "", "", "", 0},
    {"redis://h/3", "h", 6379, "", "", "", 3},
    {"redis://h:7000/15", "h", 7000, "", "", "", 15},
    {"redis://h/", "h", 6379, "", "", "", 0},
    {"redis://alice:s3cret@h", "h", 6379, "", "alice", "s3cret", 0},
    {"redis://alice:s3cret@h:6390/2", "h", 6390, "", "alice", "s3cret", 2},
    {"redis://:onlypass@h", "h", 6379, "", "", "onlypass", 0},
    {"redis://:onlypass@h:6380/1", "h", 6380, "", "", "onlypass", 1},
    {"redis://alice:@h", "h", 6379, "", "alice", "", 0},
    {"redis://:p%40ss%3Aw%2Frd%25@h", "h", 6379, "", "", "p@ss:w/rd%", 0},
    {"redis://:%7e%7E@h", "h", 6379, "", "", "~~", 0},
    {"redis://us%65r:pw@h", "h", 6379, "", "user", "pw", 0},
    {"redis://:a:b@h", "h", 6379, "", "", "a:b", 0},
    {"redis://[::1]", "::1", 6379, "", "", "", 0},
    {"redis://[::1]:6380", "::1", 6380, "", "", "", 0},
    {"redis://[::1]:6380/4", "::1", 6380, "", "", "", 4},
    {"redis://:pw@[2001:db8::1]:6381", "2001:db8::1", 6381, "", "", "pw",
     0},
    {"unix:///run/redis/redis.sock", "", 0, "/run/redis/redis.sock", "", "",
     0},
    {"unix:///tmp/r.sock?db=3", "", 0, "/tmp/r.sock", "", "", 3},
    {"unix:///s?db=0", "", 0, "/s", "", "", 0},
};

static void
test_good_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(good); i++) {
        const struct url_case *c = &good[i];
        char err[STORE_ERR_LEN] = "";
        struct store_addr a;

        memset(&a, 0x55, sizeof(a)); /* nothing left from before */
        if (store_addr_parse(c->url, &a, err) != 0)
            fail_msg("%s refused: %s", c->url, err);
        if (strcmp(a.host, c->host) != 0 || a.port != c->port ||
            strcmp(a.socket_path, c->socket_path) != 0 ||
            strcmp(a.user, c->user) != 0 ||
            strcmp(a.password, c->password) != 0 || a.db != c->db)
            fail_msg("%s: host \"%s\" port %d socket \"%s\" user \"%s\" "
                     "password \"%s\" db %d",
                     c->url, a.host, a.port, a.socket_path, a.user,
                     a.password, a.db);
    }
}

static const char *const bad[] = {
    /* other schemes */
    "",
    "localhost:6379",
    "http://localhost:6379",
    "rediss://localhost:6379",
    "REDIS://localhost",
    "redis:/localhost",
    "redis:localhost",
    "unix:/tmp/r.sock",
    "tcp://h:1",
    /* ports */
    "redis://h:",
    "redis://h:abc",
    "redis://h:12ab",
    "redis://h:-1",
    "redis://h:+80",
    "redis://h:65536",
    "redis://h:99999",
    "redis://h:1000000",
    "redis://h:6379:1",
    "redis://h: 6379",
    "redis://[::1]:",
    "redis://[::1]:x",
    "redis://[::1]:70000",
    "redis://[::1]6379",
    "redis://[::1",
    /* empty host */
    "redis://",
    "redis://:6379",
    "redis:///0",
    "redis://user:pw@",
    "redis://user:pw@:6379",
    "redis://[]:6379",
    "redis://[]",
    /* databases */
    "redis://h/x",
    "redis://h/-1",
    "redis://h/1/2",
    "redis://h/1x",
    /* percent-encoding */
    "redis://:%@h",
    "redis://:%4@h",
    "redis://:%zz@h",
    "redis://:%g0@h",
    "redis://:abc%@h",
    "redis://:abc%4@h",
    "redis://%xx:pw@h",
    /* unix sockets */
    "unix://",
    "unix://relative.sock",
    "unix://?db=1",
    "unix:///tmp/r.sock?db=",
    "unix:///tmp/r.sock?db=x",
    "unix:///tmp/r.sock?db=-1",
    "unix:///tmp/r.sock?foo=1",
    "unix:///tmp/r.sock?",
};

static void
test_bad_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(bad); i++) {
        char err[STORE_ERR_LEN] = "";
        struct store_addr a;

        if (store_addr_parse(bad[i], &a, err) != -1)
            fail_msg("accepted \"%s\" (host \"%s\" port %d db %d)", bad[i],
                     a.host, a.port, a.db);
        if (err[0] == '\0')
            fail_msg("\"%s\": no reason given", bad[i]);
    }
}

/* Limits of the fixed-size fields: the longest that fits is taken, one
 * more byte is refused (never truncated). */
static void
test_length_limits(void **state)
{
    char url[1024], err[STORE_ERR_LEN];
    struct store_addr a;
    size_t n;

    (void)state;
    /* socket_path holds 107 bytes and a NUL */
    n = sizeof(a.socket_path) - 1;
    snprintf(url, sizeof(url), "unix://");
    url[7] = '/';
    memset(url + 8, 's', n - 1);
    url[7 + n] = '\0';
    if (store_addr_parse(url, &a, err) != 0)
        fail_msg("socket path of %zu refused: %s", n, err);
    assert_int_equal(strlen(a.socket_path), n);
    url[7 + n] = 's';
    url[8 + n] = '\0';
    assert_int_equal(store_addr_parse(url, &a, err), -1);
    strcpy(url + 8 + n, "?db=2");
    assert_int_equal(store_addr_parse(url, &a, err), -1);

    /* host holds 255 bytes */
    n = sizeof(a.host) - 1;
    strcpy(url, "redis://");
    memset(url + 8, 'h', n);
    strcpy(url + 8 + n, ":1");
    if (store_addr_parse(url, &a, err) != 0)
        fail_msg("host of %zu refused: %s", n, err);
    assert_int_equal(strlen(a.host), n);
    assert_int_equal(a.port, 1);
    memset(url + 8, 'h', n + 1);
    strcpy(url + 9 + n, ":1");
    assert_int_equal(store_addr_parse(url, &a, err), -1);

    /* password holds 255 bytes (decoded) */
    n = sizeof(a.password) - 1;
    strcpy(url, "redis://:");
    memset(url + 9, 'p', n);
    strcpy(url + 9 + n, "@h");
    if (store_addr_parse(url, &a, err) != 0)
        fail_msg("password of %zu refused: %s", n, err);
    assert_int_equal(strlen(a.password), n);
    memset(url + 9, 'p', n + 1);
    strcpy(url + 10 + n, "@h");
    assert_int_equal(store_addr_parse(url, &a, err), -1);

    /* user holds 127 bytes */
    n = sizeof(a.user) - 1;
    strcpy(url, "redis://");
    memset(url + 8, 'u', n);
    strcpy(url + 8 + n, ":pw@h");
    if (store_addr_parse(url, &a, err) != 0)
        fail_msg("user of %zu refused: %s", n, err);
    assert_int_equal(strlen(a.user), n);
    memset(url + 8, 'u', n + 1);
    strcpy(url + 9 + n, ":pw@h");
    assert_int_equal(store_addr_parse(url, &a, err), -1);
}

/* Percent-encoded bytes count once: 255 "%41" decode to 255 bytes. */
static void
test_encoded_password_length(void **state)
{
    char url[1024], err[STORE_ERR_LEN];
    struct store_addr a;
    size_t o;

    (void)state;
    strcpy(url, "redis://:");
    o = strlen(url);
    for (int i = 0; i < 255; i++) {
        memcpy(url + o, "%41", 3);
        o += 3;
    }
    strcpy(url + o, "@h");
    if (store_addr_parse(url, &a, err) != 0)
        fail_msg("refused: %s", err);
    assert_int_equal(strlen(a.password), 255);
    assert_int_equal(a.password[0], 'A');
    assert_int_equal(a.password[254], 'A');
}

/* Port 0 cannot be connected to (it is "any port" to bind()); a URL
 * naming it should fail at config check time, like 65536 does, rather
 * than as a connect error on every request. */
static void
test_port_zero_refused(void **state)
{
    static const char *const urls[] = {"redis://h:0", "redis://h:00000",
                                       "redis://[::1]:0/1"};
    char err[STORE_ERR_LEN];
    struct store_addr a;

    (void)state;
    for (size_t i = 0; i < NELEM(urls); i++)
        if (store_addr_parse(urls[i], &a, err) != -1)
            fail_msg("BUG store.c parse_hostport: \"%s\" accepted with "
                     "port %d", urls[i], a.port);
}

/* The reason names the URL (so that the operator sees which one). */
static void
test_error_message(void **state)
{
    char err[STORE_ERR_LEN] = "";
    struct store_addr a;

    (void)state;
    assert_int_equal(store_addr_parse("http://x", &a, err), -1);
    assert_non_null(strstr(err, "redis://"));
    /* The bad URL is not repeated: it may carry a password. */
    assert_int_equal(store_addr_parse("redis://:s3cret@h:99999", &a, err), -1);
    assert_null(strstr(err, "s3cret"));
}

struct sentinel_case {
    const char *list;
    int n;
    const char *hosts[3];
    int ports[3];
};

static const struct sentinel_case sentinels_good[] = {
    {"", 0, {NULL}, {0}},
    {"   ", 0, {NULL}, {0}},
    {"h", 1, {"h"}, {26379}},
    {"127.0.0.1:26380", 1, {"127.0.0.1"}, {26380}},
    {"a:1,b:2,c:3", 3, {"a", "b", "c"}, {1, 2, 3}},
    {" a:1 , b ,\tc:3 ", 3, {"a", "b", "c"}, {1, 26379, 3}},
    {"[::1]:26379,[2001:db8::2]", 2, {"::1", "2001:db8::2"}, {26379, 26379}},
    {"s1.example:65535", 1, {"s1.example"}, {65535}},
};

static void
test_sentinels_good(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(sentinels_good); i++) {
        const struct sentinel_case *c = &sentinels_good[i];
        struct store_node out[STORE_SENTINELS_MAX];
        char err[STORE_ERR_LEN] = "";
        int n = store_sentinels_parse(c->list, out, err);

        if (n != c->n)
            fail_msg("\"%s\": %d Sentinels, not %d (%s)", c->list, n, c->n,
                     err);
        for (int j = 0; j < n; j++)
            if (strcmp(out[j].host, c->hosts[j]) != 0 ||
                out[j].port != c->ports[j])
                fail_msg("\"%s\" #%d: \"%s\" port %d", c->list, j,
                         out[j].host, out[j].port);
    }
}

static const char *const sentinels_bad[] = {
    ",",
    "a:1,",
    ",a:1",
    "a:1,,b:2",
    "a:1, ,b:2",
    "a:1 b:2",  /* a comma left out */
    "a b",
    "a:",
    "a:0",
    "a:65536",
    "a:x",
    ":26379",
    "[::1",
    "[::1]x",
    "[]:1",
    "a:1;b:2",
};

static void
test_sentinels_bad(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(sentinels_bad); i++) {
        struct store_node out[STORE_SENTINELS_MAX];
        char err[STORE_ERR_LEN] = "";

        if (store_sentinels_parse(sentinels_bad[i], out, err) != -1)
            fail_msg("accepted \"%s\"", sentinels_bad[i]);
        if (strstr(err, "Sentinel") == NULL)
            fail_msg("\"%s\": reason \"%s\"", sentinels_bad[i], err);
    }
}

/* 16 fit; a 17th is refused, not dropped. */
static void
test_sentinels_max(void **state)
{
    struct store_node out[STORE_SENTINELS_MAX];
    char list[STORE_SENTINELS_MAX * 16 + 16] = "", err[STORE_ERR_LEN];
    size_t o = 0;

    (void)state;
    for (int i = 0; i < STORE_SENTINELS_MAX; i++)
        o += (size_t)snprintf(list + o, sizeof(list) - o, "%sh%d:%d",
                              i ? "," : "", i, 26000 + i);
    assert_int_equal(store_sentinels_parse(list, out, err),
                     STORE_SENTINELS_MAX);
    assert_string_equal(out[15].host, "h15");
    assert_int_equal(out[15].port, 26015);
    snprintf(list + o, sizeof(list) - o, ",h16");
    assert_int_equal(store_sentinels_parse(list, out, err), -1);
    assert_non_null(strstr(err, "more than"));
}

struct cluster_case {
    const char *url;
    int n;
    const char *hosts[3];
    int ports[3];
    const char *user, *password;
};

static const struct cluster_case cluster_good[] = {
    {"redis-cluster://h", 1, {"h"}, {6379}, "", ""},
    {"redis-cluster://a:7000,b:7001,c", 3, {"a", "b", "c"},
     {7000, 7001, 6379}, "", ""},
    {"redis-cluster://:pw@a:7000,b:7001", 2, {"a", "b"}, {7000, 7001}, "",
     "pw"},
    {"redis-cluster://u:p%40w@[::1]:7000,[::1]:7001", 2, {"::1", "::1"},
     {7000, 7001}, "u", "p@w"},
    {"redis-cluster://a:1, b:2", 2, {"a", "b"}, {1, 2}, "", ""},
};

static void
test_cluster_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(cluster_good); i++) {
        const struct cluster_case *c = &cluster_good[i];
        char err[STORE_ERR_LEN] = "";
        struct store_addr a;

        if (store_addr_parse(c->url, &a, err) != 0)
            fail_msg("%s refused: %s", c->url, err);
        if (a.nseeds != c->n || strcmp(a.user, c->user) != 0 ||
            strcmp(a.password, c->password) != 0 || a.db != 0)
            fail_msg("%s: %d nodes, user \"%s\" password \"%s\"", c->url,
                     a.nseeds, a.user, a.password);
        for (int j = 0; j < c->n; j++)
            if (strcmp(a.seeds[j].host, c->hosts[j]) != 0 ||
                a.seeds[j].port != c->ports[j])
                fail_msg("%s #%d: %s:%d", c->url, j, a.seeds[j].host,
                         a.seeds[j].port);
    }
}

static void
test_bad_cluster_urls(void **state)
{
    static const char *const urls[] = {
        "redis-cluster://", "redis-cluster://,", "redis-cluster://a:1,",
        "redis-cluster://a:0", "redis-cluster://a:1/0", "redis-cluster://a/",
        "redis-cluster://a:1 b:2", "redis-cluster://:pw@",
        "redis-cluster://%zz@a", "redis-cluster:/a", "REDIS-CLUSTER://a",
        "redis-cluster://a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q",
    };
    char err[STORE_ERR_LEN];
    struct store_addr a;

    (void)state;
    for (size_t i = 0; i < NELEM(urls); i++) {
        err[0] = '\0';
        if (store_addr_parse(urls[i], &a, err) != -1)
            fail_msg("accepted \"%s\"", urls[i]);
        if (strstr(err, "redis-cluster://") == NULL)
            fail_msg("\"%s\": reason \"%s\"", urls[i], err);
    }
}

/* store_init: the [redis] rules across keys (conf_check relies on it). */
static void
test_init_rules(void **state)
{
    char err[CONF_ERR_LEN];
    struct store s;
    struct conf c;

    (void)state;
    assert_int_equal(conf_defaults(&c, err), 0);
    assert_int_equal(store_init(&s, &c), 0);
    assert_int_equal(s.nsentinels, 0);
    assert_int_equal(s.wait_replicas, 0);

    free(c.redis.sentinels);
    c.redis.sentinels = strdup("a:1, b:2");
    assert_non_null(c.redis.sentinels);
    assert_int_equal(store_init(&s, &c), 0);
    assert_int_equal(s.nsentinels, 2);
    assert_string_equal(s.master_name, "mymaster");

    c.redis.master_name[0] = '\0';
    assert_int_equal(store_init(&s, &c), -1);
    assert_non_null(strstr(s.err, "master_name"));
    conf_free(&c);

    /* WAIT's reply must come before the read times out. */
    assert_int_equal(conf_defaults(&c, err), 0);
    c.redis.wait_replicas = 1;
    c.redis.wait_timeout_ms = c.redis.command_timeout_ms;
    assert_int_equal(store_init(&s, &c), -1);
    assert_non_null(strstr(s.err, "wait_timeout_ms"));
    c.redis.wait_timeout_ms = c.redis.command_timeout_ms - 1;
    assert_int_equal(store_init(&s, &c), 0);
    conf_free(&c);

    /* A cluster fails over by itself: no Sentinels beside it. */
    assert_int_equal(conf_defaults(&c, err), 0);
    free(c.redis.url);
    c.redis.url = strdup("redis-cluster://a:7000,b:7001");
    assert_non_null(c.redis.url);
    assert_int_equal(store_init(&s, &c), 0);
    assert_non_null(s.map);
    assert_int_equal(s.addr.nseeds, 2);
    store_cleanup(&s);
    assert_null(s.map);
    free(c.redis.sentinels);
    c.redis.sentinels = strdup("a:1");
    assert_non_null(c.redis.sentinels);
    assert_int_equal(store_init(&s, &c), -1);
    assert_non_null(strstr(s.err, "exclude"));
    assert_null(s.map);
    conf_free(&c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_urls),
        cmocka_unit_test(test_bad_urls),
        cmocka_unit_test(test_length_limits),
        cmocka_unit_test(test_encoded_password_length),
        cmocka_unit_test(test_port_zero_refused),
        cmocka_unit_test(test_error_message),
        cmocka_unit_test(test_sentinels_good),
        cmocka_unit_test(test_sentinels_bad),
        cmocka_unit_test(test_sentinels_max),
        cmocka_unit_test(test_cluster_urls),
        cmocka_unit_test(test_bad_cluster_urls),
        cmocka_unit_test(test_init_rules),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
