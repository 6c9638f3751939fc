/* exchange: one request to a model provider, read and judged. */
#include "exchange.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yajl/yajl_tree.h>

#include "clock.h"
#include "json.h"
#include "tls.h"

#define ANSWER_DEPTH 32
#define HEADER_LEN 160
#define SSE_LINE_MAX (256 * 1024)

static int on_event(void *arg, const char *data, size_t len);

int
exchange_init(struct exchange *a, size_t max_reply)
{
    memset(a, 0, sizeof(*a));
    a->easy = curl_easy_init();
    buf_init(&a->body, 16u << 20);
    buf_init(&a->response, max_reply);
    buf_init(&a->arena, SSE_LINE_MAX);
    buf_init(&a->event, SSE_LINE_MAX);
    sse_init(&a->sse, SSE_LINE_MAX, SSE_LINE_MAX, on_event, a);
    answer_init(&a->ans, max_reply);
    return a->easy ? 0 : -1;
}

void
exchange_cleanup(struct exchange *a)
{
    if (a->easy != NULL)
        curl_easy_cleanup(a->easy);
    curl_slist_free_all(a->headers);
    buf_cleanup(&a->body);
    buf_cleanup(&a->response);
    buf_cleanup(&a->arena);
    buf_cleanup(&a->event);
    sse_cleanup(&a->sse);
    answer_cleanup(&a->ans);
}

/* Record why a stream broke; the transfer is then cancelled. */
static int
stream_fail(struct exchange *a, enum answer_status status, const char *why)
{
    a->stream_failed = 1;
    a->ans.status = status;
    snprintf(a->ans.message, sizeof(a->ans.message), "%s", why);
    return -1;
}

static void
pick_usage(const struct json_field *prompt, const struct json_field *done,
           const struct buf *arena, struct answer *ans)
{
    if (json_field_int(prompt, arena, 0, 1LL << 40, &ans->prompt_tokens))
        ans->prompt_tokens = -1;
    if (json_field_int(done, arena, 0, 1LL << 40, &ans->completion_tokens))
        ans->completion_tokens = -1;
}

/* The model the upstream reports, when it is a sane string; otherwise the
 * configured one stays. */
static void
pick_model(const struct json_field *f, const struct buf *arena,
           struct answer *ans)
{
    char name[ANSWER_MODEL_LEN];

    if (f->type == JSON_STRING && f->len > 0 &&
        memchr(json_field_text(f, arena), '\0', f->len) == NULL &&
        json_utf8_copy(name, sizeof(name), json_field_text(f, arena),
                       f->len) == 0)
        memcpy(ans->model, name, sizeof(name));
}

/* A string member of a tool call, or NULL. */
static const char *
call_string(yajl_val call, const char *a, const char *b)
{
    const char *path[] = {a, b, NULL};
    yajl_val v = yajl_tree_get(call, path, yajl_t_string);

    return v ? v->u.string : NULL;
}

/* The tool_calls array of a message or a delta into ans; each element's
 * fragment also into out[], for the caller to relay. An element without
 * an index is the one at its position. Returns 0, or -1 with
 * ans->message set. */
static int
add_tool_calls(struct answer *ans, yajl_val calls, struct answer_piece *out,
               size_t *nout)
{
    const char *index_path[] = {"index", NULL};

    *nout = 0;
    if (calls->u.array.len > ANSWER_MAX_CALLS) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model asked for over %d tool calls", ANSWER_MAX_CALLS);
        return -1;
    }
    for (size_t i = 0; i < calls->u.array.len; i++) {
        yajl_val c = calls->u.array.values[i];
        yajl_val index = yajl_tree_get(c, index_path, yajl_t_number);
        struct answer_piece *p = &out[(*nout)++];

        p->index = index && YAJL_IS_INTEGER(index) ? YAJL_GET_INTEGER(index)
                                                   : (long long)i;
        p->id = call_string(c, "id", NULL);
        p->name = call_string(c, "function", "name");
        p->arguments = call_string(c, "function", "arguments");
        p->arguments_len = p->arguments ? strlen(p->arguments) : 0;
        if (answer_add_piece(ans, p) == -1)
            return -1;
    }
    return 0;
}

/* choices[0].{where}.tool_calls of a document (yajl_tree_get walks
 * objects only), or NULL. */
static yajl_val
first_choice_calls(yajl_val doc, const char *where)
{
    const char *choices_path[] = {"choices", NULL};
    const char *calls_path[] = {where, "tool_calls", NULL};
    yajl_val choices = yajl_tree_get(doc, choices_path, yajl_t_array);

    if (choices == NULL || choices->u.array.len == 0)
        return NULL;
    return yajl_tree_get(choices->u.array.values[0], calls_path,
                         yajl_t_array);
}

/* The tool calls of a document that has some in its first choice's
 * message or delta (where), from its NUL-terminated text. Returns the
 * parsed document, which the pieces in out point into (the caller frees
 * it), or NULL with ans->message set. */
static yajl_val
parse_tool_calls(const char *text, const char *where, struct answer *ans,
                 struct answer_piece *out, size_t *nout)
{
    yajl_val doc = yajl_tree_parse(text, NULL, 0);
    yajl_val calls = doc ? first_choice_calls(doc, where) : NULL;

    if (calls == NULL)
        snprintf(ans->message, sizeof(ans->message),
                 "the model's tool calls cannot be read");
    if (calls == NULL || add_tool_calls(ans, calls, out, nout) == -1) {
        yajl_tree_free(doc);
        return NULL;
    }
    return doc;
}

/* A whole answer's tool calls: its body again, as a tree. */
static int
parse_answer_calls(const char *body, size_t len, struct answer *ans)
{
    struct answer_piece pieces[ANSWER_MAX_CALLS];
    struct buf text;
    yajl_val doc = NULL;
    size_t n;

    buf_init(&text, len + 1);
    if (buf_append(&text, body, len) == 0 && buf_cstr(&text) != NULL)
        doc = parse_tool_calls(text.data, "message", ans, pieces, &n);
    else
        snprintf(ans->message, sizeof(ans->message), "out of memory");
    buf_cleanup(&text);
    yajl_tree_free(doc);
    return doc ? 0 : -1;
}

int
exchange_parse_answer(const char *body, size_t len, struct answer *ans)
{
    enum { CONTENT, CALLS, FINISH, MODEL, PROMPT, COMPLETION };
    struct json_field f[] = {
        [CONTENT] = {.path = "choices.0.message.content",
                     .accept = JSON_STRING | JSON_NULL},
        [CALLS] = {.path = "choices.0.message.tool_calls",
                   .accept = JSON_ANY},
        [FINISH] = {.path = "choices.0.finish_reason", .accept = JSON_ANY},
        [MODEL] = {.path = "model", .accept = JSON_ANY},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens",
                        .accept = JSON_ANY},
    };
    char err[JSON_ERR_LEN];
    struct buf arena;
    int rc = -1, has_calls;

    buf_init(&arena, len + 8);
    if (json_pick(body, len, f, 6, &arena, ANSWER_DEPTH, 0, err) == -1) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's answer is not JSON: %s", err);
        goto out;
    }
    has_calls = f[CALLS].type == JSON_ARRAY;
    if (f[CONTENT].type != JSON_STRING && !has_calls) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's answer has no choices[0].message.content");
    } else if (f[CONTENT].type == JSON_STRING &&
               !json_utf8_valid(json_field_text(&f[CONTENT], &arena),
                                f[CONTENT].len)) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's reply is not valid UTF-8");
    } else if (f[CONTENT].type == JSON_STRING &&
               buf_append(&ans->reply, json_field_text(&f[CONTENT], &arena),
                          f[CONTENT].len) == -1) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's reply is too long");
    } else if (has_calls && parse_answer_calls(body, len, ans) == -1) {
        /* ans->message says why */
    } else if (f[CONTENT].type != JSON_STRING && ans->ncalls == 0) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's answer has neither content nor tool calls");
    } else {
        if (f[FINISH].type == JSON_STRING)
            answer_set_finish(ans, json_field_text(&f[FINISH], &arena),
                              f[FINISH].len);
        pick_model(&f[MODEL], &arena, ans);
        pick_usage(&f[PROMPT], &f[COMPLETION], &arena, ans);
        rc = 0;
    }
out:
    /* A failed answer keeps no part: the content may have been taken
     * before its tool calls failed. */
    if (rc == -1)
        answer_reset(ans);
    buf_cleanup(&arena);
    return rc;
}

int
exchange_error_message(const char *body, size_t len, char *out, size_t size)
{
    /* In order of preference: OpenAI/vLLM/llama.cpp, Ollama, others. */
    struct json_field f[] = {
        {.path = "error.message", .accept = JSON_ANY},
        {.path = "error", .accept = JSON_ANY},
        {.path = "message", .accept = JSON_ANY},
        {.path = "detail", .accept = JSON_ANY},
    };
    char err[JSON_ERR_LEN];
    struct buf arena;
    int rc = -1;

    buf_init(&arena, len + 8);
    if (len > 0 &&
        json_pick(body, len, f, 4, &arena, ANSWER_DEPTH, 0, err) == 0) {
        for (size_t i = 0; i < 4 && rc == -1; i++)
            if (f[i].type == JSON_STRING && f[i].len > 0 &&
                json_utf8_copy(out, size, json_field_text(&f[i], &arena),
                               f[i].len) == 0 &&
                out[0] != '\0')
                rc = 0;
    }
    buf_cleanup(&arena);
    return rc;
}

/* An error object in a 2xx stream: an HTTP error of the stream's status
 * (not 0: the provider did answer), which the plan retries as a 5xx. */
static int
error_mid_stream(struct exchange *a, const char *data, size_t len)
{
    char why[ANSWER_MESSAGE_LEN - 48], message[ANSWER_MESSAGE_LEN];

    if (exchange_error_message(data, len, why, sizeof(why)) == -1)
        snprintf(why, sizeof(why), "no message");
    /* why is short enough that no character is cut here */
    snprintf(message, sizeof(message), "the model reported an error "
             "mid-stream: %s", why);
    return stream_fail(a, ANSWER_HTTP_ERROR, message);
}

/* The tool-call fragments of a stream event into a->pieces, which point
 * into the returned tree until the caller frees it; NULL when the event
 * broke the stream. */
static yajl_val
stream_tool_calls(struct exchange *a, const char *data, size_t len)
{
    yajl_val doc;

    buf_reset(&a->event);
    if (buf_append(&a->event, data, len) == -1 ||
        buf_cstr(&a->event) == NULL) {
        stream_fail(a, ANSWER_BAD, "the model's stream event is too large");
        return NULL;
    }
    doc = parse_tool_calls(a->event.data, "delta", &a->ans, a->pieces,
                           &a->npieces);
    if (doc == NULL) {
        a->stream_failed = 1; /* ans.message says why */
        a->ans.status = ANSWER_BAD;
    }
    return doc;
}

/* Text and tool-call fragments of one event, to the caller. */
static int
event_content(struct exchange *a, const struct json_field *content)
{
    if (content->type == JSON_STRING && content->len > 0 &&
        buf_append(&a->ans.reply, json_field_text(content, &a->arena),
                   content->len) == -1)
        return stream_fail(a, ANSWER_BAD, "the model's reply is larger "
                           "than max_response_bytes");
    if (a->npieces == 0 && (content->type != JSON_STRING || content->len == 0))
        return 0;
    a->got_content = 1;
    if (a->on_content(a, a->arg) == 0)
        return 0;
    a->stopped = !a->stream_failed;
    return -1;
}

/* One event of an upstream stream: a chunk, [DONE], or an error object. */
static int
on_event(void *arg, const char *data, size_t len)
{
    enum { CONTENT, CALLS, FINISH, MODEL, PROMPT, COMPLETION, ERROR };
    struct json_field f[] = {
        [CONTENT] = {.path = "choices.0.delta.content", .accept = JSON_ANY},
        [CALLS] = {.path = "choices.0.delta.tool_calls", .accept = JSON_ANY},
        [FINISH] = {.path = "choices.0.finish_reason", .accept = JSON_ANY},
        [MODEL] = {.path = "model", .accept = JSON_ANY},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens",
                        .accept = JSON_ANY},
        [ERROR] = {.path = "error", .accept = JSON_ANY},
    };
    struct exchange *a = arg;
    char err[JSON_ERR_LEN];
    yajl_val calls = NULL;
    int rc;

    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        a->stream_complete = 1;
        return 0;
    }
    buf_reset(&a->arena);
    a->npieces = 0;
    if (json_pick(data, len, f, 7, &a->arena, ANSWER_DEPTH, 0, err))
        return stream_fail(a, ANSWER_BAD, "the model's stream carries "
                           "an event that is not JSON");
    if (f[ERROR].type != 0 && f[ERROR].type != JSON_NULL)
        return error_mid_stream(a, data, len);
    pick_model(&f[MODEL], &a->arena, &a->ans);
    if (f[PROMPT].type == JSON_NUMBER || f[COMPLETION].type == JSON_NUMBER)
        pick_usage(&f[PROMPT], &f[COMPLETION], &a->arena, &a->ans);
    if (f[FINISH].type == JSON_STRING) {
        a->stream_complete = 1;
        answer_set_finish(&a->ans, json_field_text(&f[FINISH], &a->arena),
                          f[FINISH].len);
    }
    if (f[CALLS].type == JSON_ARRAY) {
        calls = stream_tool_calls(a, data, len);
        if (calls == NULL)
            return -1;
    }
    rc = event_content(a, &f[CONTENT]);
    yajl_tree_free(calls);
    return rc;
}

/* Decide, at the first bytes of the body, whether it is an event stream
 * (a 2xx text/event-stream to a streaming call) or a whole body (a plain
 * answer, or an error, read whole and parsed at the end). */
static void
choose_body_mode(struct exchange *a)
{
    const char *type = NULL;
    long status = 0;

    curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(a->easy, CURLINFO_CONTENT_TYPE, &type);
    a->streaming = a->want_stream && status >= 200 && status < 300 &&
                   type != NULL &&
                   strncasecmp(type, "text/event-stream", 17) == 0;
    a->ans.http_status = status; /* what a failure mid-stream reports */
}

/* Events as they come. A parse that stops was stopped by on_event (which
 * judged the stream), by on_content (the caller's doing), or else by a
 * line or event over SSE_LINE_MAX: a bad answer, not a broken transfer
 * worth another try. */
static size_t
feed_stream(struct exchange *a, const char *data, size_t n)
{
    if (sse_feed(&a->sse, data, n) == 0)
        return n;
    if (!a->stream_failed && !a->stopped)
        stream_fail(a, ANSWER_BAD, "the model's stream has a line or an "
                    "event over 256 KiB");
    return 0;
}

static size_t
on_body(char *data, size_t size, size_t n, void *arg)
{
    struct exchange *a = arg;

    a->last_bytes_ms = clock_ms();
    if (!a->got_bytes) {
        a->got_bytes = 1;
        choose_body_mode(a);
    }
    if (a->streaming)
        return feed_stream(a, data, size * n);
    if (buf_append(&a->response, data, size * n) == -1) {
        a->response_too_large = 1;
        return 0; /* makes curl stop with CURLE_WRITE_ERROR */
    }
    return size * n;
}

struct curl_slist *
exchange_headers(const char *auth_header, const char *request_id)
{
    char id_header[HEADER_LEN];
    struct curl_slist *h = NULL, *next;
    const char *lines[] = {
        "Content-Type: application/json",
        "Expect:", /* no 100-continue round trip for bodies over 1 KiB */
        id_header,
        auth_header,
    };

    snprintf(id_header, sizeof(id_header), "X-Request-Id: %s", request_id);
    for (size_t i = 0; i < sizeof(lines) / sizeof(*lines); i++) {
        if (lines[i] == NULL)
            continue;
        next = curl_slist_append(h, lines[i]);
        if (next == NULL) {
            curl_slist_free_all(h);
            return NULL;
        }
        h = next;
    }
    return h;
}

void
exchange_post_options(CURL *e, const struct exchange_post *p)
{
    curl_easy_reset(e);
    curl_easy_setopt(e, CURLOPT_URL, p->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, p->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)p->body_len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, p->headers);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "chatfcgi/1");
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, p->on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, p->arg);
    curl_easy_setopt(e, CURLOPT_PRIVATE, p->arg);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, p->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, p->timeout_ms);
    tls_use(e, p->tls);
}

static void
set_options(struct exchange *a, const struct exchange_spec *spec)
{
    struct exchange_post post = {
        .url = spec->url,
        .body = a->body.data,
        .body_len = a->body.len,
        .headers = a->headers,
        .on_body = on_body,
        .arg = a,
        .errbuf = a->errbuf,
        .timeout_ms = spec->timeout_ms,
        .tls = &a->tls,
    };

    a->tls.peer = a->provider;

    exchange_post_options(a->easy, &post);
    curl_easy_setopt(a->easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(a->easy, CURLOPT_CONNECTTIMEOUT_MS,
                     spec->connect_timeout_ms);
}

/* Ready for a new request: nothing of the last one is left. */
static void
exchange_reset(struct exchange *a, const char *model)
{
    struct answer *ans = &a->ans;

    ans->status = ANSWER_FAILED;
    ans->http_status = 0;
    answer_reset(ans);
    snprintf(ans->model, sizeof(ans->model), "%s", model);
    ans->prompt_tokens = ans->completion_tokens = -1;
    ans->message[0] = '\0';
    buf_reset(&a->response);
    sse_reset(&a->sse);
    curl_slist_free_all(a->headers);
    a->headers = NULL;
    a->response_too_large = a->stream_complete = a->stream_failed = 0;
    a->connect_timeout = 0;
    a->stopped = 0;
    a->got_bytes = a->got_content = a->streaming = a->hedge = 0;
    a->errbuf[0] = '\0';
    a->started_ms = a->last_bytes_ms = clock_ms();
}

int
exchange_start(struct exchange *a, CURLM *multi,
              const struct exchange_spec *spec, const char *model)
{
    exchange_reset(a, model);
    a->want_stream = spec->stream;
    buf_reset(&a->body);
    a->headers = exchange_headers(spec->auth_header, spec->request_id);
    if (a->headers == NULL ||
        buf_append(&a->body, spec->body, spec->body_len) == -1) {
        snprintf(a->ans.message, sizeof(a->ans.message),
                 "cannot build the upstream request");
        return -1;
    }
    set_options(a, spec);
    if (curl_multi_add_handle(multi, a->easy) != CURLM_OK) {
        snprintf(a->ans.message, sizeof(a->ans.message),
                 "cannot start the upstream request");
        return -1;
    }
    a->active = 1;
    return 0;
}

void
exchange_stop(struct exchange *a, CURLM *multi)
{
    if (!a->active)
        return;
    curl_multi_remove_handle(multi, a->easy);
    a->active = 0;
}

void
exchange_fail(struct exchange *a, CURLM *multi, enum answer_status status,
             const char *why)
{
    exchange_stop(a, multi);
    a->ans.status = status;
    snprintf(a->ans.message, sizeof(a->ans.message), "%s", why);
}

/* Whether the transfer ended before its request went out: curl dates
 * the moment it is about to send (pretransfer) once connected. */
static int
sent_nothing(CURL *e)
{
    curl_off_t pretransfer_us = 0;

    return curl_easy_getinfo(e, CURLINFO_PRETRANSFER_TIME_T,
                             &pretransfer_us) == CURLE_OK &&
           pretransfer_us == 0;
}

static void
judge_curl_error(struct exchange *a, CURLcode rc)
{
    const char *why = a->errbuf[0] ? a->errbuf : curl_easy_strerror(rc);
    struct answer *ans = &a->ans;

    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        ans->status = ANSWER_TIMEOUT;
        a->connect_timeout = sent_nothing(a->easy);
        break;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
        ans->status = ANSWER_UNREACHABLE;
        break;
    case CURLE_WRITE_ERROR:
        if (a->response_too_large) {
            ans->status = ANSWER_BAD;
            why = "the model's answer is larger than max_response_bytes";
            break;
        }
        /* fall through */
    default:
        ans->status = ANSWER_FAILED;
    }
    snprintf(ans->message, sizeof(ans->message), "%s", why);
}

/* A whole 2xx body: a plain answer (also to a streaming call, from an
 * upstream that does not stream; its content then counts as one piece). */
static void
judge_whole_answer(struct exchange *a)
{
    if (exchange_parse_answer(a->response.data, a->response.len,
                              &a->ans) == -1) {
        a->ans.status = ANSWER_BAD;
        return;
    }
    a->ans.status = ANSWER_OK;
    a->got_content = a->ans.reply.len > 0 || a->ans.ncalls > 0;
}

static void
judge_http_answer(struct exchange *a)
{
    struct answer *ans = &a->ans;

    curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &ans->http_status);
    if (a->streaming) {
        ans->status = a->stream_complete ? ANSWER_OK : ANSWER_FAILED;
        if (!a->stream_complete)
            snprintf(ans->message, sizeof(ans->message),
                     "the model's stream ended before it was complete");
        return;
    }
    if (ans->http_status >= 200 && ans->http_status < 300) {
        judge_whole_answer(a);
        return;
    }
    ans->status = ANSWER_HTTP_ERROR;
    if (exchange_error_message(a->response.data, a->response.len, ans->message,
                          sizeof(ans->message)) == -1)
        snprintf(ans->message, sizeof(ans->message),
                 "the model answered HTTP %ld", ans->http_status);
}

void
exchange_judge(struct exchange *a, CURLcode rc)
{
    if (a->stream_failed)
        return; /* on_event has said why */
    if (rc != CURLE_OK)
        judge_curl_error(a, rc);
    else
        judge_http_answer(a);
}

/* Seconds the provider asked to wait (Retry-After), or 0. */
long
exchange_retry_after_s(struct exchange *a)
{
    curl_off_t s = 0;

    if (curl_easy_getinfo(a->easy, CURLINFO_RETRY_AFTER, &s) != CURLE_OK)
        return 0;
    return s > 0 && s < 3600 ? (long)s : 0;
}
