/*
 * chatdb: every Redis key and script of the chat, over one store
 * connection. A session's history (the stored form of a message, load,
 * append, the trim rule, TTL, delete), its owner, its turn lock,
 * idempotency records and each client's per-minute rate counters. A turn
 * takes two round trips, each one Lua script: begin (owner, idempotency
 * replay, rate limits, the lock, the history) and commit (append, trim,
 * TTL, unlock, idempotency record, token count); abort releases the lock
 * after a failure. GET and DELETE take one (rate limit, owner, then load
 * or delete). Every key of a session shares the hash tag {session_id}; a
 * client's counters and idempotency records without a session use
 * {client}: on Redis Cluster they go in scripts of their own, one more
 * round trip where they are in use.
 * Failures carry a reason (chatdb_error); mapping them to HTTP is the
 * chat's job.
 */
#ifndef CHATFCGI_CHATDB_H
#define CHATFCGI_CHATDB_H

#include <stddef.h>
#include <yajl/yajl_gen.h>

#include "messages.h"
#include "store.h"

struct buf;
struct conf;

#define CHATDB_SCRIPTS 7
#define CHATDB_HASH_HEX 64 /* a request's SHA-256, in hex */

struct chatdb {
    struct store store;
    const struct conf *conf;
    char sha[CHATDB_SCRIPTS][41]; /* each script's SHA-1, for EVALSHA */
    /* Redis's clock as the last reply that carried it gave it, and ours
     * (monotonic) when that reply came in, on the store's connection
     * number clock_connection (0: none yet): what a turn begin's deadline
     * is reckoned from. */
    long long clock_redis_ms;
    double clock_seen_ms;
    unsigned clock_connection;
};

/* Prepare (no connection yet). Returns 0, or -1 with chatdb_error set. */
int chatdb_init(struct chatdb *db, const struct conf *c);
void chatdb_cleanup(struct chatdb *db);

/* Why the last call failed. */
const char *chatdb_error(const struct chatdb *db);

/* Each returns 0, or -1 with chatdb_error set. The ping reads Redis's
 * clock (TIME), for the deadline of the next turn begin. */
int chatdb_ping(struct chatdb *db);

/* One turn's bookkeeping (GET and DELETE use the session, client, owner
 * and rpm alone). */
struct chatdb_turn {
    const char *session_id;
    const char *client;          /* scopes rate limits */
    /* Who owns the session: a client key's identity, which the first turn
     * stores, and which every other request must match; "": no owner. */
    const char *owner;
    const char *token;           /* owns the lock: the request id */
    long long lock_ms;           /* lock and pending-record lifetime */
    const char *idempotency_key; /* NULL: none */
    int idempotency_by_client;   /* the request named no session */
    /* With the client and the session named (if any), what the record of
     * an idempotency key is bound to. */
    const char *message;
    size_t message_len;
    long long rpm, tpm;          /* per-minute limits; 0: off */
    /* Set by chatdb_turn_begin: Redis's clock then, and ours (monotonic)
     * when begin went out and when its reply was read; stored items
     * before the loaded history (unreadable or over the cap), which the
     * commit trims; the hash of the request ("" without an idempotency
     * key). */
    long long redis_clock_ms;
    double begin_sent_ms, local_clock_ms;
    size_t skipped;
    char request_hash[CHATDB_HASH_HEX + 1];
};

enum chatdb_begin {
    CHATDB_GO,           /* locked; the history is loaded */
    CHATDB_RATE_LIMITED, /* *retry_after_s tells when to come back */
    CHATDB_BUSY,         /* another turn of the session is in progress */
    CHATDB_RUNNING,      /* the same Idempotency-Key is in progress */
    CHATDB_REPLAY,       /* answered before: replay holds the answer */
    CHATDB_NOT_FOUND,    /* the session is another owner's */
    CHATDB_MISMATCH,     /* the Idempotency-Key came with another request */
};

/* A session's messages for the caller (none when it does not exist),
 * into h. Returns CHATDB_GO, CHATDB_RATE_LIMITED (the request counts in
 * t->rpm), CHATDB_NOT_FOUND, or -1. */
int chatdb_history_load(struct chatdb *db, const struct chatdb_turn *t,
                        struct messages *h, long long *retry_after_s);

/* Delete a session: its history, its turn lock (a turn in progress then
 * stores nothing, its commit finding the lock gone) and its owner (the id
 * is free again). Returns as chatdb_history_load. */
int chatdb_history_delete(struct chatdb *db, const struct chatdb_turn *t,
                          long long *retry_after_s);

/* Returns an enum chatdb_begin, or -1. */
int chatdb_turn_begin(struct chatdb *db, struct chatdb_turn *t,
                      struct messages *h, struct buf *replay,
                      long long *retry_after_s);

/* What a successful turn stores. */
struct chatdb_result {
    const char *user_item, *assistant_item; /* chatdb_gen_item's form */
    size_t user_len, assistant_len;
    const struct messages *history; /* with the new pair: to trim */
    const char *answer;      /* the answer to replay (JSON) */
    size_t answer_len;
    long long tokens;        /* for the per-minute token limit */
};

/* The turn no longer holds its lock: a DELETE removed it, or it expired
 * and another turn may hold it now. Nothing was stored. */
#define CHATDB_LOST 1

/* Returns 0, CHATDB_LOST, or -1. Then nothing was stored, with two
 * exceptions: the connection died after Redis ran the script, or [redis]
 * wait_replicas is set and fewer replicas confirmed the write (it is on
 * the master, which a failover may lose). 0 with wait_replicas set means
 * that many replicas have the turn too: EVALSHA and WAIT go in one round
 * trip. */
int chatdb_turn_commit(struct chatdb *db, const struct chatdb_turn *t,
                       const struct chatdb_result *r);

/* Release the lock and a pending idempotency record after a failure.
 * Returns 0 or -1 (the lock then expires on its own). */
int chatdb_turn_abort(struct chatdb *db, const struct chatdb_turn *t);

/* Rate limits alone, for requests without a session (the /v1 face; only
 * t->client, rpm and tpm are used): CHATDB_GO (and the request is
 * counted), CHATDB_RATE_LIMITED, or -1. */
int chatdb_rate_check(struct chatdb *db, const struct chatdb_turn *t,
                      long long *retry_after_s);

/* Add a finished request's tokens to the client's per-minute count. */
int chatdb_count_tokens(struct chatdb *db, const struct chatdb_turn *t,
                        long long tokens);

/* The stored form of a message, {"role","content"[,"tools"]}, into g
 * (restarted): tools, when exchange_len > 0, is the tool exchange of the
 * turn this answer ends (see MESSAGE_EXCHANGE), kept as a string so that
 * a turn stays two items and trims as one pair. Returns 0 or -1. */
int chatdb_gen_item(yajl_gen g, enum message_role role, const char *content,
                    size_t len, const char *exchange, size_t exchange_len);

/* Parse one stored item and append it to h. Returns 0, or -1 when the
 * item is not of that form (or does not fit). */
int chatdb_add_item(struct messages *h, const char *json, size_t len);

/* The trim rule: how many of the oldest messages of h to drop so that at
 * most max_messages messages and max_bytes bytes of content (tool
 * exchanges included) remain: whole
 * pairs only, never the newest pair, which the turn just added. */
size_t chatdb_trim_start(const struct messages *h, size_t max_messages,
                         size_t max_bytes);

#endif
