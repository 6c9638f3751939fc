/* store: the Redis connections, the URL, Sentinels, Cluster, reconnects. */
#include "store.h"

#include <ctype.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "clock.h"
#include "conf.h"
#include "json.h"
#include "log.h"

#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 1000
#define DEFAULT_PORT 6379
#define SENTINEL_PORT 26379
#define CLUSTER_TRIES 16       /* redirections and retries of one command */
#define CLUSTER_PAUSE_FIRST_MS 25

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
        return cluster_decimal(portstr, (size_t)(s + n - portstr), 1,
                               65535, port);
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
        return cluster_decimal(slash + 1, strlen(slash + 1), 0, 1000000,
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
    return cluster_decimal(query + 4, strlen(query + 4), 0, 1000000, &a->db);
}

static int
has_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (isspace((unsigned char)s[i]))
            return 1;
    return 0;
}

/* A list of "host[:port]" separated by commas (spaces around them
 * allowed) into out (STORE_SENTINELS_MAX at most, as many as
 * STORE_SEEDS_MAX). Returns how many ("" has none), or -1 with the reason
 * in err. */
static int
parse_nodes(const char *list, struct store_node out[STORE_SENTINELS_MAX],
            int default_port, const char *what, char err[STORE_ERR_LEN])
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
            snprintf(err, STORE_ERR_LEN, "more than %d %ss",
                     STORE_SENTINELS_MAX, what);
            return -1;
        }
        /* Inner space: most likely a comma left out between two. */
        if (has_space(p, (size_t)(end - p)) ||
            parse_hostport(p, (size_t)(end - p), out[n].host,
                           sizeof(out[n].host), &out[n].port,
                           default_port) == -1) {
            snprintf(err, STORE_ERR_LEN, "bad %s \"%.*s\": expected "
                     "host[:port] or [v6]:port, separated by commas", what,
                     (int)(end - p > 64 ? 64 : end - p), p);
            return -1;
        }
        n++;
        if (comma == NULL)
            return n;
        p = comma + 1;
    }
}

int
store_sentinels_parse(const char *list,
                      struct store_node out[STORE_SENTINELS_MAX],
                      char err[STORE_ERR_LEN])
{
    return parse_nodes(list, out, SENTINEL_PORT, "Sentinel", err);
}

/* "[userinfo@]host[:port],host[:port],...": no db, a cluster has only
 * db 0. */
static int
parse_cluster_url(const char *rest, struct store_addr *a)
{
    const char *at = strchr(rest, '@');
    char err[STORE_ERR_LEN];

    if (at != NULL) {
        if (parse_userinfo(rest, (size_t)(at - rest), a) == -1)
            return -1;
        rest = at + 1;
    }
    if (strchr(rest, '/') != NULL)
        return -1;
    a->nseeds = parse_nodes(rest, a->seeds, DEFAULT_PORT,
                            "Redis Cluster node", err);
    return a->nseeds > 0 ? 0 : -1;
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
    else if (strncmp(url, "redis-cluster://", 16) == 0)
        rc = parse_cluster_url(url + 16, a);
    /* The URL is not repeated: it may hold a password. */
    if (rc == -1)
        snprintf(err, STORE_ERR_LEN,
                 "bad Redis URL: expected "
                 "redis://[user][:password]@host[:port][/db], "
                 "unix:///path[?db=N] or "
                 "redis-cluster://[user][:password]@host[:port],...");
    return rc;
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
    if (init_sentinels(s, c) == -1 ||
        store_addr_parse(c->redis.url, &s->addr, s->err) == -1)
        return -1;
    if (s->addr.nseeds == 0)
        return 0;
    if (s->nsentinels > 0) {
        snprintf(s->err, STORE_ERR_LEN, "sentinels and a redis-cluster:// "
                 "url exclude each other: a cluster fails over by itself");
        return -1;
    }
    /* Allocated last: a failed init leaves nothing to free. */
    s->map = malloc(sizeof(*s->map));
    if (s->map == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    cluster_map_clear(s->map);
    s->map_stale = 1;
    return 0;
}

static void
drop_connection(struct store *s)
{
    if (s->ctx != NULL)
        redisFree(s->ctx);
    s->ctx = NULL;
}

static void
drop_node(struct store *s, int i)
{
    if (s->conns[i] != NULL)
        redisFree(s->conns[i]);
    s->conns[i] = NULL;
}

void
store_cleanup(struct store *s)
{
    drop_connection(s);
    for (int i = 0; i < CLUSTER_NODES_MAX; i++)
        drop_node(s, i);
    free(s->map);
    s->map = NULL;
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
authenticate(struct store *s, redisContext *ctx)
{
    char db[16];
    const char *auth_user[] = {"AUTH", s->addr.user, s->addr.password};
    const char *auth[] = {"AUTH", s->addr.password};
    const char *select[] = {"SELECT", db};

    snprintf(db, sizeof(db), "%d", s->addr.db);
    if (s->addr.password[0] != '\0') {
        int rc = s->addr.user[0] != '\0'
                     ? setup_ok(s, ctx, 3, auth_user, "AUTH")
                     : setup_ok(s, ctx, 2, auth, "AUTH");
        if (rc == -1)
            return -1;
    }
    if (s->addr.db != 0 && setup_ok(s, ctx, 2, select, "SELECT") == -1)
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
        cluster_decimal(port->str, port->len, 1, 65535, &m->port) == -1) {
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

/* A new connection's command timeout and authentication. */
static int
prepare(struct store *s, redisContext *ctx)
{
    if (ctx->err != 0 ||
        redisSetTimeout(ctx, s->command_timeout) != REDIS_OK)
        return -1;
    return authenticate(s, ctx);
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
    if (prepare(s, s->ctx) == 0 && (s->nsentinels == 0 || check_role(s) == 0))
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
connection_closed(redisContext *ctx)
{
    struct pollfd p = {.fd = ctx->fd, .events = POLLIN};

    return poll(&p, 1, 0) != 0;
}

/* After a failed attempt to reach Redis: no other before a backoff of
 * 50 ms, doubling up to 1 s, so that a dead Redis costs requests no
 * connect each. */
static void
connect_failed(struct store *s, double now)
{
    unsigned shift = s->failures < 5 ? s->failures : 5;

    if (s->failures == 0)
        log_error("store", "%s", s->err);
    s->retry_at_ms = now + (double)(BACKOFF_FIRST_MS << shift < BACKOFF_MAX_MS
                                        ? BACKOFF_FIRST_MS << shift
                                        : BACKOFF_MAX_MS);
    s->failures++;
}

static void
connect_worked(struct store *s)
{
    s->connections++;
    if (s->failures > 0)
        log_info("store", "connected to Redis again after %u failed "
                 "attempts", s->failures);
    s->failures = 0;
}

/* Whether the last failure was so recent that another attempt would only
 * add latency (s->err then says so). */
static int
backing_off(struct store *s, double now)
{
    if (now >= s->retry_at_ms)
        return 0;
    snprintf(s->err, STORE_ERR_LEN, "Redis is down (next attempt in "
             "%.0f ms)", s->retry_at_ms - now);
    return 1;
}

/* Connect when there is no connection (or only a closed one), unless the
 * last attempt failed so recently that another would only add latency. */
static int
ensure_connected(struct store *s)
{
    double now;

    if (s->ctx != NULL && connection_closed(s->ctx)) {
        log_info("store", "Redis closed the connection; reconnecting");
        drop_connection(s);
    }
    if (s->ctx != NULL)
        return 0;
    now = clock_ms();
    if (backing_off(s, now))
        return -1;
    if (connect_now(s) == 0) {
        connect_worked(s);
        return 0;
    }
    connect_failed(s, now);
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

/* Redis takes a connection past its maxclients only to send this and
 * close it. */
static int
too_many_clients(const char *error)
{
    return strncmp(error, "ERR max number of clients reached", 33) == 0;
}

/* An error reply leaves the connection usable, unless it says this is the
 * wrong server: dropping it then makes the next command ask the Sentinels
 * again. Either way the command failed. */
static int
reply_failed(struct store *s, redisReply *r, const char *what)
{
    if (r->type != REDIS_REPLY_ERROR)
        return 0;
    if (too_many_clients(r->str)) {
        snprintf(s->err, STORE_ERR_LEN, "Redis refused the connection: "
                 "max number of clients reached (every worker keeps one: "
                 "raise Redis's maxclients above the pool's size)");
        log_error("store", "%s", s->err);
        drop_connection(s);
        return -1;
    }
    snprintf(s->err, STORE_ERR_LEN, "Redis %s: %s", what, r->str);
    if (wrong_server(r->str))
        drop_connection(s);
    return -1;
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

/* One command as the caller gave it. */
struct call {
    int argc;
    const char **argv;
    const size_t *lens;
    const char *what;
    int acked; /* a write followed by WAIT when wait_replicas is set */
    const struct store_read *then; /* sent right after it, or NULL */
    double patience_ms; /* beyond command_timeout_ms for its replies */
    const struct store_read *if_lost; /* see store_command_then */
};

static double
tv_ms(struct timeval tv)
{
    return (double)tv.tv_sec * 1000.0 + (double)tv.tv_usec / 1000.0;
}

/* ctx's timeout for c's round trip: command_timeout_ms and c's patience;
 * with c NULL, back to command_timeout_ms alone. */
static void
set_call_timeout(struct store *s, redisContext *ctx, const struct call *c)
{
    if (c == NULL || c->patience_ms > 0)
        redisSetTimeout(ctx, ms_to_tv((long long)(tv_ms(s->command_timeout) +
                                                  (c ? c->patience_ms : 0))));
}

/* The replies of one round trip: the command's, then's, WAIT's. */
struct replies {
    redisReply *r, *then, *wait;
};

static void
free_replies(struct replies *rep)
{
    freeReplyObject(rep->r);
    freeReplyObject(rep->then);
    freeReplyObject(rep->wait);
    rep->r = rep->then = rep->wait = NULL;
}

/* The next reply of a pipeline, or -1 when the connection failed. */
static int
next_reply(redisContext *ctx, redisReply **out)
{
    void *r = NULL;

    if (redisGetReply(ctx, &r) != REDIS_OK)
        return -1;
    *out = r;
    return 0;
}

/* Append one command, after ASKING when asking. Returns 0 or -1. */
static int
append(redisContext *ctx, int asking, int argc, const char **argv,
       const size_t *lens)
{
    const char *ask[] = {"ASKING"};

    return (asking && redisAppendCommandArgv(ctx, 1, ask, NULL) != REDIS_OK) ||
                   redisAppendCommandArgv(ctx, argc, argv, lens) != REDIS_OK
               ? -1
               : 0;
}

/* Redis closed ctx's connection, or it failed: what is sent on it now is
 * lost. (A reply that came late leaves it open.) */
static int
peer_gone(redisContext *ctx)
{
    struct pollfd p = {.fd = ctx->fd, .events = POLLRDHUP};

    return ctx->err == REDIS_ERR_EOF ||
           (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP |
                                                 POLLERR)));
}

/* After a pipeline whose replies did not come in time: append last (after
 * ASKING when asking) to what ctx has not sent yet, and hand all of it to
 * the kernel at once, without waiting: Redis then runs last right after
 * the pipeline's commands. Returns 0, or -1 when the connection is gone or
 * did not take all of it (full: a partial command Redis drops at the
 * close). */
static int
send_last_words(redisContext *ctx, int asking, const struct store_read *last)
{
    size_t len;

    if (peer_gone(ctx) ||
        append(ctx, asking, last->argc, last->argv, last->lens) == -1)
        return -1;
    len = sdslen(ctx->obuf);
    return send(ctx->fd, ctx->obuf, len, MSG_DONTWAIT | MSG_NOSIGNAL) ==
                   (ssize_t)len
               ? 0
               : -1;
}

/* Read the reply of a command appended by append(). Returns 0 or -1. */
static int
read_reply(redisContext *ctx, int asking, redisReply **out)
{
    redisReply *a = NULL;
    int rc = (asking && next_reply(ctx, &a) == -1) ||
             next_reply(ctx, out) == -1;

    freeReplyObject(a);
    return rc ? -1 : 0;
}

/* Send c (and c->then) on ctx in one round trip, each after ASKING when
 * asking, followed by WAIT for an acked write, then read every reply
 * before any is judged: one left unread would answer the next command.
 * Returns 0 with the replies in *rep (then and wait NULL when not sent),
 * or -1 with s->err set when the connection failed: it is dead then, and
 * the command may have run. */
static int
pipeline(struct store *s, redisContext *ctx, int asking, const struct call *c,
         struct replies *rep)
{
    char n[24], ms[24];
    const char *wait[] = {"WAIT", n, ms};
    const struct store_read *t = c->then;
    int waits = c->acked && s->wait_replicas > 0;

    rep->r = rep->then = rep->wait = NULL;
    set_call_timeout(s, ctx, c);
    if (waits) {
        snprintf(n, sizeof(n), "%lld", s->wait_replicas);
        snprintf(ms, sizeof(ms), "%lld", s->wait_timeout_ms);
    }
    if (append(ctx, asking, c->argc, c->argv, c->lens) == -1 ||
        (t && append(ctx, asking, t->argc, t->argv, t->lens) == -1) ||
        (waits && append(ctx, 0, 3, wait, NULL) == -1)) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    if (read_reply(ctx, asking, &rep->r) == -1 ||
        (t && read_reply(ctx, asking, &rep->then) == -1) ||
        (waits && read_reply(ctx, 0, &rep->wait) == -1)) {
        snprintf(s->err, STORE_ERR_LEN, "Redis %s: %s", c->what,
                 ctx->errstr[0] ? ctx->errstr : "connection lost");
        s->may_have_run = c->if_lost == NULL ||
                          send_last_words(ctx, asking, c->if_lost) == -1;
        free_replies(rep);
        return -1;
    }
    if (c->patience_ms > 0)
        set_call_timeout(s, ctx, NULL);
    return 0;
}

/* Whether the replies of a pipeline say the call worked: no error reply,
 * and as many replicas as asked when WAIT was sent. */
static int
call_worked(struct store *s, const struct call *c, const struct replies *rep)
{
    return reply_failed(s, rep->r, c->what) == 0 &&
           (rep->then == NULL || reply_failed(s, rep->then, c->what) == 0) &&
           (rep->wait == NULL ||
            (reply_failed(s, rep->wait, "WAIT") == 0 &&
             replicas_short(s, rep->wait) == 0));
}

/* The call's replies to its caller: the command's, and then's in *then
 * (NULL when the call had no then). */
static redisReply *
hand_over(struct replies *rep, redisReply **then)
{
    if (then != NULL)
        *then = rep->then;
    freeReplyObject(rep->wait);
    return rep->r;
}

/* A call on the one connection (a server, or the Sentinels' master). */
static redisReply *
single_call(struct store *s, const struct call *c, redisReply **then)
{
    struct replies rep;

    if (ensure_connected(s) == -1)
        return NULL;
    if (pipeline(s, s->ctx, 0, c, &rep) == -1) {
        drop_connection(s);
        return NULL;
    }
    if (call_worked(s, c, &rep))
        return hand_over(&rep, then);
    free_replies(&rep);
    return NULL;
}

/* ---- Redis Cluster */

static redisContext *
connect_node(struct store *s, const char *host, int port)
{
    redisContext *ctx = redisConnectWithTimeout(host, port,
                                                s->connect_timeout);

    if (ctx == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return NULL;
    }
    if (prepare(s, ctx) == 0)
        return ctx;
    if (ctx->err != 0)
        snprintf(s->err, STORE_ERR_LEN, "cannot connect to Redis at %s:%d: "
                 "%s", host, port, ctx->errstr);
    redisFree(ctx);
    return NULL;
}

/* CLUSTER SLOTS on ctx (a connection to host) into next. */
static int
load_map(struct store *s, redisContext *ctx, const char *host,
         struct cluster_map *next)
{
    const char *slots[] = {"CLUSTER", "SLOTS"};
    redisReply *r = setup_command(s, ctx, 2, slots, "CLUSTER SLOTS");
    char err[CLUSTER_ERR_LEN];
    int rc;

    if (r == NULL)
        return -1;
    rc = cluster_map_parse(next, r, host, err);
    if (rc == -1)
        snprintf(s->err, STORE_ERR_LEN, "Redis at %s: %s", host, err);
    freeReplyObject(r);
    return rc;
}

/* The map from the masters already connected, else from the seeds of the
 * URL (each on a connection of its own, closed after). */
static int
fetch_map(struct store *s, struct cluster_map *next)
{
    for (int i = 0; i < s->map->nnodes; i++) {
        if (s->conns[i] == NULL || connection_closed(s->conns[i])) {
            drop_node(s, i);
            continue;
        }
        if (load_map(s, s->conns[i], s->map->nodes[i].host, next) == 0)
            return 0;
        if (s->conns[i]->err != 0)
            drop_node(s, i);
    }
    for (int i = 0; i < s->addr.nseeds; i++) {
        const struct store_node *n = &s->addr.seeds[i];
        redisContext *ctx = connect_node(s, n->host, n->port);
        int rc = ctx != NULL ? load_map(s, ctx, n->host, next) : -1;

        if (ctx != NULL)
            redisFree(ctx);
        if (rc == 0)
            return 0;
    }
    return -1;
}

/* Replace the map with next, keeping the connections to the masters still
 * in it; one to a node that is no master any more is closed. */
static void
adopt_map(struct store *s, struct cluster_map *next)
{
    redisContext *kept[CLUSTER_NODES_MAX] = {NULL};

    for (int i = 0; i < next->nnodes; i++)
        if (cluster_map_find(s->map, next->nodes[i].host,
                             next->nodes[i].port) == -1)
            log_info("store", "Redis Cluster master %s:%d serves slots",
                     next->nodes[i].host, next->nodes[i].port);
    for (int i = 0; i < s->map->nnodes; i++) {
        int j = cluster_map_find(next, s->map->nodes[i].host,
                                 s->map->nodes[i].port);

        if (j != -1) {
            kept[j] = s->conns[i];
            s->conns[i] = NULL;
        }
        drop_node(s, i);
    }
    memcpy(s->conns, kept, sizeof(kept));
    free(s->map);
    s->map = next;
}

/* Ask for the slot map again. When no node answers, the next requests
 * fail at once for a backoff, as with a single server down. */
static int
refresh_map(struct store *s)
{
    struct cluster_map *next;
    double now = clock_ms();

    if (backing_off(s, now))
        return -1;
    next = malloc(sizeof(*next));
    if (next == NULL) {
        snprintf(s->err, STORE_ERR_LEN, "out of memory");
        return -1;
    }
    if (fetch_map(s, next) == -1) {
        free(next);
        connect_failed(s, now);
        return -1;
    }
    connect_worked(s);
    adopt_map(s, next);
    s->map_stale = 0;
    return 0;
}

/* The node serving slot (-1: any, the first connected one), or -1 with
 * s->err set when no master serves it (a failover under way). */
static int
slot_node(struct store *s, int slot)
{
    int node;

    if (slot == -1) {
        for (node = 0; node < s->map->nnodes; node++)
            if (s->conns[node] != NULL)
                return node;
        return s->map->nnodes > 0 ? 0 : -1;
    }
    node = s->map->owner[slot];
    if (node != CLUSTER_NO_NODE)
        return node;
    snprintf(s->err, STORE_ERR_LEN, "no Redis Cluster master serves slot "
             "%d", slot);
    return -1;
}

/* The connection to node i, opened when there is none (or a closed one). */
static redisContext *
node_conn(struct store *s, int i)
{
    const struct cluster_node *n = &s->map->nodes[i];

    if (s->conns[i] != NULL && connection_closed(s->conns[i])) {
        log_info("store", "Redis at %s:%d closed the connection", n->host,
                 n->port);
        drop_node(s, i);
    }
    if (s->conns[i] == NULL)
        s->conns[i] = connect_node(s, n->host, n->port);
    return s->conns[i];
}

/* What one try of a command on a cluster came to. */
enum outcome {
    DONE,   /* the reply is the caller's */
    FAILED, /* an answer that stands, or the command may have run */
    MOVED,  /* the slot has another master: from now on */
    ASKED,  /* the key is being migrated: this command only */
    RETRY,  /* nothing ran: try again, after a pause */
};

/* Judge the replies of a try on node. */
static enum outcome
judge(struct store *s, int node, const struct call *c,
      const struct replies *rep, struct cluster_redirect *to)
{
    const redisReply *r = rep->r;

    if (r->type == REDIS_REPLY_ERROR &&
        cluster_redirect_parse(r->str, r->len, to) == 0) {
        if (to->node.host[0] == '\0')
            memcpy(to->node.host, s->map->nodes[node].host, CLUSTER_HOST_MAX);
        return to->ask ? ASKED : MOVED;
    }
    if (r->type == REDIS_REPLY_ERROR &&
        (strncmp(r->str, "CLUSTERDOWN", 11) == 0 ||
         strncmp(r->str, "TRYAGAIN", 8) == 0 || wrong_server(r->str))) {
        snprintf(s->err, STORE_ERR_LEN, "Redis %s: %s", c->what, r->str);
        if (wrong_server(r->str))
            drop_node(s, node);
        s->map_stale = 1;
        return RETRY;
    }
    return call_worked(s, c, rep) ? DONE : FAILED;
}

/* One try: to the ASK target when asked, else to the slot's master. */
static enum outcome
try_once(struct store *s, int slot, const struct cluster_redirect *asked,
         const struct call *c, redisReply **out, redisReply **then,
         struct cluster_redirect *to)
{
    struct replies rep;
    redisContext *ctx;
    enum outcome o;
    int node = asked != NULL ? cluster_map_node(s->map, asked->node.host,
                                                asked->node.port)
                             : slot_node(s, slot);

    ctx = node != -1 ? node_conn(s, node) : NULL;
    if (ctx == NULL) {
        s->map_stale = 1;
        return RETRY;
    }
    if (pipeline(s, ctx, asked != NULL, c, &rep) == -1) {
        drop_node(s, node);
        s->map_stale = 1;
        return FAILED;
    }
    o = judge(s, node, c, &rep, to);
    if (o == DONE)
        *out = hand_over(&rep, then);
    else
        free_replies(&rep);
    return o;
}

/* Before another try after RETRY: 25 ms, doubling, never past give_up
 * (then -1: s->err keeps the last reason). A failover takes about the
 * cluster's node timeout, so a request that came during it may still be
 * served by the new master. */
static int
pause_before_retry(int pauses, double give_up)
{
    int ms = CLUSTER_PAUSE_FIRST_MS << (pauses < 6 ? pauses : 6);

    if (clock_ms() + ms >= give_up)
        return -1;
    poll(NULL, 0, ms);
    return 0;
}

static void
follow_moved(struct store *s, const struct cluster_redirect *to)
{
    int node = cluster_map_node(s->map, to->node.host, to->node.port);

    if (node != -1)
        s->map->owner[to->slot] = (unsigned char)node;
    /* A slot seldom moves alone (a failover moves all of a master's):
     * the next call asks for the whole map. */
    s->map_stale = 1;
}

static redisReply *
cluster_call(struct store *s, const struct call *c, redisReply **then)
{
    double give_up = clock_ms() + tv_ms(s->command_timeout) + c->patience_ms;
    int slot = cluster_command_slot(c->argc, c->argv, c->lens);
    int refresh = s->map_stale, asking = 0, pauses = 0;
    struct cluster_redirect to;

    for (int tries = 0; tries < CLUSTER_TRIES; tries++) {
        redisReply *r = NULL;
        enum outcome o;

        if (refresh && refresh_map(s) == -1)
            return NULL;
        o = try_once(s, slot, asking ? &to : NULL, c, &r, then, &to);
        refresh = asking = 0;
        if (o == DONE)
            return r;
        if (o == FAILED)
            return NULL;
        if (o == MOVED)
            follow_moved(s, &to);
        asking = o == ASKED;
        refresh = o == RETRY;
        if (o == RETRY && pause_before_retry(pauses++, give_up) == -1)
            return NULL;
    }
    snprintf(s->err, STORE_ERR_LEN, "Redis %s: still redirected after %d "
             "tries", c->what, CLUSTER_TRIES);
    return NULL;
}

/* ---- commands */

static redisReply *
call(struct store *s, const struct call *c, redisReply **then)
{
    s->may_have_run = 0;
    return s->map != NULL ? cluster_call(s, c, then) : single_call(s, c, then);
}

int
store_cluster(const struct store *s)
{
    return s->map != NULL;
}

double
store_command_timeout_ms(const struct store *s)
{
    return tv_ms(s->command_timeout);
}

struct redisReply *
store_command_argv(struct store *s, int argc, const char **argv,
                   const size_t *lens, const char *what)
{
    struct call c = {argc, argv, lens, what, 0, NULL, 0, NULL};

    return call(s, &c, NULL);
}

struct redisReply *
store_write_argv(struct store *s, int argc, const char **argv,
                 const size_t *lens, const char *what, double patience_ms)
{
    struct call c = {argc, argv, lens, what, 1, NULL, patience_ms, NULL};

    return call(s, &c, NULL);
}

struct redisReply *
store_command_then(struct store *s, int argc, const char **argv,
                   const size_t *lens, const char *what,
                   const struct store_read *then, struct redisReply **then_reply,
                   const struct store_read *if_lost)
{
    struct call c = {argc, argv, lens, what, 0, then, 0, if_lost};

    *then_reply = NULL;
    return call(s, &c, then_reply);
}
