#include "llm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "attempt.h"
#include "fcgi.h"
#include "history.h"
#include "json.h"
#include "log.h"
#include "scoreboard.h"

#define POLL_MS 1000
#define BACKOFF_MAX_MS 5000.0

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
llm_init(struct llm *l, const struct conf *c, struct sb_pool *pool,
         char err[LLM_MESSAGE_LEN])
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
        ok = attempt_init(&l->attempts[i], max) == 0;
    for (size_t i = 0; ok && i < c->nproviders; i++) {
        const struct conf_provider *p = &c->providers[i];

        l->urls[i] = completions_url(p->url);
        if (p->api_key[0] != '\0')
            l->auth[i] = join("Authorization: Bearer ", p->api_key);
        ok = l->urls[i] && (p->api_key[0] == '\0' || l->auth[i]);
    }
    if (!ok) {
        snprintf(err, LLM_MESSAGE_LEN, "cannot set up curl: out of memory");
        llm_cleanup(l);
        return -1;
    }
    return 0;
}

void
llm_cleanup(struct llm *l)
{
    for (size_t i = 0; l->attempts && i < LLM_ATTEMPTS; i++) {
        attempt_stop(&l->attempts[i], l->multi);
        attempt_cleanup(&l->attempts[i]);
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
    if (call->on_delta != NULL &&
        (json_gen_cstr(g, "stream") || yajl_gen_bool(g, 1) ||
         json_gen_cstr(g, "stream_options") || yajl_gen_map_open(g) ||
         json_gen_cstr(g, "include_usage") || yajl_gen_bool(g, 1) ||
         yajl_gen_map_close(g)))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}


enum sb_upstream_error
llm_error_kind(enum llm_status status)
{
    switch (status) {
    case LLM_TIMEOUT:
        return SB_UP_TIMEOUT;
    case LLM_UNREACHABLE:
        return SB_UP_UNREACHABLE;
    case LLM_HTTP_ERROR:
        return SB_UP_HTTP_ERROR;
    case LLM_BAD_ANSWER:
        return SB_UP_BAD_ANSWER;
    case LLM_CLIENT_GONE:
        return SB_UP_CLIENT_GONE;
    case LLM_OK:
    case LLM_FAILED:
        break;
    }
    return SB_UP_FAILED;
}

/* ---- provider health, shared by every worker through the scoreboard */

static struct sb_provider *
health(const struct llm *l, size_t provider)
{
    return l->pool != NULL && provider < SB_PROVIDERS
               ? &l->pool->providers[provider]
               : NULL;
}

static int
cooling_down(const struct llm *l, size_t provider)
{
    const struct sb_provider *h = health(l, provider);

    return h != NULL && __atomic_load_n(&h->cooldown_until_ms,
                                        __ATOMIC_RELAXED) >
                            clock_wall_ms();
}

static void
note_success(struct llm *l, const struct attempt *a)
{
    struct sb_provider *h = health(l, a->provider);

    if (h == NULL)
        return;
    __atomic_store_n(&h->failures, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&h->cooldown_until_ms, 0, __ATOMIC_RELAXED);
    scoreboard_add(&h->successes, 1);
    if (a->hedge)
        scoreboard_add(&h->hedges_won, 1);
}

/* A provider failing cooldown_failures times in a row is skipped by every
 * worker for cooldown_s; the first call after that probes it again. */
static void
note_failure(struct llm *l, const struct attempt *a)
{
    const struct conf *c = l->conf;
    struct sb_provider *h = health(l, a->provider);
    uint32_t row;

    if (h == NULL || a->ans.status == LLM_CLIENT_GONE)
        return;
    scoreboard_add(&h->errors[llm_error_kind(a->ans.status)], 1);
    row = __atomic_add_fetch(&h->failures, 1, __ATOMIC_RELAXED);
    if (row < (uint32_t)c->upstream.cooldown_failures ||
        c->upstream.cooldown_s == 0)
        return;
    __atomic_store_n(&h->cooldown_until_ms,
                     clock_wall_ms() + c->upstream.cooldown_s * 1000,
                     __ATOMIC_RELAXED);
    scoreboard_add(&h->cooldowns, 1);
    log_warnx("llm", "provider %s failed %u times in a row (%s); every "
              "worker skips it for %lld s", c->providers[a->provider].name,
              row, a->ans.message, c->upstream.cooldown_s);
}

/* ---- the plan: which provider next, and when */

struct plan {
    size_t order[CONF_PROVIDERS_MAX];
    size_t n, next;         /* providers of this round; the next to try */
    long long round;        /* 0, then one per retry */
    double retry_at_ms;     /* the next round's start; 0: none pending */
    double retry_after_ms;  /* the longest wait a provider asked for */
    int retryable;          /* a failure of this round is worth a retry */
    int done;               /* nothing more to try */
};

/* The providers not cooling down, in order; all of them when every one
 * is (a probe beats a certain failure). */
static void
plan_round(const struct llm *l, struct plan *p)
{
    size_t n = l->conf->nproviders;

    p->n = p->next = 0;
    for (size_t i = 0; i < n; i++)
        if (!cooling_down(l, i))
            p->order[p->n++] = i;
    if (p->n == 0)
        for (size_t i = 0; i < n; i++)
            p->order[p->n++] = i;
}

/* Exponential backoff with jitter (half to all of the step). */
static double
backoff_ms(struct llm *l, long long round)
{
    double step = (double)l->conf->upstream.retry_base_ms *
                  (double)(1LL << (round < 10 ? round : 10));

    l->rng ^= l->rng << 13;
    l->rng ^= l->rng >> 7;
    l->rng ^= l->rng << 17;
    step *= 0.5 + (double)(l->rng % 1000) / 2000.0;
    return step < BACKOFF_MAX_MS ? step : BACKOFF_MAX_MS;
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
commit(struct llm *l, struct attempt *a)
{
    if (l->committed == NULL)
        l->committed = a;
}

/* Pass the committed reply's new bytes on, up to the last whole
 * character. Returns 0, or -1 to cancel the transfer. */
static int
emit(struct llm *l, struct attempt *a)
{
    const struct buf *r = &a->ans.reply;
    size_t end = l->emitted + json_utf8_complete_len(r->data + l->emitted,
                                                     r->len - l->emitted);

    if (end == l->emitted)
        return 0;
    if (!json_utf8_valid(r->data + l->emitted, end - l->emitted)) {
        a->stream_failed = 1;
        a->ans.status = LLM_BAD_ANSWER;
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

static int
on_content(struct attempt *a, void *arg)
{
    struct llm *l = arg;

    commit(l, a);
    return l->committed == a ? emit(l, a) : -1;
}

static struct attempt *
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
static struct attempt *
start_next(struct llm *l, struct plan *p, int hedge)
{
    size_t provider = p->order[p->next++];
    const struct conf_provider *cp = &l->conf->providers[provider];
    struct attempt *a = idle_attempt(l);
    struct attempt_spec spec = {
        .url = l->urls[provider],
        .auth_header = l->auth[provider],
        .request_id = l->call->request_id,
        .connect_timeout_ms = (long)cp->connect_timeout_ms,
        .timeout_ms = attempt_timeout_ms(l, cp),
        .stream = streaming_call(l),
    };
    struct sb_provider *h = health(l, provider);

    if (a == NULL || gen_request(l, l->call, cp->model) == -1)
        return NULL;
    yajl_gen_get_buf(l->gen, (const unsigned char **)&spec.body,
                     &spec.body_len);
    a->provider = provider;
    a->on_content = on_content;
    a->arg = l;
    if (h != NULL) {
        scoreboard_add(&h->attempts, 1);
        scoreboard_add(&h->retries, p->round > 0);
        scoreboard_add(&h->hedges, hedge != 0);
    }
    if (attempt_start(a, l->multi, &spec, cp->model) == -1)
        return a;
    a->hedge = hedge;
    return a;
}

/* A failure the request caused itself: no other provider would do better. */
static int
final_failure(const struct attempt *a)
{
    long s = a->ans.http_status;

    return a->ans.status == LLM_HTTP_ERROR && s >= 400 && s < 500 &&
           s != 408 && s != 429;
}

/* Worth asking the same provider again after a pause: it could not be
 * reached, was overloaded (429, 5xx) or broke off. A timeout or a
 * nonsense answer is not: waiting again would only double the wait. */
static int
retryable(const struct attempt *a)
{
    switch (a->ans.status) {
    case LLM_UNREACHABLE:
    case LLM_FAILED:
        return 1;
    case LLM_HTTP_ERROR:
        return a->ans.http_status == 429 || a->ans.http_status >= 500;
    default:
        return 0;
    }
}

/* After a failed attempt: another provider now, the next round after a
 * backoff, or the end. Never another try once content reached the
 * client, nor for the request's own 4xx. */
static void
after_failure(struct llm *l, struct plan *p, struct attempt *a)
{
    double wait;

    note_failure(l, a);
    if (l->committed == a || final_failure(a)) {
        p->done = 1;
        return;
    }
    if (attempt_retry_after_s(a) * 1000.0 > p->retry_after_ms)
        p->retry_after_ms = (double)attempt_retry_after_s(a) * 1000.0;
    p->retryable |= retryable(a);
    if (active_attempts(l) > 0 || p->retry_at_ms > 0)
        return; /* the other attempt may still win */
    if (p->next < p->n) {
        struct attempt *next = start_next(l, p, 0);

        if (next != NULL && !next->active)
            after_failure(l, p, next);
        return;
    }
    wait = backoff_ms(l, p->round);
    if (p->retry_after_ms > wait)
        wait = p->retry_after_ms;
    if (!p->retryable || p->round >= l->conf->upstream.retries ||
        (l->call->deadline_ms > 0 && clock_ms() + wait >= l->call->deadline_ms)) {
        p->done = 1;
        return;
    }
    p->retry_at_ms = clock_ms() + wait;
}

/* Per attempt: no first token in time, or silent too long mid-stream. */
static const char *
attempt_overdue(const struct llm *l, const struct attempt *a, double now)
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
    const struct attempt *a = NULL;
    long long after = l->conf->upstream.hedge_after_ms;

    if (after == 0 || l->committed != NULL || p->next >= p->n ||
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
        struct attempt *a = &l->attempts[i];
        const char *why = a->active ? attempt_overdue(l, a, now) : NULL;

        if (why != NULL) {
            attempt_fail(a, l->multi, LLM_TIMEOUT, why);
            after_failure(l, p, a);
        }
    }
    if (hedge_due(l, p, now)) {
        struct attempt *h = start_next(l, p, 1);

        if (h != NULL && !h->active)
            after_failure(l, p, h);
    }
    if (p->retry_at_ms > 0 && now >= p->retry_at_ms && !p->done) {
        struct attempt *r;

        p->retry_at_ms = p->retry_after_ms = 0;
        p->retryable = 0;
        p->round++;
        plan_round(l, p);
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
        const struct attempt *a = &l->attempts[i];

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
                        (int)next_timer_ms(l, p), NULL) != CURLM_OK ||
        !client.revents)
        return 0;
    switch (fcgi_client_gone(l->call->watch_fd)) {
    case 1:
        return -1;
    case -1:
        *watching = 0; /* unreadable data: stop watching, don't spin */
        break;
    }
    return 0;
}

/* Judge every transfer that ended. Returns the winner, or NULL. */
static struct attempt *
collect(struct llm *l, struct plan *p)
{
    struct attempt *winner = NULL;
    CURLMsg *msg;
    int queued;

    curl_multi_perform(l->multi, &queued);
    while ((msg = curl_multi_info_read(l->multi, &queued)) != NULL) {
        struct attempt *a = NULL;
        CURLcode rc = msg->data.result;

        if (msg->msg != CURLMSG_DONE)
            continue;
        /* msg dies with the handle's removal: read it all first. */
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&a);
        attempt_stop(a, l->multi);
        attempt_judge(a, rc);
        if (l->client_gone)
            return NULL;
        if (a->ans.status == LLM_OK && winner == NULL &&
            (l->committed == NULL || l->committed == a))
            winner = a;
        else if (a->ans.status != LLM_OK)
            after_failure(l, p, a);
    }
    return winner;
}

/* Stop whatever lost: the attempts beside the committed one. */
static void
stop_losers(struct llm *l, const struct attempt *keep)
{
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        if (&l->attempts[i] != keep)
            attempt_stop(&l->attempts[i], l->multi);
}

static void
swap_reply(struct llm_answer *a, struct llm_answer *b)
{
    struct buf t = a->reply;

    a->reply = b->reply;
    b->reply = t;
}

/* Hand the winner's answer to the caller. A whole answer to a streaming
 * call (an upstream that does not stream) goes out as one piece now. */
static void
take_answer(struct llm *l, struct attempt *a, struct llm_answer *ans)
{
    commit(l, a);
    if (streaming_call(l) && emit(l, a) == -1 && l->client_gone)
        return;
    note_success(l, a);
    ans->status = a->ans.status;
    ans->http_status = a->ans.http_status;
    memcpy(ans->model, a->ans.model, sizeof(ans->model));
    ans->prompt_tokens = a->ans.prompt_tokens;
    ans->completion_tokens = a->ans.completion_tokens;
    ans->message[0] = '\0';
    swap_reply(ans, &a->ans);
}

/* No winner: the last failure is the answer. */
static void
take_failure(const struct llm *l, struct llm_answer *ans)
{
    const struct attempt *last = NULL;

    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        if (l->attempts[i].ans.status != LLM_OK &&
            (last == NULL ||
             l->attempts[i].started_ms > last->started_ms))
            last = &l->attempts[i];
    ans->status = last ? last->ans.status : LLM_FAILED;
    ans->http_status = last ? last->ans.http_status : 0;
    snprintf(ans->message, sizeof(ans->message), "%s",
             last ? last->ans.message : "no provider could be asked");
}

static void
begin_call(struct llm *l, const struct llm_call *call,
           struct llm_answer *ans)
{
    l->call = call;
    l->committed = NULL;
    l->emitted = 0;
    l->client_gone = 0;
    for (size_t i = 0; i < LLM_ATTEMPTS; i++)
        l->attempts[i].ans.status = LLM_OK; /* not failed: not tried */
    buf_reset(&ans->reply);
    snprintf(ans->model, sizeof(ans->model), "%s",
             l->conf->providers[0].model);
    ans->prompt_tokens = ans->completion_tokens = -1;
}

void
llm_complete(struct llm *l, const struct llm_call *call,
             struct llm_answer *ans)
{
    double start = clock_ms();
    struct plan p = {0};
    struct attempt *winner = NULL, *first;
    unsigned watching = call->watch_fd >= 0;

    begin_call(l, call, ans);
    plan_round(l, &p);
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
    if (l->client_gone) {
        ans->status = LLM_CLIENT_GONE;
        snprintf(ans->message, sizeof(ans->message),
                 "the client went away while the model was answering");
    } else if (winner != NULL) {
        take_answer(l, winner, ans);
    } else {
        take_failure(l, ans);
    }
    ans->ms = clock_ms() - start;
}
