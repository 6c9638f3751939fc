/*
 * store: chat history in Redis over one persistent hiredis connection per
 * worker. Connects lazily, treats a context as dead after any I/O error and
 * reconnects with a short backoff, so a Redis restart needs no worker
 * restart. Reports failures with a reason in s->err; mapping them to HTTP
 * statuses is the caller's job.
 */
#ifndef CHATFCGI_STORE_H
#define CHATFCGI_STORE_H

#include <stddef.h>
#include <sys/time.h>

struct conf;
struct history;
struct redisContext;

#define STORE_ERR_LEN 160

/* Where Redis is, from redis://[[user][:password]@]host[:port][/db] or
 * unix:///path/to/socket[?db=N]. */
struct store_addr {
    char host[256];
    int port;
    char socket_path[108];
    char user[128];
    char password[256];
    int db;
};

struct store {
    struct redisContext *ctx;
    struct store_addr addr;
    struct timeval connect_timeout, command_timeout;
    double retry_at_ms;  /* no reconnect attempt before this time */
    unsigned failures;   /* consecutive failed connects, for the backoff */
    char err[STORE_ERR_LEN];
};

/* Parse a Redis URL. Returns 0, or -1 with the reason in err. */
int store_addr_parse(const char *url, struct store_addr *a,
                     char err[STORE_ERR_LEN]);

/* Prepare (no connection yet). Returns 0, or -1 with s->err set. */
int store_init(struct store *s, const struct conf *c);
void store_cleanup(struct store *s);

/* Each returns 0, or -1 with s->err set. */
int store_ping(struct store *s);

/* Load a session's messages (none when it does not exist). */
int store_history_load(struct store *s, const char *session_id,
                       struct history *h);

/* Append the user and assistant items (JSON), drop the trim_start oldest
 * messages and refresh the TTL, atomically and in one round trip. */
int store_history_append(struct store *s, const char *session_id,
                         const char *user_json, size_t user_len,
                         const char *assistant_json, size_t assistant_len,
                         size_t trim_start, long long ttl_seconds);

int store_history_delete(struct store *s, const char *session_id);

#endif
