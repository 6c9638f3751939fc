/* chatdb: the chat's Redis keys, scripts and stored forms. */
#include "chatdb.h"

#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "clock.h"
#include "conf.h"
#include "json.h"
#include "log.h"

#define KEY_MAX 320
#define WINDOW_S 60
#define COUNTER_TTL "120" /* a window's counters outlive it a little */
#define MAX_ARGS 24 /* EVALSHA sha nkeys, 5 keys, 11 args for commit */
#define ITEM_DEPTH 4

/* Lua for the scripts that count a client's requests: whether a counter
 * of this minute has reached its limit (0: none), and one more request. */
#define LIMITS_LUA                                                         \
    "local function over(key, limit)\n"                                    \
    "  return limit > 0 and\n"                                             \
    "         tonumber(redis.call('GET', key) or '0') >= limit\n"          \
    "end\n"                                                                \
    "local function count(key, limit)\n"                                   \
    "  if limit > 0 then\n"                                                \
    "    redis.call('INCR', key)\n"                                        \
    "    redis.call('EXPIRE', key, " COUNTER_TTL ")\n"                     \
    "  end\n"                                                              \
    "end\n"

/* Lua for the scripts that open a session: whether it belongs to another
 * owner than the caller ('': the caller is no owner, as without client
 * keys). A session without an owner, made without client keys, is
 * anyone's; the next turn with a key claims it. */
#define OWNER_LUA                                                          \
    "local function foreign(key, owner)\n"                                 \
    "  if owner == '' then return false end\n"                             \
    "  local o = redis.call('GET', key)\n"                                 \
    "  return o and o ~= owner\n"                                          \
    "end\n"

/* Lua for the scripts that look up an idempotency record: what it says
 * to a request of that hash (nil: there is none). */
#define RECORD_LUA                                                         \
    "local function recorded(key, hash)\n"                                 \
    "  local v = redis.call('GET', key)\n"                                 \
    "  if not v then return nil end\n"                                     \
    "  if string.sub(v, 1, #hash) ~= hash then return {'mismatch'} end\n"  \
    "  v = string.sub(v, #hash + 1)\n"                                     \
    "  if string.sub(v, 1, 8) == 'pending:' then return {'running'} end\n" \
    "  return {'replay', v}\n"                                             \
    "end\n"

/* KEYS: history, lock, idempotency record, rpm counter, tpm counter,
 *       owner.
 * ARGV: token, lock ms, rpm, tpm, retry-after, has idempotency key,
 *       owner ('': none), history ttl, request hash, deadline (0: none).
 * Past the deadline (Redis's clock) the caller has given up and answered
 * an error: a begin that a stalled Redis runs then must take no lock, or
 * the session would refuse every turn (409) for lock ms.
 * Another owner's session is not found, and counts in the rate limit as
 * any request does, so that probing ids costs the prober. The first turn
 * with an owner claims the session for as long as its history lives. An
 * idempotency record starts with the hash of its request: a key reused
 * for another request neither replays nor runs. Go comes with Redis's
 * clock (seconds, microseconds); the history is read by an LRANGE sent
 * right after the script, in the same round trip: through Lua, each of
 * its items would be copied into a table and back, a third of the
 * script's time. The lock, taken here, keeps other turns from changing
 * the history in between. */
static const char begin_lua[] = LIMITS_LUA OWNER_LUA RECORD_LUA
    "local t = redis.call('TIME')\n"
    "local deadline = tonumber(ARGV[10])\n"
    "if deadline > 0 and t[1] * 1000 + math.floor(t[2] / 1000) > deadline\n"
    "then\n"
    "  return {'late', t[1], t[2]}\n"
    "end\n"
    "local theirs = foreign(KEYS[6], ARGV[7])\n"
    "local hash = ARGV[9]\n"
    "if ARGV[6] == '1' and not theirs then\n"
    "  local seen = recorded(KEYS[3], hash)\n"
    "  if seen then return seen end\n"
    "end\n"
    "local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "if over(KEYS[5], tpm) or over(KEYS[4], rpm) then\n"
    "  return {'rate', ARGV[5]}\n"
    "end\n"
    "if theirs then\n"
    "  count(KEYS[4], rpm)\n"
    "  return {'notfound'}\n"
    "end\n"
    "if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then\n"
    "  return {'busy'}\n"
    "end\n"
    "if ARGV[6] == '1' then\n"
    "  redis.call('SET', KEYS[3], hash .. 'pending:' .. ARGV[1],\n"
    "             'PX', ARGV[2])\n"
    "end\n"
    "if ARGV[7] ~= '' then\n"
    "  redis.call('SET', KEYS[6], ARGV[7], 'NX', 'EX', ARGV[8])\n"
    "end\n"
    "count(KEYS[4], rpm)\n"
    "return {'go', t[1], t[2]}\n";

/* KEYS: history, lock, idempotency record, tpm counter, owner.
 * ARGV: user item, assistant item, trim start, ttl, token,
 *       has idempotency key, answer, idempotency ttl, tokens, deadline,
 *       request hash.
 * Past the deadline (Redis's clock) the caller has given up and answered
 * an error, so nothing may be stored: a Redis that stalled and then ran a
 * queued commit would otherwise store a failed turn. Without the lock
 * (DELETE removed it, or it expired and another turn may hold it) the
 * history may have changed since begin, and the trim start with it. */
static const char commit_lua[] =
    "local t = redis.call('TIME')\n"
    "if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[10]) then\n"
    "  return 'late'\n"
    "end\n"
    "if redis.call('GET', KEYS[2]) ~= ARGV[5] then\n"
    "  return 'lost'\n"
    "end\n"
    "redis.call('RPUSH', KEYS[1], ARGV[1], ARGV[2])\n"
    "if tonumber(ARGV[3]) > 0 then\n"
    "  redis.call('LTRIM', KEYS[1], ARGV[3], -1)\n"
    "end\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[4])\n"
    "redis.call('EXPIRE', KEYS[5], ARGV[4])\n"
    "redis.call('DEL', KEYS[2])\n"
    "if ARGV[6] == '1' then\n"
    "  redis.call('SET', KEYS[3], ARGV[11] .. ARGV[7], 'EX', ARGV[8])\n"
    "end\n"
    "if tonumber(ARGV[9]) > 0 then\n"
    "  redis.call('INCRBY', KEYS[4], ARGV[9])\n"
    "  redis.call('EXPIRE', KEYS[4], " COUNTER_TTL ")\n"
    "end\n"
    "return 'stored'\n";

/* KEYS: lock, idempotency record.
 * ARGV: token, has idempotency key, request hash. */
static const char abort_lua[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
    "  redis.call('DEL', KEYS[1])\n"
    "end\n"
    "if ARGV[2] == '1' and\n"
    "   redis.call('GET', KEYS[2]) == ARGV[3] .. 'pending:' .. ARGV[1] then\n"
    "  redis.call('DEL', KEYS[2])\n"
    "end\n"
    "return 1\n";

/* Rate limits without a session (the /v1 face).
 * KEYS: rpm counter, tpm counter. ARGV: rpm, tpm, retry-after. */
static const char rate_lua[] = LIMITS_LUA
    "local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "if over(KEYS[2], tpm) or over(KEYS[1], rpm) then\n"
    "  return ARGV[3]\n"
    "end\n"
    "count(KEYS[1], rpm)\n"
    "return 0\n";

/* GET or DELETE of a session, counted in the client's rpm like a turn.
 * KEYS: history, lock, owner, rpm counter.
 * ARGV: owner ('': none), rpm, retry-after, 'load' or 'delete'.
 * DELETE removes the lock and the owner with the history: a turn in
 * flight then stores nothing, and the id is free again. */
static const char session_lua[] = LIMITS_LUA OWNER_LUA
    "local rpm = tonumber(ARGV[2])\n"
    "if over(KEYS[4], rpm) then return {'rate', ARGV[3]} end\n"
    "count(KEYS[4], rpm)\n"
    "if foreign(KEYS[3], ARGV[1]) then return {'notfound'} end\n"
    "if ARGV[4] == 'delete' then\n"
    "  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])\n"
    "  return {'go'}\n"
    "end\n"
    "local h = redis.call('LRANGE', KEYS[1], 0, -1)\n"
    "table.insert(h, 1, 'go')\n"
    "return h\n";

/* The client's part of a turn begin on Redis Cluster, where it lives in
 * another slot than the session: the idempotency record of a request
 * that named no session, then the rate limits.
 * KEYS: rpm counter, tpm counter, record (or the rpm counter: none).
 * ARGV: rpm, tpm, retry-after, has a record, request hash, token,
 *       lock ms. */
static const char client_begin_lua[] = LIMITS_LUA RECORD_LUA
    "if ARGV[4] == '1' then\n"
    "  local seen = recorded(KEYS[3], ARGV[5])\n"
    "  if seen then return seen end\n"
    "end\n"
    "local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "if over(KEYS[2], tpm) or over(KEYS[1], rpm) then\n"
    "  return {'rate', ARGV[3]}\n"
    "end\n"
    "count(KEYS[1], rpm)\n"
    "if ARGV[4] == '1' then\n"
    "  redis.call('SET', KEYS[3], ARGV[5] .. 'pending:' .. ARGV[6],\n"
    "             'PX', ARGV[7])\n"
    "end\n"
    "return {'go'}\n";

/* A request's tokens, and (on Redis Cluster, after the session's commit)
 * the answer of a request that named no session.
 * KEYS: tpm counter, record (or the tpm counter: none).
 * ARGV: tokens, has a record, request hash, answer, ttl. */
static const char client_commit_lua[] =
    "if tonumber(ARGV[1]) > 0 then\n"
    "  redis.call('INCRBY', KEYS[1], ARGV[1])\n"
    "  redis.call('EXPIRE', KEYS[1], " COUNTER_TTL ")\n"
    "end\n"
    "if ARGV[2] == '1' then\n"
    "  redis.call('SET', KEYS[2], ARGV[3] .. ARGV[4], 'EX', ARGV[5])\n"
    "end\n"
    "return 1\n";

enum script { BEGIN, COMMIT, ABORT, RATE, SESSION, CLIENT_BEGIN,
              CLIENT_COMMIT };

static const char *const scripts[CHATDB_SCRIPTS] = {
    [BEGIN] = begin_lua,
    [COMMIT] = commit_lua,
    [ABORT] = abort_lua,
    [RATE] = rate_lua,
    [SESSION] = session_lua,
    [CLIENT_BEGIN] = client_begin_lua,
    [CLIENT_COMMIT] = client_commit_lua,
};

/* n bytes as 2n hex digits and a NUL. */
static void
to_hex(const unsigned char *md, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";

    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 0xf];
    }
    out[2 * n] = '\0';
}

/* SHA-1 in hex, worked out once per process: the digest goes through
 * OpenSSL's provider lookup, too slow for every call. */
static void
script_sha(const char *lua, char out[41])
{
    unsigned char md[SHA_DIGEST_LENGTH];

    SHA1((const unsigned char *)lua, strlen(lua), md);
    to_hex(md, SHA_DIGEST_LENGTH, out);
}

int
chatdb_init(struct chatdb *db, const struct conf *c)
{
    db->conf = c;
    for (int i = 0; i < CHATDB_SCRIPTS; i++)
        script_sha(scripts[i], db->sha[i]);
    return store_init(&db->store, c);
}

void
chatdb_cleanup(struct chatdb *db)
{
    store_cleanup(&db->store);
}

const char *
chatdb_error(const struct chatdb *db)
{
    return db->store.err;
}

/* Redis's clock in ms, from the two strings TIME gives. */
static long long
redis_ms(const redisReply *secs, const redisReply *usecs)
{
    return strtoll(secs->str, NULL, 10) * 1000 +
           strtoll(usecs->str, NULL, 10) / 1000;
}

/* Redis's clock was at_ms when it ran a command whose reply is here now. */
static void
clock_seen(struct chatdb *db, long long at_ms)
{
    db->clock_redis_ms = at_ms;
    db->clock_seen_ms = clock_ms();
    db->clock_connection = db->store.connections;
}

/* Redis's clock now, from at_ms it gave in a reply we read at seen_ms
 * (monotonic): behind by that reply's way back. */
static long long
redis_now_ms(long long at_ms, double seen_ms)
{
    return at_ms + (long long)(clock_ms() - seen_ms);
}

/* Whether r is {secs, usecs} from index `from` on, as TIME gives them. */
static int
has_clock(const redisReply *r, size_t from)
{
    return r->type == REDIS_REPLY_ARRAY && r->elements == from + 2 &&
           r->element[from]->type == REDIS_REPLY_STRING &&
           r->element[from + 1]->type == REDIS_REPLY_STRING;
}

int
chatdb_ping(struct chatdb *db)
{
    const char *time_argv[] = {"TIME"};
    redisReply *r = store_command_argv(&db->store, 1, time_argv, NULL,
                                       "TIME");

    if (r == NULL)
        return -1;
    if (has_clock(r, 0))
        clock_seen(db, redis_ms(r->element[0], r->element[1]));
    freeReplyObject(r);
    return 0;
}

/* ---- the keys */

/* The keys of a session and of a client, as C strings. */
struct turn_keys {
    char history[KEY_MAX];
    char lock[KEY_MAX];
    char owner[KEY_MAX];
    char record[KEY_MAX];
    char rpm[KEY_MAX];
    char tpm[KEY_MAX];
};

/* The concatenation of parts (NULL-terminated) into out. Session ids and
 * client names are bounded far below KEY_MAX by their parsers; a longer
 * key would be cut. Every turn builds a handful: no snprintf here. */
static void
key_join(char out[KEY_MAX], const char *const *parts)
{
    size_t n = 0;

    for (; *parts != NULL; parts++) {
        size_t len = strnlen(*parts, KEY_MAX - 1 - n);

        memcpy(out + n, *parts, len);
        n += len;
    }
    out[n] = '\0';
}

/* The client's rate-limit counters of the current minute. */
static void
client_keys(const struct chatdb_turn *t, struct turn_keys *k, long long window)
{
    snprintf(k->rpm, sizeof(k->rpm), "rl:{%s}:rpm:%lld", t->client, window);
    snprintf(k->tpm, sizeof(k->tpm), "rl:{%s}:tpm:%lld", t->client, window);
}

/* The idempotency record: the session's, or without an idempotency key a
 * session key no script uses; the client's for a request that named no
 * session (then the session may be NULL). */
static void
record_key(const struct chatdb_turn *t, char out[KEY_MAX])
{
    const char *sid = t->session_id, *key = t->idempotency_key;

    if (key == NULL)
        key_join(out, (const char *[]){"chat:{", sid, "}:idem", NULL});
    else if (t->idempotency_by_client)
        key_join(out, (const char *[]){"idem:{", t->client, "}:", key, NULL});
    else
        key_join(out, (const char *[]){"chat:{", sid, "}:idem:", key, NULL});
}

/* A session's keys share the hash tag {id}, a Redis Cluster slot. */
static void
turn_keys(const struct chatdb_turn *t, struct turn_keys *k, long long window)
{
    const char *sid = t->session_id;

    key_join(k->history, (const char *[]){"chat:{", sid, "}:history", NULL});
    key_join(k->lock, (const char *[]){"chat:{", sid, "}:lock", NULL});
    key_join(k->owner, (const char *[]){"chat:{", sid, "}:owner", NULL});
    record_key(t, k->record);
    if (t->rpm > 0 || t->tpm > 0)
        client_keys(t, k, window);
    /* A counter that is off is never touched: the lock stands in for it,
     * so that every key of a session's script may share its slot. */
    if (t->rpm == 0)
        memcpy(k->rpm, k->lock, sizeof(k->rpm));
    if (t->tpm == 0)
        memcpy(k->tpm, k->lock, sizeof(k->tpm));
}

/* On Redis Cluster one script runs in one slot, so the client's keys
 * ({client}: rate counters, the record of a request that named no
 * session) cannot go with the session's ({session_id}): they go in
 * scripts of their own, one more round trip, made only when they are in
 * use. The session's script then sees the turn without them. */
static int
client_apart(const struct chatdb *db)
{
    return store_cluster(&db->store);
}

static int
client_record(const struct chatdb_turn *t)
{
    return t->idempotency_key != NULL && t->idempotency_by_client;
}

static struct chatdb_turn
session_part(const struct chatdb_turn *t)
{
    struct chatdb_turn st = *t;

    st.rpm = st.tpm = 0;
    if (client_record(t))
        st.idempotency_key = NULL;
    return st;
}

/* ---- the stored form of a history */

int
chatdb_gen_item(yajl_gen g, enum message_role role, const char *content,
                size_t len, const char *exchange, size_t exchange_len)
{
    json_gen_restart(g);
    return yajl_gen_map_open(g) ||
           json_gen_key_cstr(g, "role", messages_role_name(role)) ||
           json_gen_key_str(g, "content", content, len) ||
           (exchange_len > 0 &&
            json_gen_key_str(g, "tools", exchange, exchange_len)) ||
           yajl_gen_map_close(g);
}

/* Readers of an item as written: each takes its part at s[*i] and moves
 * *i past it, or returns 0. */
static int
literal_at(const char *s, size_t n, size_t *i, const char *lit)
{
    size_t k = strlen(lit);

    if (n - *i < k || memcmp(s + *i, lit, k) != 0)
        return 0;
    *i += k;
    return 1;
}

static int
role_at(const char *s, size_t n, size_t *i, enum message_role *role)
{
    if (literal_at(s, n, i, "user\""))
        *role = MESSAGE_USER;
    else if (literal_at(s, n, i, "assistant\""))
        *role = MESSAGE_ASSISTANT;
    else
        return 0;
    return 1;
}

static int
string_at(const char *s, size_t n, size_t *i, struct buf *out)
{
    size_t k = json_string_decode(s + *i, n - *i, out);

    *i += k;
    return k > 0;
}

/* An item in the very form chatdb_gen_item writes, read without a parser:
 * every turn reads the whole history, and yajl's callbacks cost ten times
 * this. The form is fixed: {"role":R,"content":C} or with ,"tools":T
 * before the brace. Decoding checks the strings as json_pick would. Into
 * text: the content, then the tool exchange. Returns 1 with the parts set,
 * 0 when the item has another form. */
static int
read_item_as_written(const char *s, size_t n, enum message_role *role,
                     struct buf *text, size_t *content_len)
{
    size_t i = 0;

    if (!literal_at(s, n, &i, "{\"role\":\"") || !role_at(s, n, &i, role) ||
        !literal_at(s, n, &i, ",\"content\":\"") ||
        !string_at(s, n, &i, text))
        return 0;
    *content_len = text->len;
    if (literal_at(s, n, &i, ",\"tools\":\"") && !string_at(s, n, &i, text))
        return 0;
    return i + 1 == n && s[i] == '}';
}

/* The same item through json_pick: any key order, spacing or extra key. */
static int
read_item_parsed(const char *json, size_t len, enum message_role *role,
                 struct buf *text, size_t *content_len)
{
    struct json_field f[] = {
        {.path = "role", .accept = JSON_STRING},
        {.path = "content", .accept = JSON_STRING},
        {.path = "tools", .accept = JSON_STRING},
    };
    char err[JSON_ERR_LEN];
    struct buf arena;
    const char *name;
    int ok = 0;

    buf_init(&arena, len + 2);
    if (json_pick(json, len, f, 3, &arena, ITEM_DEPTH, 0, err) == -1 ||
        f[0].type == 0 || f[1].type == 0)
        goto out;
    name = json_field_text(&f[0], &arena);
    if (f[0].len == 4 && memcmp(name, "user", 4) == 0)
        *role = MESSAGE_USER;
    else if (f[0].len == 9 && memcmp(name, "assistant", 9) == 0)
        *role = MESSAGE_ASSISTANT;
    else
        goto out;
    *content_len = f[1].len;
    ok = buf_append(text, json_field_text(&f[1], &arena), f[1].len) == 0 &&
         (f[2].type == 0 ||
          buf_append(text, json_field_text(&f[2], &arena), f[2].len) == 0);
out:
    buf_cleanup(&arena);
    return ok;
}

/* chatdb_add_item with text, a scratch buffer of the caller's, so that a
 * history's items share one. */
static int
add_item(struct messages *h, const char *json, size_t len, struct buf *text)
{
    enum message_role role;
    const char *parts;
    size_t content_len;
    int as_written;

    buf_reset(text);
    as_written = read_item_as_written(json, len, &role, text, &content_len);
    if (!as_written) {
        buf_reset(text);
        if (!read_item_parsed(json, len, &role, text, &content_len))
            return -1;
    }
    if ((parts = buf_cstr(text)) == NULL ||
        messages_add_extra(h, role, parts, content_len, MESSAGE_EXCHANGE,
                           parts + content_len,
                           text->len - content_len) == -1)
        return -1;
    /* Without a tool exchange the item is the message in OpenAI's shape
     * already: the request to the model takes it as it is. */
    if (as_written && text->len == content_len)
        messages_attach_json(h, json, len);
    return 0;
}

int
chatdb_add_item(struct messages *h, const char *json, size_t len)
{
    struct buf text;
    int rc;

    buf_init(&text, len);
    rc = add_item(h, json, len, &text);
    buf_cleanup(&text);
    return rc;
}

/* Replace h with the stored items r->element[from..], skipping what
 * cannot be read and the oldest pairs that do not fit h's cap. Returns
 * how many were skipped. */
static size_t
fill_history(const redisReply *r, size_t from, struct messages *h)
{
    size_t i = r->elements, skipped;
    struct buf text;

    messages_reset(h);
    /* No item's parts outgrow the history's own cap. */
    buf_init(&text, h->text.max);
    /* Newest first, for as long as items are readable and fit the cap: a
     * lowered limit must not make an old session unreadable. */
    for (; i > from; i--) {
        const redisReply *item = r->element[i - 1];

        if (item->type != REDIS_REPLY_STRING ||
            add_item(h, item->str, item->len, &text) == -1)
            break;
    }
    buf_cleanup(&text);
    /* Whole pairs only: a reply whose question did not make it goes too. */
    if (h->count % 2 == 1 && i > from) {
        messages_drop_last(h);
        i++;
    }
    skipped = i - from;
    if (skipped > 0)
        log_warnx("chatdb", "%zu older history items are over the cap or "
                  "unreadable; the next turn trims them", skipped);
    messages_reverse(h);
    return skipped;
}

size_t
chatdb_trim_start(const struct messages *h, size_t max_messages,
                  size_t max_bytes)
{
    size_t bytes = 0, drop = 0;

    for (size_t i = 0; i < h->count; i++)
        bytes += h->msgs[i].len + h->msgs[i].extra_len;
    while (h->count - drop > 2 &&
           (h->count - drop > max_messages || bytes > max_bytes)) {
        bytes -= h->msgs[drop].len + h->msgs[drop].extra_len +
                 h->msgs[drop + 1].len + h->msgs[drop + 1].extra_len;
        drop += 2;
    }
    return drop;
}

/* ---- commands and scripts */

/* Arguments of one command, built up one by one. */
struct args {
    const char *argv[MAX_ARGS];
    size_t lens[MAX_ARGS];
    char numbers[MAX_ARGS][24];
    int argc;
};

static void
arg(struct args *c, const char *s, size_t n)
{
    c->argv[c->argc] = s;
    c->lens[c->argc++] = n;
}

static void
arg_str(struct args *c, const char *s)
{
    arg(c, s, strlen(s));
}

/* v in decimal, as "%lld" prints it, without printf's cost: a turn passes
 * about a dozen numbers. */
static void
arg_int(struct args *c, long long v)
{
    char *end = c->numbers[c->argc] + sizeof(c->numbers[0]), *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v
                                  : (unsigned long long)v;

    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u > 0);
    if (v < 0)
        *--p = '-';
    arg(c, p, (size_t)(end - p));
}

/* A script call with nkeys keys: argv[0..1] are left for the script. */
static void
script_args(struct args *c, int nkeys)
{
    c->argc = 2;
    arg_int(c, nkeys);
}

/* How a script is sent: plain, (acked) as a write that waits for [redis]
 * wait_replicas, or with a read that follows it in the same round trip. */
struct sending {
    int acked;
    const struct store_read *then;
    redisReply **then_reply;
    double patience_ms; /* an acked write's, beyond command_timeout_ms */
    const struct store_read *if_lost; /* with then: store_command_then */
};

static redisReply *
send_args(struct store *s, struct args *c, const struct sending *how,
          const char *what)
{
    if (how->then != NULL)
        return store_command_then(s, c->argc, c->argv, c->lens, what,
                                  how->then, how->then_reply, how->if_lost);
    if (how->acked)
        return store_write_argv(s, c->argc, c->argv, c->lens, what,
                                how->patience_ms);
    return store_command_argv(s, c->argc, c->argv, c->lens, what);
}

/* argv[0..1] of a script sent with its body, which any Redis runs. */
static void
as_eval(struct args *c, enum script sc)
{
    c->argv[0] = "EVAL";
    c->lens[0] = 4;
    c->argv[1] = scripts[sc];
    c->lens[1] = strlen(scripts[sc]);
}

/* EVALSHA, or EVAL when Redis does not have the script yet (a restart, a
 * flush, a replica just promoted): one round trip in the usual case. */
static redisReply *
run_script_as(struct chatdb *db, enum script sc, struct args *c,
              const struct sending *how, const char *what)
{
    redisReply *r;

    c->argv[0] = "EVALSHA";
    c->lens[0] = 7;
    c->argv[1] = db->sha[sc];
    c->lens[1] = 40;
    r = send_args(&db->store, c, how, what);
    if (r != NULL || strstr(db->store.err, "NOSCRIPT") == NULL)
        return r;
    as_eval(c, sc);
    return send_args(&db->store, c, how, what);
}

/* A script sent plainly. */
static redisReply *
run_script(struct chatdb *db, enum script sc, struct args *c,
           const char *what)
{
    struct sending how = {0};

    return run_script_as(db, sc, c, &how, what);
}

/* ---- the replies of the scripts */

static int
unexpected(struct chatdb *db)
{
    snprintf(db->store.err, STORE_ERR_LEN,
             "unexpected reply from a chat script");
    return -1;
}

/* The tag of a script's {tag, ...} reply, or NULL. */
static const char *
reply_tag(const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0 ||
        r->element[0]->type != REDIS_REPLY_STRING)
        return NULL;
    return r->element[0]->str;
}

/* The value of a {tag, value} reply, or NULL. */
static const redisReply *
reply_value(const redisReply *r)
{
    if (r->elements != 2 || r->element[1]->type != REDIS_REPLY_STRING)
        return NULL;
    return r->element[1];
}

/* Why a script refused to go on: an enum chatdb_begin, or -1. */
static int
refusal(struct chatdb *db, const redisReply *r, long long *retry_after_s)
{
    const char *tag = reply_tag(r);

    if (tag == NULL)
        return unexpected(db);
    if (strcmp(tag, "busy") == 0)
        return CHATDB_BUSY;
    if (strcmp(tag, "running") == 0)
        return CHATDB_RUNNING;
    if (strcmp(tag, "notfound") == 0)
        return CHATDB_NOT_FOUND;
    if (strcmp(tag, "mismatch") == 0)
        return CHATDB_MISMATCH;
    if (strcmp(tag, "rate") == 0 && reply_value(r) != NULL) {
        *retry_after_s = strtoll(reply_value(r)->str, NULL, 10);
        return CHATDB_RATE_LIMITED;
    }
    return unexpected(db);
}

/* ---- a session alone (GET, DELETE) */

/* Load the session into h, or delete it when h is NULL. */
static int
run_session(struct chatdb *db, const struct chatdb_turn *t,
            struct messages *h, long long *retry_after_s)
{
    long long now = (long long)time(NULL);
    const char *tag;
    struct turn_keys k;
    struct args c;
    redisReply *r;
    int rc;

    turn_keys(t, &k, now / WINDOW_S);
    script_args(&c, 4);
    arg_str(&c, k.history);
    arg_str(&c, k.lock);
    arg_str(&c, k.owner);
    arg_str(&c, k.rpm);
    arg_str(&c, t->owner);
    arg_int(&c, t->rpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    arg_str(&c, h != NULL ? "load" : "delete");
    r = run_script(db, SESSION, &c, h != NULL ? "load" : "delete");
    if (r == NULL)
        return -1;
    tag = reply_tag(r);
    if (tag != NULL && strcmp(tag, "go") == 0) {
        if (h != NULL)
            fill_history(r, 1, h);
        rc = CHATDB_GO;
    } else {
        rc = refusal(db, r, retry_after_s);
    }
    freeReplyObject(r);
    return rc;
}

/* On Redis Cluster the client's rpm comes first, apart. */
static int
run_session_apart(struct chatdb *db, const struct chatdb_turn *t,
                  struct messages *h, long long *retry_after_s)
{
    struct chatdb_turn rate = *t, st = session_part(t);
    int rc;

    if (!client_apart(db))
        return run_session(db, t, h, retry_after_s);
    rate.tpm = 0;
    rc = t->rpm > 0 ? chatdb_rate_check(db, &rate, retry_after_s)
                    : CHATDB_GO;
    return rc == CHATDB_GO ? run_session(db, &st, h, retry_after_s) : rc;
}

int
chatdb_history_load(struct chatdb *db, const struct chatdb_turn *t,
                    struct messages *h, long long *retry_after_s)
{
    messages_reset(h);
    return run_session_apart(db, t, h, retry_after_s);
}

int
chatdb_history_delete(struct chatdb *db, const struct chatdb_turn *t,
                      long long *retry_after_s)
{
    return run_session_apart(db, t, NULL, retry_after_s);
}

/* ---- one turn */

/* A begin script's answer other than go: a replay, or a refusal. */
static int
stop_outcome(struct chatdb *db, const redisReply *r, struct buf *replay,
             long long *retry_after_s)
{
    const char *tag = reply_tag(r);
    const redisReply *v = tag != NULL ? reply_value(r) : NULL;

    if (tag != NULL && strcmp(tag, "replay") == 0 && v != NULL) {
        buf_reset(replay);
        return buf_append(replay, v->str, v->len) == 0 ? CHATDB_REPLAY
                                                        : unexpected(db);
    }
    return refusal(db, r, retry_after_s);
}

static int
begin_outcome(struct chatdb *db, struct chatdb_turn *t, const redisReply *r,
              const redisReply *history, struct messages *h,
              struct buf *replay, long long *retry_after_s)
{
    const char *tag = reply_tag(r);
    int go = tag != NULL && strcmp(tag, "go") == 0;
    int late = tag != NULL && strcmp(tag, "late") == 0;
    int clocked = (go || late) && has_clock(r, 1);

    if (clocked)
        clock_seen(db, redis_ms(r->element[1], r->element[2]));
    if (go && clocked && history->type == REDIS_REPLY_ARRAY) {
        t->redis_clock_ms = db->clock_redis_ms;
        t->local_clock_ms = db->clock_seen_ms;
        t->skipped = fill_history(history, 0, h);
        return CHATDB_GO;
    }
    if (late) {
        snprintf(db->store.err, STORE_ERR_LEN, "Redis ran the turn's begin "
                 "too late (its round trip took %.0f ms); it left the "
                 "session as it was", clock_ms() - t->begin_sent_ms);
        return -1;
    }
    return stop_outcome(db, r, replay, retry_after_s);
}

/* What an idempotency record is bound to, as t->request_hash: SHA-256 of
 * the client, the session it named ("" for none) and its message, each
 * but the last ended by a NUL that none of them holds. Not the body as
 * sent: a retry may differ in "stream" and in fields the API ignores. */
static int
hash_request(struct chatdb *db, struct chatdb_turn *t)
{
    const char *sid = t->idempotency_by_client ? "" : t->session_id;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL &&
             EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
             EVP_DigestUpdate(ctx, t->client, strlen(t->client) + 1) == 1 &&
             EVP_DigestUpdate(ctx, sid, strlen(sid) + 1) == 1 &&
             EVP_DigestUpdate(ctx, t->message, t->message_len) == 1 &&
             EVP_DigestFinal_ex(ctx, md, &n) == 1 &&
             2 * n == CHATDB_HASH_HEX;

    EVP_MD_CTX_free(ctx);
    if (!ok) {
        snprintf(db->store.err, STORE_ERR_LEN, "cannot hash the request");
        return -1;
    }
    to_hex(md, n, t->request_hash);
    return 0;
}

/* Whether Redis's clock came from this connection: a new one may be
 * another server. */
static int
clock_current(const struct chatdb *db)
{
    return db->clock_connection != 0 &&
           db->clock_connection == db->store.connections;
}

/* The begin's deadline in Redis's clock: the worker gives up on it
 * command_timeout_ms from now, and a begin Redis runs after that takes a
 * lock nobody releases, so the session refuses its next turns (409) for
 * lock_ms. Now in Redis's clock is reckoned from the last reply that gave
 * it, counted from when that reply came in: the estimate runs behind by
 * the reply's way back, never ahead (counted from when the command went
 * out, it ran ahead by the command's whole wait in a stalled Redis, and
 * let such begins through). The last fifth of the timeout is left for
 * the reply to come back: a begin Redis runs in it is refused, and the
 * turn is a 503 with nothing held. A new connection (after a timeout,
 * when a stalled Redis matters most) asks for the clock first. 0 (none)
 * on a cluster, whose masters' clocks may differ. Returns 0, or -1 with
 * the error when Redis did not answer that TIME. */
static int
begin_deadline(struct chatdb *db, long long *deadline)
{
    long long timeout_ms = store_command_timeout_ms(&db->store);

    *deadline = 0;
    if (store_cluster(&db->store))
        return 0;
    if (!clock_current(db) && chatdb_ping(db) == -1)
        return -1;
    if (clock_current(db))
        *deadline = redis_now_ms(db->clock_redis_ms, db->clock_seen_ms) +
                    timeout_ms - timeout_ms / 5;
    return 0;
}

/* The abort script's arguments: release a turn's lock (the record's key
 * when lock is NULL: one no token matches) and its pending record. */
static void
abort_args(struct args *c, const char *lock, const char *record,
           const struct chatdb_turn *t)
{
    script_args(c, 2);
    arg_str(c, lock != NULL ? lock : record);
    arg_str(c, record);
    arg_str(c, t->token);
    arg_str(c, t->idempotency_key ? "1" : "0");
    arg_str(c, t->request_hash);
}

/* Release a turn's lock and its pending record after a failure. */
static int
abort_keys(struct chatdb *db, const char *lock, const char *record,
           const struct chatdb_turn *t)
{
    struct args c;
    redisReply *r;

    abort_args(&c, lock, record, t);
    r = run_script(db, ABORT, &c, "turn abort");
    freeReplyObject(r);
    return r != NULL ? 0 : -1;
}

/* After a begin whose reply never came (a timeout, a connection lost):
 * Redis may have run it, in time, with its reply late, and taken the lock,
 * which would refuse the session's next turns (409) for lock_ms. The abort
 * sent after the begin on its own connection (begin_session) releases it
 * even when Redis is too slow to answer anything; when that could not go
 * out (the connection is gone: may_have_run), release it on a new
 * connection before the caller answers. The error stays the begin's. */
static void
release_unanswered(struct chatdb *db, const struct turn_keys *k,
                   const struct chatdb_turn *st)
{
    char why[STORE_ERR_LEN];

    memcpy(why, db->store.err, sizeof(why));
    if (abort_keys(db, k->lock, k->record, st) == -1)
        log_warnx("chatdb", "cannot release the turn lock (%s); it expires "
                  "in %lld s", db->store.err, st->lock_ms / 1000);
    memcpy(db->store.err, why, sizeof(why));
}

/* The session's part of a turn begin, as st shows it; the outcome goes
 * into t. */
static int
begin_session(struct chatdb *db, struct chatdb_turn *t,
              const struct chatdb_turn *st, struct messages *h,
              struct buf *replay, long long *retry_after_s)
{
    long long now = (long long)time(NULL);
    struct turn_keys k;
    const char *lrange[] = {"LRANGE", k.history, "0", "-1"};
    const struct store_read read_history = {4, lrange, NULL};
    redisReply *r, *history = NULL;
    struct args c, abort_call;
    struct store_read release;
    struct sending how = {.then = &read_history, .then_reply = &history,
                          .if_lost = &release};
    long long deadline;
    int rc;

    if (begin_deadline(db, &deadline) == -1)
        return -1;
    turn_keys(st, &k, now / WINDOW_S);
    abort_args(&abort_call, k.lock, k.record, st);
    as_eval(&abort_call, ABORT); /* no second try on NOSCRIPT */
    release = (struct store_read){abort_call.argc, abort_call.argv,
                                  abort_call.lens};
    script_args(&c, 6);
    arg_str(&c, k.history);
    arg_str(&c, k.lock);
    arg_str(&c, k.record);
    arg_str(&c, k.rpm);
    arg_str(&c, k.tpm);
    arg_str(&c, k.owner);
    arg_str(&c, st->token);
    arg_int(&c, st->lock_ms);
    arg_int(&c, st->rpm);
    arg_int(&c, st->tpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    arg_str(&c, st->idempotency_key ? "1" : "0");
    arg_str(&c, st->owner);
    arg_int(&c, db->conf->chat.history_ttl_seconds);
    arg_str(&c, st->request_hash);
    arg_int(&c, deadline);
    t->begin_sent_ms = clock_ms();
    r = run_script_as(db, BEGIN, &c, &how, "turn begin");
    if (r == NULL && db->store.may_have_run)
        release_unanswered(db, &k, st);
    if (r == NULL)
        return -1;
    rc = begin_outcome(db, t, r, history, h, replay, retry_after_s);
    freeReplyObject(r);
    freeReplyObject(history);
    return rc;
}

/* The client's part of a turn begin on Redis Cluster: CHATDB_GO at once
 * when it has none. */
static int
begin_client(struct chatdb *db, const struct chatdb_turn *t,
             struct buf *replay, long long *retry_after_s)
{
    long long now = (long long)time(NULL);
    struct turn_keys k;
    struct args c;
    redisReply *r;
    int rc;

    if (t->rpm == 0 && t->tpm == 0 && !client_record(t))
        return CHATDB_GO;
    client_keys(t, &k, now / WINDOW_S);
    record_key(t, k.record);
    script_args(&c, 3);
    arg_str(&c, k.rpm);
    arg_str(&c, k.tpm);
    arg_str(&c, client_record(t) ? k.record : k.rpm);
    arg_int(&c, t->rpm);
    arg_int(&c, t->tpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    arg_str(&c, client_record(t) ? "1" : "0");
    arg_str(&c, t->request_hash);
    arg_str(&c, t->token);
    arg_int(&c, t->lock_ms);
    r = run_script(db, CLIENT_BEGIN, &c, "turn begin (client)");
    if (r == NULL)
        return -1;
    rc = reply_tag(r) != NULL && strcmp(reply_tag(r), "go") == 0
             ? CHATDB_GO
             : stop_outcome(db, r, replay, retry_after_s);
    freeReplyObject(r);
    return rc;
}

/* On Redis Cluster, the pending record of a request that named no
 * session, alone in its slot. */
static int
abort_client(struct chatdb *db, const struct chatdb_turn *t)
{
    char record[KEY_MAX];

    record_key(t, record);
    return abort_keys(db, NULL, record, t);
}

int
chatdb_turn_begin(struct chatdb *db, struct chatdb_turn *t,
                  struct messages *h, struct buf *replay,
                  long long *retry_after_s)
{
    struct chatdb_turn st;
    int rc;

    t->request_hash[0] = '\0';
    if (t->idempotency_key != NULL && hash_request(db, t) == -1)
        return -1;
    if (!client_apart(db))
        return begin_session(db, t, t, h, replay, retry_after_s);
    rc = begin_client(db, t, replay, retry_after_s);
    if (rc != CHATDB_GO)
        return rc;
    st = session_part(t);
    rc = begin_session(db, t, &st, h, replay, retry_after_s);
    /* A new session is seldom busy, but its record must not stay
     * pending for lock_ms if it is. */
    if (rc != CHATDB_GO && client_record(t))
        abort_client(db, t);
    return rc;
}

/* Below this round trip of begin, the commit waits no longer than
 * command_timeout_ms: widening a socket's timeout costs four system calls
 * a turn, and a few milliseconds of the deadline cost nothing. */
#define PATIENCE_MIN_MS 50.0

/* How much longer than command_timeout_ms the commit waits for its
 * reply: begin's round trip, when it was long (a worker short of CPU read
 * the reply seconds after Redis sent it), else nothing. */
static double
commit_patience(const struct chatdb_turn *t)
{
    double rtt = t->local_clock_ms - t->begin_sent_ms;

    return rtt >= PATIENCE_MIN_MS ? rtt : 0;
}

/* The commit's deadline in Redis's clock, from the clock begin saw, so
 * that the two hosts' clocks need not agree: command_timeout_ms from now,
 * counting from when begin's reply was read, or, when the commit waits
 * begin's round trip longer (commit_patience), from when begin went out,
 * as if Redis ran it at once. Redis ran it at some time in that round
 * trip, so either way whatever Redis stores by the deadline, it stores
 * before the worker gives up; counting from the read alone would take a
 * worker that was short of CPU then (seconds, thousands of streams on two
 * cores) as a Redis that ran the commit late. */
static long long
commit_deadline(const struct store *s, const struct chatdb_turn *t)
{
    return redis_now_ms(t->redis_clock_ms,
                        t->local_clock_ms - commit_patience(t)) +
           (long long)store_command_timeout_ms(s);
}

/* Late says the commit ran past its deadline; the two waits that count
 * against it tell a slow Redis from a worker that read begin's reply
 * late (a host short of CPU). sent: when the commit went out. */
static int
commit_outcome(struct chatdb *db, const struct chatdb_turn *t,
               const redisReply *r, double sent)
{
    if (r->type == REDIS_REPLY_STRING && strcmp(r->str, "stored") == 0)
        return 0;
    if (r->type == REDIS_REPLY_STRING && strcmp(r->str, "lost") == 0)
        return CHATDB_LOST;
    if (r->type == REDIS_REPLY_STRING && strcmp(r->str, "late") == 0)
        snprintf(db->store.err, STORE_ERR_LEN, "Redis ran the store too "
                 "late; nothing was stored (begin's round trip took %.0f "
                 "ms, the store's %.0f ms)",
                 t->local_clock_ms - t->begin_sent_ms, clock_ms() - sent);
    else
        unexpected(db);
    return -1;
}

static int
commit_session(struct chatdb *db, const struct chatdb_turn *t,
               const struct chatdb_result *res)
{
    const struct conf *cf = db->conf;
    struct turn_keys k;
    struct args c;
    struct sending how = {.acked = 1};
    redisReply *r;
    double sent;
    int rc;

    turn_keys(t, &k, (long long)time(NULL) / WINDOW_S);
    script_args(&c, 5);
    arg_str(&c, k.history);
    arg_str(&c, k.lock);
    arg_str(&c, k.record);
    arg_str(&c, k.tpm);
    arg_str(&c, k.owner);
    arg(&c, res->user_item, res->user_len);
    arg(&c, res->assistant_item, res->assistant_len);
    arg_int(&c, (long long)(t->skipped +
                            chatdb_trim_start(res->history,
                                (size_t)cf->chat.history_max_messages,
                                (size_t)cf->chat.history_max_bytes)));
    arg_int(&c, cf->chat.history_ttl_seconds);
    arg_str(&c, t->token);
    arg_str(&c, t->idempotency_key ? "1" : "0");
    /* Only a record keeps the answer: without one, it need not travel. */
    if (t->idempotency_key != NULL)
        arg(&c, res->answer, res->answer_len);
    else
        arg_str(&c, "");
    arg_int(&c, cf->idempotency_ttl_s);
    arg_int(&c, t->tpm > 0 ? res->tokens : 0);
    arg_int(&c, commit_deadline(&db->store, t));
    arg_str(&c, t->request_hash);
    sent = clock_ms();
    how.patience_ms = commit_patience(t);
    r = run_script_as(db, COMMIT, &c, &how, "turn commit");
    if (r == NULL)
        return -1;
    rc = commit_outcome(db, t, r, sent);
    freeReplyObject(r);
    return rc;
}

/* Tokens into the client's tpm counter and, with an answer, the record
 * of a request that named no session. */
static int
commit_client(struct chatdb *db, const struct chatdb_turn *t,
              long long tokens, const char *answer, size_t answer_len)
{
    struct turn_keys k;
    struct args c;
    redisReply *r;

    client_keys(t, &k, (long long)time(NULL) / WINDOW_S);
    if (answer != NULL)
        record_key(t, k.record);
    script_args(&c, 2);
    arg_str(&c, k.tpm);
    arg_str(&c, answer != NULL ? k.record : k.tpm);
    arg_int(&c, tokens);
    arg_str(&c, answer != NULL ? "1" : "0");
    arg_str(&c, t->request_hash);
    arg(&c, answer != NULL ? answer : "", answer != NULL ? answer_len : 0);
    arg_int(&c, db->conf->idempotency_ttl_s);
    r = run_script(db, CLIENT_COMMIT, &c, "token count");
    freeReplyObject(r);
    return r != NULL ? 0 : -1;
}

int
chatdb_turn_commit(struct chatdb *db, const struct chatdb_turn *t,
                   const struct chatdb_result *res)
{
    struct chatdb_turn st;
    int rc;

    if (!client_apart(db))
        return commit_session(db, t, res);
    st = session_part(t);
    rc = commit_session(db, &st, res);
    if (rc != 0 || (t->tpm == 0 && !client_record(t)))
        return rc;
    /* The turn is stored: a failure here costs a count or a replay (a
     * retry then runs again, in a session of its own), not the turn. */
    if (commit_client(db, t, t->tpm > 0 ? res->tokens : 0,
                      client_record(t) ? res->answer : NULL,
                      res->answer_len) == -1)
        log_warnx("chatdb", "turn stored, but not its client's part: %s",
                  db->store.err);
    return 0;
}

int
chatdb_turn_abort(struct chatdb *db, const struct chatdb_turn *t)
{
    struct chatdb_turn st = client_apart(db) ? session_part(t) : *t;
    struct turn_keys k;
    int rc;

    turn_keys(&st, &k, 0);
    rc = abort_keys(db, k.lock, k.record, &st);
    if (client_apart(db) && client_record(t) && abort_client(db, t) == -1)
        rc = -1;
    return rc;
}

/* ---- a client's rate counters alone (the /v1 face) */

int
chatdb_rate_check(struct chatdb *db, const struct chatdb_turn *t,
                  long long *retry_s)
{
    long long now = (long long)time(NULL);
    struct turn_keys k;
    struct args c;
    redisReply *r;
    int rc = CHATDB_GO;

    client_keys(t, &k, now / WINDOW_S);
    script_args(&c, 2);
    arg_str(&c, k.rpm);
    arg_str(&c, k.tpm);
    arg_int(&c, t->rpm);
    arg_int(&c, t->tpm);
    arg_int(&c, WINDOW_S - now % WINDOW_S);
    r = run_script(db, RATE, &c, "rate check");
    if (r == NULL)
        return -1;
    if (r->type == REDIS_REPLY_STRING) {
        *retry_s = strtoll(r->str, NULL, 10);
        rc = CHATDB_RATE_LIMITED;
    }
    freeReplyObject(r);
    return rc;
}

int
chatdb_count_tokens(struct chatdb *db, const struct chatdb_turn *t,
                    long long tokens)
{
    return commit_client(db, t, tokens, NULL, 0);
}
