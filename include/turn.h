/*
 * turn: the Redis side of one chat turn, in two round trips, each one
 * Lua script: begin (idempotency replay, rate limits, the session's turn
 * lock, the history) and commit (append, trim, TTL, unlock, idempotency
 * record, token count); abort releases the lock after a failure. Redis
 * Cluster: the rate-limit keys live in the client's slot, not the
 * session's, so there these scripts would need the rate check split off
 * into a round trip of its own (not done: Cluster is not supported).
 */
#ifndef CHATFCGI_TURN_H
#define CHATFCGI_TURN_H

#include <stddef.h>

struct buf;
struct history;
struct store;

/* One turn's bookkeeping. */
struct turn {
    const char *session_id;
    const char *client;          /* scopes rate limits */
    const char *token;           /* owns the lock: the request id */
    long long lock_ms;           /* lock and pending-record lifetime */
    const char *idempotency_key; /* NULL: none */
    int idempotency_by_client;   /* the request named no session */
    long long rpm, tpm;          /* per-minute limits; 0: off */
    /* Set by turn_begin: Redis's clock then, and ours (monotonic). */
    long long redis_clock_ms;
    double local_clock_ms;
};

enum turn_begin {
    TURN_GO,            /* locked; the history is loaded */
    TURN_RATE_LIMITED,  /* *retry_after_s tells when to come back */
    TURN_BUSY,          /* another turn of the session is in progress */
    TURN_RUNNING,       /* the same Idempotency-Key is in progress */
    TURN_REPLAY,        /* answered before: replay holds the answer */
};

/* Returns an enum turn_begin, or -1 with s->err set. */
int turn_begin(struct store *s, struct turn *t, struct history *h,
               struct buf *replay, long long *retry_after_s);

/* What a successful turn stores. */
struct turn_result {
    const char *user_item, *assistant_item; /* history items (JSON) */
    size_t user_len, assistant_len;
    size_t trim_start;       /* oldest messages to drop */
    long long ttl_s;         /* of the history */
    const char *answer;      /* the answer to replay (JSON) */
    size_t answer_len;
    long long idempotency_ttl_s;
    long long tokens;        /* for the per-minute token limit */
};

/* Returns 0, or -1 with s->err set. Then nothing was stored, with two
 * exceptions: the connection died after Redis ran the script, or [redis]
 * wait_replicas is set and fewer replicas confirmed the write (it is on
 * the master, which a failover may lose). 0 with wait_replicas set means
 * that many replicas have the turn too: EVALSHA and WAIT go in one round
 * trip (pipelined). */
int turn_commit(struct store *s, const struct turn *t,
                const struct turn_result *r);

/* Rate limits alone, for requests without a session (the /v1 face; only
 * t->client, rpm and tpm are used): TURN_GO (and the turn is counted),
 * TURN_RATE_LIMITED, or -1. */
int turn_rate_check(struct store *s, const struct turn *t,
                    long long *retry_after_s);

/* Add a finished request's tokens to the client's per-minute count. */
int turn_count_tokens(struct store *s, const struct turn *t,
                      long long tokens);

/* Release the lock and a pending idempotency record after a failure.
 * Returns 0 or -1 (the lock then expires on its own). */
int turn_abort(struct store *s, const struct turn *t);

#endif
