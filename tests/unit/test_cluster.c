/*
 * Unit tests of cluster, Redis Cluster's addressing (pure: no Redis is
 * needed): CRC16 and key slots (the values redis-cli CLUSTER KEYSLOT gives
 * for the same keys), the slot of a command, MOVED and ASK parsing, and
 * the slot map from CLUSTER SLOTS replies written as RESP and read by
 * hiredis's own reader, malformed ones included.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "cluster.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

static void
test_crc16(void **state)
{
    (void)state;
    /* The check value of the Redis Cluster specification. */
    assert_int_equal(cluster_crc16("123456789", 9), 0x31c3);
    assert_int_equal(cluster_crc16("", 0), 0);
}

struct slot_case {
    const char *key;
    int slot;
};

static void
test_key_slots(void **state)
{
    static const struct slot_case cases[] = {
        {"foo", 12182},
        {"bar", 5061},
        {"hello", 866},
        {"123456789", 12739},
        {"{user1000}.following", 3443},
        {"foo{}{bar}", 8363},    /* an empty tag: the whole key */
        {"foo{{bar}}zap", 4015}, /* the tag is "{bar" */
        {"foo{bar}{zap}", 5061}, /* the first tag: "bar" */
        {"{}", 15257},
        {"a{b", 13340},          /* no closing brace */
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        int slot = cluster_key_slot(cases[i].key, strlen(cases[i].key));

        if (slot != cases[i].slot)
            fail_msg("%s: slot %d, not %d", cases[i].key, slot,
                     cases[i].slot);
    }
    /* Every key of a session shares its slot. */
    assert_int_equal(cluster_key_slot("chat:{s1}:history", 17),
                     cluster_key_slot("chat:{s1}:lock", 14));
}

static void
test_command_slot(void **state)
{
    const char *evalsha[] = {"EVALSHA", "abc", "2", "chat:{s}:h", "x"};
    const char *eval0[] = {"eval", "return 1", "0"};
    const char *ping[] = {"PING"};
    const char *get[] = {"GET", "foo"};
    const char *binary[] = {"GET", "bar\0zzz"};
    size_t lens[] = {3, 3};

    (void)state;
    assert_int_equal(cluster_command_slot(5, evalsha, NULL),
                     cluster_key_slot("s", 1));
    assert_int_equal(cluster_command_slot(3, eval0, NULL), -1);
    assert_int_equal(cluster_command_slot(1, ping, NULL), -1);
    assert_int_equal(cluster_command_slot(2, get, NULL), 12182);
    assert_int_equal(cluster_command_slot(2, binary, lens), 5061);
}

struct redirect_case {
    const char *error;
    int ask, slot, port;
    const char *host;
};

static void
test_redirects(void **state)
{
    static const struct redirect_case good[] = {
        {"MOVED 3999 127.0.0.1:6381", 0, 3999, 6381, "127.0.0.1"},
        {"ASK 3999 127.0.0.1:6381", 1, 3999, 6381, "127.0.0.1"},
        {"MOVED 0 ::1:7000", 0, 0, 7000, "::1"},
        {"MOVED 16383 :7000", 0, 16383, 7000, ""},
        {"ASK 1 redis-3.internal:65535", 1, 1, 65535, "redis-3.internal"},
    };
    struct cluster_redirect r;

    (void)state;
    for (size_t i = 0; i < NELEM(good); i++) {
        const struct redirect_case *c = &good[i];

        memset(&r, 0x55, sizeof(r));
        if (cluster_redirect_parse(c->error, strlen(c->error), &r) != 0)
            fail_msg("refused: %s", c->error);
        if (r.ask != c->ask || r.slot != c->slot || r.node.port != c->port ||
            strcmp(r.node.host, c->host) != 0)
            fail_msg("%s: ask %d slot %d %s:%d", c->error, r.ask, r.slot,
                     r.node.host, r.node.port);
    }
}

static void
test_bad_redirects(void **state)
{
    static const char *const bad[] = {
        "", "MOVED", "MOVED ", "MOVED 1", "MOVED 1 ", "MOVED 1 h",
        "MOVED 1 h:", "MOVED 1 h:0", "MOVED 1 h:65536", "MOVED 1 h:1x",
        "MOVED 16384 h:1", "MOVED -1 h:1", "MOVED x h:1", "MOVED  1 h:1",
        "MOVED 1234567 h:1", "MOVEDX 1 h:1", "moved 1 h:1", "ASK",
        "ASK 1", "ERR unknown command", "NOSCRIPT No matching script",
        "CLUSTERDOWN The cluster is down", "TRYAGAIN",
    };
    char huge[400];
    struct cluster_redirect r;

    (void)state;
    for (size_t i = 0; i < NELEM(bad); i++)
        if (cluster_redirect_parse(bad[i], strlen(bad[i]), &r) != -1)
            fail_msg("accepted \"%s\"", bad[i]);
    /* A host over the buffer is refused, not cut. */
    snprintf(huge, sizeof(huge), "MOVED 1 %0*d:1", CLUSTER_HOST_MAX, 0);
    assert_int_equal(cluster_redirect_parse(huge, strlen(huge), &r), -1);
    /* The length bounds the parse, not a NUL. */
    assert_int_equal(cluster_redirect_parse("MOVED 1 h:12", 11, &r), 0);
    assert_int_equal(r.node.port, 1);
    assert_int_equal(cluster_redirect_parse("MOVED 1 h\0x:1", 13, &r), -1);
}

/* A reply from n bytes of RESP, through hiredis's reader. */
static redisReply *
resp_n(const char *text, size_t n)
{
    redisReader *reader = redisReaderCreate();
    void *reply = NULL;

    assert_non_null(reader);
    assert_int_equal(redisReaderFeed(reader, text, n), REDIS_OK);
    assert_int_equal(redisReaderGetReply(reader, &reply), REDIS_OK);
    assert_non_null(reply);
    redisReaderFree(reader);
    return reply;
}

static redisReply *
resp(const char *text)
{
    return resp_n(text, strlen(text));
}

/* Three masters (the third one answering, its address left empty), a
 * replica each. */
static const char three_masters[] =
    "*3\r\n"
    "*4\r\n:0\r\n:5460\r\n"
    "*3\r\n$8\r\n10.0.0.1\r\n:7000\r\n$2\r\nid\r\n"
    "*3\r\n$8\r\n10.0.0.4\r\n:7003\r\n$2\r\nid\r\n"
    "*4\r\n:5461\r\n:10922\r\n"
    "*2\r\n$8\r\n10.0.0.2\r\n:7001\r\n"
    "*2\r\n$8\r\n10.0.0.5\r\n:7004\r\n"
    "*3\r\n:10923\r\n:16383\r\n"
    "*2\r\n$0\r\n\r\n:7002\r\n";

static void
test_map_parse(void **state)
{
    struct cluster_map *m = malloc(sizeof(*m));
    redisReply *r = resp(three_masters);
    char err[CLUSTER_ERR_LEN];

    (void)state;
    assert_int_equal(cluster_map_parse(m, r, "10.0.0.3", err), 0);
    assert_int_equal(m->nnodes, 3);
    assert_string_equal(m->nodes[m->owner[0]].host, "10.0.0.1");
    assert_int_equal(m->nodes[m->owner[5460]].port, 7000);
    assert_int_equal(m->nodes[m->owner[5461]].port, 7001);
    assert_int_equal(m->nodes[m->owner[10922]].port, 7001);
    assert_string_equal(m->nodes[m->owner[16383]].host, "10.0.0.3");
    assert_int_equal(cluster_map_find(m, "10.0.0.4", 7003), -1);
    assert_int_equal(cluster_map_find(m, "10.0.0.2", 7001), 1);
    freeReplyObject(r);
    free(m);
}

static void
test_map_with_holes(void **state)
{
    struct cluster_map *m = malloc(sizeof(*m));
    redisReply *r = resp("*1\r\n*3\r\n:100\r\n:100\r\n"
                         "*2\r\n$1\r\nh\r\n:1\r\n");
    char err[CLUSTER_ERR_LEN];

    (void)state;
    assert_int_equal(cluster_map_parse(m, r, "x", err), 0);
    assert_int_equal(m->owner[99], CLUSTER_NO_NODE);
    assert_int_equal(m->owner[100], 0);
    assert_int_equal(m->owner[101], CLUSTER_NO_NODE);
    freeReplyObject(r);
    free(m);
}

static void
test_map_malformed(void **state)
{
    static const char *const bad[] = {
        "*0\r\n",                                            /* no slot */
        "$2\r\nOK\r\n",                                      /* no array */
        ":1\r\n",
        "*1\r\n:1\r\n",                                      /* no entry */
        "*1\r\n*2\r\n:0\r\n:1\r\n",                          /* no master */
        "*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:-1\r\n:5\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:9\r\n:5\r\n*2\r\n$1\r\nh\r\n:1\r\n",   /* end < start */
        "*1\r\n*3\r\n$1\r\n0\r\n:5\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\nh\r\n:0\r\n",   /* port 0 */
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\nh\r\n:65536\r\n",
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\nh\r\n$2\r\n80\r\n",
        "*1\r\n*3\r\n:0\r\n:5\r\n*1\r\n$1\r\nh\r\n",         /* no port */
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n:1\r\n:1\r\n",        /* host int */
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$1\r\n?\r\n:1\r\n",   /* unknown */
        "*1\r\n*3\r\n:0\r\n:5\r\n$1\r\nh\r\n",               /* not array */
        "*1\r\n*3\r\n:0\r\n:5\r\n*-1\r\n",
    };
    struct cluster_map *m = malloc(sizeof(*m));
    char err[CLUSTER_ERR_LEN];

    (void)state;
    for (size_t i = 0; i < NELEM(bad); i++) {
        redisReply *r = resp(bad[i]);

        err[0] = '\0';
        if (cluster_map_parse(m, r, "x", err) != -1)
            fail_msg("accepted reply #%zu", i);
        if (err[0] == '\0')
            fail_msg("reply #%zu: no reason", i);
        freeReplyObject(r);
    }
    free(m);
}

/* A host with a NUL in it would be cut where C reads it: refused. */
static void
test_map_host_with_nul(void **state)
{
    static const char text[] =
        "*1\r\n*3\r\n:0\r\n:5\r\n*2\r\n$3\r\na\0b\r\n:1\r\n";
    struct cluster_map *m = malloc(sizeof(*m));
    redisReply *r = resp_n(text, sizeof(text) - 1);
    char err[CLUSTER_ERR_LEN];

    (void)state;
    assert_int_equal(cluster_map_parse(m, r, "x", err), -1);
    freeReplyObject(r);
    free(m);
}

/* 64 masters fit (a slot's owner is a byte); a 65th is refused. */
static void
test_map_too_many_masters(void **state)
{
    struct cluster_map *m = malloc(sizeof(*m));
    char text[CLUSTER_NODES_MAX * 64 + 64], err[CLUSTER_ERR_LEN];
    size_t o;
    redisReply *r;

    (void)state;
    for (int n = CLUSTER_NODES_MAX; n <= CLUSTER_NODES_MAX + 1; n++) {
        o = (size_t)snprintf(text, sizeof(text), "*%d\r\n", n);
        for (int i = 0; i < n; i++)
            o += (size_t)snprintf(text + o, sizeof(text) - o,
                                  "*3\r\n:%d\r\n:%d\r\n*2\r\n$1\r\nh\r\n"
                                  ":%d\r\n", i, i, 1000 + i);
        r = resp(text);
        assert_int_equal(cluster_map_parse(m, r, "x", err),
                         n > CLUSTER_NODES_MAX ? -1 : 0);
        freeReplyObject(r);
    }
    assert_non_null(strstr(err, "masters"));
    free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc16),
        cmocka_unit_test(test_key_slots),
        cmocka_unit_test(test_command_slot),
        cmocka_unit_test(test_redirects),
        cmocka_unit_test(test_bad_redirects),
        cmocka_unit_test(test_map_parse),
        cmocka_unit_test(test_map_with_holes),
        cmocka_unit_test(test_map_malformed),
        cmocka_unit_test(test_map_host_with_nul),
        cmocka_unit_test(test_map_too_many_masters),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
