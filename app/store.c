#include "store.h"

#include <errno.h>
#include <stdarg.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conf.h"
#include "history.h"
#include "log.h"

#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 1000
#define DEFAULT_PORT 6379

static double
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Copy n bytes of a URL part, decoding %XX. Returns 0 or -1. */
static int
copy_decoded(char *out, size_t size, const char *s, size_t n)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];

        if (c == '%') {
            if (i + 2 >= n || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0)
                return -1;
            c = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
        }
        if (o + 1 >= size)
            return -1;
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

static int
parse_number(const char *s, size_t n, int min, int max, int *out)
{
    int v = 0;

    if (n == 0 || n > 6)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* "[user][:password]@" in front of the host (the IANA redis URI scheme:
 * without a colon it is a user name). */
static int
parse_userinfo(const char *s, size_t n, struct store_addr *a)
{
    const char *colon = memchr(s, ':', n);

    if (colon == NULL)
        return copy_decoded(a->user, sizeof(a->user), s, n);
    if (copy_decoded(a->user, sizeof(a->user), s, (size_t)(colon - s)) == -1)
        return -1;
    return copy_decoded(a->password, sizeof(a->password), colon + 1,
                        n - (size_t)(colon - s) - 1);
}

/* "host[:port]" or "[v6]:port". */
static int
parse_hostport(const char *s, size_t n, struct store_addr *a)
{
    const char *host = s, *port = NULL;
    size_t hostlen = n;

    if (n > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', n);

        if (close == NULL)
            return -1;
        host = s + 1;
        hostlen = (size_t)(close - s) - 1;
        if (close + 1 < s + n) {
            if (close[1] != ':')
                return -1;
            port = close + 2;
        }
    } else {
        const char *colon = memchr(s, ':', n);

        if (colon != NULL) {
            hostlen = (size_t)(colon - s);
            port = colon + 1;
        }
    }
    if (hostlen == 0 || hostlen >= sizeof(a->host))
        return -1;
    memcpy(a->host, host, hostlen);
    a->host[hostlen] = '\0';
    a->port = DEFAULT_PORT;
    if (port != NULL)
        return parse_number(port, (size_t)(s + n - port), 1, 65535,
                            &a->port);
    return 0;
}

static int
parse_tcp_url(const char *rest, struct store_addr *a)
{
    const char *slash = strchr(rest, '/');
    const char *end = slash ? slash : rest + strlen(rest);
    const char *at = memchr(rest, '@', (size_t)(end - rest));

    if (at != NULL) {
        if (parse_userinfo(rest, (size_t)(at - rest), a) == -1)
            return -1;
        rest = at + 1;
    }
    if (parse_hostport(rest, (size_t)(end - rest), a) == -1)
        return -1;
    if (slash != NULL && slash[1] != '\0')
        return parse_number(slash + 1, strlen(slash + 1), 0, 1000000,
                            &a->db);
    return 0;
}

static int
parse_unix_url(const char *rest, struct store_addr *a)
{
    const char *query = strchr(rest, '?');
    size_t n = query ? (size_t)(query - rest) : strlen(rest);

    if (n == 0 || rest[0] != '/' || n >= sizeof(a->socket_path))
        return -1;
    memcpy(a->socket_path, rest, n);
    a->socket_path[n] = '\0';
    if (query == NULL)
        return 0;
    if (strncmp(query, "?db=", 4) != 0)
        return -1;
    return parse_number(query + 4, strlen(query + 4), 0, 1000000, &a->db);
}

int
store_addr_parse(const char *url, struct store_addr *a,
                 char err[STORE_ERR_LEN])
{
    int rc = -1;

    memset(a, 0, sizeof(*a));
    if (strncmp(url, "redis://", 8) == 0)
        rc = parse_tcp_url(url + 8, a);
    else if (strncmp(url, "unix://", 7) == 0)
        rc = parse_unix_url(url + 7, a);
    /* The URL is not repeated: it may hold a password. */
    if (rc == -1)
        snprintf(err, STORE_ERR_LEN,
                 "bad Redis URL: expected "
                 "redis://[user][:password]@host[:port][/db] or "
                 "unix:///path[?db=N]");
    return rc;
}

static struct timeval
ms_to_tv(long long ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};

    return tv;
}

int
store_init(struct store *s, const struct conf *c)
{
    memset(s, 0, sizeof(*s));
    s->connect_timeout = ms_to_tv(c->redis.connect_timeout_ms);
    s->command_timeout = ms_to_tv(c->redis.command_timeout_ms);
    return store_addr_parse(c->redis.url, &s->addr, s->err);
}

static void
drop_connection(struct store *s)
{
    if (s->ctx != NULL)
        redisFree(s->ctx);
    s->ctx = NULL;
}

void
store_cleanup(struct store *s)
{
    drop_connection(s);
}

/* The rest of the setup of a new connection: AUTH and SELECT. */
static int
setup_command(struct store *s, int argc, const char **argv, const char *what)
{
    redisReply *r = redisCommandArgv(s->ctx, argc, argv, NULL);
    int ok = r != NULL && r->type != REDIS_REPLY_ERROR;

    if (!ok)
        snprintf(s->err, STORE_ERR_LEN, "Redis %s failed: %s", what,
                 r ? r->str : s->ctx->errstr);
    freeReplyObject(r);
    return ok ? 0 : -1;
}

static int
authenticate(struct store *s)
{
    char db[16];
    const char *auth_user[] = {"AUTH", s->addr.user, s->addr.password};
    const char *auth[] = {"AUTH", s->addr.password};
    const char *select[] = {"SELECT", db};

    snprintf(db, sizeof(db), "%d", s->addr.db);
    if (s->addr.password[0] != '\0') {
        int rc = s->addr.user[0] != '\0'
                     ? setup_command(s, 3, auth_user, "AUTH")
                     : setup_command(s, 2, auth, "AUTH");
        if (rc == -1)
            return -1;
    }
    if (s->addr.db != 0 && setup_command(s, 2, select, "SELECT") == -1)
        return -1;
    return 0;
}

static int
connect_now(struct store *s)
{
    const struct store_addr *a = &s->addr;

    if (a->socket_path[0] != '\0')
        s->ctx = redisConnectUnixWithTimeout(a->socket_path,
                                             s->connect_timeout);
    else
        s->ctx = redisConnectWithTimeout(a->host, a->port,
                                         s->connect_timeout);
    if (s->ctx == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    if (s->ctx->err == 0 && redisSetTimeout(s->ctx, s->command_timeout) ==
                                REDIS_OK && authenticate(s) == 0)
        return 0;
    if (s->ctx->err != 0)
        snprintf(s->err, STORE_ERR_LEN, "cannot connect to Redis: %s",
                 s->ctx->errstr);
    drop_connection(s);
    return -1;
}

/* An idle connection has nothing to read: if it is readable, the server
 * closed it (a Redis restart) and the next command would fail on it. */
static int
connection_closed(const struct store *s)
{
    struct pollfd p = {.fd = s->ctx->fd, .events = POLLIN};

    return poll(&p, 1, 0) != 0;
}

/* Connect when there is no connection (or only a closed one), unless the
 * last attempt failed so recently that another would only add latency. */
static int
ensure_connected(struct store *s)
{
    double now;
    unsigned shift;

    if (s->ctx != NULL && connection_closed(s)) {
        log_info("store", "Redis closed the connection; reconnecting");
        drop_connection(s);
    }
    if (s->ctx != NULL)
        return 0;
    now = now_ms();
    if (now < s->retry_at_ms) {
        snprintf(s->err, STORE_ERR_LEN, "Redis is down (next attempt in "
                 "%.0f ms)", s->retry_at_ms - now);
        return -1;
    }
    if (connect_now(s) == 0) {
        if (s->failures > 0)
            log_info("store", "connected to Redis again after %u failed "
                     "attempts", s->failures);
        s->failures = 0;
        return 0;
    }
    if (s->failures == 0)
        log_error("store", "%s", s->err);
    shift = s->failures < 5 ? s->failures : 5;
    s->retry_at_ms = now + (double)(BACKOFF_FIRST_MS << shift < BACKOFF_MAX_MS
                                        ? BACKOFF_FIRST_MS << shift
                                        : BACKOFF_MAX_MS);
    s->failures++;
    return -1;
}

/* A NULL reply means the connection is unusable: drop it. An error reply
 * leaves it usable. Either way the command failed. */
static int
reply_failed(struct store *s, redisReply *r, const char *what)
{
    if (r == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "Redis %s: %s", what,
                 s->ctx->errstr[0] ? s->ctx->errstr : "connection lost");
        drop_connection(s);
        return -1;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(s->err, STORE_ERR_LEN, "Redis %s: %s", what, r->str);
        return -1;
    }
    return 0;
}

/* Run one command and check its reply; the caller frees *out. */
static int
command(struct store *s, redisReply **out, const char *what,
        const char *fmt, ...)
{
    va_list ap;

    *out = NULL;
    if (ensure_connected(s) == -1)
        return -1;
    va_start(ap, fmt);
    *out = redisvCommand(s->ctx, fmt, ap);
    va_end(ap);
    if (reply_failed(s, *out, what) == 0)
        return 0;
    freeReplyObject(*out);
    *out = NULL;
    return -1;
}

int
store_ping(struct store *s)
{
    redisReply *r;
    int rc = command(s, &r, "PING", "PING");

    freeReplyObject(r);
    return rc;
}

size_t
store_history_key(char key[STORE_KEY_MAX], const char *session_id)
{
    int n = snprintf(key, STORE_KEY_MAX, "chat:{%s}:history", session_id);

    return n < STORE_KEY_MAX ? (size_t)n : STORE_KEY_MAX - 1;
}

void
store_fill_history(const redisReply *r, size_t from, struct history *h)
{
    size_t i = r->elements;

    history_reset(h);
    /* Newest first, for as long as items are readable and fit the cap: a
     * lowered limit must not make an old session unreadable. */
    for (; i > from; i--) {
        const redisReply *item = r->element[i - 1];

        if (item->type != REDIS_REPLY_STRING ||
            history_add_json(h, item->str, item->len) == -1)
            break;
    }
    /* Whole pairs only: a reply whose question did not make it goes too. */
    if (h->count % 2 == 1 && i > from) {
        history_drop_last(h);
        i++;
    }
    h->skipped = i - from;
    if (h->skipped > 0)
        log_warnx("store", "%zu older history items are over the cap or "
                  "unreadable; the next turn trims them", h->skipped);
    history_reverse(h);
}

int
store_history_load(struct store *s, const char *session_id, struct history *h)
{
    char key[STORE_KEY_MAX];
    size_t klen = store_history_key(key, session_id);
    redisReply *r;

    history_reset(h);
    if (command(s, &r, "LRANGE", "LRANGE %b 0 -1", key, klen) == -1)
        return -1;
    if (r->type != REDIS_REPLY_ARRAY) {
        snprintf(s->err, STORE_ERR_LEN, "LRANGE gave no list");
        freeReplyObject(r);
        return -1;
    }
    store_fill_history(r, 0, h);
    freeReplyObject(r);
    return 0;
}

struct redisReply *
store_command_argv(struct store *s, int argc, const char **argv,
                   const size_t *lens, const char *what)
{
    redisReply *r;

    if (ensure_connected(s) == -1)
        return NULL;
    r = redisCommandArgv(s->ctx, argc, argv, lens);
    if (reply_failed(s, r, what) == 0)
        return r;
    freeReplyObject(r);
    return NULL;
}

int
store_history_delete(struct store *s, const char *session_id)
{
    char key[STORE_KEY_MAX];
    size_t klen = store_history_key(key, session_id);
    redisReply *r;
    int rc = command(s, &r, "DEL", "DEL %b", key, klen);

    freeReplyObject(r);
    return rc;
}
