#include "turn.h"

#include <hiredis/hiredis.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "buf.h"
#include "history.h"
#include "store.h"

#define WINDOW_S 60
#define COUNTER_TTL "120" /* a window's counters outlive it a little */
#define MAX_ARGS 20 /* EVALSHA sha nkeys, 4 keys, 10 args for commit */

/* KEYS: history, lock, idempotency record, rpm counter, tpm counter.
 * ARGV: token, lock ms, rpm, tpm, retry-after, has idempotency key. */
static const char begin_lua[] =
    "if ARGV[6] == '1' then\n"
    "  local v = redis.call('GET', KEYS[3])\n"
    "  if v then\n"
    "    if string.sub(v, 1, 8) == 'pending:' then return {'running'} end\n"
    "    return {'replay', v}\n"
    "  end\n"
    "end\n"
    "local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "if (tpm > 0 and tonumber(redis.call('GET', KEYS[5]) or '0') >= tpm) or\n"
    "   (rpm > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= rpm) then\n"
    "  return {'rate', ARGV[5]}\n"
    "end\n"
    "if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then\n"
    "  return {'busy'}\n"
    "end\n"
    "if ARGV[6] == '1' then\n"
    "  redis.call('SET', KEYS[3], 'pending:' .. ARGV[1], 'PX', ARGV[2])\n"
    "end\n"
    "if rpm > 0 then\n"
    "  redis.call('INCR', KEYS[4])\n"
    "  redis.call('EXPIRE', KEYS[4], " COUNTER_TTL ")\n"
    "end\n"
    "local t = redis.call('TIME')\n"
    "local h = redis.call('LRANGE', KEYS[1], 0, -1)\n"
    "table.insert(h, 1, tostring(t[1] * 1000 + math.floor(t[2] / 1000)))\n"
    "table.insert(h, 1, 'go')\n"
    "return h\n";

/* KEYS: history, lock, idempotency record, tpm counter.
 * ARGV: user item, assistant item, trim start, ttl, token,
 *       has idempotency key, answer, idempotency ttl, tokens, deadline.
 * Past the deadline (Redis's clock) the caller has given up and answered
 * an error, so nothing may be stored: a Redis that stalled and then ran a
 * queued commit would otherwise store a failed turn. */
static const char commit_lua[] =
    "local t = redis.call('TIME')\n"
    "if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[10]) then\n"
    "  return 0\n"
    "end\n"
    "redis.call('RPUSH', KEYS[1], ARGV[1], ARGV[2])\n"
    "if tonumber(ARGV[3]) > 0 then\n"
    "  redis.call('LTRIM', KEYS[1], ARGV[3], -1)\n"
    "end\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[4])\n"
    "if redis.call('GET', KEYS[2]) == ARGV[5] then\n"
    "  redis.call('DEL', KEYS[2])\n"
    "end\n"
    "if ARGV[6] == '1' then\n"
    "  redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])\n"
    "end\n"
    "if tonumber(ARGV[9]) > 0 then\n"
    "  redis.call('INCRBY', KEYS[4], ARGV[9])\n"
    "  redis.call('EXPIRE', KEYS[4], " COUNTER_TTL ")\n"
    "end\n"
    "return 1\n";

/* KEYS: lock, idempotency record. ARGV: token, has idempotency key. */
static const char abort_lua[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  redis.call('DEL', KEYS[1])\n"
    "end\n"
    "if ARGV[2] == '1' and\n"
    "   redis.call('GET', KEYS[2]) == 'pending:' .. ARGV[1] then\n"
    "  redis.call('DEL', KEYS[2])\n"
    "end\n"
    "return 1\n";

/* Rate limits without a session (the /v1 face).
 * KEYS: rpm counter, tpm counter. ARGV: rpm, tpm, retry-after. */
static const char rate_lua[] =
    "local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "if (tpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm) or\n"
    "   (rpm > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm) then\n"
    "  return ARGV[3]\n"
    "end\n"
    "if rpm > 0 then\n"
    "  redis.call('INCR', KEYS[1])\n"
    "  redis.call('EXPIRE', KEYS[1], " COUNTER_TTL ")\n"
    "end\n"
    "return 0\n";

/* KEYS: tpm counter. ARGV: tokens. */
static const char tokens_lua[] =
    "redis.call('INCRBY', KEYS[1], ARGV[1])\n"
    "redis.call('EXPIRE', KEYS[1], " COUNTER_TTL ")\n"
    "return 1\n";

/* The keys of one turn, as C strings. */
struct turn_keys {
    char history[STORE_KEY_MAX];
    char lock[STORE_KEY_MAX];
    char record[STORE_KEY_MAX];
    char rpm[STORE_KEY_MAX];
    char tpm[STORE_KEY_MAX];
};

/* The client's rate-limit counters of the current minute. */
static void
client_keys(const struct turn *t, struct turn_keys *k, long long window)
{
    snprintf(k->rpm, sizeof(k->rpm), "rl:{%s}:rpm:%lld", t->client, window);
    snprintf(k->tpm, sizeof(k->tpm), "rl:{%s}:tpm:%lld", t->client, window);
}

static void
make_keys(const struct turn *t, struct turn_keys *k, long long window)
{
    client_keys(t, k, window);
    store_history_key(k->history, t->session_id);
    snprintf(k->lock, sizeof(k->lock), "chat:{%s}:lock", t->session_id);
    if (t->idempotency_key == NULL)
        snprintf(k->record, sizeof(k->record), "chat:{%s}:idem",
                 t->session_id);
    else if (t->idempotency_by_client)
        snprintf(k->record, sizeof(k->record), "idem:{%s}:%s", t->client,
                 t->idempotency_key);
    else
        snprintf(k->record, sizeof(k->record), "chat:{%s}:idem:%s",
                 t->session_id, t->idempotency_key);
}

/* Arguments of one EVALSHA, built up one by one. */
struct call {
    const char *argv[MAX_ARGS];
    size_t lens[MAX_ARGS];
    char numbers[MAX_ARGS][24];
    int argc;
};

static void
arg(struct call *c, const char *s, size_t n)
{
    c->argv[c->argc] = s;
    c->lens[c->argc++] = n;
}

static void
arg_str(struct call *c, const char *s)
{
    arg(c, s, strlen(s));
}

static void
arg_int(struct call *c, long long v)
{
    int n = snprintf(c->numbers[c->argc], sizeof(c->numbers[0]), "%lld", v);

    arg(c, c->numbers[c->argc], (size_t)n);
}

/* A Lua script and its SHA-1 in hex, worked out once per process (the
 * digest goes through OpenSSL's provider lookup: not for every call). */
struct script {
    const char *lua;
    char sha[41];
};

static struct script begin_script = {.lua = begin_lua};
static struct script commit_script = {.lua = commit_lua};
static struct script abort_script = {.lua = abort_lua};
static struct script rate_script = {.lua = rate_lua};
static struct script tokens_script = {.lua = tokens_lua};

static const char *
script_sha(struct script *sc)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[SHA_DIGEST_LENGTH];

    if (sc->sha[0] != '\0')
        return sc->sha;
    SHA1((const unsigned char *)sc->lua, strlen(sc->lua), md);
    for (int i = 0; i < SHA_DIGEST_LENGTH; i++) {
        sc->sha[2 * i] = hex[md[i] >> 4];
        sc->sha[2 * i + 1] = hex[md[i] & 0xf];
    }
    return sc->sha;
}

/* One call as a plain command, or (acked) as a write that waits for
 * [redis] wait_replicas in the same round trip. */
static redisReply *
send_call(struct store *s, struct call *c, int acked, const char *what)
{
    if (acked)
        return store_write_argv(s, c->argc, c->argv, c->lens, what);
    return store_command_argv(s, c->argc, c->argv, c->lens, what);
}

/* EVALSHA, or EVAL when Redis does not have the script yet (a restart, a
 * flush, a replica just promoted): one round trip in the usual case.
 * c->argv[0..1] are reserved. */
static redisReply *
run_script(struct store *s, struct script *sc, struct call *c, int acked,
           const char *what)
{
    redisReply *r;

    c->argv[0] = "EVALSHA";
    c->lens[0] = 7;
    c->argv[1] = script_sha(sc);
    c->lens[1] = 40;
    r = send_call(s, c, acked, what);
    if (r != NULL || strstr(s->err, "NOSCRIPT") == NULL)
        return r;
    c->argv[0] = "EVAL";
    c->lens[0] = 4;
    c->argv[1] = sc->lua;
    c->lens[1] = strlen(sc->lua);
    return send_call(s, c, acked, what);
}

static void
begin_call(struct call *c, int nkeys)
{
    c->argc = 2;
    arg_int(c, nkeys);
}

static int
begin_outcome(struct store *s, struct turn *t, const redisReply *r,
              struct history *h, struct buf *replay, long long *retry_after_s)
{
    const redisReply *tag = r->type == REDIS_REPLY_ARRAY && r->elements > 0
                                ? r->element[0]
                                : NULL;

    if (tag == NULL || tag->type != REDIS_REPLY_STRING) {
        snprintf(s->err, STORE_ERR_LEN, "unexpected reply to the turn script");
        return -1;
    }
    if (strcmp(tag->str, "go") == 0 && r->elements >= 2 &&
        r->element[1]->type == REDIS_REPLY_STRING) {
        t->redis_clock_ms = strtoll(r->element[1]->str, NULL, 10);
        t->local_clock_ms = clock_ms();
        store_fill_history(r, 2, h);
        return TURN_GO;
    }
    if (strcmp(tag->str, "busy") == 0)
        return TURN_BUSY;
    if (strcmp(tag->str, "running") == 0)
        return TURN_RUNNING;
    if (r->elements == 2 && strcmp(tag->str, "go") != 0 &&
        r->element[1]->type != REDIS_REPLY_STRING) {
        snprintf(s->err, STORE_ERR_LEN, "unexpected reply to the turn script");
        return -1;
    }
    if (strcmp(tag->str, "rate") == 0 && r->elements == 2) {
        *retry_after_s = strtoll(r->element[1]->str, NULL, 10);
        return TURN_RATE_LIMITED;
    }
    if (strcmp(tag->str, "replay") == 0 && r->elements == 2) {
        buf_reset(replay);
        if (buf_append(replay, r->element[1]->str, r->element[1]->len) == 0)
            return TURN_REPLAY;
    }
    snprintf(s->err, STORE_ERR_LEN, "unexpected reply to the turn script");
    return -1;
}

int
turn_begin(struct store *s, struct turn *t, struct history *h,
           struct buf *replay, long long *retry_after_s)
{
    long long now = (long long)time(NULL);
    struct turn_keys k;
    struct call c;
    redisReply *r;
    int rc;

    make_keys(t, &k, now / WINDOW_S);
    begin_call(&c, 5);
    arg_str(&c, k.history);
    arg_str(&c, k.lock);
    arg_str(&c, k.record);
    arg_str(&c, k.rpm);
    arg_str(&c, k.tpm);
    arg_str(&c, t->token);
    arg_int(&c, t->lock_ms);
    arg_int(&c, t->rpm);
    arg_int(&c, t->tpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    arg_str(&c, t->idempotency_key ? "1" : "0");
    r = run_script(s, &begin_script, &c, 0, "turn begin");
    if (r == NULL)
        return -1;
    rc = begin_outcome(s, t, r, h, replay, retry_after_s);
    freeReplyObject(r);
    return rc;
}

/* In Redis's clock: when this worker will have given up on the commit
 * (its command timeout), measured from the clock begin saw, so that the
 * two hosts' clocks need not agree. */
static long long
commit_deadline(const struct store *s, const struct turn *t)
{
    double timeout = (double)s->command_timeout.tv_sec * 1000.0 +
                     (double)s->command_timeout.tv_usec / 1000.0;

    return t->redis_clock_ms +
           (long long)(clock_ms() - t->local_clock_ms + timeout);
}

int
turn_commit(struct store *s, const struct turn *t,
            const struct turn_result *res)
{
    struct turn_keys k;
    struct call c;
    redisReply *r;
    int stored;

    make_keys(t, &k, (long long)time(NULL) / WINDOW_S);
    begin_call(&c, 4);
    arg_str(&c, k.history);
    arg_str(&c, k.lock);
    arg_str(&c, k.record);
    arg_str(&c, k.tpm);
    arg(&c, res->user_item, res->user_len);
    arg(&c, res->assistant_item, res->assistant_len);
    arg_int(&c, (long long)res->trim_start);
    arg_int(&c, res->ttl_s);
    arg_str(&c, t->token);
    arg_str(&c, t->idempotency_key ? "1" : "0");
    arg(&c, res->answer, res->answer_len);
    arg_int(&c, res->idempotency_ttl_s);
    arg_int(&c, t->tpm > 0 ? res->tokens : 0);
    arg_int(&c, commit_deadline(s, t));
    r = run_script(s, &commit_script, &c, 1, "turn commit");
    if (r == NULL)
        return -1;
    stored = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    if (!stored)
        snprintf(s->err, STORE_ERR_LEN, "Redis ran the store too late; "
                 "nothing was stored");
    return stored ? 0 : -1;
}

int
turn_abort(struct store *s, const struct turn *t)
{
    struct turn_keys k;
    struct call c;
    redisReply *r;

    make_keys(t, &k, 0);
    begin_call(&c, 2);
    arg_str(&c, k.lock);
    arg_str(&c, k.record);
    arg_str(&c, t->token);
    arg_str(&c, t->idempotency_key ? "1" : "0");
    r = run_script(s, &abort_script, &c, 0, "turn abort");
    if (r == NULL)
        return -1;
    freeReplyObject(r);
    return 0;
}

int
turn_rate_check(struct store *s, const struct turn *t, long long *retry_s)
{
    long long now = (long long)time(NULL);
    struct turn_keys k;
    struct call c;
    redisReply *r;
    int rc = TURN_GO;

    client_keys(t, &k, now / WINDOW_S);
    begin_call(&c, 2);
    arg_str(&c, k.rpm);
    arg_str(&c, k.tpm);
    arg_int(&c, t->rpm);
    arg_int(&c, t->tpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    r = run_script(s, &rate_script, &c, 0, "rate check");
    if (r == NULL)
        return -1;
    if (r->type == REDIS_REPLY_STRING) {
        *retry_s = strtoll(r->str, NULL, 10);
        rc = TURN_RATE_LIMITED;
    }
    freeReplyObject(r);
    return rc;
}

int
turn_count_tokens(struct store *s, const struct turn *t, long long tokens)
{
    struct turn_keys k;
    struct call c;
    redisReply *r;

    client_keys(t, &k, (long long)time(NULL) / WINDOW_S);
    begin_call(&c, 1);
    arg_str(&c, k.tpm);
    arg_int(&c, tokens);
    r = run_script(s, &tokens_script, &c, 0, "token count");
    if (r == NULL)
        return -1;
    freeReplyObject(r);
    return 0;
}
