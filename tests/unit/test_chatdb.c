/*
 * Unit tests of chatdb, the chat's Redis schema. The pure parts first:
 * the stored form of a message (chatdb_add_item) and the trim rule that
 * keeps a session under its message and byte limits by whole pairs. Then
 * every script against a real redis-server that the test starts on a
 * unix socket in a scratch directory and stops at the end: the turn lock,
 * idempotency records, rate limits, the commit's trim and deadline, the
 * EVAL fallback after a script flush, and history load and delete.
 * The scripts' tests run twice: on a plain server, then on a one-node
 * Redis Cluster, where a script whose keys span two slots fails.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "buf.h"
#include "chatdb.h"
#include "clock.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "messages.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

struct json_item {
    const char *json;
    enum message_role role;
    const char *content;
    size_t len;
};

static void
test_add_json_accepted(void **state)
{
    static const struct json_item items[] = {
        {"{\"role\":\"user\",\"content\":\"hello\"}", MESSAGE_USER, "hello",
         5},
        {"{\"role\":\"assistant\",\"content\":\"hi\"}", MESSAGE_ASSISTANT,
         "hi", 2},
        {"{\"content\":\"order\",\"role\":\"user\"}", MESSAGE_USER, "order",
         5},
        {" { \"role\" : \"user\" , \"content\" : \"\" } ", MESSAGE_USER, "",
         0},
        {"{\"role\":\"user\",\"content\":\"a\\nb \\\"q\\\" \\u00e9\"}",
         MESSAGE_USER, "a\nb \"q\" \xc3\xa9", 10},
        {"{\"role\":\"user\",\"content\":\"nul\\u0000in\"}", MESSAGE_USER,
         "nul\0in", 6},
        {"{\"role\":\"user\",\"content\":\"\\ud83d\\ude00\"}", MESSAGE_USER,
         "\xf0\x9f\x98\x80", 4},
        /* later versions may store more fields */
        {"{\"role\":\"assistant\",\"content\":\"x\",\"ts\":1,\"meta\":{}}",
         MESSAGE_ASSISTANT, "x", 1},
    };
    struct messages h;

    (void)state;
    messages_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items); i++) {
        if (chatdb_add_item(&h, items[i].json, strlen(items[i].json)) != 0)
            fail_msg("refused: %s", items[i].json);
        assert_int_equal(h.count, i + 1);
        assert_int_equal(h.msgs[i].role, items[i].role);
        assert_int_equal(h.msgs[i].len, items[i].len);
        assert_memory_equal(messages_content(&h, i), items[i].content,
                            items[i].len);
    }
    messages_cleanup(&h);
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
    struct messages h;

    (void)state;
    messages_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items); i++) {
        if (chatdb_add_item(&h, items[i], strlen(items[i])) != -1)
            fail_msg("accepted: %s", items[i]);
        assert_int_equal(h.count, 0);
    }
    messages_cleanup(&h);
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
    struct messages h;

    (void)state;
    messages_init(&h, 4096);
    for (size_t i = 0; i < NELEM(items) && accepted == NULL; i++)
        if (chatdb_add_item(&h, items[i], strlen(items[i])) != -1)
            accepted = items[i];
    messages_cleanup(&h); /* before failing, so that ASan reports no leak */
    if (accepted != NULL)
        fail_msg("BUG chatdb.c chatdb_add_item: role compared with "
                 "strcmp, accepted: %s", accepted);
}

/* The JSON length is the bound: bytes after it are not part of the item,
 * and the text need not be NUL-terminated. */
static void
test_add_json_uses_length(void **state)
{
    static const char text[] = "{\"role\":\"user\",\"content\":\"ok\"}XYZ";
    struct messages h;

    (void)state;
    messages_init(&h, 64);
    assert_int_equal(chatdb_add_item(&h, text, sizeof(text) - 4), 0);
    assert_string_equal(messages_content(&h, 0), "ok");
    assert_int_equal(chatdb_add_item(&h, text, sizeof(text) - 1), -1);
    assert_int_equal(h.count, 1);
    messages_cleanup(&h);
}

/* A content larger than the history's text cap is refused. */
static void
test_add_json_over_cap(void **state)
{
    static const char item[] =
        "{\"role\":\"user\",\"content\":\"0123456789\"}";
    struct messages h;

    (void)state;
    messages_init(&h, 10);
    assert_int_equal(chatdb_add_item(&h, item, sizeof(item) - 1), -1);
    assert_int_equal(h.count, 0);
    messages_cleanup(&h);
}

/* What chatdb_gen_item writes, read back: the same parts. An item without
 * a tool exchange is kept as it is and goes to the model unchanged. The
 * same item spaced out (so json_pick reads it) gives the same parts. */
static void
test_item_as_written_round_trip(void **state)
{
    static const struct {
        enum message_role role;
        const char *content, *tools;
        size_t len;
    } items[] = {
        {MESSAGE_USER, "hello", "", 5},
        {MESSAGE_ASSISTANT, "", "", 0},
        {MESSAGE_USER, "quote \" slash \\ / tab \t nl \n cr \r \x01 \x1f", "",
         37},
        {MESSAGE_ASSISTANT, "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80 nul \0 end",
         "", 22},
        {MESSAGE_ASSISTANT, "answer", "[{\"role\":\"tool\",\"content\":\"2\"}]",
         6},
    };
    yajl_gen g = json_gen_new(), out = json_gen_new();
    struct messages h, spaced;

    (void)state;
    messages_init(&h, 4096);
    messages_init(&spaced, 4096);
    for (size_t i = 0; i < NELEM(items); i++) {
        const unsigned char *json, *sent;
        size_t len, sent_len;
        char loose[512];
        int n;

        assert_int_equal(chatdb_gen_item(g, items[i].role, items[i].content,
                                         items[i].len, items[i].tools,
                                         strlen(items[i].tools)),
                         0);
        yajl_gen_get_buf(g, &json, &len);
        assert_int_equal(chatdb_add_item(&h, (const char *)json, len), 0);
        assert_int_equal(h.msgs[i].role, items[i].role);
        assert_int_equal(h.msgs[i].len, items[i].len);
        assert_memory_equal(messages_content(&h, i), items[i].content,
                            items[i].len);
        assert_string_equal(messages_extra(&h, i), items[i].tools);
        /* without tools, exactly the stored text goes to the model (after
         * the '[' of the messages array) */
        json_gen_restart(out);
        assert_int_equal(yajl_gen_array_open(out), yajl_gen_status_ok);
        assert_int_equal(messages_gen(out, &h, i), 0);
        yajl_gen_get_buf(out, &sent, &sent_len);
        if (items[i].tools[0] == '\0')
            assert_true(sent_len == len + 1 &&
                        memcmp(sent + 1, json, len) == 0);
        assert_int_equal(h.msgs[i].json_len,
                         items[i].tools[0] == '\0' ? len : 0);
        /* "{ " instead of "{": json_pick's reading, the same parts */
        n = snprintf(loose, sizeof(loose), "{ %.*s", (int)len - 1,
                     (const char *)json + 1);
        assert_int_equal(chatdb_add_item(&spaced, loose, (size_t)n), 0);
        assert_int_equal(spaced.msgs[i].role, items[i].role);
        assert_int_equal(spaced.msgs[i].len, items[i].len);
        assert_memory_equal(messages_content(&spaced, i), items[i].content,
                            items[i].len);
        assert_string_equal(messages_extra(&spaced, i), items[i].tools);
        assert_int_equal(spaced.msgs[i].json_len, 0);
    }
    messages_cleanup(&h);
    messages_cleanup(&spaced);
    yajl_gen_free(g);
    yajl_gen_free(out);
}

/* Dropping messages drops their stored text too. */
static void
test_item_json_dropped_with_message(void **state)
{
    static const char a[] = "{\"role\":\"user\",\"content\":\"a\"}",
                      b[] = "{\"role\":\"assistant\",\"content\":\"b\"}";
    struct messages h;

    (void)state;
    messages_init(&h, 4096);
    assert_int_equal(chatdb_add_item(&h, a, sizeof(a) - 1), 0);
    assert_int_equal(chatdb_add_item(&h, b, sizeof(b) - 1), 0);
    assert_int_equal(h.json.len, sizeof(a) - 1 + sizeof(b) - 1);
    messages_drop_last(&h);
    assert_int_equal(h.json.len, sizeof(a) - 1);
    assert_int_equal(chatdb_add_item(&h, b, sizeof(b) - 1), 0);
    assert_memory_equal(h.json.data + h.msgs[1].json_off, b, sizeof(b) - 1);
    messages_cleanup(&h);
}

/* Build a history of n messages, user first, of the given lengths. */
static void
fill(struct messages *h, const size_t *lens, size_t n)
{
    static const char text[256] = {0};

    messages_init(h, 1 << 16);
    for (size_t i = 0; i < n; i++) {
        assert_true(lens[i] < sizeof(text));
        assert_int_equal(messages_add(h, i % 2 ? MESSAGE_ASSISTANT
                                              : MESSAGE_USER,
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
        struct messages h;
        size_t drop;

        fill(&h, c->lens, c->n);
        drop = chatdb_trim_start(&h, c->max_messages, c->max_bytes);
        if (drop != c->drop)
            fail_msg("%s: dropped %zu, want %zu", c->what, drop, c->drop);
        assert_int_equal(drop % 2, 0);
        messages_cleanup(&h);
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
                struct messages h;
                size_t drop, bytes = 0;

                fill(&h, lens, n);
                drop = chatdb_trim_start(&h, maxm, maxb);
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
                messages_cleanup(&h);
            }
        }
    }
}


/* ---- against a real Redis */

/* The server of the group running: a plain one, or a one-node Redis
 * Cluster (port != 0) that owns every slot, where a script whose keys
 * are not all in one slot fails (CROSSSLOT) as on a real cluster. */
static struct {
    char dir[64];
    char socket[128];
    pid_t pid;
    int port, bus_port;
} server;

static redisContext *
raw_connect(void)
{
    redisContext *c = redisConnectUnix(server.socket);

    if (c != NULL && c->err != 0) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* A raw command's reply, for looking at the keys behind chatdb's back. */
static redisReply *
raw(const char *fmt, ...)
{
    redisContext *c = raw_connect();
    redisReply *r;
    va_list ap;

    assert_non_null(c);
    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    assert_non_null(r);
    return r;
}

static long long
raw_int(const char *fmt, const char *arg)
{
    redisReply *r = raw(fmt, arg);
    long long v = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;

    freeReplyObject(r);
    return v;
}

/* A free loopback TCP port, or -1. */
static int
free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t n = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &n) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

/* redis-server on a unix socket in a scratch directory; with
 * server.port, also on that TCP port with cluster mode on. */
static int
spawn_redis(void)
{
    char err[LOG_ERR_LEN], port[16], bus[16];

    if (log_open("stderr", "off", LOG_ERROR, err) == -1)
        return -1;
    snprintf(server.dir, sizeof(server.dir), "/tmp/chatfcgi-test-XXXXXX");
    if (mkdtemp(server.dir) == NULL)
        return -1;
    snprintf(server.socket, sizeof(server.socket), "%s/redis.sock",
             server.dir);
    snprintf(port, sizeof(port), "%d", server.port);
    snprintf(bus, sizeof(bus), "%d", server.bus_port);
    server.pid = fork();
    if (server.pid == 0) {
        int null = open("/dev/null", O_WRONLY);

        dup2(null, STDOUT_FILENO);
        execlp("redis-server", "redis-server", "--port", port,
               "--bind", "127.0.0.1", "--unixsocket", server.socket,
               "--dir", server.dir, "--save", "", "--appendonly", "no",
               "--loglevel", "warning", "--cluster-enabled",
               server.port ? "yes" : "no", "--cluster-port", bus,
               (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 200; i++) {
        redisContext *c = raw_connect();

        if (c != NULL) {
            redisFree(c);
            return 0;
        }
        usleep(25000);
    }
    fprintf(stderr, "redis-server did not start on %s\n", server.socket);
    return -1;
}

static int
start_redis(void **state)
{
    (void)state;
    server.port = server.bus_port = 0;
    return spawn_redis();
}

static int
start_cluster(void **state)
{
    (void)state;
    server.port = free_port();
    server.bus_port = free_port();
    if (server.port == -1 || server.bus_port == -1 || spawn_redis() == -1)
        return -1;
    freeReplyObject(raw("CLUSTER ADDSLOTSRANGE 0 16383"));
    for (int i = 0; i < 200; i++) {
        redisReply *r = raw("CLUSTER INFO");
        int ok = r->type == REDIS_REPLY_STRING &&
                 strstr(r->str, "cluster_state:ok") != NULL;

        freeReplyObject(r);
        if (ok)
            return 0;
        usleep(25000);
    }
    fprintf(stderr, "the one-node cluster did not come up\n");
    return -1;
}

static int
stop_redis(void **state)
{
    char path[160];

    (void)state;
    if (server.pid > 0) {
        kill(server.pid, SIGTERM);
        waitpid(server.pid, NULL, 0);
    }
    snprintf(path, sizeof(path), "%s/redis.sock", server.dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/nodes.conf", server.dir);
    unlink(path);
    rmdir(server.dir);
    return 0;
}

/* A chatdb on the test's Redis, its conf, and buffers for one turn. */
struct fixture {
    struct conf conf;
    struct chatdb db;
    struct messages history;
    struct buf replay;
    yajl_gen gen;
    struct buf user_item, assistant_item;
};

static void
set_string(char **slot, const char *value)
{
    free(*slot);
    *slot = strdup(value);
    assert_non_null(*slot);
}

static void
fixture_open(struct fixture *f, const char *url)
{
    char err[CONF_ERR_LEN], spec[160];

    memset(f, 0, sizeof(*f));
    assert_int_equal(conf_defaults(&f->conf, err), 0);
    if (server.port)
        snprintf(spec, sizeof(spec), "redis-cluster://127.0.0.1:%d",
                 server.port);
    else
        snprintf(spec, sizeof(spec), "unix://%s", server.socket);
    set_string(&f->conf.redis.url, url ? url : spec);
    f->conf.chat.history_max_messages = 4;
    assert_int_equal(chatdb_init(&f->db, &f->conf), 0);
    messages_init(&f->history, 1 << 16);
    buf_init(&f->replay, 1 << 16);
    buf_init(&f->user_item, 1 << 16);
    buf_init(&f->assistant_item, 1 << 16);
    f->gen = json_gen_new();
    assert_non_null(f->gen);
    redisReply *r = raw("FLUSHALL");
    freeReplyObject(r);
}

static void
fixture_close(struct fixture *f)
{
    yajl_gen_free(f->gen);
    buf_cleanup(&f->user_item);
    buf_cleanup(&f->assistant_item);
    buf_cleanup(&f->replay);
    messages_cleanup(&f->history);
    chatdb_cleanup(&f->db);
    conf_free(&f->conf);
}

static struct chatdb_turn
turn_of(const char *session_id, const char *token)
{
    return (struct chatdb_turn){
        .session_id = session_id,
        .client = "addr:127.0.0.1",
        .owner = "",
        .message = "question",
        .message_len = 8,
        .token = token,
        .lock_ms = 60000,
    };
}

static int
begin(struct fixture *f, struct chatdb_turn *t, long long *retry)
{
    long long unused;

    return chatdb_turn_begin(&f->db, t, &f->history, &f->replay,
                             retry ? retry : &unused);
}

/* GET's and DELETE's view of a session, as the owner or client given
 * ("" : none), without a rate limit. */
static int
load_as(struct fixture *f, const char *session_id, const char *owner)
{
    struct chatdb_turn t = turn_of(session_id, "get");
    long long unused;

    t.owner = owner;
    return chatdb_history_load(&f->db, &t, &f->history, &unused);
}

static int
load(struct fixture *f, const char *session_id)
{
    return load_as(f, session_id, "");
}

static int
delete_as(struct fixture *f, const char *session_id, const char *owner)
{
    struct chatdb_turn t = turn_of(session_id, "delete");
    long long unused;

    t.owner = owner;
    return chatdb_history_delete(&f->db, &t, &unused);
}

/* The stored form of one message, copied out of the generator. */
static void
item(struct fixture *f, enum message_role role, const char *text,
     struct buf *out)
{
    const unsigned char *json;
    size_t len;

    assert_int_equal(chatdb_gen_item(f->gen, role, text, strlen(text), "", 0), 0);
    yajl_gen_get_buf(f->gen, &json, &len);
    buf_reset(out);
    assert_int_equal(buf_append(out, json, len), 0);
}

/* Commit one turn (question, reply) after a begin, as the chat does: the
 * pair joins the loaded history, which the commit trims. */
static int
commit(struct fixture *f, const struct chatdb_turn *t, const char *question,
       const char *reply, const char *answer)
{
    struct chatdb_result res = {.history = &f->history,
                                .answer = answer,
                                .answer_len = strlen(answer)};

    item(f, MESSAGE_USER, question, &f->user_item);
    item(f, MESSAGE_ASSISTANT, reply, &f->assistant_item);
    assert_int_equal(messages_add(&f->history, MESSAGE_USER, question,
                                  strlen(question)), 0);
    assert_int_equal(messages_add(&f->history, MESSAGE_ASSISTANT, reply,
                                  strlen(reply)), 0);
    res.user_item = f->user_item.data;
    res.user_len = f->user_item.len;
    res.assistant_item = f->assistant_item.data;
    res.assistant_len = f->assistant_item.len;
    return chatdb_turn_commit(&f->db, t, &res);
}

static void
test_turn_locks_then_stores(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("s1", "req-1"), other = turn_of("s1",
                                                                   "req-2");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(f.history.count, 0);
    r = raw("GET chat:{s1}:lock");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "req-1");
    freeReplyObject(r);
    assert_int_equal(begin(&f, &other, NULL), CHATDB_BUSY);
    assert_int_equal(commit(&f, &t, "hello", "hi there", "{}"), 0);
    assert_int_equal(raw_int("EXISTS %s", "chat:{s1}:lock"), 0);
    assert_int_equal(raw_int("LLEN %s", "chat:{s1}:history"), 2);
    assert_true(raw_int("TTL %s", "chat:{s1}:history") > 0);
    assert_int_equal(load(&f, "s1"), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    assert_int_equal(f.history.msgs[0].role, MESSAGE_USER);
    assert_string_equal(messages_content(&f.history, 0), "hello");
    assert_int_equal(f.history.msgs[1].role, MESSAGE_ASSISTANT);
    assert_string_equal(messages_content(&f.history, 1), "hi there");
    /* The next turn sees the history. */
    assert_int_equal(begin(&f, &other, NULL), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    fixture_close(&f);
}

static void
test_commit_trims_whole_pairs(void **state)
{
    static const char *const questions[] = {"q1", "q2", "q3", "q4"};
    struct fixture f;

    (void)state;
    fixture_open(&f, NULL); /* history_max_messages = 4 */
    for (size_t i = 0; i < NELEM(questions); i++) {
        struct chatdb_turn t = turn_of("trim", questions[i]);

        assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
        assert_int_equal(commit(&f, &t, questions[i], "a", "{}"), 0);
    }
    assert_int_equal(load(&f, "trim"), CHATDB_GO);
    assert_int_equal(f.history.count, 4);
    assert_string_equal(messages_content(&f.history, 0), "q3");
    assert_string_equal(messages_content(&f.history, 2), "q4");
    fixture_close(&f);
}

static void
test_abort_releases_only_its_own_lock(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("s2", "owner"), thief = turn_of("s2",
                                                                   "thief");

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(chatdb_turn_abort(&f.db, &thief), 0);
    assert_int_equal(begin(&f, &thief, NULL), CHATDB_BUSY);
    assert_int_equal(chatdb_turn_abort(&f.db, &t), 0);
    assert_int_equal(begin(&f, &thief, NULL), CHATDB_GO);
    assert_int_equal(raw_int("LLEN %s", "chat:{s2}:history"), 0);
    fixture_close(&f);
}

static void
test_idempotency_running_then_replay(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("s3", "first"), again = turn_of("s3",
                                                                   "again");

    (void)state;
    fixture_open(&f, NULL);
    t.idempotency_key = again.idempotency_key = "key-1";
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(begin(&f, &again, NULL), CHATDB_RUNNING);
    assert_int_equal(commit(&f, &t, "q", "a", "{\"reply\":\"a\"}"), 0);
    assert_int_equal(begin(&f, &again, NULL), CHATDB_REPLAY);
    assert_int_equal(f.replay.len, strlen("{\"reply\":\"a\"}"));
    assert_memory_equal(f.replay.data, "{\"reply\":\"a\"}", f.replay.len);
    /* An aborted turn drops its pending record: a retry may run. */
    t = turn_of("s3", "third");
    t.idempotency_key = "key-2";
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(chatdb_turn_abort(&f.db, &t), 0);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    fixture_close(&f);
}

/* A record is bound to its request: the client, the session it named
 * and the message. Another request with the key neither replays nor
 * runs, while the first runs or after. */
static void
test_idempotency_bound_to_its_request(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("s5", "first"),
                       other = turn_of("s5", "other");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    t.idempotency_key = other.idempotency_key = "key-1";
    other.message = "another question";
    other.message_len = strlen(other.message);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(strlen(t.request_hash), CHATDB_HASH_HEX);
    assert_int_equal(begin(&f, &other, NULL), CHATDB_MISMATCH);
    assert_int_equal(commit(&f, &t, "q", "a", "{\"reply\":\"a\"}"), 0);
    r = raw("GET chat:{s5}:idem:key-1");
    assert_memory_equal(r->str, t.request_hash, CHATDB_HASH_HEX);
    assert_string_equal(r->str + CHATDB_HASH_HEX, "{\"reply\":\"a\"}");
    freeReplyObject(r);
    assert_int_equal(begin(&f, &other, NULL), CHATDB_MISMATCH);
    /* The same message from another client is another request too. */
    other = turn_of("s5", "other");
    other.idempotency_key = "key-1";
    other.client = "addr:10.0.0.2";
    assert_int_equal(begin(&f, &other, NULL), CHATDB_MISMATCH);
    /* Without a session: two people behind one address. */
    t = turn_of("random-1", "alice");
    other = turn_of("random-2", "bob");
    t.idempotency_key = other.idempotency_key = "nat";
    t.idempotency_by_client = other.idempotency_by_client = 1;
    other.message = "I am Bob";
    other.message_len = strlen(other.message);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    assert_int_equal(begin(&f, &other, NULL), CHATDB_MISMATCH);
    other = turn_of("random-3", "alice-again");
    other.idempotency_key = "nat";
    other.idempotency_by_client = 1;
    assert_int_equal(begin(&f, &other, NULL), CHATDB_REPLAY);
    fixture_close(&f);
}

static void
test_rate_limits(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("s4", "r1");
    long long retry = 0;

    (void)state;
    fixture_open(&f, NULL);
    t.rpm = 2;
    assert_int_equal(chatdb_rate_check(&f.db, &t, &retry), CHATDB_GO);
    assert_int_equal(begin(&f, &t, &retry), CHATDB_GO);
    assert_int_equal(chatdb_turn_abort(&f.db, &t), 0);
    assert_int_equal(begin(&f, &t, &retry), CHATDB_RATE_LIMITED);
    assert_true(retry >= 1 && retry <= 60);
    assert_int_equal(chatdb_rate_check(&f.db, &t, &retry),
                     CHATDB_RATE_LIMITED);
    /* Another client has its own counters. */
    t.client = "addr:10.0.0.2";
    assert_int_equal(chatdb_rate_check(&f.db, &t, &retry), CHATDB_GO);
    /* Tokens: over tpm after one big count. */
    t.rpm = 0;
    t.tpm = 50;
    assert_int_equal(chatdb_rate_check(&f.db, &t, &retry), CHATDB_GO);
    assert_int_equal(chatdb_count_tokens(&f.db, &t, 100), 0);
    assert_int_equal(chatdb_rate_check(&f.db, &t, &retry),
                     CHATDB_RATE_LIMITED);
    fixture_close(&f);
}

/* A worker that read begin's reply late (short of CPU, while Redis ran
 * begin at once) still stores its turn: the deadline counts from when
 * begin went out, and the commit waits the round trip longer. */
static void
test_commit_after_late_begin_reply_stores(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("starved", "slow");

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    /* As if Redis ran begin at once and the worker read its reply 5 s
     * later: the commit below goes out "before" that read. */
    t.local_clock_ms += 5000;
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    assert_int_equal(raw_int("LLEN %s", "chat:{starved}:history"), 2);
    fixture_close(&f);
}

static void
test_commit_after_deadline_stores_nothing(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("late", "slow");

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    t.redis_clock_ms -= 3600 * 1000; /* as if begin ran an hour ago */
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), -1);
    assert_non_null(strstr(chatdb_error(&f.db), "too late"));
    /* with the two waits that count against the deadline */
    assert_non_null(strstr(chatdb_error(&f.db), "begin's round trip took"));
    assert_non_null(strstr(chatdb_error(&f.db), "ms, the store's"));
    assert_int_equal(raw_int("LLEN %s", "chat:{late}:history"), 0);
    fixture_close(&f);
}

/* The commit stores only while the turn holds its lock: one that expired
 * (and that another turn may hold now) or that DELETE removed means the
 * history may have changed under the turn's trim index. */
static void
test_commit_without_the_lock_stores_nothing(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("lost", "mine"),
                       other = turn_of("lost", "other");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    r = raw("DEL chat:{lost}:lock");
    freeReplyObject(r);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), CHATDB_LOST);
    assert_int_equal(raw_int("EXISTS %s", "chat:{lost}:history"), 0);
    /* Another turn took the lock: still nothing, and its lock stays. */
    assert_int_equal(begin(&f, &other, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), CHATDB_LOST);
    assert_int_equal(raw_int("EXISTS %s", "chat:{lost}:history"), 0);
    r = raw("GET chat:{lost}:lock");
    assert_string_equal(r->str, "other");
    freeReplyObject(r);
    fixture_close(&f);
}

/* DELETE during a turn removes the lock with the history, so that the
 * turn in flight cannot bring the history back. */
static void
test_delete_during_a_turn(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("del", "first"),
                       running = turn_of("del", "second");

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q1", "a1", "{}"), 0);
    assert_int_equal(begin(&f, &running, NULL), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    assert_int_equal(delete_as(&f, "del", ""), CHATDB_GO);
    assert_int_equal(raw_int("EXISTS %s", "chat:{del}:lock"), 0);
    assert_int_equal(commit(&f, &running, "q2", "a2", "{}"), CHATDB_LOST);
    assert_int_equal(raw_int("EXISTS %s", "chat:{del}:history"), 0);
    fixture_close(&f);
}

static void
test_scripts_survive_a_flush(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("flush", "a");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    r = raw("SCRIPT FLUSH");
    freeReplyObject(r);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    assert_int_equal(raw_int("LLEN %s", "chat:{flush}:history"), 2);
    fixture_close(&f);
}

static void
test_unreadable_items_are_skipped_then_trimmed(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("junk", "t");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    r = raw("RPUSH chat:{junk}:history not-json "
            "{\"role\":\"user\",\"content\":\"old\"} "
            "{\"role\":\"assistant\",\"content\":\"reply\"}");
    freeReplyObject(r);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    assert_int_equal(t.skipped, 1);
    assert_int_equal(commit(&f, &t, "new", "answer", "{}"), 0);
    assert_int_equal(load(&f, "junk"), CHATDB_GO);
    assert_int_equal(raw_int("LLEN %s", "chat:{junk}:history"), 4);
    assert_string_equal(messages_content(&f.history, 0), "old");
    fixture_close(&f);
}

static void
test_history_delete(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("gone", "t");

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    assert_int_equal(delete_as(&f, "gone", ""), CHATDB_GO);
    assert_int_equal(load(&f, "gone"), CHATDB_GO);
    assert_int_equal(f.history.count, 0);
    fixture_close(&f);
}

/* With client keys, the first turn's key owns the session for as long
 * as its history lives; other keys find nothing, whatever they try. */
static void
test_owner_claims_and_guards_a_session(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("own", "first"),
                       thief = turn_of("own", "thief");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    t.owner = "key:aaaa";
    thief.owner = "key:bbbb";
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    r = raw("GET chat:{own}:owner");
    assert_string_equal(r->str, "key:aaaa");
    freeReplyObject(r);
    assert_true(raw_int("TTL %s", "chat:{own}:owner") >=
                raw_int("TTL %s", "chat:{own}:history") - 1);
    assert_int_equal(begin(&f, &thief, NULL), CHATDB_NOT_FOUND);
    assert_int_equal(raw_int("EXISTS %s", "chat:{own}:lock"), 0);
    assert_int_equal(load_as(&f, "own", "key:bbbb"), CHATDB_NOT_FOUND);
    assert_int_equal(delete_as(&f, "own", "key:bbbb"), CHATDB_NOT_FOUND);
    assert_int_equal(raw_int("LLEN %s", "chat:{own}:history"), 2);
    /* Without client keys nobody is an owner, and nothing is checked. */
    assert_int_equal(load(&f, "own"), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    assert_int_equal(load_as(&f, "own", "key:aaaa"), CHATDB_GO);
    assert_int_equal(delete_as(&f, "own", "key:aaaa"), CHATDB_GO);
    assert_int_equal(raw_int("EXISTS %s", "chat:{own}:owner"), 0);
    /* The id is free again. */
    assert_int_equal(begin(&f, &thief, NULL), CHATDB_GO);
    fixture_close(&f);
}

/* A session made without client keys has no owner: a key may use it, and
 * its first turn claims it. */
static void
test_unowned_session_is_claimed(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("old", "first"),
                       keyed = turn_of("old", "keyed");
    redisReply *r;

    (void)state;
    fixture_open(&f, NULL);
    assert_int_equal(begin(&f, &t, NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t, "q", "a", "{}"), 0);
    assert_int_equal(raw_int("EXISTS %s", "chat:{old}:owner"), 0);
    assert_int_equal(load_as(&f, "old", "key:aaaa"), CHATDB_GO);
    keyed.owner = "key:aaaa";
    assert_int_equal(begin(&f, &keyed, NULL), CHATDB_GO);
    r = raw("GET chat:{old}:owner");
    assert_string_equal(r->str, "key:aaaa");
    freeReplyObject(r);
    fixture_close(&f);
}

/* GET and DELETE count in the client's rpm like turns. */
static void
test_session_requests_count_in_rpm(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("counted", "get");
    long long retry = 0;

    (void)state;
    fixture_open(&f, NULL);
    t.rpm = 2;
    assert_int_equal(chatdb_history_load(&f.db, &t, &f.history, &retry),
                     CHATDB_GO);
    assert_int_equal(chatdb_history_delete(&f.db, &t, &retry), CHATDB_GO);
    assert_int_equal(chatdb_history_load(&f.db, &t, &f.history, &retry),
                     CHATDB_RATE_LIMITED);
    assert_true(retry >= 1 && retry <= 60);
    assert_int_equal(chatdb_history_delete(&f.db, &t, &retry),
                     CHATDB_RATE_LIMITED);
    assert_int_equal(begin(&f, &t, &retry), CHATDB_RATE_LIMITED);
    fixture_close(&f);
}

/* An Idempotency-Key without a session: the record is the client's (on a
 * cluster in another slot than the session's, written by a script of its
 * own). An abort releases it, so that a retry runs; once a turn is
 * stored, a retry (in a session of its own) replays its answer. */
static void
test_idempotency_without_a_session(void **state)
{
    static const char answer[] = "{\"reply\":\"r\"}";
    struct chatdb_turn t[3] = {turn_of("new-1", "tok1"),
                               turn_of("new-2", "tok2"),
                               turn_of("new-3", "tok3")};
    struct fixture f;

    (void)state;
    fixture_open(&f, NULL);
    for (int i = 0; i < 3; i++) {
        t[i].idempotency_key = "k1";
        t[i].idempotency_by_client = 1;
    }
    assert_int_equal(begin(&f, &t[0], NULL), CHATDB_GO);
    assert_int_equal(begin(&f, &t[1], NULL), CHATDB_RUNNING);
    assert_int_equal(chatdb_turn_abort(&f.db, &t[0]), 0);
    assert_int_equal(raw_int("EXISTS %s", "chat:{new-1}:lock"), 0);
    assert_int_equal(begin(&f, &t[1], NULL), CHATDB_GO);
    assert_int_equal(commit(&f, &t[1], "question", "reply", answer), 0);
    assert_int_equal(begin(&f, &t[2], NULL), CHATDB_REPLAY);
    assert_int_equal(f.replay.len, strlen(answer));
    assert_memory_equal(f.replay.data, answer, strlen(answer));
    assert_int_equal(load(&f, "new-2"), CHATDB_GO);
    assert_int_equal(f.history.count, 2);
    fixture_close(&f);
}

static void
test_redis_down_is_an_error(void **state)
{
    struct fixture f;
    struct chatdb_turn t = turn_of("down", "t");

    (void)state;
    fixture_open(&f, "unix:///nonexistent/redis.sock");
    assert_int_equal(begin(&f, &t, NULL), -1);
    assert_non_null(strstr(chatdb_error(&f.db), "cannot connect"));
    assert_int_equal(chatdb_ping(&f.db), -1);
    fixture_close(&f);
}

int
main(void)
{
    const struct CMUnitTest pure[] = {
        cmocka_unit_test(test_add_json_accepted),
        cmocka_unit_test(test_add_json_refused),
        cmocka_unit_test(test_add_json_role_with_nul_refused),
        cmocka_unit_test(test_add_json_uses_length),
        cmocka_unit_test(test_add_json_over_cap),
        cmocka_unit_test(test_item_as_written_round_trip),
        cmocka_unit_test(test_item_json_dropped_with_message),
        cmocka_unit_test(test_trim_start),
        cmocka_unit_test(test_trim_start_properties),
    };
    const struct CMUnitTest redis[] = {
        cmocka_unit_test(test_turn_locks_then_stores),
        cmocka_unit_test(test_commit_trims_whole_pairs),
        cmocka_unit_test(test_abort_releases_only_its_own_lock),
        cmocka_unit_test(test_idempotency_running_then_replay),
        cmocka_unit_test(test_idempotency_bound_to_its_request),
        cmocka_unit_test(test_rate_limits),
        cmocka_unit_test(test_commit_after_late_begin_reply_stores),
        cmocka_unit_test(test_commit_after_deadline_stores_nothing),
        cmocka_unit_test(test_commit_without_the_lock_stores_nothing),
        cmocka_unit_test(test_delete_during_a_turn),
        cmocka_unit_test(test_scripts_survive_a_flush),
        cmocka_unit_test(test_unreadable_items_are_skipped_then_trimmed),
        cmocka_unit_test(test_history_delete),
        cmocka_unit_test(test_owner_claims_and_guards_a_session),
        cmocka_unit_test(test_unowned_session_is_claimed),
        cmocka_unit_test(test_session_requests_count_in_rpm),
        cmocka_unit_test(test_idempotency_without_a_session),
        cmocka_unit_test(test_redis_down_is_an_error),
    };

    return cmocka_run_group_tests(pure, NULL, NULL) |
           cmocka_run_group_tests_name("one server", redis, start_redis,
                                       stop_redis) |
           cmocka_run_group_tests_name("Redis Cluster", redis,
                                       start_cluster, stop_redis);
}
