/*
 * llm: calls to the OpenAI-compatible model upstream through the worker's
 * curl multi handle. One easy handle is reused so that connections (and
 * TLS sessions) stay warm across requests; while the model thinks, the
 * client's connection is watched too, so an abandoned request cancels its
 * upstream transfer at once. Results are statuses with a reason; the chat
 * handler maps them to the HTTP error table.
 */
#ifndef CHATFCGI_LLM_H
#define CHATFCGI_LLM_H

#include <curl/curl.h>
#include <yajl/yajl_gen.h>

#include "buf.h"
#include "conf.h"
#include "scoreboard.h"

struct history;

#define LLM_MESSAGE_LEN 256
#define LLM_MODEL_LEN 128

enum llm_status {
    LLM_OK,
    LLM_CLIENT_GONE,  /* the web server dropped the request: cancelled */
    LLM_TIMEOUT,      /* connect or total timeout */
    LLM_UNREACHABLE,  /* connection refused, DNS failure, TLS failure */
    LLM_HTTP_ERROR,   /* a non-2xx status; message is the provider's */
    LLM_BAD_ANSWER,   /* 2xx that is not a chat completion, or too big */
    LLM_FAILED,       /* anything else: transfer broke, out of memory */
};

/* What the model answered. Caller-owned; reused across requests. */
struct llm_answer {
    enum llm_status status;
    long http_status;
    struct buf reply;
    char model[LLM_MODEL_LEN];
    long long prompt_tokens, completion_tokens; /* -1: not reported */
    char message[LLM_MESSAGE_LEN];
    double ms;
};

/* Receives a piece of streamed content (whole UTF-8 characters only);
 * returns -1 when the client went away, which cancels the transfer. */
typedef int (*llm_delta_fn)(void *arg, const char *text, size_t len);

/* One chat completion to ask for: [system prompt] + history + [message]. */
struct llm_call {
    const char *system_prompt; /* NULL or "": none */
    const struct history *history;
    const char *message;       /* the new user message; NULL: none */
    size_t message_len;
    double temperature;        /* < 0: the model's default */
    long long max_tokens;      /* 0: the model's default */
    const char *request_id;
    int watch_fd; /* the request's connection to the web server, or -1 */
    double deadline_ms; /* the request's own deadline (monotonic ms) */
    llm_delta_fn on_delta; /* non-NULL: ask the upstream to stream */
    void *delta_arg;
};

/* At most this many requests at once for one call: the one running and a
 * hedge beside it. */
#define LLM_ATTEMPTS 2

struct attempt;
struct sb_pool;

struct llm {
    const struct conf *conf;
    struct sb_pool *pool; /* provider health, shared by the pool */
    CURLM *multi;
    yajl_gen gen;
    char *urls[CONF_PROVIDERS_MAX]; /* per provider: .../chat/completions */
    char *auth[CONF_PROVIDERS_MAX]; /* "Authorization: ..." or NULL */
    struct attempt *attempts;
    /* The call in progress: */
    const struct llm_call *call;
    struct attempt *committed; /* its content has reached the client */
    size_t emitted;            /* bytes of its reply passed on */
    int client_gone;
    uint64_t rng;              /* jitter of the retry backoff */
};

/* Set up the multi handle and one reusable request per attempt; pool may
 * be NULL (no shared health). Returns 0, or -1 with err set. */
int llm_init(struct llm *l, const struct conf *c, struct sb_pool *pool,
             char err[LLM_MESSAGE_LEN]);
void llm_cleanup(struct llm *l);

/* The metrics' kind of a failure. */
enum sb_upstream_error llm_error_kind(enum llm_status status);

void llm_answer_init(struct llm_answer *a, size_t max_reply);
void llm_answer_cleanup(struct llm_answer *a);

/* Run one completion through the providers in order, with retries,
 * fallbacks, cooldowns and an optional hedge; streamed when call->on_delta
 * is set (a stream never moves to another provider once content reached
 * the client). Fills ans, status first. */
void llm_complete(struct llm *l, const struct llm_call *call,
                  struct llm_answer *ans);

#endif
