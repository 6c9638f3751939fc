/* chat: a chat turn and a /v1 completion, from request to answer. */
#include "chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "answer.h"
#include "buf.h"
#include "chatdb.h"
#include "clock.h"
#include "conf.h"
#include "fcgi.h"
#include "guard.h"
#include "http.h"
#include "json.h"
#include "llm.h"
#include "log.h"
#include "messages.h"
#include "scoreboard.h"
#include "tools.h"
#include "v1.h"

#define REQUEST_DEPTH 16
#define SESSION_ID_BYTES 16
#define ITEM_OVERHEAD 64
#define JSON_ESCAPE_GROWTH 6 /* a byte may become \u00XX */
#define ANSWER_OVERHEAD 1024 /* an answer's session id, model and usage */
/* A turn's tool exchange (calls and results of every round): in memory
 * beside the history, then stored with the answer. More is a 502. */
#define EXCHANGE_MAX (512 * 1024)

/* Every configured tool has its own counters, and one more is left for
 * the calls of tools that are not configured. */
_Static_assert(CONF_TOOLS_MAX < SCOREBOARD_TOOLS, "a tool without counters");

struct chat {
    const struct conf *conf;
    struct scoreboard *pool;
    struct scoreboard_slot *slot;
    struct chatdb db;
    struct llm llm;
    struct tools tools;
    /* The configured tools declared to the model ({"tools": [...]}), and
     * the same with tool_choice none for the call after the last round;
     * NULL without tools. */
    char *tool_options, *last_round_options;
    struct http_request *req; /* the request in hand */
    double redis_since_ms;    /* when its Redis round trip began */
    struct buf body;          /* the request body, capped at max_body_bytes */
    struct buf arena;         /* strings picked from the body */
    struct buf user_item;     /* the turn's messages as stored */
    struct buf assistant_item;
    struct buf exchange;      /* the turn's tool exchange, a JSON array */
    struct buf replay;        /* an answer stored for Idempotency-Key */
    struct buf options;       /* a /v1 request's options passed through */
    struct messages history;  /* the session's, or a /v1 request's */
    size_t turn_start;        /* history's count before the turn's own */
    struct answer answer;
};

/* ---- setup */

int
chat_check_conf(const struct conf *c, char err[CHAT_ERR_LEN])
{
    struct chatdb db;
    int rc = chatdb_init(&db, c);

    if (rc == -1)
        snprintf(err, CHAT_ERR_LEN, "redis: %s", chatdb_error(&db));
    chatdb_cleanup(&db);
    return rc;
}

static void
init_buffers(struct chat *ch, const struct conf *c)
{
    size_t max_msg = (size_t)c->chat.max_message_bytes;
    size_t max_reply = (size_t)c->upstream.max_response_bytes;
    size_t max_item = max_reply * JSON_ESCAPE_GROWTH + ITEM_OVERHEAD;
    size_t max_answer = max_item + ANSWER_OVERHEAD;
    size_t max_body = (size_t)c->chat.max_body_bytes;

    buf_init(&ch->body, max_body);
    /* The arena holds the strings picked from a body, or from a stored
     * answer replayed as a stream (load_answer), which may be larger. */
    buf_init(&ch->arena,
             (max_body > max_answer ? max_body : max_answer) + ITEM_OVERHEAD);
    buf_init(&ch->user_item, max_msg * JSON_ESCAPE_GROWTH + ITEM_OVERHEAD);
    buf_init(&ch->assistant_item,
             max_item + EXCHANGE_MAX * JSON_ESCAPE_GROWTH);
    buf_init(&ch->exchange, EXCHANGE_MAX);
    buf_init(&ch->replay, max_answer);
    /* Options are written back as they came, so they fit in about the
     * body's size; \u escapes and spaces only shrink. */
    buf_init(&ch->options, max_body + ITEM_OVERHEAD);
    messages_init(&ch->history, (size_t)c->chat.history_max_bytes +
                                    max_msg + max_reply + EXCHANGE_MAX +
                                    ITEM_OVERHEAD);
    answer_init(&ch->answer, max_reply);
}

static int
gen_tool(yajl_gen g, const struct conf_tool *t)
{
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "type", "function") ||
           json_gen_cstr(g, "function") || yajl_gen_map_open(g) ||
           json_gen_key_cstr(g, "name", t->name) ||
           json_gen_key_cstr(g, "description", t->description) ||
           json_gen_cstr(g, "parameters") ||
           json_gen_raw(g, t->parameters, strlen(t->parameters)) ||
           yajl_gen_map_close(g) || yajl_gen_map_close(g);
}

/* {"tools": [...][, "tool_choice": "none"]} as text, or NULL. The
 * parameters were checked to be a JSON object by conf, so they go in as
 * they are. */
static char *
tools_request(const struct conf *c, int last_round)
{
    yajl_gen g = json_gen_new();
    const unsigned char *json;
    size_t len;
    char *out = NULL;
    int rc = g == NULL || yajl_gen_map_open(g) ||
             json_gen_cstr(g, "tools") || yajl_gen_array_open(g);

    for (size_t i = 0; rc == 0 && i < c->ntools; i++)
        rc = gen_tool(g, &c->tools[i]);
    rc = rc || yajl_gen_array_close(g) ||
         (last_round && json_gen_key_cstr(g, "tool_choice", "none")) ||
         yajl_gen_map_close(g);
    if (rc == 0) {
        yajl_gen_get_buf(g, &json, &len);
        out = strndup((const char *)json, len);
    }
    if (g != NULL)
        yajl_gen_free(g);
    return out;
}

/* The tools a turn offers the model: none without [tool] sections or
 * with max_tool_rounds 0. */
static int
declare_tools(struct chat *ch)
{
    if (ch->conf->ntools == 0 || ch->conf->chat.max_tool_rounds == 0)
        return 0;
    ch->tool_options = tools_request(ch->conf, 0);
    ch->last_round_options = tools_request(ch->conf, 1);
    return ch->tool_options && ch->last_round_options ? 0 : -1;
}

struct chat *
chat_new(const struct conf *c, struct scoreboard *pool,
         struct scoreboard_slot *slot, char err[CHAT_ERR_LEN])
{
    struct chat *ch = calloc(1, sizeof(*ch));
    char why[ANSWER_MESSAGE_LEN];

    if (ch == NULL) {
        snprintf(err, CHAT_ERR_LEN, "out of memory");
        return NULL;
    }
    ch->conf = c;
    ch->pool = pool;
    ch->slot = slot;
    init_buffers(ch, c);
    if (chatdb_init(&ch->db, c) == -1) {
        snprintf(err, CHAT_ERR_LEN, "%s", chatdb_error(&ch->db));
        chat_free(ch);
        return NULL;
    }
    /* Connected now, as the master forks the pool one worker after the
     * other, not by the first request: a burst of first requests to
     * thousands of workers would open as many connections at once, past
     * Redis's accept queue (measured: 23 of 12,006 turns failed at 4,000
     * held streams). A Redis down now is tried again by the request. */
    chatdb_ping(&ch->db);
    if (llm_init(&ch->llm, c, pool, why) == -1) {
        snprintf(err, CHAT_ERR_LEN, "%s", why);
        chat_free(ch);
        return NULL;
    }
    tools_init(&ch->tools, c, ch->llm.multi);
    if (declare_tools(ch) == -1) {
        snprintf(err, CHAT_ERR_LEN, "cannot set up the tools: out of memory");
        chat_free(ch);
        return NULL;
    }
    return ch;
}

void
chat_free(struct chat *ch)
{
    if (ch == NULL)
        return;
    tools_cleanup(&ch->tools);
    free(ch->tool_options);
    free(ch->last_round_options);
    answer_cleanup(&ch->answer);
    messages_cleanup(&ch->history);
    buf_cleanup(&ch->options);
    buf_cleanup(&ch->replay);
    buf_cleanup(&ch->assistant_item);
    buf_cleanup(&ch->exchange);
    buf_cleanup(&ch->user_item);
    buf_cleanup(&ch->arena);
    buf_cleanup(&ch->body);
    llm_cleanup(&ch->llm);
    chatdb_cleanup(&ch->db);
    free(ch);
}

/* ---- what both faces share */

int
chat_session_id_valid(const char *s, size_t n)
{
    if (n == 0 || n > CHAT_SESSION_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static const char *
skip_spaces(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

int
chat_content_type_ok(const char *ct)
{
    static const char json[] = "application/json";
    const char *p = skip_spaces(ct);

    if (strncasecmp(p, json, sizeof(json) - 1) != 0)
        return 0;
    p = skip_spaces(p + sizeof(json) - 1);
    while (*p == ';') {
        size_t n;

        p = skip_spaces(p + 1);
        n = strcspn(p, ";");
        if (strncasecmp(p, "charset=", 8) == 0) {
            const char *v = p + 8;
            size_t vn = n - 8;

            while (vn > 0 && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
                vn--;
            if (!((vn == 5 && strncasecmp(v, "utf-8", 5) == 0) ||
                  (vn == 7 && strncasecmp(v, "\"utf-8\"", 7) == 0)))
                return 0;
        }
        p += n;
    }
    return *p == '\0';
}

static void
phase(struct chat *ch, enum scoreboard_state state)
{
    scoreboard_set_state(ch->slot, state);
}

/* Around each Redis round trip of a request: the status page shows the
 * phase, and the time counts in the request's redis_ms. Usage:
 * redis_begin(ch); rc = redis_end(ch, chatdb_...(...)); */
static void
redis_begin(struct chat *ch)
{
    phase(ch, SCOREBOARD_REDIS);
    ch->redis_since_ms = clock_ms();
}

static int
redis_end(struct chat *ch, int rc)
{
    ch->req->redis_ms += clock_ms() - ch->redis_since_ms;
    return rc;
}

static void
fail_store(struct chat *ch)
{
    http_send_error(ch->req, 503, "unavailable",
                    "the chat history store is unavailable (%s)",
                    chatdb_error(&ch->db));
}

static void
send_rate_limited(struct chat *ch, long long retry_s)
{
    ch->req->retry_after_s = (int)retry_s;
    http_send_error(ch->req, 429, "rate_limited", "this client is over its "
                    "rate limit; retry in %lld s", retry_s);
}

/* The one answer for a session that does not exist and for another
 * owner's, so that the two cannot be told apart. */
static void
send_no_session(struct chat *ch)
{
    http_send_error(ch->req, 404, "not_found", "no such session");
}

/* Who owns the sessions a request makes: its client key's identity. An
 * address is no owner (people behind one NAT share it, a phone changes
 * it), so without client keys a session is anyone's who knows its id. */
static const char *
session_owner(const struct chat *ch)
{
    return ch->conf->nclient_digests > 0 ? ch->req->client : "";
}

/* The JSON body within its cap (415, 413, 400). Returns 0, or -1 when
 * the request has been answered. */
static int
read_body(struct chat *ch)
{
    struct http_request *r = ch->req;

    if (!chat_content_type_ok(fcgi_param(r->fcgi, "CONTENT_TYPE"))) {
        http_send_error(r, 415, "unsupported_media_type",
                        "the body must be application/json");
        return -1;
    }
    switch (fcgi_read_body(r->fcgi, &ch->body)) {
    case FCGI_BODY_OK:
        return 0;
    case FCGI_BODY_TOO_LARGE:
        http_send_error(r, 413, "too_large", "the body is over %zu bytes",
                        ch->body.max);
        return -1;
    case FCGI_BODY_MISMATCH:
        http_send_error(r, 400, "bad_request",
                        "the body does not have the length announced");
        return -1;
    case FCGI_BODY_IO_ERROR:
        break;
    }
    http_send_error(r, 400, "bad_request", "the body could not be read");
    return -1;
}

/* What a client is told of a failed model call: its kind, and the
 * provider's HTTP status. */
static const char *
failure_kind(const struct answer *a)
{
    long s = a->http_status;

    switch (a->status) {
    case ANSWER_TIMEOUT:
        return "the model did not answer in time";
    case ANSWER_UNREACHABLE:
        return "the model provider cannot be reached";
    case ANSWER_BAD:
        return "the model's answer cannot be used";
    case ANSWER_HTTP_ERROR:
        if (s >= 200 && s < 300)
            return "the model reported an error mid-stream";
        return s >= 400 && s < 500 ? "the model provider refused the request"
                                   : "the model provider failed";
    default:
        return "the model call failed";
    }
}

/* The provider's own words never reach the client: they can quote the
 * server's API key (OpenAI's 401 shows a masked form of it) or name its
 * account, and curl's name its hosts. They go to the error log, whose
 * lines carry the request id the client got in X-Request-Id. */
static void
fail_model(struct chat *ch, const struct answer *a)
{
    struct http_request *r = ch->req;
    int timeout = a->status == ANSWER_TIMEOUT;
    char text[96];

    if (a->status == ANSWER_OK)
        return;
    if (a->status == ANSWER_CLIENT_GONE) {
        log_info("chat", "%s; upstream call cancelled", a->message);
        r->status = HTTP_STATUS_CLIENT_GONE;
        return;
    }
    if (a->status == ANSWER_HTTP_ERROR)
        snprintf(text, sizeof(text), "%s (HTTP %ld)", failure_kind(a),
                 a->http_status);
    else
        snprintf(text, sizeof(text), "%s", failure_kind(a));
    log_warnx("chat", "%s: %s", text, a->message);
    http_send_error(r, timeout ? 504 : 502,
                    timeout ? "upstream_timeout" : "upstream_error", "%s",
                    text);
}

/* Run call into ch->answer, within the request's deadline and watching
 * its client (502, 504; nothing when the client went away). Returns 0, or
 * -1 when the request has been answered. */
static int
ask_model(struct chat *ch, struct llm_call *call)
{
    struct http_request *r = ch->req;

    call->request_id = r->id;
    call->deadline_ms = r->start_ms +
                        (double)ch->conf->request_timeout_s * 1000.0;
    call->watch_fd = r->fcgi->ipcFd;
    call->client_gone = fcgi_client_gone;
    phase(ch, SCOREBOARD_UPSTREAM);
    llm_complete(&ch->llm, call, &ch->answer);
    r->upstream_ms += ch->answer.ms;
    if (ch->answer.status == ANSWER_OK)
        return 0;
    scoreboard_count_upstream_error(ch->pool,
                                    answer_error_kind(ch->answer.status));
    fail_model(ch, &ch->answer);
    return -1;
}

/* Before the first piece of a streamed answer: start the event stream
 * (not earlier, so that a failure before it still gets its plain JSON
 * status). Returns 0, or -1 when the client went away. */
static int
begin_stream(struct chat *ch)
{
    if (ch->req->streaming)
        return 0;
    phase(ch, SCOREBOARD_STREAMING);
    return http_stream_begin(ch->req);
}

/* ---- POST /api/chat */

/* A validated POST /api/chat request; strings point into ch->arena or the
 * request's parameters. */
struct chat_turn {
    char session_id[CHAT_SESSION_ID_MAX + 1];
    const char *message;
    size_t message_len;
    int stream;
    struct chatdb_turn turn; /* its bookkeeping in Redis */
};

/* Check the picked fields against the contract's rules. */
static int
check_fields(struct chat *ch, const struct json_field *sid,
             const struct json_field *msg, const struct json_field *stream,
             struct chat_turn *t)
{
    struct http_request *r = ch->req;
    size_t max = (size_t)ch->conf->chat.max_message_bytes;

    if (msg->type != JSON_STRING || msg->len == 0) {
        http_send_error(r, 400, "bad_request",
                        "'message' must be a non-empty string");
        return -1;
    }
    if (msg->len > max) {
        http_send_error(r, 413, "too_large",
                        "'message' is over %zu bytes", max);
        return -1;
    }
    t->message = json_field_text(msg, &ch->arena);
    t->message_len = msg->len;
    if (memchr(t->message, '\0', t->message_len) != NULL) {
        http_send_error(r, 400, "bad_request", "'message' contains NUL");
        return -1;
    }
    t->stream = stream->type == JSON_BOOL && stream->boolean;
    t->turn.idempotency_by_client = sid->type != JSON_STRING;
    if (sid->type != JSON_STRING)
        return http_random_hex(t->session_id, SESSION_ID_BYTES);
    if (!chat_session_id_valid(json_field_text(sid, &ch->arena), sid->len)) {
        http_send_error(r, 400, "bad_request",
                        "'session_id' must be 1-128 of A-Z a-z 0-9 _ -");
        return -1;
    }
    memcpy(t->session_id, json_field_text(sid, &ch->arena), sid->len + 1);
    return 0;
}

/* The turn's bookkeeping: lock, idempotency and rate-limit scopes. */
static int
prepare_turn(struct chat *ch, struct chat_turn *t)
{
    const char *key = fcgi_param(ch->req->fcgi, "HTTP_IDEMPOTENCY_KEY");
    struct chatdb_turn *turn = &t->turn;

    turn->session_id = t->session_id;
    turn->client = ch->req->client;
    turn->owner = session_owner(ch);
    turn->token = ch->req->id;
    /* The model's deadline is request_timeout_s from the request's start:
     * the lock outlives it by the commit's own timeout, so that a turn
     * answered just in time still holds it when it stores. */
    turn->lock_ms = ch->conf->request_timeout_s * 1000 +
                    ch->conf->redis.command_timeout_ms;
    turn->rpm = ch->conf->rate_limit.rpm;
    turn->tpm = ch->conf->rate_limit.tpm;
    turn->idempotency_key = NULL;
    turn->message = t->message;
    turn->message_len = t->message_len;
    if (*key == '\0')
        return 0;
    if (!guard_idempotency_key_valid(key)) {
        http_send_error(ch->req, 400, "bad_request", "Idempotency-Key must "
                        "be 1-%d printable ASCII characters",
                        GUARD_IDEMPOTENCY_MAX);
        return -1;
    }
    turn->idempotency_key = key;
    return 0;
}

/* Step 1: the body, its JSON and its fields. */
static int
parse_turn(struct chat *ch, struct chat_turn *t)
{
    struct json_field f[] = {
        {.path = "session_id", .accept = JSON_STRING | JSON_NULL},
        {.path = "message", .accept = JSON_STRING},
        {.path = "stream", .accept = JSON_BOOL | JSON_NULL},
    };
    char err[JSON_ERR_LEN];

    if (read_body(ch) == -1)
        return -1;
    buf_reset(&ch->arena);
    if (json_pick(ch->body.data, ch->body.len, f, 3, &ch->arena,
                  REQUEST_DEPTH, JSON_STRICT, err) == -1) {
        http_send_error(ch->req, 400, "bad_request", "%s", err);
        return -1;
    }
    if (check_fields(ch, &f[0], &f[1], &f[2], t) == -1)
        return -1;
    return prepare_turn(ch, t);
}

static void replay_answer(struct chat *ch, struct chat_turn *t);

/* What any script on a session may answer: go on (0), or the request is
 * answered here (rate limit, no such session, Redis failure) and -1. */
static int
session_outcome(struct chat *ch, int rc, long long retry_s)
{
    switch (rc) {
    case CHATDB_GO:
        return 0;
    case CHATDB_RATE_LIMITED:
        send_rate_limited(ch, retry_s);
        return -1;
    case CHATDB_NOT_FOUND:
        send_no_session(ch);
        return -1;
    }
    fail_store(ch);
    return -1;
}

/* Step 2, in one round trip: an idempotent replay, rate limits, the
 * session's turn lock, and its history. Answers the request itself unless
 * the turn may go on. */
static int
begin_turn(struct chat *ch, struct chat_turn *t)
{
    long long retry = 1;
    int rc;

    redis_begin(ch);
    rc = redis_end(ch, chatdb_turn_begin(&ch->db, &t->turn, &ch->history,
                                         &ch->replay, &retry));
    switch (rc) {
    case CHATDB_BUSY:
        http_send_error(ch->req, 409, "conflict", "another turn of this "
                        "session is still in progress");
        return -1;
    case CHATDB_RUNNING:
        http_send_error(ch->req, 409, "conflict", "a request with this "
                        "Idempotency-Key is still in progress");
        return -1;
    case CHATDB_REPLAY:
        replay_answer(ch, t);
        return -1;
    case CHATDB_MISMATCH:
        http_send_error(ch->req, 422, "idempotency_mismatch", "this "
                        "Idempotency-Key came with another request (client, "
                        "session_id or message)");
        return -1;
    }
    return session_outcome(ch, rc, retry);
}

/* After a failure: release the session's lock (and a pending idempotency
 * record) so that a retry may run at once. */
static void
abort_turn(struct chat *ch, const struct chat_turn *t)
{
    redis_begin(ch);
    if (redis_end(ch, chatdb_turn_abort(&ch->db, &t->turn)) == -1)
        log_warnx("chat", "cannot release the turn lock (%s); it expires "
                  "in %lld s", chatdb_error(&ch->db),
                  ch->conf->request_timeout_s);
}

/* A piece of a streamed reply, as `event: delta`. */
static int
send_delta(void *arg, const char *text, size_t len)
{
    struct chat *ch = arg;
    yajl_gen g = ch->req->gen;

    if (begin_stream(ch) == -1)
        return -1;
    json_gen_restart(g);
    if (yajl_gen_map_open(g) || json_gen_key_str(g, "content", text, len) ||
        yajl_gen_map_close(g))
        return -1;
    return http_stream_event(ch->req, "delta");
}

/* An event of the stream, begun if need be, with the document in the
 * request's generator. Returns 0, or -1 when the client went away. */
static int
send_event(struct chat *ch, const char *name, int gen_rc)
{
    if (gen_rc != 0)
        return -1;
    if (begin_stream(ch) == -1)
        return -1;
    return http_stream_event(ch->req, name);
}

/* `event: tool` as a call starts, {id, name, arguments}, or, given its
 * run, as it ends, {id, name, status, ms}. */
static int
send_tool_event(struct chat *ch, const struct answer_call *c,
                const struct tool_run *run)
{
    yajl_gen g = ch->req->gen;

    json_gen_restart(g);
    return send_event(
        ch, "tool",
        yajl_gen_map_open(g) || json_gen_key_cstr(g, "id", c->id) ||
            json_gen_key_cstr(g, "name", c->name) ||
            (run == NULL
                 ? json_gen_key_str(g, "arguments", c->arguments.data,
                                    c->arguments.len)
                 : json_gen_key_cstr(g, "status",
                                     tools_outcome_name(run->outcome)) ||
                       json_gen_key_int(g, "ms", (long long)run->ms)) ||
            yajl_gen_map_close(g));
}

/* The answer's calls as an assistant message's tool_calls; a call the
 * model left without an id gets one, so that its result can name it. */
static int
add_call_message(struct chat *ch, long long round)
{
    struct answer *a = &ch->answer;
    yajl_gen g = ch->req->gen;
    const unsigned char *json;
    size_t len;

    json_gen_restart(g);
    if (yajl_gen_array_open(g))
        return -1;
    for (size_t i = 0; i < a->ncalls; i++) {
        struct answer_call *c = &a->calls[i];

        if (c->id[0] == '\0')
            snprintf(c->id, sizeof(c->id), "call_%lld_%zu", round, i);
        if (yajl_gen_map_open(g) || json_gen_key_cstr(g, "id", c->id) ||
            json_gen_key_cstr(g, "type", "function") ||
            json_gen_cstr(g, "function") || yajl_gen_map_open(g) ||
            json_gen_key_cstr(g, "name", c->name) ||
            json_gen_key_str(g, "arguments", c->arguments.data,
                             c->arguments.len) ||
            yajl_gen_map_close(g) || yajl_gen_map_close(g))
            return -1;
    }
    yajl_gen_array_close(g);
    yajl_gen_get_buf(g, &json, &len);
    return messages_add_extra(&ch->history, MESSAGE_ASSISTANT,
                              a->reply.data, a->reply.len, MESSAGE_CALLS,
                              (const char *)json, len);
}

/* The calls of one round, counted and logged; their results join the
 * history as tool messages and, when streaming, end their tool events. */
static int
add_tool_results(struct chat *ch, int streaming)
{
    const struct answer *a = &ch->answer;

    for (size_t i = 0; i < a->ncalls; i++) {
        const struct tool_run *run = &ch->tools.runs[i];

        log_info("chat", "tool %s: %s in %.0f ms", a->calls[i].name,
                 tools_outcome_name(run->outcome), run->ms);
        scoreboard_count_tool(ch->pool,
                              run->tool ? (size_t)(run->tool -
                                                   ch->conf->tools)
                                        : SCOREBOARD_TOOLS - 1,
                              run->outcome, run->ms);
        if (messages_add_extra(&ch->history, MESSAGE_TOOL, run->result.data,
                               run->result.len, MESSAGE_CALL_ID,
                               a->calls[i].id,
                               strlen(a->calls[i].id)) == -1 ||
            (streaming && send_tool_event(ch, &a->calls[i], run) == -1))
            return -1;
    }
    return 0;
}

/* One round: the model's calls, all at once, and their results as tool
 * messages. The turn's user message joins the history before the first
 * round, so that the next model call sees the whole exchange. Returns 0,
 * or -1 when the request has been answered (502; nothing when the client
 * went away). */
static int
run_tool_round(struct chat *ch, struct llm_call *call, long long round)
{
    const struct answer *a = &ch->answer;
    int streaming = call->on_delta != NULL;

    int ok = call->message == NULL ||
             messages_add(&ch->history, MESSAGE_USER, call->message,
                          call->message_len) == 0;

    call->message = NULL;
    ok = ok && add_call_message(ch, round) == 0;
    for (size_t i = 0; ok && streaming && i < a->ncalls; i++)
        ok = send_tool_event(ch, &a->calls[i], NULL) == 0;
    if (ok) {
        phase(ch, SCOREBOARD_UPSTREAM);
        if (tools_run(&ch->tools, a, call) == -1) {
            log_info("chat", "the client went away; %zu tool call(s) "
                     "cancelled", a->ncalls);
            ch->req->status = HTTP_STATUS_CLIENT_GONE;
            return -1;
        }
        ok = add_tool_results(ch, streaming) == 0;
    }
    if (!ok)
        http_send_error(ch->req, 502, "upstream_error", "the model's tool "
                        "calls cannot be handled");
    return ok ? 0 : -1;
}

/* Step 3: history + message to the model; while it asks for tools, a
 * round of them and the model again, up to max_tool_rounds rounds (the
 * call after the last one may not ask for more). A retried or hedged
 * model call happens inside llm_complete, so no tool ever runs twice. */
static int
ask_turn(struct chat *ch, const struct chat_turn *t)
{
    struct llm_call call = {
        .system_prompt = ch->conf->upstream.system_prompt,
        .messages = &ch->history,
        .message = t->message,
        .message_len = t->message_len,
        .temperature = ch->conf->upstream.temperature,
        .max_tokens = ch->conf->upstream.max_tokens,
        .options = ch->tool_options,
        .on_delta = t->stream ? send_delta : NULL,
        .delta_arg = ch,
    };
    long long rounds = ch->conf->chat.max_tool_rounds;

    ch->turn_start = ch->history.count;
    for (long long round = 0;; round++) {
        if (round == rounds && call.options != NULL)
            call.options = ch->last_round_options;
        if (ask_model(ch, &call) == -1)
            return -1;
        if (ch->answer.ncalls == 0 || call.options == NULL ||
            round == rounds)
            return 0;
        if (run_tool_round(ch, &call, round) == -1)
            return -1;
    }
}

/* Copy the JSON document in g into b. */
static int
take_json(yajl_gen g, struct buf *b)
{
    const unsigned char *json;
    size_t len;

    yajl_gen_get_buf(g, &json, &len);
    buf_reset(b);
    return buf_append(b, json, len);
}

static int
gen_usage(yajl_gen g, const struct answer *a)
{
    if (json_gen_cstr(g, "usage"))
        return -1;
    if (a->prompt_tokens < 0 && a->completion_tokens < 0)
        return yajl_gen_null(g) ? -1 : 0;
    if (yajl_gen_map_open(g))
        return -1;
    if (a->prompt_tokens >= 0 &&
        json_gen_key_int(g, "prompt_tokens", a->prompt_tokens))
        return -1;
    if (a->completion_tokens >= 0 &&
        json_gen_key_int(g, "completion_tokens", a->completion_tokens))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}

/* {session_id, [reply,] model, usage}: the answer, or a stream's done. */
static int
gen_answer(yajl_gen g, const char *session_id, const struct answer *a,
           int with_reply)
{
    json_gen_restart(g);
    return yajl_gen_map_open(g) ||
           json_gen_key_cstr(g, "session_id", session_id) ||
           (with_reply &&
            json_gen_key_str(g, "reply", a->reply.data, a->reply.len)) ||
           json_gen_key_cstr(g, "model", a->model) || gen_usage(g, a) ||
           yajl_gen_map_close(g);
}

/* The turn's tool exchange, the messages after its user message, as a
 * JSON array in ch->exchange (empty when no tool ran). */
static int
take_exchange(struct chat *ch)
{
    yajl_gen g = ch->req->gen;
    const struct messages *h = &ch->history;

    buf_reset(&ch->exchange);
    if (h->count <= ch->turn_start)
        return 0;
    json_gen_restart(g);
    if (yajl_gen_array_open(g))
        return -1;
    for (size_t i = ch->turn_start + 1; i < h->count; i++)
        if (messages_gen(g, h, i))
            return -1;
    return yajl_gen_array_close(g) || take_json(g, &ch->exchange);
}

/* The stored messages and the answer, serialised before anything is
 * stored, so that a turn whose answer cannot be sent is never kept; the
 * new pair (the exchange folded into its answer) joins the history,
 * which the commit trims. The answer stays in the generator: the
 * response body and the idempotency record. */
static int
serialise_turn(struct chat *ch, const struct chat_turn *t)
{
    yajl_gen g = ch->req->gen;
    const struct buf *reply = &ch->answer.reply, *x = &ch->exchange;

    if (take_exchange(ch) == -1)
        return -1;
    messages_truncate(&ch->history, ch->turn_start);
    return chatdb_gen_item(g, MESSAGE_USER, t->message, t->message_len, "",
                           0) ||
           take_json(g, &ch->user_item) ||
           chatdb_gen_item(g, MESSAGE_ASSISTANT, reply->data, reply->len,
                           x->data, x->len) ||
           take_json(g, &ch->assistant_item) ||
           gen_answer(g, t->session_id, &ch->answer, 1) ||
           messages_add(&ch->history, MESSAGE_USER, t->message,
                        t->message_len) ||
           messages_add_extra(&ch->history, MESSAGE_ASSISTANT, reply->data,
                              reply->len, MESSAGE_EXCHANGE, x->data, x->len);
}

/* Step 4, in one round trip: append both messages, trim, refresh the
 * TTL, release the lock, keep the answer for an idempotent retry. */
static int
commit_turn(struct chat *ch, const struct chat_turn *t)
{
    struct chatdb_result res = {.history = &ch->history};
    const unsigned char *answer;
    int rc;

    if (serialise_turn(ch, t) != 0) {
        http_send_error(ch->req, 502, "upstream_error", "the model's answer "
                        "cannot be encoded or is too large");
        return -1;
    }
    yajl_gen_get_buf(ch->req->gen, &answer, &res.answer_len);
    res.answer = (const char *)answer;
    res.user_item = ch->user_item.data;
    res.user_len = ch->user_item.len;
    res.assistant_item = ch->assistant_item.data;
    res.assistant_len = ch->assistant_item.len;
    res.tokens = answer_tokens(t->message_len, &ch->answer);
    redis_begin(ch);
    rc = redis_end(ch, chatdb_turn_commit(&ch->db, &t->turn, &res));
    if (rc == CHATDB_LOST)
        http_send_error(ch->req, 409, "conflict", "the session was deleted "
                        "or taken over during this turn; nothing was "
                        "stored");
    else if (rc == -1)
        fail_store(ch);
    return rc == 0 ? 0 : -1;
}

/* The end of a stream: {session_id, model, usage} as `event: done`. */
static void
send_done(struct chat *ch, const struct chat_turn *t)
{
    if (gen_answer(ch->req->gen, t->session_id, &ch->answer, 0) != 0) {
        http_send_error(ch->req, 500, "internal_error",
                        "the answer cannot be encoded");
        return;
    }
    /* An empty reply sent no delta, so the stream may not have begun. */
    if (begin_stream(ch) == -1 || http_stream_event(ch->req, "done") == -1)
        log_info("chat", "the client went away before the done event; "
                 "the turn is stored");
}

/* Step 5: the answer commit_turn serialised, or a stream's last event. */
static void
send_answer(struct chat *ch, const struct chat_turn *t)
{
    phase(ch, SCOREBOARD_WRITING);
    if (t->stream)
        send_done(ch, t);
    else
        http_send_json(ch->req, 200);
}

/* A stored answer {session_id, reply, model, usage} back into ch->answer
 * and t->session_id (the arena's message is no longer needed). */
static int
load_answer(struct chat *ch, struct chat_turn *t)
{
    enum { SID, REPLY, MODEL, PROMPT, COMPLETION };
    struct json_field f[] = {
        [SID] = {.path = "session_id", .accept = JSON_STRING},
        [REPLY] = {.path = "reply", .accept = JSON_STRING},
        [MODEL] = {.path = "model", .accept = JSON_STRING},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens", .accept = JSON_ANY},
    };
    struct answer *a = &ch->answer;
    struct buf *arena = &ch->arena;
    char err[JSON_ERR_LEN];

    buf_reset(arena);
    if (json_pick(ch->replay.data, ch->replay.len, f, 5, arena,
                  REQUEST_DEPTH, 0, err) == -1 ||
        f[SID].type == 0 || f[REPLY].type == 0 || f[MODEL].type == 0 ||
        !chat_session_id_valid(json_field_text(&f[SID], arena), f[SID].len))
        return -1;
    memcpy(t->session_id, json_field_text(&f[SID], arena), f[SID].len + 1);
    buf_reset(&a->reply);
    if (buf_append(&a->reply, json_field_text(&f[REPLY], arena),
                   f[REPLY].len) == -1 ||
        json_utf8_copy(a->model, sizeof(a->model),
                       json_field_text(&f[MODEL], arena), f[MODEL].len) == -1)
        return -1;
    if (json_field_int(&f[PROMPT], arena, 0, 1LL << 40, &a->prompt_tokens))
        a->prompt_tokens = -1;
    if (json_field_int(&f[COMPLETION], arena, 0, 1LL << 40,
                       &a->completion_tokens))
        a->completion_tokens = -1;
    return 0;
}

/* A retry with a known Idempotency-Key: the first answer again, without
 * the model. A streamed retry gets it as one delta and done. */
static void
replay_answer(struct chat *ch, struct chat_turn *t)
{
    log_info("chat", "replaying the answer of an earlier request with the "
             "same Idempotency-Key");
    if (!t->stream) {
        http_send_text(ch->req, 200, "application/json", ch->replay.data,
                       ch->replay.len);
        return;
    }
    if (load_answer(ch, t) == -1) {
        http_send_error(ch->req, 500, "internal_error",
                        "the stored answer cannot be read");
        return;
    }
    if (ch->answer.reply.len > 0 &&
        send_delta(ch, ch->answer.reply.data, ch->answer.reply.len) == -1)
        return;
    send_done(ch, t);
}

void
chat_post(struct chat *ch, struct http_request *r)
{
    struct chat_turn t;

    ch->req = r;
    if (parse_turn(ch, &t) == -1 || begin_turn(ch, &t) == -1)
        return;
    if (ask_turn(ch, &t) == -1 || commit_turn(ch, &t) == -1) {
        abort_turn(ch, &t);
        return;
    }
    send_answer(ch, &t);
}

/* ---- GET and DELETE /api/chat/{id} */

static int
check_path_id(struct chat *ch, const char *session_id)
{
    if (chat_session_id_valid(session_id, strlen(session_id)))
        return 0;
    http_send_error(ch->req, 400, "bad_request",
                    "the session id must be 1-128 of A-Z a-z 0-9 _ -");
    return -1;
}

static int
gen_history(yajl_gen g, const char *session_id, const struct messages *h)
{
    json_gen_restart(g);
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "session_id", session_id) ||
        json_gen_cstr(g, "messages") || yajl_gen_array_open(g))
        return -1;
    for (size_t i = 0; i < h->count; i++)
        if (messages_gen(g, h, i))
            return -1;
    return yajl_gen_array_close(g) || yajl_gen_map_close(g);
}

/* GET and DELETE's round trip: the client's rate limit, the session's
 * owner, then its history loaded into h, or deleted when h is NULL.
 * Returns 0, or -1 when the request has been answered. */
static int
open_session(struct chat *ch, const char *session_id, struct messages *h)
{
    struct chatdb_turn t = {.session_id = session_id,
                            .client = ch->req->client,
                            .owner = session_owner(ch),
                            .rpm = ch->conf->rate_limit.rpm};
    long long retry = 1;
    int rc;

    if (check_path_id(ch, session_id) == -1)
        return -1;
    redis_begin(ch);
    rc = redis_end(ch, h != NULL
                           ? chatdb_history_load(&ch->db, &t, h, &retry)
                           : chatdb_history_delete(&ch->db, &t, &retry));
    return session_outcome(ch, rc, retry);
}

void
chat_get(struct chat *ch, struct http_request *r, const char *session_id)
{
    ch->req = r;
    if (open_session(ch, session_id, &ch->history) == -1)
        return;
    if (ch->history.count == 0) {
        send_no_session(ch);
        return;
    }
    if (gen_history(r->gen, session_id, &ch->history) != 0) {
        http_send_error(r, 500, "internal_error",
                        "the stored history cannot be encoded");
        return;
    }
    http_send_json(r, 200);
}

void
chat_delete(struct chat *ch, struct http_request *r, const char *session_id)
{
    ch->req = r;
    if (open_session(ch, session_id, NULL) == 0)
        http_send_no_content(r);
}

/* ---- POST /v1/chat/completions */

/* A completion being answered. */
struct completion {
    struct chat *ch;
    struct v1_request q;
    struct v1_completion v1;
};

/* The body in OpenAI's shape into ch->history and c->q. */
static int
parse_completion(struct chat *ch, struct completion *c)
{
    struct v1_scratch s = {.arena = &ch->arena, .scratch = &ch->user_item,
                           .options = &ch->options, .gen = ch->req->gen};
    char err[V1_ERR_LEN];

    if (read_body(ch) == -1)
        return -1;
    if (v1_parse_request(&ch->body, &s, &ch->history, &c->q, err) == 0)
        return 0;
    http_send_error(ch->req, 400, "invalid_request", "%s", err);
    return -1;
}

/* Client system and developer messages, unless [v1]
 * allow_system_messages says no: then a 400 rather than dropping them, so
 * that the client knows its instructions would not be followed. */
static int
check_roles(struct chat *ch)
{
    const struct messages *h = &ch->history;

    if (ch->conf->v1.allow_system_messages)
        return 0;
    for (size_t i = 0; i < h->count; i++) {
        if (h->msgs[i].role == MESSAGE_SYSTEM) {
            http_send_error(ch->req, 400, "invalid_request", "system and "
                            "developer messages are not allowed here");
            return -1;
        }
    }
    return 0;
}

/* The model asked for, one of those [v1] models offers: the first (also
 * when the request names none) asks each provider for its own model,
 * another is asked of every provider by its name. Returns 0, or -1 when
 * the request has been answered (400 model_not_found). */
static int
choose_model(struct chat *ch, const struct completion *c,
             struct llm_call *call)
{
    const char *offered = ch->conf->v1.models, *name;
    size_t len;
    int first = 1;

    while ((name = conf_list_next(&offered, &len)) != NULL) {
        if (c->q.model == NULL ||
            (len == c->q.model_len && memcmp(name, c->q.model, len) == 0)) {
            call->model = first ? NULL : c->q.model;
            return 0;
        }
        first = 0;
    }
    http_send_error(ch->req, 400, "model_not_found", "the model asked for "
                    "is not offered here; GET /v1/models lists those that "
                    "are");
    return -1;
}

/* Per-client limits, when configured: one round trip before the model. */
static int
check_rate(struct chat *ch, const struct chatdb_turn *t)
{
    long long retry = 1;
    int rc;

    if (t->rpm == 0 && t->tpm == 0)
        return 0;
    redis_begin(ch);
    rc = redis_end(ch, chatdb_rate_check(&ch->db, t, &retry));
    if (rc == CHATDB_GO)
        return 0;
    if (rc == CHATDB_RATE_LIMITED)
        send_rate_limited(ch, retry);
    else
        http_send_error(ch->req, 503, "unavailable", "the rate limiter is "
                        "unavailable (%s)", chatdb_error(&ch->db));
    return -1;
}

static void
count_tokens(struct chat *ch, const struct chatdb_turn *t)
{
    if (t->tpm == 0)
        return;
    redis_begin(ch);
    if (redis_end(ch, chatdb_count_tokens(&ch->db, t,
                                          answer_tokens(0, &ch->answer))))
        log_warnx("chat", "cannot count tokens: %s", chatdb_error(&ch->db));
}

/* The chunk in the generator, once the stream has begun. */
static int
send_generated_chunk(struct completion *c, int gen_rc)
{
    if (begin_stream(c->ch) == -1 || gen_rc != 0)
        return -1;
    return http_stream_event(c->ch->req, NULL);
}

/* A piece of a streamed completion, as one chunk. */
static int
send_chunk(void *arg, const char *text, size_t len)
{
    struct completion *c = arg;

    return send_generated_chunk(
        c, v1_gen_chunk(c->ch->req->gen, &c->v1, text, len));
}

/* A fragment of a tool call, as one chunk, as soon as it arrives. */
static int
send_call_chunk(void *arg, const struct answer_piece *p)
{
    struct completion *c = arg;

    return send_generated_chunk(
        c, v1_gen_call_chunk(c->ch->req->gen, &c->v1, p));
}

/* The end of a stream: the finish chunk, usage if asked, [DONE]. */
static void
finish_stream(struct completion *c)
{
    struct http_request *r = c->ch->req;

    if (send_generated_chunk(c, v1_gen_finish_chunk(r->gen, &c->v1,
                                                    &c->ch->answer)) == -1)
        return;
    if (c->q.include_usage &&
        (v1_gen_usage_chunk(r->gen, &c->v1, &c->ch->answer) ||
         http_stream_event(r, NULL) == -1))
        return;
    http_stream_text(r, NULL, V1_DONE);
}

static void
send_completion(struct completion *c)
{
    struct http_request *r = c->ch->req;

    if (v1_gen_completion(r->gen, &c->v1, &c->ch->answer) != 0) {
        http_send_error(r, 502, "upstream_error",
                        "the model's answer cannot be encoded");
        return;
    }
    http_send_json(r, 200);
}

/* The operator's policy over what the client asked: the configured
 * system prompt goes first, and [upstream] max_tokens, when set, is the
 * most a client may ask for (as well as the default). */
static void
set_up_call(struct chat *ch, const struct completion *c,
            struct llm_call *call)
{
    long long cap = ch->conf->upstream.max_tokens;

    call->system_prompt = ch->conf->upstream.system_prompt;
    call->temperature = c->q.temperature;
    call->max_tokens = cap > 0 && c->q.max_tokens > cap ? cap
                                                         : c->q.max_tokens;
    call->options = c->q.options;
    call->on_delta = c->q.stream ? send_chunk : NULL;
    call->on_call = c->q.stream ? send_call_chunk : NULL;
}

void
chat_completions(struct chat *ch, struct http_request *r)
{
    const struct conf *cf = ch->conf;
    struct completion c = {
        .ch = ch,
        .q = {.temperature = cf->upstream.temperature,
              .max_tokens = cf->upstream.max_tokens},
        .v1 = {.created = (long long)time(NULL), .model = ch->answer.model},
    };
    struct chatdb_turn t = {.client = r->client, .rpm = cf->rate_limit.rpm,
                            .tpm = cf->rate_limit.tpm};
    struct llm_call call = {.messages = &ch->history, .delta_arg = &c};

    ch->req = r;
    snprintf(c.v1.id, sizeof(c.v1.id), "chatcmpl-%s", r->id);
    if (parse_completion(ch, &c) == -1 || check_roles(ch) == -1 ||
        choose_model(ch, &c, &call) == -1 || check_rate(ch, &t) == -1)
        return;
    set_up_call(ch, &c, &call);
    if (ask_model(ch, &call) == -1)
        return;
    count_tokens(ch, &t);
    phase(ch, SCOREBOARD_WRITING);
    if (c.q.stream)
        finish_stream(&c);
    else
        send_completion(&c);
}

/* ---- GET /api/healthz */

void
chat_healthz(struct chat *ch, struct http_request *r)
{
    int up = chatdb_ping(&ch->db) == 0;
    yajl_gen g = r->gen;

    json_gen_restart(g);
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "status", up ? "ok" : "unavailable") ||
        json_gen_key_cstr(g, "redis", up ? "ok" : "down") ||
        yajl_gen_map_close(g)) {
        http_send_error(r, 500, "internal_error", "out of memory");
        return;
    }
    http_send_json(r, up ? 200 : 503);
}
