/* v1: OpenAI's request, chunk, completion and error shapes. */
#include "v1.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_tree.h>

#include "answer.h"
#include "buf.h"
#include "conf.h"
#include "json.h"
#include "messages.h"

#define REQUEST_DEPTH 16
#define GEN_DEPTH (REQUEST_DEPTH + 1)
#define NAME_MAX_LEN 64 /* OpenAI's limit on a function's name */

static int
refuse(char err[V1_ERR_LEN], const char *why)
{
    snprintf(err, V1_ERR_LEN, "%s", why);
    return -1;
}

/* Message content: a string, or an array of {"type":"text","text"} parts,
 * joined in scratch. *out and *len point at it. */
static int
content_text(yajl_val content, struct buf *scratch, const char **out,
             size_t *len)
{
    const char *type_path[] = {"type", NULL}, *text_path[] = {"text", NULL};

    if (YAJL_IS_STRING(content)) {
        *out = content->u.string;
        *len = strlen(content->u.string);
        return 0;
    }
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
    *out = scratch->len ? scratch->data : "";
    *len = scratch->len;
    return 0;
}

static int
role_of(const char *name, enum message_role *role)
{
    if (strcmp(name, "user") == 0)
        *role = MESSAGE_USER;
    else if (strcmp(name, "assistant") == 0)
        *role = MESSAGE_ASSISTANT;
    else if (strcmp(name, "system") == 0 || strcmp(name, "developer") == 0)
        *role = MESSAGE_SYSTEM;
    else if (strcmp(name, "tool") == 0)
        *role = MESSAGE_TOOL;
    else
        return -1;
    return 0;
}

static const char *
string_at(yajl_val v, const char *a, const char *b)
{
    const char *path[] = {a, b, NULL};
    yajl_val s = yajl_tree_get(v, path, yajl_t_string);

    return s ? s->u.string : NULL;
}

/* A function name as OpenAI allows it: 1-64 of a-z A-Z 0-9 _ -. */
int
v1_function_name_valid(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > NAME_MAX_LEN)
        return 0;
    return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                     "0123456789_-") == n;
}

/* One of an assistant message's tool_calls, written in OpenAI's shape
 * (whatever else the client put in it stays out). */
static int
gen_call(yajl_gen g, yajl_val call)
{
    const char *id = string_at(call, "id", NULL);
    const char *type = string_at(call, "type", NULL);
    const char *name = string_at(call, "function", "name");
    const char *arguments = string_at(call, "function", "arguments");

    if (id == NULL || strlen(id) > V1_CALL_ID_MAX || type == NULL ||
        strcmp(type, "function") != 0 || name == NULL ||
        !v1_function_name_valid(name) || arguments == NULL)
        return -1;
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "id", id) ||
           json_gen_key_cstr(g, "type", "function") ||
           json_gen_cstr(g, "function") || yajl_gen_map_open(g) ||
           json_gen_key_cstr(g, "name", name) ||
           json_gen_key_cstr(g, "arguments", arguments) ||
           yajl_gen_map_close(g) || yajl_gen_map_close(g);
}

/* An assistant message's tool_calls as a JSON array in g. */
static int
gen_calls(yajl_gen g, yajl_val calls)
{
    json_gen_restart(g);
    if (calls->u.array.len == 0 || calls->u.array.len > V1_MAX_CALLS ||
        yajl_gen_array_open(g))
        return -1;
    for (size_t i = 0; i < calls->u.array.len; i++)
        if (gen_call(g, calls->u.array.values[i]))
            return -1;
    return yajl_gen_array_close(g) ? -1 : 0;
}

/* The extra of a tool exchange (struct message): an assistant message's
 * tool calls, whose content may then be null, or a tool message's
 * tool_call_id. */
static int
add_message(struct messages *h, enum message_role role, yajl_val m,
            struct v1_scratch *s, char err[V1_ERR_LEN])
{
    const char *content_path[] = {"content", NULL};
    const char *calls_path[] = {"tool_calls", NULL};
    yajl_val content = yajl_tree_get(m, content_path, yajl_t_any);
    yajl_val calls = yajl_tree_get(m, calls_path, yajl_t_array);
    const char *text = "", *extra = "", *id = string_at(m, "tool_call_id",
                                                          NULL);
    size_t len = 0, extra_len = 0;

    if (role == MESSAGE_TOOL && (id == NULL || *id == '\0' ||
                                 strlen(id) > V1_CALL_ID_MAX))
        return refuse(err, "a tool message needs a tool_call_id of 1-256 "
                      "bytes");
    if (role == MESSAGE_TOOL) {
        extra = id;
        extra_len = strlen(id);
    }
    if (role == MESSAGE_ASSISTANT && calls != NULL) {
        if (gen_calls(s->gen, calls) == -1)
            return refuse(err, "an assistant message's tool_calls must be "
                          "1-128 {id, type function, function {name, "
                          "arguments}}");
        yajl_gen_get_buf(s->gen, (const unsigned char **)&extra, &extra_len);
    }
    if (!(extra_len > 0 && role == MESSAGE_ASSISTANT &&
          (content == NULL || YAJL_IS_NULL(content))) &&
        (content == NULL || content_text(content, s->scratch, &text, &len)))
        return refuse(err, "each message needs a text content: a string or "
                      "text parts");
    if (messages_add_extra(h, role, text, len,
                           role == MESSAGE_TOOL ? MESSAGE_CALL_ID
                                                : MESSAGE_CALLS,
                           extra, extra_len) == -1)
        return refuse(err, "the messages are too large");
    return 0;
}

/* messages[] into h. The document was checked by json_pick's strict mode
 * first (UTF-8, depth, duplicate keys), so yajl's tree parser only builds
 * it. */
static int
load_messages(yajl_val doc, struct v1_scratch *s, struct messages *h,
              char err[V1_ERR_LEN])
{
    const char *messages_path[] = {"messages", NULL};
    const char *role_path[] = {"role", NULL};
    yajl_val messages = yajl_tree_get(doc, messages_path, yajl_t_array);

    messages_reset(h);
    if (messages == NULL || messages->u.array.len == 0)
        return refuse(err, "'messages' must be a non-empty array");
    for (size_t i = 0; i < messages->u.array.len; i++) {
        yajl_val m = messages->u.array.values[i];
        yajl_val role = yajl_tree_get(m, role_path, yajl_t_string);
        enum message_role r;

        if (role == NULL || role_of(role->u.string, &r) == -1)
            return refuse(err, "each message needs a role of system, "
                          "developer, user, assistant or tool");
        if (add_message(h, r, m, s, err) == -1)
            return -1;
    }
    return 0;
}

/* ---- the options passed through to the model, each checked */

static const char *
check_tools(yajl_val v)
{
    if (!YAJL_IS_ARRAY(v) || v->u.array.len > V1_MAX_TOOLS)
        return "'tools' must be an array of at most 128 tools";
    for (size_t i = 0; i < v->u.array.len; i++) {
        const char *type = string_at(v->u.array.values[i], "type", NULL);
        const char *name = string_at(v->u.array.values[i], "function",
                                     "name");

        if (type == NULL || strcmp(type, "function") != 0 || name == NULL ||
            !v1_function_name_valid(name))
            return "each tool must be {type function, function {name of "
                   "1-64 a-z A-Z 0-9 _ -}}";
    }
    return NULL;
}

static const char *
check_tool_choice(yajl_val v)
{
    static const char *const modes[] = {"none", "auto", "required"};

    for (size_t i = 0; YAJL_IS_STRING(v) && i < 3; i++)
        if (strcmp(v->u.string, modes[i]) == 0)
            return NULL;
    return YAJL_IS_OBJECT(v) ? NULL
                             : "'tool_choice' must be none, auto, required "
                               "or an object";
}

static const char *
check_bool(yajl_val v)
{
    return YAJL_IS_TRUE(v) || YAJL_IS_FALSE(v)
               ? NULL
               : "'parallel_tool_calls' must be a boolean";
}

static const char *
check_response_format(yajl_val v)
{
    return YAJL_IS_OBJECT(v) && string_at(v, "type", NULL)
               ? NULL
               : "'response_format' must be an object with a type";
}

static const char *
check_stop(yajl_val v)
{
    if (YAJL_IS_STRING(v))
        return NULL;
    if (YAJL_IS_ARRAY(v) && v->u.array.len <= V1_MAX_STOP) {
        size_t i = 0;

        while (i < v->u.array.len && YAJL_IS_STRING(v->u.array.values[i]))
            i++;
        if (i == v->u.array.len)
            return NULL;
    }
    return "'stop' must be a string or an array of at most 4 strings";
}

static const char *
check_seed(yajl_val v)
{
    return YAJL_IS_INTEGER(v) ? NULL : "'seed' must be an integer";
}

static const char *
check_top_p(yajl_val v)
{
    return YAJL_IS_NUMBER(v) && YAJL_GET_DOUBLE(v) >= 0 &&
                   YAJL_GET_DOUBLE(v) <= 1
               ? NULL
               : "'top_p' must be a number from 0 to 1";
}

static const char *
check_penalty(yajl_val v)
{
    return YAJL_IS_NUMBER(v) && YAJL_GET_DOUBLE(v) >= -2 &&
                   YAJL_GET_DOUBLE(v) <= 2
               ? NULL
               : "the penalties must be numbers from -2 to 2";
}

static const char *
check_user(yajl_val v)
{
    return YAJL_IS_STRING(v) && strlen(v->u.string) <= V1_USER_MAX
               ? NULL
               : "'user' must be a string of at most 256 bytes";
}

static const struct {
    const char *name;
    const char *(*check)(yajl_val v); /* NULL, or why v is refused */
} passed_options[] = {
    {"tools", check_tools},
    {"tool_choice", check_tool_choice},
    {"parallel_tool_calls", check_bool},
    {"response_format", check_response_format},
    {"stop", check_stop},
    {"seed", check_seed},
    {"top_p", check_top_p},
    {"presence_penalty", check_penalty},
    {"frequency_penalty", check_penalty},
    {"user", check_user},
};

/* Some clients send "tools": [] for none, which providers refuse. */
static int
is_empty_array(yajl_val v)
{
    return YAJL_IS_ARRAY(v) && v->u.array.len == 0;
}

/* The options to pass through, checked, as one JSON object in
 * s->options (a null option, or an empty array, is left out, as if not
 * given). */
static int
load_passed_options(yajl_val doc, struct v1_scratch *s,
                    struct v1_request *q, char err[V1_ERR_LEN])
{
    yajl_gen g = s->gen;
    const unsigned char *json;
    size_t len;

    json_gen_restart(g);
    if (yajl_gen_map_open(g))
        return refuse(err, "out of memory");
    for (size_t i = 0; i < sizeof(passed_options) / sizeof(*passed_options);
         i++) {
        const char *path[] = {passed_options[i].name, NULL};
        yajl_val v = yajl_tree_get(doc, path, yajl_t_any);
        const char *why = v && !YAJL_IS_NULL(v) ? passed_options[i].check(v)
                                                : NULL;

        if (why != NULL)
            return refuse(err, why);
        if (v != NULL && !YAJL_IS_NULL(v) && !is_empty_array(v) &&
            (json_gen_cstr(g, path[0]) || json_gen_value(g, v, GEN_DEPTH)))
            return refuse(err, "an option cannot be encoded");
    }
    yajl_gen_map_close(g);
    yajl_gen_get_buf(g, &json, &len);
    buf_reset(s->options);
    if (buf_append(s->options, json, len) == -1 ||
        buf_cstr(s->options) == NULL)
        return refuse(err, "the options are too large");
    q->options = s->options->data;
    return 0;
}

/* A temperature within OpenAI's 0 to 2 (1e400 reads as infinite). One
 * outside would be refused by the provider, counting the request's own
 * fault against it, or, being negative, silently not sent. */
static int
parse_temperature(const char *text, double *out)
{
    double t = strtod(text, NULL);

    if (!(t >= 0 && t <= 2))
        return -1;
    *out = t;
    return 0;
}

/* The scalar options, picked in one strict pass. */
static int
parse_options(const struct buf *body, struct buf *arena,
              struct v1_request *q, char err[V1_ERR_LEN])
{
    enum { STREAM, USAGE, TEMPERATURE, MAX_TOKENS, MAX_COMPLETION, MODEL };
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
        [MODEL] = {.path = "model", .accept = JSON_STRING | JSON_NULL},
    };

    buf_reset(arena);
    if (json_pick(body->data, body->len, f, 6, arena, REQUEST_DEPTH,
                  JSON_STRICT, err) == -1)
        return -1;
    q->model = f[MODEL].type == JSON_STRING
                   ? json_field_text(&f[MODEL], arena)
                   : NULL;
    q->model_len = f[MODEL].len;
    q->stream = f[STREAM].type == JSON_BOOL && f[STREAM].boolean;
    q->include_usage = f[USAGE].type == JSON_BOOL && f[USAGE].boolean;
    if (f[TEMPERATURE].type == JSON_NUMBER &&
        parse_temperature(json_field_text(&f[TEMPERATURE], arena),
                          &q->temperature) == -1)
        return refuse(err, "temperature must be a number from 0 to 2");
    for (int i = MAX_TOKENS; i <= MAX_COMPLETION; i++)
        if (f[i].type == JSON_NUMBER &&
            json_field_int(&f[i], arena, 1, 1LL << 30, &q->max_tokens))
            return refuse(err, "max_tokens must be a positive integer");
    return 0;
}

/* A \u0000 escape in the body: a NUL in some string. yajl's tree keeps
 * strings as C strings, so a NUL would silently cut a message (or a role)
 * short; /api/chat refuses a NUL in its message too. The body passed the
 * strict parse, so every backslash begins an escape of its own. */
static int
has_nul(const struct buf *body)
{
    for (size_t i = 0; i + 1 < body->len; i++) {
        if (body->data[i] != '\\')
            continue;
        if (body->len - i >= 6 && memcmp(body->data + i, "\\u0000", 6) == 0)
            return 1;
        i++; /* past the escaped character, which may be a backslash */
    }
    return 0;
}

int
v1_parse_request(struct buf *body, struct v1_scratch *s, struct messages *h,
                 struct v1_request *q, char err[V1_ERR_LEN])
{
    const char *text;
    yajl_val doc;
    int rc;

    if (parse_options(body, s->arena, q, err) == -1)
        return -1;
    if (has_nul(body))
        return refuse(err, "a string of the body contains NUL (\\u0000)");
    text = buf_cstr(body);
    doc = text ? yajl_tree_parse(text, NULL, 0) : NULL;
    if (doc == NULL)
        return refuse(err, "the body cannot be parsed");
    rc = load_messages(doc, s, h, err);
    if (rc == 0)
        rc = load_passed_options(doc, s, q, err);
    yajl_tree_free(doc);
    return rc;
}

static int
gen_openai_usage(yajl_gen g, const struct answer *a)
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
gen_head(yajl_gen g, const struct v1_completion *c, const char *object)
{
    json_gen_restart(g);
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "id", c->id) ||
           json_gen_key_cstr(g, "object", object) ||
           json_gen_key_int(g, "created", c->created) ||
           json_gen_key_cstr(g, "model", c->model) ||
           json_gen_cstr(g, "choices") || yajl_gen_array_open(g);
}

/* {"index":0,"delta":{[role], ... : a chunk up to its delta's fields. */
static int
gen_chunk_head(yajl_gen g, struct v1_completion *c)
{
    int first = !c->sent_role;

    c->sent_role = 1;
    return gen_head(g, c, "chat.completion.chunk") || yajl_gen_map_open(g) ||
           json_gen_key_int(g, "index", 0) || json_gen_cstr(g, "delta") ||
           yajl_gen_map_open(g) ||
           (first && json_gen_key_cstr(g, "role", "assistant"));
}

/* ...}, "finish_reason": finish or null}]} */
static int
gen_chunk_tail(yajl_gen g, const char *finish)
{
    return yajl_gen_map_close(g) || json_gen_cstr(g, "finish_reason") ||
           (finish ? json_gen_cstr(g, finish) != 0
                   : yajl_gen_null(g) != yajl_gen_status_ok) ||
           yajl_gen_map_close(g) || yajl_gen_array_close(g) ||
           yajl_gen_map_close(g);
}

int
v1_gen_chunk(yajl_gen g, struct v1_completion *c, const char *text,
             size_t len)
{
    return gen_chunk_head(g, c) || json_gen_key_str(g, "content", text, len) ||
           gen_chunk_tail(g, NULL);
}

/* A tool call, or a fragment of one: {[index,] [id, type,] function:
 * {[name,] arguments}}. */
static int
gen_tool_call(yajl_gen g, const struct answer_piece *p)
{
    return yajl_gen_map_open(g) ||
           (p->index >= 0 && json_gen_key_int(g, "index", p->index)) ||
           (p->id && (json_gen_key_cstr(g, "id", p->id) ||
                      json_gen_key_cstr(g, "type", "function"))) ||
           json_gen_cstr(g, "function") || yajl_gen_map_open(g) ||
           (p->name && json_gen_key_cstr(g, "name", p->name)) ||
           json_gen_key_str(g, "arguments", p->arguments ? p->arguments : "",
                            p->arguments_len) ||
           yajl_gen_map_close(g) || yajl_gen_map_close(g);
}

int
v1_gen_call_chunk(yajl_gen g, struct v1_completion *c,
                  const struct answer_piece *p)
{
    return gen_chunk_head(g, c) || json_gen_cstr(g, "tool_calls") ||
           yajl_gen_array_open(g) || gen_tool_call(g, p) ||
           yajl_gen_array_close(g) || gen_chunk_tail(g, NULL);
}

const char *
v1_finish_reason(const struct answer *a)
{
    if (a->finish_reason[0] != '\0')
        return a->finish_reason;
    return a->ncalls > 0 ? "tool_calls" : "stop";
}

int
v1_gen_finish_chunk(yajl_gen g, struct v1_completion *c,
                    const struct answer *a)
{
    return gen_chunk_head(g, c) || gen_chunk_tail(g, v1_finish_reason(a));
}

int
v1_gen_usage_chunk(yajl_gen g, const struct v1_completion *c,
                   const struct answer *a)
{
    return gen_head(g, c, "chat.completion.chunk") ||
           yajl_gen_array_close(g) || gen_openai_usage(g, a) ||
           yajl_gen_map_close(g);
}

/* message: {role, content (null for tool calls alone), [tool_calls]} */
static int
gen_answer_message(yajl_gen g, const struct answer *a)
{
    if (yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", "assistant") ||
        json_gen_cstr(g, "content") ||
        (a->reply.len == 0 && a->ncalls > 0
             ? yajl_gen_null(g) != yajl_gen_status_ok
             : json_gen_str(g, a->reply.data, a->reply.len) != 0))
        return -1;
    if (a->ncalls > 0 &&
        (json_gen_cstr(g, "tool_calls") || yajl_gen_array_open(g)))
        return -1;
    for (size_t i = 0; i < a->ncalls; i++) {
        const struct answer_call *call = &a->calls[i];
        struct answer_piece p = {.index = -1, .id = call->id,
                                 .name = call->name,
                                 .arguments = call->arguments.data,
                                 .arguments_len = call->arguments.len};

        if (gen_tool_call(g, &p))
            return -1;
    }
    if (a->ncalls > 0 && yajl_gen_array_close(g))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}

int
v1_gen_completion(yajl_gen g, const struct v1_completion *c,
                  const struct answer *a)
{
    return gen_head(g, c, "chat.completion") || yajl_gen_map_open(g) ||
           json_gen_key_int(g, "index", 0) || json_gen_cstr(g, "message") ||
           gen_answer_message(g, a) ||
           json_gen_key_cstr(g, "finish_reason", v1_finish_reason(a)) ||
           yajl_gen_map_close(g) || yajl_gen_array_close(g) ||
           gen_openai_usage(g, a) || yajl_gen_map_close(g);
}

static int
gen_model(yajl_gen g, const char *id, size_t len)
{
    return yajl_gen_map_open(g) || json_gen_key_str(g, "id", id, len) ||
           json_gen_key_cstr(g, "object", "model") ||
           json_gen_key_int(g, "created", 0) ||
           json_gen_key_cstr(g, "owned_by", "chatfcgi") ||
           yajl_gen_map_close(g);
}

int
v1_gen_models(yajl_gen g, const char *models)
{
    const char *id;
    size_t len;

    json_gen_restart(g);
    if (yajl_gen_map_open(g) || json_gen_key_cstr(g, "object", "list") ||
        json_gen_cstr(g, "data") || yajl_gen_array_open(g))
        return -1;
    while ((id = conf_list_next(&models, &len)) != NULL)
        if (gen_model(g, id, len))
            return -1;
    return yajl_gen_array_close(g) || yajl_gen_map_close(g);
}

/* OpenAI's error type for a status. */
static const char *
error_type(int status)
{
    if (status == 401)
        return "authentication_error";
    if (status == 429)
        return "rate_limit_error";
    return status >= 500 ? "api_error" : "invalid_request_error";
}

static int
gen_openai_error(yajl_gen g, int status, const char *code,
                 const char *message)
{
    return yajl_gen_map_open(g) || json_gen_cstr(g, "error") ||
           yajl_gen_map_open(g) || json_gen_key_cstr(g, "message", message) ||
           json_gen_key_cstr(g, "type", error_type(status)) ||
           json_gen_cstr(g, "param") || yajl_gen_null(g) ||
           json_gen_key_cstr(g, "code", code) || yajl_gen_map_close(g) ||
           yajl_gen_map_close(g);
}

const struct http_error_style v1_errors = {.gen = gen_openai_error,
                                          .event = NULL};
