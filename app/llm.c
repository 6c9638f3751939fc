#include "llm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "conf.h"
#include "fcgi.h"
#include "history.h"
#include "json.h"
#include "log.h"

#define ANSWER_DEPTH 32
#define POLL_MS 1000
#define HEADER_LEN 160
#define SSE_LINE_MAX (256 * 1024)

static int on_event(void *arg, const char *data, size_t len);

static double
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static char *
join(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    char *s = malloc(na + nb + 1);

    if (s != NULL) {
        memcpy(s, a, na);
        memcpy(s + na, b, nb + 1);
    }
    return s;
}

static char *
completions_url(const char *base)
{
    size_t n = strlen(base);

    /* Accept a base URL with or without its trailing slash. */
    return join(base, n > 0 && base[n - 1] == '/' ? "chat/completions"
                                                  : "/chat/completions");
}

int
llm_init(struct llm *l, const struct conf *c, char err[LLM_MESSAGE_LEN])
{
    size_t max = (size_t)c->upstream.max_response_bytes;

    memset(l, 0, sizeof(*l));
    l->conf = c;
    buf_init(&l->response, max);
    buf_init(&l->event_arena, SSE_LINE_MAX);
    sse_init(&l->sse, SSE_LINE_MAX, SSE_LINE_MAX, on_event, l);
    l->multi = curl_multi_init();
    l->easy = curl_easy_init();
    l->gen = json_gen_new();
    l->url = completions_url(c->upstream.url);
    if (c->upstream.api_key[0] != '\0')
        l->auth_header = join("Authorization: Bearer ", c->upstream.api_key);
    if (!l->multi || !l->easy || !l->gen || !l->url ||
        (c->upstream.api_key[0] != '\0' && !l->auth_header)) {
        snprintf(err, LLM_MESSAGE_LEN, "cannot set up curl: out of memory");
        llm_cleanup(l);
        return -1;
    }
    return 0;
}

void
llm_cleanup(struct llm *l)
{
    if (l->easy != NULL)
        curl_easy_cleanup(l->easy);
    if (l->multi != NULL)
        curl_multi_cleanup(l->multi);
    if (l->gen != NULL)
        yajl_gen_free(l->gen);
    free(l->url);
    free(l->auth_header);
    buf_cleanup(&l->response);
    buf_cleanup(&l->event_arena);
    sse_cleanup(&l->sse);
    memset(l, 0, sizeof(*l));
}

void
llm_answer_init(struct llm_answer *a, size_t max_reply)
{
    memset(a, 0, sizeof(*a));
    buf_init(&a->reply, max_reply);
}

void
llm_answer_cleanup(struct llm_answer *a)
{
    buf_cleanup(&a->reply);
}

static void
answer_reset(struct llm_answer *a, const char *model)
{
    a->status = LLM_FAILED;
    a->http_status = 0;
    buf_reset(&a->reply);
    snprintf(a->model, sizeof(a->model), "%s", model);
    a->prompt_tokens = a->completion_tokens = -1;
    a->message[0] = '\0';
    a->ms = 0;
}

static int
gen_message(yajl_gen g, const char *role, const char *content, size_t len)
{
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", role) ||
           json_gen_key_str(g, "content", content, len) ||
           yajl_gen_map_close(g);
}

/* [system prompt] + history + [the new user message]. */
static int
gen_messages(yajl_gen g, const struct llm_call *call)
{
    const struct history *h = call->history;
    const char *system = call->system_prompt;

    if (json_gen_cstr(g, "messages") || yajl_gen_array_open(g))
        return -1;
    if (system != NULL && system[0] != '\0' &&
        gen_message(g, "system", system, strlen(system)))
        return -1;
    for (size_t i = 0; i < h->count; i++)
        if (gen_message(g, history_role_name(h->msgs[i].role),
                        history_content(h, i), h->msgs[i].len))
            return -1;
    if (call->message != NULL &&
        gen_message(g, "user", call->message, call->message_len))
        return -1;
    return yajl_gen_array_close(g) ? -1 : 0;
}

/* The OpenAI chat-completions request body, in l->gen. */
static int
gen_request(struct llm *l, const struct llm_call *call)
{
    const struct conf *c = l->conf;
    yajl_gen g = l->gen;

    json_gen_restart(g);
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "model", c->upstream.model) ||
        gen_messages(g, call))
        return -1;
    if (call->temperature >= 0 &&
        (json_gen_cstr(g, "temperature") ||
         yajl_gen_double(g, call->temperature)))
        return -1;
    if (call->max_tokens > 0 &&
        json_gen_key_int(g, "max_tokens", call->max_tokens))
        return -1;
    if (call->on_delta != NULL &&
        (json_gen_cstr(g, "stream") || yajl_gen_bool(g, 1) ||
         json_gen_cstr(g, "stream_options") || yajl_gen_map_open(g) ||
         json_gen_cstr(g, "include_usage") || yajl_gen_bool(g, 1) ||
         yajl_gen_map_close(g)))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}

/* Record why a stream broke; the transfer is then cancelled. */
static int
stream_fail(struct llm *l, enum llm_status status, const char *why)
{
    l->stream_failed = 1;
    l->ans->status = status;
    snprintf(l->ans->message, sizeof(l->ans->message), "%s", why);
    return -1;
}

/* Pass on the reply's new bytes, up to the last whole character. */
static int
emit_new_content(struct llm *l)
{
    const struct buf *r = &l->ans->reply;
    size_t end = l->emitted + json_utf8_complete_len(r->data + l->emitted,
                                                     r->len - l->emitted);

    if (end == l->emitted)
        return 0;
    if (!json_utf8_valid(r->data + l->emitted, end - l->emitted))
        return stream_fail(l, LLM_BAD_ANSWER,
                           "the model's reply is not valid UTF-8");
    if (l->call->on_delta(l->call->delta_arg, r->data + l->emitted,
                          end - l->emitted) == -1) {
        l->client_gone = 1;
        return -1;
    }
    l->emitted = end;
    return 0;
}

static void
pick_usage(const struct json_field *prompt, const struct json_field *done,
           const struct buf *arena, struct llm_answer *ans)
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
           struct llm_answer *ans)
{
    char name[LLM_MODEL_LEN];

    if (f->type == JSON_STRING && f->len > 0 &&
        memchr(json_field_text(f, arena), '\0', f->len) == NULL &&
        json_utf8_copy(name, sizeof(name), json_field_text(f, arena),
                       f->len) == 0)
        memcpy(ans->model, name, sizeof(name));
}

/* One event of an upstream stream: a chunk, [DONE], or an error object. */
static int
on_event(void *arg, const char *data, size_t len)
{
    enum { CONTENT, FINISH, MODEL, PROMPT, COMPLETION, ERROR };
    struct json_field f[] = {
        [CONTENT] = {.path = "choices.0.delta.content", .accept = JSON_ANY},
        [FINISH] = {.path = "choices.0.finish_reason", .accept = JSON_ANY},
        [MODEL] = {.path = "model", .accept = JSON_ANY},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens",
                        .accept = JSON_ANY},
        [ERROR] = {.path = "error", .accept = JSON_ANY},
    };
    struct llm *l = arg;
    char err[JSON_ERR_LEN];
    struct llm_answer *ans = l->ans;

    if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
        l->stream_complete = 1;
        return 0;
    }
    buf_reset(&l->event_arena);
    if (json_pick(data, len, f, 6, &l->event_arena, ANSWER_DEPTH, 0, err))
        return stream_fail(l, LLM_BAD_ANSWER, "the model's stream carries "
                           "an event that is not JSON");
    if (f[ERROR].type != 0 && f[ERROR].type != JSON_NULL) {
        if (llm_error_message(data, len, err, sizeof(err)) == -1)
            snprintf(err, sizeof(err), "the model's stream reported an "
                     "error");
        return stream_fail(l, LLM_HTTP_ERROR, err);
    }
    pick_model(&f[MODEL], &l->event_arena, ans);
    if (f[PROMPT].type == JSON_NUMBER || f[COMPLETION].type == JSON_NUMBER)
        pick_usage(&f[PROMPT], &f[COMPLETION], &l->event_arena, ans);
    if (f[FINISH].type == JSON_STRING)
        l->stream_complete = 1;
    if (f[CONTENT].type != JSON_STRING || f[CONTENT].len == 0)
        return 0;
    if (buf_append(&ans->reply, json_field_text(&f[CONTENT], &l->event_arena),
                   f[CONTENT].len) == -1)
        return stream_fail(l, LLM_BAD_ANSWER, "the model's reply is larger "
                           "than max_response_bytes");
    return emit_new_content(l);
}

/* Decide, at the first bytes of the body, whether it is an event stream
 * (a 2xx text/event-stream to a streaming call) or a whole body (a plain
 * answer, or an error, read whole and parsed at the end). */
static enum llm_body
body_mode(struct llm *l)
{
    const char *type = NULL;
    long status = 0;

    if (l->body_mode != LLM_BODY_UNKNOWN)
        return l->body_mode;
    curl_easy_getinfo(l->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(l->easy, CURLINFO_CONTENT_TYPE, &type);
    l->body_mode = LLM_BODY_WHOLE;
    if (l->call->on_delta != NULL && status >= 200 && status < 300 &&
        type != NULL && strncasecmp(type, "text/event-stream", 17) == 0)
        l->body_mode = LLM_BODY_EVENTS;
    return l->body_mode;
}

static size_t
on_body(char *data, size_t size, size_t n, void *arg)
{
    struct llm *l = arg;

    if (body_mode(l) == LLM_BODY_EVENTS)
        return sse_feed(&l->sse, data, size * n) == 0 ? size * n : 0;
    if (buf_append(&l->response, data, size * n) == -1) {
        l->response_too_large = 1;
        return 0; /* makes curl stop with CURLE_WRITE_ERROR */
    }
    return size * n;
}

static struct curl_slist *
request_headers(const struct llm *l, const char *request_id)
{
    char id_header[HEADER_LEN];
    struct curl_slist *h = NULL, *next;
    const char *lines[] = {
        "Content-Type: application/json",
        "Expect:", /* no 100-continue round trip for bodies over 1 KiB */
        id_header,
        l->auth_header,
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

/* The upstream's timeout, cut short by the request's own deadline. */
static long
timeout_ms(const struct llm *l)
{
    double left = l->call->deadline_ms - now_ms();
    double limit = (double)l->conf->upstream.timeout_ms;

    if (l->call->deadline_ms > 0 && left < limit)
        limit = left < 1 ? 1 : left;
    return (long)limit;
}

static void
set_options(struct llm *l, struct curl_slist *headers)
{
    const struct conf *c = l->conf;
    const char *body;
    size_t len;
    CURL *e = l->easy;

    yajl_gen_get_buf(l->gen, (const unsigned char **)&body, &len);
    curl_easy_setopt(e, CURLOPT_URL, l->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "chatfcgi/1");
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, l);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, l->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)c->upstream.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms(l));
}

/* Drive the transfer until it ends or the client goes away. Returns the
 * curl result, or -1 when the client went away first. */
static int
run_transfer(struct llm *l, int watch_fd)
{
    struct curl_waitfd client = {.fd = watch_fd, .events = CURL_WAIT_POLLIN};
    unsigned nwatch = watch_fd >= 0 ? 1 : 0;
    int running = 1, queued;
    CURLMsg *msg;

    while (running) {
        if (curl_multi_perform(l->multi, &running) != CURLM_OK)
            return CURLE_FAILED_INIT;
        if (!running)
            break;
        client.revents = 0;
        if (curl_multi_poll(l->multi, nwatch ? &client : NULL, nwatch,
                            POLL_MS, NULL) != CURLM_OK)
            return CURLE_FAILED_INIT;
        if (client.revents) {
            int gone = fcgi_client_gone(watch_fd);

            if (gone == 1)
                return -1;
            if (gone == -1)
                nwatch = 0; /* unreadable data: stop watching, don't spin */
        }
    }
    while ((msg = curl_multi_info_read(l->multi, &queued)) != NULL)
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == l->easy)
            return (int)msg->data.result;
    return CURLE_FAILED_INIT;
}

static void
classify_curl_error(struct llm *l, int rc, struct llm_answer *ans)
{
    const char *why = l->errbuf[0] ? l->errbuf : curl_easy_strerror(rc);

    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        ans->status = LLM_TIMEOUT;
        break;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
        ans->status = LLM_UNREACHABLE;
        break;
    case CURLE_WRITE_ERROR:
        if (l->response_too_large) {
            ans->status = LLM_BAD_ANSWER;
            why = "the model's answer is larger than max_response_bytes";
            break;
        }
        /* fall through */
    default:
        ans->status = LLM_FAILED;
    }
    snprintf(ans->message, sizeof(ans->message), "%s", why);
}

/* A whole 2xx body: a plain answer (also to a streaming call, from an
 * upstream that does not stream; it then arrives as one delta). */
static void
classify_whole_answer(struct llm *l, struct llm_answer *ans)
{
    const struct buf *r = &l->response;

    if (llm_parse_answer(r->data, r->len, ans) == -1) {
        ans->status = LLM_BAD_ANSWER;
        return;
    }
    ans->status = LLM_OK;
    if (l->call->on_delta != NULL && emit_new_content(l) == -1) {
        ans->status = LLM_CLIENT_GONE;
        snprintf(ans->message, sizeof(ans->message), "the client went away");
    }
}

static void
classify_stream_end(struct llm *l, struct llm_answer *ans)
{
    if (!l->stream_complete) {
        ans->status = LLM_FAILED;
        snprintf(ans->message, sizeof(ans->message),
                 "the model's stream ended before it was complete");
        return;
    }
    ans->status = LLM_OK;
}

static void
classify_http_answer(struct llm *l, struct llm_answer *ans)
{
    const struct buf *r = &l->response;

    curl_easy_getinfo(l->easy, CURLINFO_RESPONSE_CODE, &ans->http_status);
    if (l->body_mode == LLM_BODY_EVENTS) {
        classify_stream_end(l, ans);
        return;
    }
    if (ans->http_status >= 200 && ans->http_status < 300) {
        classify_whole_answer(l, ans);
        return;
    }
    ans->status = LLM_HTTP_ERROR;
    if (llm_error_message(r->data, r->len, ans->message,
                          sizeof(ans->message)) == -1)
        snprintf(ans->message, sizeof(ans->message),
                 "the model answered HTTP %ld", ans->http_status);
}

static void
start_call(struct llm *l, const struct llm_call *call,
           struct llm_answer *ans)
{
    l->call = call;
    l->ans = ans;
    l->body_mode = LLM_BODY_UNKNOWN;
    buf_reset(&l->response);
    l->response_too_large = 0;
    sse_reset(&l->sse);
    l->emitted = 0;
    l->stream_complete = 0;
    l->client_gone = 0;
    l->stream_failed = 0;
    l->errbuf[0] = '\0';
}

void
llm_complete(struct llm *l, const struct llm_call *call,
             struct llm_answer *ans)
{
    double start = now_ms();
    struct curl_slist *headers;
    int rc;

    answer_reset(ans, l->conf->upstream.model);
    start_call(l, call, ans);
    headers = request_headers(l, call->request_id);
    if (headers == NULL || gen_request(l, call) == -1) {
        snprintf(ans->message, sizeof(ans->message),
                 "cannot build the upstream request");
        curl_slist_free_all(headers);
        return;
    }
    set_options(l, headers);
    curl_multi_add_handle(l->multi, l->easy);
    rc = run_transfer(l, call->watch_fd);
    curl_multi_remove_handle(l->multi, l->easy);
    curl_slist_free_all(headers);
    ans->ms = now_ms() - start;
    if (rc == -1 || l->client_gone) {
        ans->status = LLM_CLIENT_GONE;
        snprintf(ans->message, sizeof(ans->message),
                 "the client went away while the model was answering");
    } else if (l->stream_failed) {
        return; /* on_event has set status and message */
    } else if (rc != CURLE_OK) {
        classify_curl_error(l, rc, ans);
    } else {
        classify_http_answer(l, ans);
    }
}

int
llm_parse_answer(const char *body, size_t len, struct llm_answer *ans)
{
    enum { CONTENT, MODEL, PROMPT, COMPLETION };
    struct json_field f[] = {
        [CONTENT] = {.path = "choices.0.message.content",
                     .accept = JSON_STRING | JSON_NULL},
        [MODEL] = {.path = "model", .accept = JSON_ANY},
        [PROMPT] = {.path = "usage.prompt_tokens", .accept = JSON_ANY},
        [COMPLETION] = {.path = "usage.completion_tokens",
                        .accept = JSON_ANY},
    };
    char err[JSON_ERR_LEN];
    struct buf arena;
    int rc = -1;

    buf_init(&arena, len + 8);
    if (json_pick(body, len, f, 4, &arena, ANSWER_DEPTH, 0, err) == -1) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's answer is not JSON: %s", err);
    } else if (f[CONTENT].type != JSON_STRING) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's answer has no choices[0].message.content");
    } else if (!json_utf8_valid(json_field_text(&f[CONTENT], &arena),
                                f[CONTENT].len)) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's reply is not valid UTF-8");
    } else if (buf_append(&ans->reply, json_field_text(&f[CONTENT], &arena),
                          f[CONTENT].len) == -1) {
        snprintf(ans->message, sizeof(ans->message),
                 "the model's reply is too long");
    } else {
        pick_model(&f[MODEL], &arena, ans);
        pick_usage(&f[PROMPT], &f[COMPLETION], &arena, ans);
        rc = 0;
    }
    buf_cleanup(&arena);
    return rc;
}

int
llm_error_message(const char *body, size_t len, char *out, size_t size)
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
