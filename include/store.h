/*
 * store: a worker's persistent Redis connection (hiredis): the URL,
 * Sentinels, authentication, and commands. It connects lazily, treats a
 * context as dead after any I/O error and reconnects with a short backoff,
 * so a Redis restart needs no worker restart; with Sentinels it asks them
 * for the master at every reconnect, so a failover needs none either.
 * With Redis Cluster it keeps the slot map (cluster.h) and one connection
 * per master in use, follows MOVED and ASK, and asks for the map again
 * after a failover. Failures carry a reason in s->err. What the keys mean
 * is chatdb's.
 */
#ifndef CHATFCGI_STORE_H
#define CHATFCGI_STORE_H

#include <stddef.h>
#include <sys/time.h>

#include "cluster.h"

struct conf;
struct redisContext;
struct redisReply;

#define STORE_ERR_LEN 160
#define STORE_SENTINELS_MAX 16
#define STORE_SEEDS_MAX STORE_SENTINELS_MAX /* one list parser */

/* A Sentinel, the master one named, or a node of a cluster URL. */
struct store_node {
    char host[256];
    int port;
};

/* Where Redis is, from redis://[[user][:password]@]host[:port][/db],
 * unix:///path/to/socket[?db=N] or
 * redis-cluster://[[user][:password]@]host[:port],host[:port],... */
struct store_addr {
    char host[256];
    int port;
    char socket_path[108];
    char user[128];
    char password[256];
    int db;
    struct store_node seeds[STORE_SEEDS_MAX]; /* where to ask for slots */
    int nseeds;                               /* 0: not a cluster */
};

struct store {
    struct redisContext *ctx;
    struct store_addr addr; /* with Sentinels: only user, password, db */
    struct timeval connect_timeout, command_timeout;
    double retry_at_ms;  /* no reconnect attempt before this time */
    unsigned failures;   /* consecutive failed connects, for the backoff */
    unsigned connections; /* made so far: a new one may be another server */
    /* Asked in order, the one that answered last first. */
    struct store_node sentinels[STORE_SENTINELS_MAX];
    int nsentinels;      /* 0: addr names the server itself */
    char master_name[128];
    char sentinel_password[256];
    struct store_node master; /* the one followed; host "" before any */
    long long wait_replicas, wait_timeout_ms; /* for store_write_argv */
    /* Redis Cluster (NULL map: none): which master serves each slot, and
     * conns[i] to map->nodes[i] once a command went there. */
    struct cluster_map *map;
    struct redisContext *conns[CLUSTER_NODES_MAX];
    int map_stale; /* ask for the map before the next command */
    /* The last call failed after its command was handed to a connection
     * (a timeout, a connection lost): Redis may have run it, and nothing
     * went after it to undo it (no if_lost: store_command_then). */
    int may_have_run;
    char err[STORE_ERR_LEN];
};

/* Parse a Redis URL. Returns 0, or -1 with the reason in err. */
int store_addr_parse(const char *url, struct store_addr *a,
                     char err[STORE_ERR_LEN]);

/* Parse a list of Sentinels, "host[:port]" separated by commas (spaces
 * around them allowed; port 26379 by default; "[v6]:port" for IPv6) into
 * out. Returns how many ("" has none), or -1 with the reason in err. */
int store_sentinels_parse(const char *list,
                          struct store_node out[STORE_SENTINELS_MAX],
                          char err[STORE_ERR_LEN]);

/* Prepare (no connection yet), applying the rules of the [redis] keys;
 * worker_check_conf runs it before any fork too, so that a bad value stops
 * the startup rather than every worker. Returns 0, or -1 with s->err set. */
int store_init(struct store *s, const struct conf *c);
void store_cleanup(struct store *s);

/* Whether s talks to a Redis Cluster, where one script runs in one slot:
 * all its keys must share a hash tag. */
int store_cluster(const struct store *s);

/* command_timeout_ms, as applied. */
double store_command_timeout_ms(const struct store *s);

/* Run one command given as argv (binary-safe). Returns the reply, which
 * the caller frees with freeReplyObject(), or NULL with s->err set (an
 * error reply counts as a failure). On a cluster the command goes to the
 * master of its key's slot (cluster_command_slot); a redirection, a
 * master that refuses connections or CLUSTERDOWN/TRYAGAIN (the command
 * did not run) is retried, with a pause while the cluster fails over,
 * for at most command_timeout_ms in all. A connection lost after the
 * command went out is not retried: it may have run. */
struct redisReply *store_command_argv(struct store *s, int argc,
                                      const char **argv, const size_t *lens,
                                      const char *what);

/* A read-only command that follows another in the same round trip. */
struct store_read {
    int argc;
    const char **argv;
    const size_t *lens;
};

/* Like store_command_argv, with then sent right after the command in the
 * same round trip, to the same node (its keys must share the command's
 * slot on a cluster): one wait instead of two. Returns the command's reply
 * and then's in *then_reply, or NULL (*then_reply NULL too) when either
 * failed. When the replies do not come (a timeout: Redis may have run the
 * command), if_lost (or NULL) is sent on the same connection before it is
 * dropped, without waiting for a reply: Redis runs it right after the
 * command, if it ran that at all, however slow it is to answer; when it
 * could not go out, may_have_run is set as for any other call. */
struct redisReply *store_command_then(struct store *s, int argc,
                                      const char **argv, const size_t *lens,
                                      const char *what,
                                      const struct store_read *then,
                                      struct redisReply **then_reply,
                                      const struct store_read *if_lost);

/* Like store_command_argv, for a write that must survive a failover:
 * when [redis] wait_replicas is set, WAIT follows the command in the same
 * round trip (pipelined, so on a cluster to the master that ran it), and
 * fewer replicas than asked is a failure, though the write then stays on
 * the master. Its replies may take patience_ms longer than
 * command_timeout_ms (0: no longer). */
struct redisReply *store_write_argv(struct store *s, int argc,
                                    const char **argv, const size_t *lens,
                                    const char *what, double patience_ms);

#endif
