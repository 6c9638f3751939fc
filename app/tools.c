/* tools: one round of tool calls, run at once on the curl multi handle. */
#include "tools.h"

#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "exchange.h"
#include "json.h"

#define ARGUMENTS_DEPTH 32
#define POLL_MS 1000

void
tools_init(struct tools *t, const struct conf *c, CURLM *multi)
{
    memset(t, 0, sizeof(*t));
    t->conf = c;
    t->multi = multi;
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++) {
        t->runs[i].tls.peer = TLS_TOOLS;
        buf_init(&t->runs[i].result, TOOLS_RESULT_MAX);
    }
}

static void
stop(struct tools *t, struct tool_run *r)
{
    if (r->active)
        curl_multi_remove_handle(t->multi, r->easy);
    r->active = 0;
    curl_slist_free_all(r->headers);
    r->headers = NULL;
}

void
tools_cleanup(struct tools *t)
{
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++) {
        stop(t, &t->runs[i]);
        if (t->runs[i].easy != NULL)
            curl_easy_cleanup(t->runs[i].easy);
        buf_cleanup(&t->runs[i].result);
    }
    memset(t, 0, sizeof(*t));
}

const char *
tools_outcome_name(enum tool_outcome o)
{
    static const char *const names[] = {"ok", "failed", "timeout",
                                        "refused"};

    return names[o];
}

/* The error result the model reads instead of the tool's answer. */
static void
fail(struct tool_run *r, enum tool_outcome o, const char *why)
{
    yajl_gen g = json_gen_new();
    const unsigned char *json;
    size_t len;

    r->outcome = o;
    buf_reset(&r->result);
    if (g != NULL && yajl_gen_map_open(g) == yajl_gen_status_ok &&
        json_gen_key_cstr(g, "error", why) == 0 &&
        yajl_gen_map_close(g) == yajl_gen_status_ok) {
        yajl_gen_get_buf(g, &json, &len);
        buf_append(&r->result, json, len);
    }
    if (g != NULL)
        yajl_gen_free(g);
}

static const struct conf_tool *
find_tool(const struct conf *c, const char *name)
{
    for (size_t i = 0; i < c->ntools; i++)
        if (strcmp(c->tools[i].name, name) == 0)
            return &c->tools[i];
    return NULL;
}

/* Arguments the tool can be sent: a JSON object ("" counts as {}). */
static int
arguments_ok(const char *s, size_t n)
{
    struct json_field whole = {.path = "", .accept = JSON_OBJECT};
    char err[JSON_ERR_LEN];
    struct buf arena;
    int rc;

    if (n == 0)
        return 1;
    buf_init(&arena, n + 8);
    rc = json_pick(s, n, &whole, 1, &arena, ARGUMENTS_DEPTH, JSON_STRICT,
                   err);
    buf_cleanup(&arena);
    return rc == 0;
}

static size_t
on_body(char *data, size_t size, size_t n, void *arg)
{
    struct tool_run *r = arg;

    /* Over the cap: curl stops with a write error, judged as failed. */
    return buf_append(&r->result, data, size * n) == 0 ? size * n : 0;
}

/* The request of one call. Returns 0, or -1 (the run has its error). */
static int
start(struct tools *t, struct tool_run *r, const char *request_id,
      double deadline_ms)
{
    double left = deadline_ms - clock_ms();
    long timeout = (long)r->tool->timeout_ms;
    struct exchange_post post = {
        .url = r->tool->url,
        .body = r->arguments_len ? r->arguments : "{}",
        .body_len = r->arguments_len ? r->arguments_len : 2,
        .on_body = on_body,
        .arg = r,
        .errbuf = r->errbuf,
        .tls = &r->tls,
    };

    if (left < (double)timeout)
        timeout = left < 1 ? 1 : (long)left;
    r->headers = exchange_headers(NULL, request_id);
    post.headers = r->headers;
    post.timeout_ms = timeout;
    /* Made at the first call: a pool of thousands without tools, or
     * with rounds of one call, pays for no handle it does not use. */
    if (r->easy == NULL)
        r->easy = curl_easy_init();
    if (r->easy != NULL)
        exchange_post_options(r->easy, &post);
    if (r->easy == NULL || r->headers == NULL ||
        curl_multi_add_handle(t->multi, r->easy) != CURLM_OK) {
        fail(r, TOOL_FAILED, "the tool could not be called");
        return -1;
    }
    r->active = 1;
    return 0;
}

/* Set up call i of ans; refused calls are answered at once. Returns 1
 * when the call is to run. */
static int
prepare(struct tools *t, struct tool_run *r, const struct answer_call *call)
{
    char why[160];

    r->name = call->name;
    r->arguments = call->arguments.data;
    r->arguments_len = call->arguments.len;
    r->tool = find_tool(t->conf, call->name);
    r->outcome = TOOL_OK;
    r->ms = 0;
    r->errbuf[0] = '\0';
    buf_reset(&r->result);
    if (r->tool == NULL) {
        snprintf(why, sizeof(why), "there is no tool named '%s'", call->name);
        fail(r, TOOL_REFUSED, why);
        return 0;
    }
    if (!arguments_ok(r->arguments, r->arguments_len)) {
        fail(r, TOOL_REFUSED, "the arguments are not a JSON object");
        return 0;
    }
    return 1;
}

/* A transfer that ended: its answer, or why there is none. */
static void
judge(struct tool_run *r, CURLcode rc)
{
    long status = 0;
    char why[CURL_ERROR_SIZE + 64];

    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    if (rc == CURLE_OPERATION_TIMEDOUT) {
        snprintf(why, sizeof(why), "the tool did not answer within %lld ms",
                 r->tool->timeout_ms);
        fail(r, TOOL_TIMEOUT, why);
    } else if (rc != CURLE_OK) {
        snprintf(why, sizeof(why), "the tool failed: %s",
                 r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc));
        fail(r, TOOL_FAILED, why);
    } else if (status < 200 || status >= 300) {
        snprintf(why, sizeof(why), "the tool answered HTTP %ld", status);
        fail(r, TOOL_FAILED, why);
    } else if (!json_utf8_valid(r->result.data, r->result.len) ||
               memchr(r->result.data, '\0', r->result.len) != NULL) {
        fail(r, TOOL_FAILED, "the tool's answer is not UTF-8 text");
    }
}

/* Collect what ended; returns how many are still running. */
static size_t
collect(struct tools *t, size_t n, double started_ms)
{
    CURLMsg *msg;
    int queued;
    size_t running = 0;

    while ((msg = curl_multi_info_read(t->multi, &queued)) != NULL) {
        struct tool_run *r = NULL;

        if (msg->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        judge(r, msg->data.result);
        r->ms = clock_ms() - started_ms;
        stop(t, r);
    }
    for (size_t i = 0; i < n; i++)
        running += t->runs[i].active;
    return running;
}

/* Stop the calls still running, each with why as its error result. */
static void
stop_running(struct tools *t, size_t n, const char *why)
{
    for (size_t i = 0; i < n; i++) {
        if (t->runs[i].active) {
            stop(t, &t->runs[i]);
            fail(&t->runs[i], TOOL_FAILED, why);
        }
    }
}

int
tools_run(struct tools *t, const struct answer *ans,
          const struct llm_call *call)
{
    struct curl_waitfd client = {.fd = call->watch_fd,
                                 .events = CURL_WAIT_POLLIN};
    unsigned watching = call->watch_fd >= 0;
    double started = clock_ms();
    size_t n = ans->ncalls;
    int still;

    for (size_t i = 0; i < n; i++)
        if (prepare(t, &t->runs[i], &ans->calls[i]))
            start(t, &t->runs[i], call->request_id, call->deadline_ms);
    /* curl enforces each call's timeout: the loop cannot outlive them. */
    while (curl_multi_perform(t->multi, &still) == CURLM_OK &&
           collect(t, n, started) > 0) {
        if (curl_multi_poll(t->multi, watching ? &client : NULL, watching,
                            POLL_MS, NULL) != CURLM_OK)
            break;
        if (llm_client_left(call, &client, &watching)) {
            stop_running(t, n, "cancelled: the client went away");
            return -1;
        }
    }
    stop_running(t, n, "the tool call broke off");
    return 0;
}
