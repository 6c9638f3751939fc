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

static int
refuse(char err[V1_ERR_LEN], const char *why)
{
    snprintf(err, V1_ERR_LEN, "%s", why);
    return -1;
}

/* Message content: a string, or an array of {"type":"text","text"} parts,
 * joined in scratch. */
static int
add_content(struct messages *h, enum message_role role, yajl_val content,
            struct buf *scratch)
{
    const char *type_path[] = {"type", NULL}, *text_path[] = {"text", NULL};

    if (YAJL_IS_STRING(content))
        return messages_add(h, role, content->u.string,
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
    return messages_add(h, role, scratch->len ? scratch->data : "",
                        scratch->len);
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
    else
        return -1;
    return 0;
}

/* messages[] into h. The document was checked by json_pick's strict mode
 * first (UTF-8, depth, duplicate keys), so yajl's tree parser only builds
 * it. */
static int
load_messages(yajl_val doc, struct buf *scratch, struct messages *h,
              char err[V1_ERR_LEN])
{
    const char *messages_path[] = {"messages", NULL};
    const char *role_path[] = {"role", NULL};
    const char *content_path[] = {"content", NULL};
    yajl_val messages = yajl_tree_get(doc, messages_path, yajl_t_array);

    messages_reset(h);
    if (messages == NULL || messages->u.array.len == 0)
        return refuse(err, "'messages' must be a non-empty array");
    for (size_t i = 0; i < messages->u.array.len; i++) {
        yajl_val m = messages->u.array.values[i];
        yajl_val role = yajl_tree_get(m, role_path, yajl_t_string);
        yajl_val content = yajl_tree_get(m, content_path, yajl_t_any);
        enum message_role r;

        if (role == NULL || role_of(role->u.string, &r) == -1)
            return refuse(err, "each message needs a role of system, "
                          "developer, user or assistant");
        if (content == NULL || add_content(h, r, content, scratch) == -1)
            return refuse(err, "each message needs a text content: a "
                          "string or text parts");
    }
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
v1_parse_request(struct buf *body, struct buf *arena, struct buf *scratch,
                 struct messages *h, struct v1_request *q,
                 char err[V1_ERR_LEN])
{
    const char *text;
    yajl_val doc;
    int rc;

    if (parse_options(body, arena, q, err) == -1)
        return -1;
    if (has_nul(body))
        return refuse(err, "a string of the body contains NUL (\\u0000)");
    text = buf_cstr(body);
    doc = text ? yajl_tree_parse(text, NULL, 0) : NULL;
    if (doc == NULL)
        return refuse(err, "the body cannot be parsed");
    rc = load_messages(doc, scratch, h, err);
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

int
v1_gen_chunk(yajl_gen g, struct v1_completion *c, const char *text,
             size_t len)
{
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

int
v1_gen_usage_chunk(yajl_gen g, const struct v1_completion *c,
                   const struct answer *a)
{
    return gen_head(g, c, "chat.completion.chunk") ||
           yajl_gen_array_close(g) || gen_openai_usage(g, a) ||
           yajl_gen_map_close(g);
}

int
v1_gen_completion(yajl_gen g, const struct v1_completion *c,
                  const struct answer *a)
{
    return gen_head(g, c, "chat.completion") || yajl_gen_map_open(g) ||
           json_gen_key_int(g, "index", 0) || json_gen_cstr(g, "message") ||
           yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", "assistant") ||
           json_gen_key_str(g, "content", a->reply.data, a->reply.len) ||
           yajl_gen_map_close(g) ||
           json_gen_key_cstr(g, "finish_reason", "stop") ||
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
