#include "openai.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <yajl/yajl_tree.h>

#include "chat.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "scoreboard.h"
#include "turn.h"
#include "worker.h"

#define REQUEST_DEPTH 16
#define ID_LEN 96

/* A completion being answered. */
struct completion {
    struct worker *w;
    char id[ID_LEN];
    long long created;
    int stream;
    int include_usage;
    int sent_role; /* the first chunk carries the role */
    double temperature;
    long long max_tokens;
};

void
openai_models(struct worker *w)
{
    yajl_gen g = w->gen;

    w->req.openai = 1;
    json_gen_restart(g);
    if (yajl_gen_map_open(g) || json_gen_key_cstr(g, "object", "list") ||
        json_gen_cstr(g, "data") || yajl_gen_array_open(g) ||
        yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "id", w->conf->upstream.model) ||
        json_gen_key_cstr(g, "object", "model") ||
        json_gen_key_int(g, "created", 0) ||
        json_gen_key_cstr(g, "owned_by", "chatfcgi") ||
        yajl_gen_map_close(g) || yajl_gen_array_close(g) ||
        yajl_gen_map_close(g)) {
        http_send_error(&w->req, 500, "internal_error", "out of memory");
        return;
    }
    http_send_json(&w->req, 200);
}

static int
bad_request(struct worker *w, const char *why)
{
    http_send_error(&w->req, 400, "invalid_request", "%s", why);
    return -1;
}

/* Message content: a string, or an array of {"type":"text","text"} parts,
 * joined in scratch. */
static int
add_content(struct history *h, enum history_role role, yajl_val content,
            struct buf *scratch)
{
    const char *type_path[] = {"type", NULL}, *text_path[] = {"text", NULL};

    if (YAJL_IS_STRING(content))
        return history_add(h, role, content->u.string,
                           strlen(content->u.string));
    if (!YAJL_IS_ARRAY(content))
        return -1;
    buf_reset(scratch);
    for (size_t i = 0; i < content->u.array.len; i++) {
        yajl_val part = content->u.array.values[i];
        yajl_val type = yajl_tree_get(part, type_path, yajl_t_string);
        yajl_val text = yajl_tree_get(part, text_path, yajl_t_string);

        if (type == NULL || strcmp(type->u.string, "text") != 0 ||
            text == NULL || buf_append_str(scratch, text->u.string) == -1)
            return -1;
    }
    return history_add(h, role, scratch->len ? scratch->data : "",
                       scratch->len);
}

static int
role_of(const char *name, enum history_role *role)
{
    if (strcmp(name, "user") == 0)
        *role = HISTORY_USER;
    else if (strcmp(name, "assistant") == 0)
        *role = HISTORY_ASSISTANT;
    else if (strcmp(name, "system") == 0 || strcmp(name, "developer") == 0)
        *role = HISTORY_SYSTEM;
    else
        return -1;
    return 0;
}

/* messages[] into w->history. The document was checked by json_pick's
 * strict mode first (UTF-8, depth, duplicate keys), so yajl's tree parser
 * only builds it. */
static int
load_messages(struct worker *w, yajl_val doc)
{
    const char *messages_path[] = {"messages", NULL};
    const char *role_path[] = {"role", NULL}, *content_path[] = {"content",
                                                                  NULL};
    yajl_val messages = yajl_tree_get(doc, messages_path, yajl_t_array);

    history_reset(&w->history);
    if (messages == NULL || messages->u.array.len == 0)
        return bad_request(w, "'messages' must be a non-empty array");
    for (size_t i = 0; i < messages->u.array.len; i++) {
        yajl_val m = messages->u.array.values[i];
        yajl_val role = yajl_tree_get(m, role_path, yajl_t_string);
        yajl_val content = yajl_tree_get(m, content_path, yajl_t_any);
        enum history_role r;

        if (role == NULL || role_of(role->u.string, &r) == -1)
            return bad_request(w, "each message needs a role of system, "
                               "developer, user or assistant");
        if (content == NULL ||
            add_content(&w->history, r, content, &w->user_item) == -1)
            return bad_request(w, "each message needs a text content: a "
                               "string or text parts");
    }
    return 0;
}

/* The scalar options, then the messages. */
static int
parse_request(struct worker *w, struct completion *c)
{
    enum { STREAM, USAGE, TEMPERATURE, MAX_TOKENS, MAX_COMPLETION };
    struct json_field f[] = {
        [STREAM] = {.path = "stream", .accept = JSON_BOOL | JSON_NULL},
        [USAGE] = {.path = "stream_options.include_usage",
                   .accept = JSON_BOOL | JSON_NULL},
        [TEMPERATURE] = {.path = "temperature",
                         .accept = JSON_NUMBER | JSON_NULL},
        [MAX_TOKENS] = {.path = "max_tokens",
                        .accept = JSON_NUMBER | JSON_NULL},
        [MAX_COMPLETION] = {.path = "max_completion_tokens",
                            .accept = JSON_NUMBER | JSON_NULL},
    };
    char err[JSON_ERR_LEN];
    const char *text;
    yajl_val doc;
    int rc;

    if (chat_read_body(w) == -1)
        return -1;
    buf_reset(&w->arena);
    if (json_pick(w->body.data, w->body.len, f, 5, &w->arena, REQUEST_DEPTH,
                  JSON_STRICT, err) == -1)
        return bad_request(w, err);
    c->stream = f[STREAM].type == JSON_BOOL && f[STREAM].boolean;
    c->include_usage = f[USAGE].type == JSON_BOOL && f[USAGE].boolean;
    c->temperature = f[TEMPERATURE].type == JSON_NUMBER
                         ? strtod(json_field_text(&f[TEMPERATURE], &w->arena),
                                  NULL)
                         : w->conf->upstream.temperature;
    c->max_tokens = w->conf->upstream.max_tokens;
    for (int i = MAX_TOKENS; i <= MAX_COMPLETION; i++)
        if (f[i].type == JSON_NUMBER &&
            json_field_int(&f[i], &w->arena, 1, 1LL << 30, &c->max_tokens))
            return bad_request(w, "max_tokens must be a positive integer");
    text = buf_cstr(&w->body);
    doc = text ? yajl_tree_parse(text, err, sizeof(err)) : NULL;
    if (doc == NULL)
        return bad_request(w, "the body cannot be parsed");
    rc = load_messages(w, doc);
    yajl_tree_free(doc);
    return rc;
}

static int
gen_usage(yajl_gen g, const struct llm_answer *a)
{
    long long p = a->prompt_tokens > 0 ? a->prompt_tokens : 0;
    long long c = a->completion_tokens > 0 ? a->completion_tokens : 0;

    return json_gen_cstr(g, "usage") || yajl_gen_map_open(g) ||
           json_gen_key_int(g, "prompt_tokens", p) ||
           json_gen_key_int(g, "completion_tokens", c) ||
           json_gen_key_int(g, "total_tokens", p + c) ||
           yajl_gen_map_close(g);
}

/* {"id", "object", "created", "model", "choices": [ */
static int
gen_head(yajl_gen g, const struct completion *c, const char *object)
{
    json_gen_restart(g);
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "id", c->id) ||
           json_gen_key_cstr(g, "object", object) ||
           json_gen_key_int(g, "created", c->created) ||
           json_gen_key_cstr(g, "model", c->w->answer.model) ||
           json_gen_cstr(g, "choices") || yajl_gen_array_open(g);
}

/* One streamed chunk: content (the first also says the role), or the end
 * (finish_reason "stop"). */
static int
gen_chunk(struct completion *c, const char *text, size_t len)
{
    yajl_gen g = c->w->gen;
    int first = !c->sent_role;

    c->sent_role = 1;
    return gen_head(g, c, "chat.completion.chunk") || yajl_gen_map_open(g) ||
           json_gen_key_int(g, "index", 0) || json_gen_cstr(g, "delta") ||
           yajl_gen_map_open(g) ||
           (first && json_gen_key_cstr(g, "role", "assistant")) ||
           (text && json_gen_key_str(g, "content", text, len)) ||
           yajl_gen_map_close(g) || json_gen_cstr(g, "finish_reason") ||
           (text ? yajl_gen_null(g) != yajl_gen_status_ok
                 : json_gen_cstr(g, "stop") != 0) ||
           yajl_gen_map_close(g) || yajl_gen_array_close(g) ||
           yajl_gen_map_close(g);
}

static int
send_chunk(void *arg, const char *text, size_t len)
{
    struct completion *c = arg;
    struct http_request *r = &c->w->req;

    if (!r->streaming) {
        worker_phase(c->w, SB_STREAMING);
        if (http_stream_begin(r) == -1)
            return -1;
    }
    if (gen_chunk(c, text, len) != 0)
        return -1;
    return http_stream_event(r, NULL);
}

/* The end of a stream: the stop chunk, usage if asked, [DONE]. */
static void
finish_stream(struct completion *c)
{
    struct http_request *r = &c->w->req;
    yajl_gen g = c->w->gen;

    if (send_chunk(c, NULL, 0) == -1)
        return;
    if (c->include_usage &&
        (gen_head(g, c, "chat.completion.chunk") || yajl_gen_array_close(g) ||
         gen_usage(g, &c->w->answer) || yajl_gen_map_close(g) ||
         http_stream_event(r, NULL) == -1))
        return;
    http_stream_write(r, "data: [DONE]\n\n");
}

static void
send_completion(struct completion *c)
{
    const struct llm_answer *a = &c->w->answer;
    yajl_gen g = c->w->gen;

    if (gen_head(g, c, "chat.completion") || yajl_gen_map_open(g) ||
        json_gen_key_int(g, "index", 0) || json_gen_cstr(g, "message") ||
        yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", "assistant") ||
        json_gen_key_str(g, "content", a->reply.data, a->reply.len) ||
        yajl_gen_map_close(g) ||
        json_gen_key_cstr(g, "finish_reason", "stop") ||
        yajl_gen_map_close(g) || yajl_gen_array_close(g) ||
        gen_usage(g, a) || yajl_gen_map_close(g)) {
        http_send_error(&c->w->req, 502, "upstream_error",
                        "the model's answer cannot be encoded");
        return;
    }
    http_send_json(&c->w->req, 200);
}

/* Per-client limits, when configured: one round trip before the model. */
static int
check_rate(struct worker *w, const struct turn *t)
{
    long long retry = 1;
    int rc;

    if (t->rpm == 0 && t->tpm == 0)
        return 0;
    rc = turn_rate_check(&w->store, t, &retry);
    if (rc == TURN_GO)
        return 0;
    if (rc == TURN_RATE_LIMITED) {
        w->req.retry_after_s = (int)retry;
        http_send_error(&w->req, 429, "rate_limited", "this client is over "
                        "its rate limit; retry in %lld s", retry);
    } else {
        http_send_error(&w->req, 503, "unavailable", "the rate limiter is "
                        "unavailable (%s)", w->store.err);
    }
    return -1;
}

void
openai_completions(struct worker *w)
{
    struct completion c = {.w = w, .created = (long long)time(NULL)};
    struct turn t = {.client = w->client, .rpm = w->conf->rate_limit.rpm,
                     .tpm = w->conf->rate_limit.tpm};
    struct llm_call call = {.request_id = w->req.id,
                            .watch_fd = w->req.fcgi->ipcFd,
                            .history = &w->history, .delta_arg = &c};

    w->req.openai = 1;
    snprintf(c.id, sizeof(c.id), "chatcmpl-%s", w->req.id);
    if (parse_request(w, &c) == -1 || check_rate(w, &t) == -1)
        return;
    call.temperature = c.temperature;
    call.max_tokens = c.max_tokens;
    call.on_delta = c.stream ? send_chunk : NULL;
    call.deadline_ms = w->req.start_ms +
                       (double)w->conf->request_timeout_s * 1000.0;
    if (chat_ask_model(w, &call) == -1)
        return;
    if (t.tpm > 0 && turn_count_tokens(&w->store, &t, chat_answer_tokens(
                                                         0, &w->answer)))
        log_warnx("openai", "cannot count tokens: %s", w->store.err);
    worker_phase(w, SB_WRITING);
    if (c.stream)
        finish_stream(&c);
    else
        send_completion(&c);
}
