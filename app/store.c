/* store: the Redis connection, its URL, Sentinels and reconnects. */
#include "store.h"

#include <ctype.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "conf.h"
#include "json.h"
#include "log.h"

#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 1000
#define DEFAULT_PORT 6379
#define SENTINEL_PORT 26379

/* Copy n bytes of a URL part, decoding %XX. Returns 0 or -1. */
static int
copy_decoded(char *out, size_t size, const char *s, size_t n)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];

        if (c == '%') {
            if (i + 2 >= n || json_hex_digit(s[i + 1]) < 0 || json_hex_digit(s[i + 2]) < 0)
                return -1;
            c = (char)(json_hex_digit(s[i + 1]) * 16 + json_hex_digit(s[i + 2]));
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

/* "host[:port]" or "[v6]:port", into host (size bytes) and port. */
static int
parse_hostport(const char *s, size_t n, char *out, size_t size, int *port,
               int default_port)
{
    const char *host = s, *portstr = NULL;
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
            portstr = close + 2;
        }
    } else {
        const char *colon = memchr(s, ':', n);

        if (colon != NULL) {
            hostlen = (size_t)(colon - s);
            portstr = colon + 1;
        }
    }
    if (hostlen == 0 || hostlen >= size)
        return -1;
    memcpy(out, host, hostlen);
    out[hostlen] = '\0';
    *port = default_port;
    if (portstr != NULL)
        return parse_number(portstr, (size_t)(s + n - portstr), 1, 65535,
                            port);
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
    if (parse_hostport(rest, (size_t)(end - rest), a->host, sizeof(a->host),
                       &a->port, DEFAULT_PORT) == -1)
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

static int
has_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (isspace((unsigned char)s[i]))
            return 1;
    return 0;
}

int
store_sentinels_parse(const char *list,
                      struct store_node out[STORE_SENTINELS_MAX],
                      char err[STORE_ERR_LEN])
{
    const char *p = list;
    int n = 0;

    while (isspace((unsigned char)*p))
        p++;
    if (*p == '\0')
        return 0;
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);

        while (p < end && isspace((unsigned char)*p))
            p++;
        while (end > p && isspace((unsigned char)end[-1]))
            end--;
        if (n == STORE_SENTINELS_MAX) {
            snprintf(err, STORE_ERR_LEN, "more than %d Sentinels",
                     STORE_SENTINELS_MAX);
            return -1;
        }
        /* Inner space: most likely a comma left out between two. */
        if (has_space(p, (size_t)(end - p)) ||
            parse_hostport(p, (size_t)(end - p), out[n].host,
                           sizeof(out[n].host), &out[n].port,
                           SENTINEL_PORT) == -1) {
            snprintf(err, STORE_ERR_LEN, "bad Sentinel \"%.*s\": expected "
                     "host[:port] or [v6]:port, separated by commas",
                     (int)(end - p > 64 ? 64 : end - p), p);
            return -1;
        }
        n++;
        if (comma == NULL)
            return n;
        p = comma + 1;
    }
}

static struct timeval
ms_to_tv(long long ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};

    return tv;
}

/* Copy a setting; one too long for its buffer is refused, never cut. */
static int
copy_setting(char *out, size_t size, const char *value, const char *name,
             char err[STORE_ERR_LEN])
{
    size_t n = strlen(value);

    if (n >= size) {
        snprintf(err, STORE_ERR_LEN, "%s is over %zu bytes", name, size - 1);
        return -1;
    }
    memcpy(out, value, n + 1);
    return 0;
}

/* Copied into fixed buffers, so that the connection code has no
 * pointers into the configuration to keep valid. */
static int
init_sentinels(struct store *s, const struct conf *c)
{
    s->nsentinels = store_sentinels_parse(c->redis.sentinels, s->sentinels,
                                          s->err);
    if (s->nsentinels == -1 ||
        copy_setting(s->master_name, sizeof(s->master_name),
                     c->redis.master_name, "master_name", s->err) == -1 ||
        copy_setting(s->sentinel_password, sizeof(s->sentinel_password),
                     c->redis.sentinel_password, "sentinel_password",
                     s->err) == -1)
        return -1;
    if (s->nsentinels > 0 && s->master_name[0] == '\0') {
        snprintf(s->err, STORE_ERR_LEN, "sentinels need a master_name");
        return -1;
    }
    return 0;
}

int
store_init(struct store *s, const struct conf *c)
{
    memset(s, 0, sizeof(*s));
    s->connect_timeout = ms_to_tv(c->redis.connect_timeout_ms);
    s->command_timeout = ms_to_tv(c->redis.command_timeout_ms);
    s->wait_replicas = c->redis.wait_replicas;
    s->wait_timeout_ms = c->redis.wait_timeout_ms;
    /* The reply to WAIT comes after up to wait_timeout_ms: the read must
     * not time out first. */
    if (s->wait_replicas > 0 &&
        s->wait_timeout_ms >= c->redis.command_timeout_ms) {
        snprintf(s->err, STORE_ERR_LEN, "wait_timeout_ms must be below "
                 "command_timeout_ms");
        return -1;
    }
    if (init_sentinels(s, c) == -1)
        return -1;
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

/* One command of a connection's setup (AUTH, SELECT, ROLE, the question
 * to a Sentinel). Returns the reply, or NULL with s->err set. */
static redisReply *
setup_command(struct store *s, redisContext *ctx, int argc,
              const char **argv, const char *what)
{
    redisReply *r = redisCommandArgv(ctx, argc, argv, NULL);

    if (r != NULL && r->type != REDIS_REPLY_ERROR)
        return r;
    snprintf(s->err, STORE_ERR_LEN, "Redis %s failed: %s", what,
             r ? r->str : ctx->errstr);
    freeReplyObject(r);
    return NULL;
}

/* Run a setup command whose reply only says it worked. */
static int
setup_ok(struct store *s, redisContext *ctx, int argc, const char **argv,
         const char *what)
{
    redisReply *r = setup_command(s, ctx, argc, argv, what);

    freeReplyObject(r);
    return r != NULL ? 0 : -1;
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
                     ? setup_ok(s, s->ctx, 3, auth_user, "AUTH")
                     : setup_ok(s, s->ctx, 2, auth, "AUTH");
        if (rc == -1)
            return -1;
    }
    if (s->addr.db != 0 && setup_ok(s, s->ctx, 2, select, "SELECT") == -1)
        return -1;
    return 0;
}

/* A Sentinel's answer: [ip, port], or nil for a name it does not know. */
static int
master_from_reply(struct store *s, const redisReply *r, struct store_node *m)
{
    const redisReply *ip, *port;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        snprintf(s->err, STORE_ERR_LEN, "Sentinel does not know master "
                 "\"%s\"", s->master_name);
        return -1;
    }
    ip = r->element[0];
    port = r->element[1];
    if (ip->type != REDIS_REPLY_STRING || port->type != REDIS_REPLY_STRING ||
        copy_setting(m->host, sizeof(m->host), ip->str, "master host",
                     s->err) == -1 ||
        parse_number(port->str, port->len, 1, 65535, &m->port) == -1) {
        snprintf(s->err, STORE_ERR_LEN, "Sentinel gave a bad address");
        return -1;
    }
    return 0;
}

/* Ask one Sentinel where the master is, within the connect timeout: a
 * Sentinel that stalls must not hold the request longer than a dead one. */
static int
ask_sentinel(struct store *s, const struct store_node *n, struct store_node *m)
{
    const char *get[] = {"SENTINEL", "get-master-addr-by-name",
                         s->master_name};
    const char *auth[] = {"AUTH", s->sentinel_password};
    redisContext *ctx = redisConnectWithTimeout(n->host, n->port,
                                                s->connect_timeout);
    redisReply *r = NULL;
    int rc = -1;

    if (ctx == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    if (ctx->err != 0)
        snprintf(s->err, STORE_ERR_LEN, "Sentinel %s:%d: %s", n->host,
                 n->port, ctx->errstr);
    else if (redisSetTimeout(ctx, s->connect_timeout) == REDIS_OK &&
             (s->sentinel_password[0] == '\0' ||
              setup_ok(s, ctx, 2, auth, "Sentinel AUTH") == 0))
        r = setup_command(s, ctx, 3, get, "SENTINEL get-master-addr-by-name");
    if (r != NULL)
        rc = master_from_reply(s, r, m);
    freeReplyObject(r);
    redisFree(ctx);
    return rc;
}

/* The first Sentinel that names the master becomes the first to ask next
 * time (the Sentinel client guidelines), so that a dead one early in the
 * list costs one failed connect, not one per reconnect. */
static int
resolve_master(struct store *s)
{
    struct store_node m;

    for (int i = 0; i < s->nsentinels; i++) {
        if (ask_sentinel(s, &s->sentinels[i], &m) == -1)
            continue;
        if (i > 0) {
            struct store_node first = s->sentinels[0];

            s->sentinels[0] = s->sentinels[i];
            s->sentinels[i] = first;
        }
        if (strcmp(m.host, s->master.host) != 0 || m.port != s->master.port)
            log_info("store", "following Redis master %s:%d (master_name "
                     "%s)", m.host, m.port, s->master_name);
        s->master = m;
        return 0;
    }
    return -1;
}

/* A Sentinel's answer can be stale (a failover under way, or a Sentinel
 * cut off from the rest): only a master takes our writes. */
static int
check_role(struct store *s)
{
    const char *role[] = {"ROLE"};
    redisReply *r = setup_command(s, s->ctx, 1, role, "ROLE");
    int master;

    if (r == NULL)
        return -1;
    master = r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
             r->element[0]->type == REDIS_REPLY_STRING &&
             strcmp(r->element[0]->str, "master") == 0;
    if (!master)
        snprintf(s->err, STORE_ERR_LEN, "Redis at %s:%d is not a master "
                 "(yet); asking the Sentinels again", s->master.host,
                 s->master.port);
    freeReplyObject(r);
    return master ? 0 : -1;
}

static void
open_context(struct store *s)
{
    const struct store_addr *a = &s->addr;

    if (s->nsentinels > 0)
        s->ctx = redisConnectWithTimeout(s->master.host, s->master.port,
                                         s->connect_timeout);
    else if (a->socket_path[0] != '\0')
        s->ctx = redisConnectUnixWithTimeout(a->socket_path,
                                             s->connect_timeout);
    else
        s->ctx = redisConnectWithTimeout(a->host, a->port,
                                         s->connect_timeout);
}

static int
connect_now(struct store *s)
{
    if (s->nsentinels > 0 && resolve_master(s) == -1)
        return -1;
    open_context(s);
    if (s->ctx == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    if (s->ctx->err == 0 && redisSetTimeout(s->ctx, s->command_timeout) ==
                                REDIS_OK && authenticate(s) == 0 &&
        (s->nsentinels == 0 || check_role(s) == 0))
        return 0;
    if (s->ctx->err != 0 && s->nsentinels > 0)
        snprintf(s->err, STORE_ERR_LEN, "cannot connect to the Redis master "
                 "at %s:%d: %s", s->master.host, s->master.port,
                 s->ctx->errstr);
    else if (s->ctx->err != 0)
        snprintf(s->err, STORE_ERR_LEN, "cannot connect to Redis: %s",
                 s->ctx->errstr);
    drop_connection(s);
    return -1;
}

/* An idle connection has nothing to read: if it is readable, the server
 * closed it (a Redis restart, or a Sentinel reconfiguring a demoted
 * master: it kills the clients) and the next command would fail on it. */
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
    now = clock_ms();
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

/* Errors of a server that cannot take the command where another could: a
 * replica since a failover (READONLY), one still loading its data
 * (LOADING), a replica cut off from its master (MASTERDOWN). */
static int
wrong_server(const char *error)
{
    return strncmp(error, "READONLY", 8) == 0 ||
           strncmp(error, "LOADING", 7) == 0 ||
           strncmp(error, "MASTERDOWN", 10) == 0;
}

/* A NULL reply means the connection is unusable: drop it. An error reply
 * leaves it usable, unless it says this is the wrong server: dropping it
 * then makes the next command ask the Sentinels again. Either way the
 * command failed. */
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
        if (wrong_server(r->str))
            drop_connection(s);
        return -1;
    }
    return 0;
}

int
store_ping(struct store *s)
{
    const char *ping[] = {"PING"};
    redisReply *r = store_command_argv(s, 1, ping, NULL, "PING");

    freeReplyObject(r);
    return r != NULL ? 0 : -1;
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

/* The next reply of a pipeline, or NULL when the connection failed. */
static redisReply *
next_reply(struct store *s)
{
    void *r = NULL;

    if (redisGetReply(s->ctx, &r) != REDIS_OK)
        return NULL;
    return r;
}

static int
replicas_short(struct store *s, const redisReply *w)
{
    if (w->type == REDIS_REPLY_INTEGER && w->integer >= s->wait_replicas)
        return 0;
    snprintf(s->err, STORE_ERR_LEN, "only %lld of %lld replicas confirmed "
             "the write within %lld ms (it may remain on the master)",
             w->type == REDIS_REPLY_INTEGER ? w->integer : 0LL,
             s->wait_replicas, s->wait_timeout_ms);
    return -1;
}

struct redisReply *
store_write_argv(struct store *s, int argc, const char **argv,
                 const size_t *lens, const char *what)
{
    char n[24], ms[24];
    const char *wait[] = {"WAIT", n, ms};
    redisReply *r, *w = NULL;

    if (s->wait_replicas == 0)
        return store_command_argv(s, argc, argv, lens, what);
    if (ensure_connected(s) == -1)
        return NULL;
    snprintf(n, sizeof(n), "%lld", s->wait_replicas);
    snprintf(ms, sizeof(ms), "%lld", s->wait_timeout_ms);
    if (redisAppendCommandArgv(s->ctx, argc, argv, lens) != REDIS_OK ||
        redisAppendCommandArgv(s->ctx, 3, wait, NULL) != REDIS_OK) {
        /* Half a pipeline in the output buffer would desync replies. */
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        drop_connection(s);
        return NULL;
    }
    /* Both replies are read before either is judged: one left unread
     * would answer the next command. */
    r = next_reply(s);
    if (r != NULL)
        w = next_reply(s);
    if (w == NULL)
        reply_failed(s, NULL, r != NULL ? "WAIT" : what);
    else if (reply_failed(s, r, what) == 0 &&
             reply_failed(s, w, "WAIT") == 0 && replicas_short(s, w) == 0) {
        freeReplyObject(w);
        return r;
    }
    freeReplyObject(r);
    freeReplyObject(w);
    return NULL;
}
