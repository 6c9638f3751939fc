#include "chat.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "clock.h"
#include "conf.h"
#include "fcgi.h"
#include "json.h"
#include "guard.h"
#include "log.h"
#include "scoreboard.h"
#include "turn.h"
#include "worker.h"

#define REQUEST_DEPTH 16
#define SESSION_ID_BYTES 16

/* A validated POST /api/chat request; strings point into w->arena or the
 * request's parameters. */
struct chat_turn {
    char session_id[CHAT_SESSION_ID_MAX + 1];
    const char *message;
    size_t message_len;
    int stream;
    struct turn turn; /* its bookkeeping in Redis */
};

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

int
chat_read_body(struct worker *w)
{
    struct http_request *r = &w->req;

    if (!chat_content_type_ok(fcgi_param(w->req.fcgi, "CONTENT_TYPE"))) {
        http_send_error(r, 415, "unsupported_media_type",
                        "the body must be application/json");
        return -1;
    }
    switch (fcgi_read_body(w->req.fcgi, &w->body)) {
    case FCGI_BODY_OK:
        return 0;
    case FCGI_BODY_TOO_LARGE:
        http_send_error(r, 413, "too_large", "the body is over %zu bytes",
                        w->body.max);
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

/* Check the picked fields against the contract's rules. */
static int
check_fields(struct worker *w, const struct json_field *sid,
             const struct json_field *msg, const struct json_field *stream,
             struct chat_turn *t)
{
    struct http_request *r = &w->req;
    size_t max = (size_t)w->conf->chat.max_message_bytes;

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
    t->message = json_field_text(msg, &w->arena);
    t->message_len = msg->len;
    if (memchr(t->message, '\0', t->message_len) != NULL) {
        http_send_error(r, 400, "bad_request", "'message' contains NUL");
        return -1;
    }
    t->stream = stream->type == JSON_BOOL && stream->boolean;
    t->turn.idempotency_by_client = sid->type != JSON_STRING;
    if (sid->type != JSON_STRING)
        return http_random_hex(t->session_id, SESSION_ID_BYTES);
    if (!chat_session_id_valid(json_field_text(sid, &w->arena), sid->len)) {
        http_send_error(r, 400, "bad_request",
                        "'session_id' must be 1-128 of A-Z a-z 0-9 _ -");
        return -1;
    }
    memcpy(t->session_id, json_field_text(sid, &w->arena), sid->len + 1);
    return 0;
}

/* The turn's bookkeeping: lock, idempotency and rate-limit scopes. */
static int
prepare_turn(struct worker *w, struct chat_turn *t)
{
    const char *key = fcgi_param(w->req.fcgi, "HTTP_IDEMPOTENCY_KEY");
    struct turn *turn = &t->turn;

    turn->session_id = t->session_id;
    turn->client = w->client;
    turn->token = w->req.id;
    turn->lock_ms = w->conf->request_timeout_s * 1000;
    turn->rpm = w->conf->rate_limit.rpm;
    turn->tpm = w->conf->rate_limit.tpm;
    turn->idempotency_key = NULL;
    if (*key == '\0')
        return 0;
    if (!guard_idempotency_key_valid(key)) {
        http_send_error(&w->req, 400, "bad_request", "Idempotency-Key must "
                        "be 1-%d printable ASCII characters",
                        GUARD_IDEMPOTENCY_MAX);
        return -1;
    }
    turn->idempotency_key = key;
    return 0;
}

/* Step 1: the body, its JSON and its fields. */
static int
parse_turn(struct worker *w, struct chat_turn *t)
{
    struct json_field f[] = {
        {.path = "session_id", .accept = JSON_STRING | JSON_NULL},
        {.path = "message", .accept = JSON_STRING},
        {.path = "stream", .accept = JSON_BOOL | JSON_NULL},
    };
    char err[JSON_ERR_LEN];

    if (chat_read_body(w) == -1)
        return -1;
    buf_reset(&w->arena);
    if (json_pick(w->body.data, w->body.len, f, 3, &w->arena, REQUEST_DEPTH,
                  JSON_STRICT, err) == -1) {
        http_send_error(&w->req, 400, "bad_request", "%s", err);
        return -1;
    }
    if (check_fields(w, &f[0], &f[1], &f[2], t) == -1)
        return -1;
    return prepare_turn(w, t);
}

static void
fail_store(struct worker *w)
{
    http_send_error(&w->req, 503, "unavailable",
                    "the chat history store is unavailable (%s)",
                    w->store.err);
}

/* Step 2: the session's history, in one round trip. */
static int
load_history(struct worker *w, const char *session_id)
{
    double start = clock_ms();
    int rc;

    worker_phase(w, SB_REDIS);
    rc = store_history_load(&w->store, session_id, &w->history);
    w->req.redis_ms += clock_ms() - start;
    if (rc == -1)
        fail_store(w);
    return rc;
}

static void replay_answer(struct worker *w, struct chat_turn *t);

/* Step 2, in one round trip: an idempotent replay, rate limits, the
 * session's turn lock, and its history. Answers the request itself unless
 * the turn may go on. */
static int
begin_turn(struct worker *w, struct chat_turn *t)
{
    double start = clock_ms();
    long long retry = 1;
    int rc;

    worker_phase(w, SB_REDIS);
    rc = turn_begin(&w->store, &t->turn, &w->history, &w->replay, &retry);
    w->req.redis_ms += clock_ms() - start;
    switch (rc) {
    case TURN_GO:
        return 0;
    case TURN_RATE_LIMITED:
        w->req.retry_after_s = (int)retry;
        http_send_error(&w->req, 429, "rate_limited", "this client is over "
                        "its rate limit; retry in %lld s", retry);
        return -1;
    case TURN_BUSY:
        http_send_error(&w->req, 409, "conflict", "another turn of this "
                        "session is still in progress");
        return -1;
    case TURN_RUNNING:
        http_send_error(&w->req, 409, "conflict", "a request with this "
                        "Idempotency-Key is still in progress");
        return -1;
    case TURN_REPLAY:
        replay_answer(w, t);
        return -1;
    }
    fail_store(w);
    return -1;
}

/* After a failure: release the session's lock (and a pending idempotency
 * record) so that a retry may run at once. */
static void
abort_turn(struct worker *w, const struct chat_turn *t)
{
    if (turn_abort(&w->store, &t->turn) == -1)
        log_warnx("chat", "cannot release the turn lock (%s); it expires "
                  "in %lld s", w->store.err, w->conf->request_timeout_s);
}

static void
fail_model(struct worker *w, const struct llm_answer *a)
{
    struct http_request *r = &w->req;

    switch (a->status) {
    case LLM_OK:
        return;
    case LLM_CLIENT_GONE:
        log_info("chat", "%s; upstream call cancelled", a->message);
        r->status = HTTP_STATUS_CLIENT_GONE;
        return;
    case LLM_TIMEOUT:
        http_send_error(r, 504, "upstream_timeout",
                        "the model did not answer in time (%s)", a->message);
        return;
    case LLM_HTTP_ERROR:
        http_send_error(r, 502, "upstream_error",
                        "the model answered %ld: %s", a->http_status,
                        a->message);
        return;
    case LLM_UNREACHABLE:
        http_send_error(r, 502, "upstream_error",
                        "the model cannot be reached (%s)", a->message);
        return;
    case LLM_BAD_ANSWER:
    case LLM_FAILED:
        break;
    }
    http_send_error(r, 502, "upstream_error", "the model failed: %s",
                    a->message);
}

/* A piece of a streamed reply: the first one starts the event stream, so
 * that a failure before it still gets its plain JSON status. */
static int
send_delta(void *arg, const char *text, size_t len)
{
    struct worker *w = arg;
    yajl_gen g = w->gen;

    if (!w->req.streaming) {
        worker_phase(w, SB_STREAMING);
        if (http_stream_begin(&w->req) == -1)
            return -1;
    }
    json_gen_restart(g);
    if (yajl_gen_map_open(g) || json_gen_key_str(g, "content", text, len) ||
        yajl_gen_map_close(g))
        return -1;
    return http_stream_event(&w->req, "delta");
}

int
chat_ask_model(struct worker *w, const struct llm_call *call)
{
    worker_phase(w, SB_UPSTREAM);
    llm_complete(&w->llm, call, &w->answer);
    w->req.upstream_ms += w->answer.ms;
    if (w->answer.status == LLM_OK)
        return 0;
    scoreboard_count_upstream_error(w->pool,
                                    llm_error_kind(w->answer.status));
    fail_model(w, &w->answer);
    return -1;
}

/* Step 3: history + message to the model. */
static int
ask_model(struct worker *w, const struct chat_turn *t)
{
    struct llm_call call = {
        .system_prompt = w->conf->upstream.system_prompt,
        .history = &w->history,
        .message = t->message,
        .message_len = t->message_len,
        .temperature = w->conf->upstream.temperature,
        .max_tokens = w->conf->upstream.max_tokens,
        .request_id = w->req.id,
        .watch_fd = w->req.fcgi->ipcFd,
        .deadline_ms = w->req.start_ms +
                       (double)w->conf->request_timeout_s * 1000.0,
        .on_delta = t->stream ? send_delta : NULL,
        .delta_arg = w,
    };

    return chat_ask_model(w, &call);
}

/* One stored history item, {"role","content"}, in w->gen's buffer. */
static int
gen_item(yajl_gen g, const char *role, const char *content, size_t len)
{
    json_gen_restart(g);
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", role) ||
           json_gen_key_str(g, "content", content, len) ||
           yajl_gen_map_close(g);
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
gen_usage(yajl_gen g, const struct llm_answer *a)
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
gen_answer(yajl_gen g, const char *session_id, const struct llm_answer *a,
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

/* The history items and the answer, serialised before anything is stored,
 * so that a turn whose answer cannot be sent is never kept. The answer
 * stays in w->gen: the response body and the idempotency record. */
static int
serialise_turn(struct worker *w, const struct chat_turn *t)
{
    const struct buf *reply = &w->answer.reply;

    return gen_item(w->gen, "user", t->message, t->message_len) ||
           take_json(w->gen, &w->user_item) ||
           gen_item(w->gen, "assistant", reply->data, reply->len) ||
           take_json(w->gen, &w->assistant_item) ||
           gen_answer(w->gen, t->session_id, &w->answer, 1);
}

long long
chat_answer_tokens(size_t message_len, const struct llm_answer *a)
{
    if (a->prompt_tokens >= 0 && a->completion_tokens >= 0)
        return a->prompt_tokens + a->completion_tokens;
    return (long long)((message_len + a->reply.len) / 4 + 1);
}

/* Step 4, in one round trip: append both turns, trim, refresh the TTL,
 * release the lock, keep the answer for an idempotent retry. */
static int
store_turn(struct worker *w, const struct chat_turn *t)
{
    const struct conf *c = w->conf;
    const struct buf *reply = &w->answer.reply;
    struct turn_result res = {.ttl_s = c->chat.history_ttl_seconds,
                              .idempotency_ttl_s = c->idempotency_ttl_s};
    const unsigned char *answer;
    double start;
    int rc;

    if (serialise_turn(w, t) != 0 ||
        history_add(&w->history, HISTORY_USER, t->message, t->message_len) ||
        history_add(&w->history, HISTORY_ASSISTANT, reply->data, reply->len)) {
        http_send_error(&w->req, 502, "upstream_error", "the model's answer "
                        "cannot be encoded or is too large");
        return -1;
    }
    yajl_gen_get_buf(w->gen, &answer, &res.answer_len);
    res.answer = (const char *)answer;
    res.user_item = w->user_item.data;
    res.user_len = w->user_item.len;
    res.assistant_item = w->assistant_item.data;
    res.assistant_len = w->assistant_item.len;
    res.trim_start = history_trim_start(&w->history,
                                        (size_t)c->chat.history_max_messages,
                                        (size_t)c->chat.history_max_bytes);
    res.tokens = chat_answer_tokens(t->message_len, &w->answer);
    worker_phase(w, SB_REDIS);
    start = clock_ms();
    rc = turn_commit(&w->store, &t->turn, &res);
    w->req.redis_ms += clock_ms() - start;
    if (rc == -1)
        fail_store(w);
    return rc;
}

/* The end of a stream: {session_id, model, usage} as `event: done`. */
static void
send_done(struct worker *w, const struct chat_turn *t)
{
    if (gen_answer(w->gen, t->session_id, &w->answer, 0) != 0) {
        http_send_error(&w->req, 500, "internal_error",
                        "the answer cannot be encoded");
        return;
    }
    /* An empty reply sent no delta, so the stream may not have begun. */
    if ((!w->req.streaming && http_stream_begin(&w->req) == -1) ||
        http_stream_event(&w->req, "done") == -1)
        log_info("chat", "the client went away before the done event; "
                 "the turn is stored");
}

/* Step 5: the answer store_turn serialised, or a stream's last event. */
static void
send_answer(struct worker *w, const struct chat_turn *t)
{
    worker_phase(w, SB_WRITING);
    if (t->stream)
        send_done(w, t);
    else
        http_send_json(&w->req, 200);
}

/* A stored answer {session_id, reply, model, usage} back into w->answer
 * and t->session_id (the arena's message is no longer needed). */
static int
load_answer(struct worker *w, struct chat_turn *t)
{
    enum { SID, REPLY, MODEL, PROMPT, COMPLETION };
    struct json_field f[] = {
        [SID] = {.path = "session_id", .accept = JSON_STRING},
        [REPLY] = {.path = "reply", .accept = JSON_STRING},
        [MODEL] = {.path = "model", .accept = JSON_STRING},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens", .accept = JSON_ANY},
    };
    struct llm_answer *a = &w->answer;
    char err[JSON_ERR_LEN];

    buf_reset(&w->arena);
    if (json_pick(w->replay.data, w->replay.len, f, 5, &w->arena,
                  REQUEST_DEPTH, 0, err) == -1 ||
        f[SID].type == 0 || f[REPLY].type == 0 || f[MODEL].type == 0 ||
        !chat_session_id_valid(json_field_text(&f[SID], &w->arena),
                               f[SID].len))
        return -1;
    memcpy(t->session_id, json_field_text(&f[SID], &w->arena), f[SID].len + 1);
    buf_reset(&a->reply);
    if (buf_append(&a->reply, json_field_text(&f[REPLY], &w->arena),
                   f[REPLY].len) == -1 ||
        json_utf8_copy(a->model, sizeof(a->model),
                       json_field_text(&f[MODEL], &w->arena),
                       f[MODEL].len) == -1)
        return -1;
    if (json_field_int(&f[PROMPT], &w->arena, 0, 1LL << 40,
                       &a->prompt_tokens))
        a->prompt_tokens = -1;
    if (json_field_int(&f[COMPLETION], &w->arena, 0, 1LL << 40,
                       &a->completion_tokens))
        a->completion_tokens = -1;
    return 0;
}

/* A retry with a known Idempotency-Key: the first answer again, without
 * the model. A streamed retry gets it as one delta and done. */
static void
replay_answer(struct worker *w, struct chat_turn *t)
{
    log_info("chat", "replaying the answer of an earlier request with the "
             "same Idempotency-Key");
    if (!t->stream) {
        http_send_text(&w->req, 200, "application/json", w->replay.data,
                       w->replay.len);
        return;
    }
    if (load_answer(w, t) == -1) {
        http_send_error(&w->req, 500, "internal_error",
                        "the stored answer cannot be read");
        return;
    }
    if (w->answer.reply.len > 0 &&
        send_delta(w, w->answer.reply.data, w->answer.reply.len) == -1)
        return;
    send_done(w, t);
}

void
chat_post(struct worker *w)
{
    struct chat_turn t;

    if (parse_turn(w, &t) == -1 || begin_turn(w, &t) == -1)
        return;
    if (ask_model(w, &t) == -1 || store_turn(w, &t) == -1) {
        abort_turn(w, &t);
        return;
    }
    send_answer(w, &t);
}

static int
check_path_id(struct worker *w, const char *session_id)
{
    if (chat_session_id_valid(session_id, strlen(session_id)))
        return 0;
    http_send_error(&w->req, 400, "bad_request",
                    "the session id must be 1-128 of A-Z a-z 0-9 _ -");
    return -1;
}

static int
gen_messages(yajl_gen g, const struct history *h)
{
    if (json_gen_cstr(g, "messages") || yajl_gen_array_open(g))
        return -1;
    for (size_t i = 0; i < h->count; i++) {
        if (yajl_gen_map_open(g) ||
            json_gen_key_cstr(g, "role",
                              history_role_name(h->msgs[i].role)) ||
            json_gen_key_str(g, "content", history_content(h, i),
                             h->msgs[i].len) ||
            yajl_gen_map_close(g))
            return -1;
    }
    return yajl_gen_array_close(g) ? -1 : 0;
}

void
chat_get(struct worker *w, const char *session_id)
{
    yajl_gen g = w->gen;

    if (check_path_id(w, session_id) == -1 ||
        load_history(w, session_id) == -1)
        return;
    if (w->history.count == 0) {
        http_send_error(&w->req, 404, "not_found", "no such session");
        return;
    }
    json_gen_restart(g);
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "session_id", session_id) ||
        gen_messages(g, &w->history) || yajl_gen_map_close(g)) {
        http_send_error(&w->req, 500, "internal_error",
                        "the stored history cannot be encoded");
        return;
    }
    http_send_json(&w->req, 200);
}

void
chat_delete(struct worker *w, const char *session_id)
{
    double start;
    int rc;

    if (check_path_id(w, session_id) == -1)
        return;
    worker_phase(w, SB_REDIS);
    start = clock_ms();
    rc = store_history_delete(&w->store, session_id);
    w->req.redis_ms += clock_ms() - start;
    if (rc == -1) {
        fail_store(w);
        return;
    }
    http_send_no_content(&w->req);
}
