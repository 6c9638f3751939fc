/* llm: a chat completion run across providers, retries and a hedge. */
#include "llm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "exchange.h"
#include "json.h"
#include "messages.h"
#include "plan.h"
#include "scoreboard.h"
#include "tls.h"

#define POLL_MS 1000
/* A call waiting for a TLS handshake slot looks again after 2 ms, then
 * less and less often: a thousand waiting workers must leave the CPU to
 * the handshakes they wait for. */
#define ADMIT_POLL_MIN_MS 2
#define ADMIT_POLL_MAX_MS 64

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
llm_init(struct llm *l, const struct conf *c, struct scoreboard *pool,
         char err[ANSWER_MESSAGE_LEN])
{
    size_t max = (size_t)c->upstream.max_response_bytes;
    int ok = 1;

    memset(l, 0, sizeof(*l));
    l->conf = c;
    l->pool = pool;
    l->rng = (uint64_t)getpid() * 0x9E3779B97F4A7C15ULL | 1;
    l->multi = curl_multi_init();
    l->gen = json_gen_new();
    l->attempts = calloc(LLM_ATTEMPTS, sizeof(*l->attempts));
    ok = l->multi && l->gen && l->attempts;
    for (size_t i = 0; ok && i < LLM_ATTEMPTS; i++)
        ok = exchange_init(&l->attempts[i], max) == 0;
    for (size_t i = 0; ok && i < c->nproviders; i++) {
        const struct conf_provider *p = &c->providers[i];

        l->urls[i] = completions_url(p->url);
        if (p->api_key[0] != '\0')
            l->auth[i] = join("Authorization: Bearer ", p->api_key);
        ok = l->urls[i] && (p->api_key[0] == '\0' || l->auth[i]);
    }
    if (!ok) {
        snprintf(err, ANSWER_MESSAGE_LEN, "cannot set up curl: out of memory");
        llm_cleanup(l);
        return -1;
    }
    return 0;
}

void
llm_cleanup(struct llm *l)
{
    for (size_t i = 0; l->attempts && i < LLM_ATTEMPTS; i++) {
        exchange_stop(&l->attempts[i], l->multi);
        exchange_cleanup(&l->attempts[i]);
    }
    free(l->attempts);
    if (l->multi != NULL)
        curl_multi_cleanup(l->multi);
    if (l->gen != NULL)
        yajl_gen_free(l->gen);
    for (size_t i = 0; i < CONF_PROVIDERS_MAX; i++) {
        free(l->urls[i]);
        free(l->auth[i]);
    }
    memset(l, 0, sizeof(*l));
}

static int
gen_message(yajl_gen g, const char *role, const char *content, size_t len)
{
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "role", role) ||
           json_gen_key_str(g, "content", content, len) ||
           yajl_gen_map_close(g);
}

/* [system prompt] + messages + [the new user message]. */
static int
gen_messages(yajl_gen g, const struct llm_call *call)
{
    const struct messages *h = call->messages;
    const char *system = call->system_prompt;

    if (json_gen_cstr(g, "messages") || yajl_gen_array_open(g))
        return -1;
    if (system != NULL && system[0] != '\0' &&
        gen_message(g, "system", system, strlen(system)))
        return -1;
    for (size_t i = 0; i < h->count; i++)
        if (messages_gen(g, h, i))
            return -1;
    if (call->message != NULL &&
        gen_message(g, "user", call->message, call->message_len))
        return -1;
    return yajl_gen_array_close(g) ? -1 : 0;
}

/* The OpenAI chat-completions request body for a model, in l->gen. */
static int
gen_request(struct llm *l, const struct llm_call *call, const char *model)
{
    yajl_gen g = l->gen;

    json_gen_restart(g);
    if (yajl_gen_map_open(g) || json_gen_key_cstr(g, "model", model) ||
        gen_messages(g, call))
        return -1;
    if (call->temperature >= 0 &&
        (json_gen_cstr(g, "temperature") ||
         yajl_gen_double(g, call->temperature)))
        return -1;
    if (call->max_tokens > 0 &&
        json_gen_key_int(g, "max_tokens", call->max_tokens))
        return -1;
    if (call->options != NULL && json_gen_text(g, call->options, 1))
        return -1;
    if (call->on_delta != NULL &&
        (json_gen_cstr(g, "stream") || yajl_gen_bool(g, 1) ||
         json_gen_cstr(g, "stream_options") || yajl_gen_map_open(g) ||
         json_gen_cstr(g, "include_usage") || yajl_gen_bool(g, 1) ||
         yajl_gen_map_close(g)))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}

/* ---- the attempts of one call */

static int
streaming_call(const struct llm *l)
{
    return l->call->on_delta != NULL;
}

/* The first attempt with content wins the stream: the others are stopped
 * (after the current curl_multi_perform; libcurl refuses calls from its
 * callbacks). */
static void
commit(struct llm *l, struct exchange *a)
{
    if (l->committed == NULL)
        l->committed = a;
}

/* Pass the committed reply's new bytes on, up to the last whole
 * character. Returns 0, or -1 to cancel the transfer. */
static int
emit(struct llm *l, struct exchange *a)
{
    const struct buf *r = &a->ans.reply;
    size_t end = l->emitted + json_utf8_complete_len(r->data + l->emitted,
                                                     r->len - l->emitted);

    if (end == l->emitted)
        return 0;
    if (!json_utf8_valid(r->data + l->emitted, end - l->emitted)) {
        a->stream_failed = 1;
        a->ans.status = ANSWER_BAD;
        snprintf(a->ans.message, sizeof(a->ans.message),
                 "the model's reply is not valid UTF-8");
        return -1;
    }
    if (l->call->on_delta(l->call->delta_arg, r->data + l->emitted,
                          end - l->emitted) == -1) {
        l->client_gone = 1;
        return -1;
    }
    l->emitted = end;
    return 0;
}

/* Relay tool-call fragments, when the caller wants them. */
static int
emit_pieces(struct llm *l, const struct answer_piece *p, size_t n)
{
    const struct llm_call *call = l->call;

    for (size_t i = 0; call->on_call != NULL && i < n; i++) {
        if (call->on_call(call->delta_arg, &p[i]) == -1) {
            l->client_gone = 1;
            return -1;
        }
    }
    return 0;
}

static int
on_content(struct exchange *a, void *arg)
{
    struct llm *l = arg;

    commit(l, a);
    if (l->committed != a || emit(l, a) == -1)
        return -1;
    return emit_pieces(l, a->pieces, a->npieces);
}

/* A whole answer's tool calls, each as one fragment. */
static int
emit_whole_calls(struct llm *l, const struct answer *ans)
{
    for (size_t i = 0; i < ans->ncalls; i++) {
        const struct answer_call *c = &ans->calls[i];
        struct answer_piece p = {.index = (long long)i, .id = c->id,
                                 .name = c->name,
                                 .arguments = c->arguments.data,
                                 .arguments_len = c->arguments.len};

        if (emit_pieces(l, &p, 1) == -1)
            return -1;
    }
    return 0;
}

static struct exchange *
idle_attempt(struct llm *l)
{
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        if (!l->attempts[i].active)
            return &l->attempts[i];
    return NULL;
}

static size_t
active_attempts(const struct llm *l)
{
    size_t n = 0;

    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        n += l->attempts[i].active;
    return n;
}

/* The provider's total timeout, cut short by the request's deadline. */
static long
attempt_timeout_ms(const struct llm *l, const struct conf_provider *p)
{
    double left = l->call->deadline_ms - clock_ms();
    double limit = (double)p->timeout_ms;

    if (l->call->deadline_ms > 0 && left < limit)
        limit = left < 1 ? 1 : left;
    return (long)limit;
}

/* Start the plan's next provider. Returns the attempt, or NULL when it
 * could not start (its answer says why: a failure like any other). */
static struct exchange *
start_next(struct llm *l, struct plan *p, int hedge)
{
    size_t provider = plan_take(p);
    const struct conf_provider *cp = &l->conf->providers[provider];
    const char *model = l->call->model ? l->call->model : cp->model;
    struct exchange *a = idle_attempt(l);
    struct exchange_spec spec = {
        .url = l->urls[provider],
        .auth_header = l->auth[provider],
        .request_id = l->call->request_id,
        .connect_timeout_ms = (long)cp->connect_timeout_ms,
        .timeout_ms = attempt_timeout_ms(l, cp),
        .stream = streaming_call(l),
    };

    if (a == NULL || gen_request(l, l->call, model) == -1)
        return NULL;
    yajl_gen_get_buf(l->gen, (const unsigned char **)&spec.body,
                     &spec.body_len);
    a->provider = provider;
    a->on_content = on_content;
    a->arg = l;
    plan_note_start(p, provider, hedge);
    if (exchange_start(a, l->multi, &spec, model) == -1)
        return a;
    a->hedge = hedge;
    return a;
}

/* After a failed attempt: another provider now, the next round after a
 * backoff, or the end. Never another try once content reached the
 * client. A connection cut short by the connect timeout (TCP or TLS) sent
 * the provider nothing and is most likely this host short of CPU in a
 * burst: it is tried again as an unreachable provider is (measured: 3 to
 * 46 of 12,000 answers at 4,000 TLS streams failed so, with the burst
 * over by the retry). */
static void
after_failure(struct llm *l, struct plan *p, struct exchange *a)
{
    if (a->connect_timeout)
        plan_note_local_failure(p, a->provider, a->ans.status);
    else
        plan_note_failure(p, a->provider, a->ans.status, a->ans.message);
    if (l->committed == a) {
        p->done = 1;
        return;
    }
    plan_failed(p, a->connect_timeout ? ANSWER_UNREACHABLE : a->ans.status,
                a->ans.http_status, exchange_retry_after_s(a));
    if (p->done || active_attempts(l) > 0 || p->retry_at_ms > 0)
        return; /* the other attempt may still win */
    if (plan_has_next(p)) {
        struct exchange *next = start_next(l, p, 0);

        if (next != NULL && !next->active)
            after_failure(l, p, next);
        return;
    }
    plan_schedule_retry(p, clock_ms(), l->call->deadline_ms);
}

/* Per attempt: no first token in time, or silent too long mid-stream. */
static const char *
attempt_overdue(const struct llm *l, const struct exchange *a, double now)
{
    const struct conf *c = l->conf;
    int started = streaming_call(l) ? a->got_content : a->got_bytes;

    if (c->upstream.first_token_timeout_ms > 0 && !started &&
        now - a->started_ms >= (double)c->upstream.first_token_timeout_ms)
        return "no first token within first_token_timeout_ms";
    if (c->upstream.idle_timeout_ms > 0 && started && a->streaming &&
        now - a->last_bytes_ms >= (double)c->upstream.idle_timeout_ms)
        return "the stream was silent for idle_timeout_ms";
    return NULL;
}

/* When the single running attempt has not begun to answer after
 * hedge_after_ms, ask the next provider too; the first answer wins. */
static int
hedge_due(const struct llm *l, const struct plan *p, double now)
{
    const struct exchange *a = NULL;
    long long after = l->conf->upstream.hedge_after_ms;

    if (after == 0 || l->committed != NULL || !plan_has_next(p) ||
        active_attempts(l) != 1)
        return 0;
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        if (l->attempts[i].active)
            a = &l->attempts[i];
    return !a->got_bytes && now - a->started_ms >= (double)after;
}

static void
run_timers(struct llm *l, struct plan *p)
{
    double now = clock_ms();

    for (size_t i = 0; i < LLM_ATTEMPTS; i++) {
        struct exchange *a = &l->attempts[i];
        const char *why = a->active ? attempt_overdue(l, a, now) : NULL;

        if (why != NULL) {
            exchange_fail(a, l->multi, ANSWER_TIMEOUT, why);
            after_failure(l, p, a);
        }
    }
    if (hedge_due(l, p, now)) {
        struct exchange *h = start_next(l, p, 1);

        if (h != NULL && !h->active)
            after_failure(l, p, h);
    }
    if (p->retry_at_ms > 0 && now >= p->retry_at_ms && !p->done) {
        struct exchange *r;

        plan_next_round(p);
        r = start_next(l, p, 0);
        if (r != NULL && !r->active)
            after_failure(l, p, r);
    }
}

/* Milliseconds until the next timer of run_timers() may fire. */
static double
next_timer_ms(const struct llm *l, const struct plan *p)
{
    const struct conf *c = l->conf;
    double now = clock_ms(), wait = POLL_MS;

#define SOONER(t)                                                              \
    do {                                                                       \
        if ((t) - now < wait)                                                  \
            wait = (t) - now;                                                  \
    } while (0)
    if (p->retry_at_ms > 0)
        SOONER(p->retry_at_ms);
    for (size_t i = 0; i < LLM_ATTEMPTS; i++) {
        const struct exchange *a = &l->attempts[i];

        if (!a->active)
            continue;
        if (c->upstream.first_token_timeout_ms > 0)
            SOONER(a->started_ms + (double)c->upstream.first_token_timeout_ms);
        if (c->upstream.idle_timeout_ms > 0)
            SOONER(a->last_bytes_ms + (double)c->upstream.idle_timeout_ms);
        if (c->upstream.hedge_after_ms > 0)
            SOONER(a->started_ms + (double)c->upstream.hedge_after_ms);
    }
#undef SOONER
    return wait < 1 ? 1 : wait;
}

int
llm_client_left(const struct llm_call *call, const struct curl_waitfd *w,
                unsigned *watching)
{
    if (!*watching || !w->revents)
        return 0;
    switch (call->client_gone(call->watch_fd)) {
    case 1:
        return 1;
    case -1:
        *watching = 0; /* unreadable data: stop watching, don't spin */
        break;
    }
    return 0;
}

/* Run the transfers until something may have happened. Returns 0, or -1
 * when the client went away (the web server closed the connection). */
static int
drive(struct llm *l, const struct plan *p, unsigned *watching)
{
    struct curl_waitfd client = {.fd = l->call->watch_fd,
                                 .events = CURL_WAIT_POLLIN};
    int running;

    if (curl_multi_perform(l->multi, &running) != CURLM_OK ||
        running < (int)active_attempts(l))
        return 0; /* a transfer ended: collect() reads it, no waiting */
    if (curl_multi_poll(l->multi, *watching ? &client : NULL, *watching,
                        (int)next_timer_ms(l, p), NULL) != CURLM_OK)
        return 0;
    return llm_client_left(l->call, &client, watching) ? -1 : 0;
}

/* Judge every transfer that ended. Returns the winner, or NULL. */
static struct exchange *
collect(struct llm *l, struct plan *p)
{
    struct exchange *winner = NULL;
    CURLMsg *msg;
    int queued;

    curl_multi_perform(l->multi, &queued);
    while ((msg = curl_multi_info_read(l->multi, &queued)) != NULL) {
        struct exchange *a = NULL;
        CURLcode rc = msg->data.result;

        if (msg->msg != CURLMSG_DONE)
            continue;
        /* msg dies with the handle's removal: read it all first. */
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&a);
        exchange_stop(a, l->multi);
        exchange_judge(a, rc);
        if (l->client_gone)
            return NULL;
        if (l->committed != NULL && l->committed != a)
            continue; /* lost the race: stopped, not failed */
        if (a->ans.status == ANSWER_OK && winner == NULL)
            winner = a;
        else if (a->ans.status != ANSWER_OK)
            after_failure(l, p, a);
    }
    return winner;
}

/* Stop whatever lost: the attempts beside the committed one. */
static void
stop_losers(struct llm *l, const struct exchange *keep)
{
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        if (&l->attempts[i] != keep)
            exchange_stop(&l->attempts[i], l->multi);
}

/* Hand the winner's answer to the caller. A whole answer to a streaming
 * call (an upstream that does not stream) goes out as one piece now; when
 * that first write finds the client gone, ans is left to the caller. */
static void
take_answer(struct llm *l, struct plan *p, struct exchange *a,
            struct answer *ans)
{
    commit(l, a);
    if (streaming_call(l) &&
        (emit(l, a) == -1 ||
         (!a->streaming && emit_whole_calls(l, &a->ans) == -1)) &&
        l->client_gone)
        return;
    plan_note_success(p, a->provider, a->hedge);
    ans->status = a->ans.status;
    ans->http_status = a->ans.http_status;
    memcpy(ans->model, a->ans.model, sizeof(ans->model));
    ans->prompt_tokens = a->ans.prompt_tokens;
    ans->completion_tokens = a->ans.completion_tokens;
    ans->message[0] = '\0';
    answer_swap_content(ans, &a->ans);
}

/* No winner: the failure of the stream that reached the client, else the
 * last failure, is the answer. */
static void
take_failure(const struct llm *l, struct answer *ans)
{
    const struct exchange *last = l->committed;

    for (size_t i = 0; last == NULL && i < LLM_ATTEMPTS; i++)
        if (l->attempts[i].ans.status != ANSWER_OK &&
            (last == NULL ||
             l->attempts[i].started_ms > last->started_ms))
            last = &l->attempts[i];
    ans->status = last ? last->ans.status : ANSWER_FAILED;
    ans->http_status = last ? last->ans.http_status : 0;
    snprintf(ans->message, sizeof(ans->message), "%s",
             last ? last->ans.message : "no provider could be asked");
}

/* Before the first attempt of a call to an HTTPS provider this worker has
 * no TLS session with: wait for one of the pool's full-handshake slots, or
 * for a session another worker published, watching the client. The wait
 * is local queueing, never the provider's failure. (A retry or a hedge of
 * a call goes straight: the bound is for bursts of first calls.) Returns
 * 0 to go on, -1 when the client left or the deadline passed. */
static int
wait_for_tls(struct llm *l, const struct plan *p, struct answer *ans)
{
    struct curl_waitfd client = {.fd = l->call->watch_fd,
                                 .events = CURL_WAIT_POLLIN};
    unsigned watching = l->call->watch_fd >= 0;
    int pause_ms = ADMIT_POLL_MIN_MS;

    while (plan_has_next(p) && !tls_admit(plan_peek(p))) {
        if (l->call->deadline_ms > 0 && clock_ms() >= l->call->deadline_ms) {
            ans->status = ANSWER_TIMEOUT;
            snprintf(ans->message, sizeof(ans->message), "the request's "
                     "deadline passed while it waited for a TLS handshake "
                     "slot (tls_handshakes)");
            return -1;
        }
        curl_multi_poll(l->multi, watching ? &client : NULL, watching,
                        pause_ms, NULL);
        if (llm_client_left(l->call, &client, &watching)) {
            l->client_gone = 1;
            return -1;
        }
        if (pause_ms < ADMIT_POLL_MAX_MS)
            pause_ms *= 2;
    }
    return 0;
}

static void
begin_call(struct llm *l, const struct llm_call *call,
           struct answer *ans)
{
    l->call = call;
    l->committed = NULL;
    l->emitted = 0;
    l->client_gone = 0;
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        l->attempts[i].ans.status = ANSWER_OK; /* not failed: not tried */
    answer_reset(ans);
    snprintf(ans->model, sizeof(ans->model), "%s",
             call->model ? call->model : l->conf->providers[0].model);
    ans->prompt_tokens = ans->completion_tokens = -1;
}

/* A call's end: the handshake slots it may hold given back, a client
 * gone said (also after take_answer: its write may be the one that finds
 * the client gone, and ans must not keep the status of an earlier call),
 * its time. */
static void
end_call(struct llm *l, struct answer *ans, double start)
{
    for (size_t i = 0; i < l->conf->nproviders; i++)
        tls_release(i);
    json_gen_shrink(&l->gen);
    if (l->client_gone) {
        ans->status = ANSWER_CLIENT_GONE;
        snprintf(ans->message, sizeof(ans->message),
                 "the client went away while the model was answering");
    }
    ans->ms = clock_ms() - start;
}

void
llm_complete(struct llm *l, const struct llm_call *call,
             struct answer *ans)
{
    double start = clock_ms();
    struct plan p;
    struct exchange *winner = NULL, *first;
    unsigned watching = call->watch_fd >= 0;

    begin_call(l, call, ans);
    plan_begin(&p, l->conf, l->pool ? l->pool->providers : NULL, &l->rng);
    if (wait_for_tls(l, &p, ans) == -1) {
        end_call(l, ans, start);
        return;
    }
    first = start_next(l, &p, 0);
    if (first != NULL && !first->active)
        after_failure(l, &p, first);
    while (winner == NULL && !l->client_gone && !p.done &&
           (active_attempts(l) > 0 || p.retry_at_ms > 0)) {
        if (drive(l, &p, &watching) == -1) {
            l->client_gone = 1;
            break;
        }
        winner = collect(l, &p);
        if (l->committed != NULL)
            stop_losers(l, l->committed);
        if (winner == NULL)
            run_timers(l, &p);
    }
    stop_losers(l, NULL);
    if (winner != NULL)
        take_answer(l, &p, winner, ans);
    else if (!l->client_gone)
        take_failure(l, ans);
    end_call(l, ans, start);
}
