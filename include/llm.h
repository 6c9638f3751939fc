/*
 * llm: one chat completion asked of the model providers, through the
 * worker's curl multi handle. It runs the plan (providers in order,
 * retries, cooldowns) and an optional hedge as exchanges side by side,
 * relays a streamed reply as it arrives, and watches the client's
 * connection so that an abandoned request cancels its upstream transfers
 * at once. Connections and TLS sessions stay warm across calls. The
 * result is an answer with a status; the chat maps it to HTTP.
 */
#ifndef CHATFCGI_LLM_H
#define CHATFCGI_LLM_H

#include <curl/curl.h>
#include <stdint.h>
#include <yajl/yajl_gen.h>

#include "answer.h"
#include "conf.h"

struct exchange;
struct messages;
struct scoreboard;

/* Receives a piece of streamed content (whole UTF-8 characters only);
 * returns -1 when the client went away, which cancels the transfer. */
typedef int (*llm_delta_fn)(void *arg, const char *text, size_t len);

/* Receives a fragment of a tool call as it streams in (or each call of a
 * whole answer to a streaming call); -1 as for llm_delta_fn. */
typedef int (*llm_call_fn)(void *arg, const struct answer_piece *p);

/* One chat completion to ask for: [system prompt] + messages + [message]. */
struct llm_call {
    const char *system_prompt; /* NULL or "": none */
    const struct messages *messages;
    const char *message;       /* the new user message; NULL: none */
    size_t message_len;
    const char *model;         /* asked of every provider; NULL: each
                                  provider's own */
    double temperature;        /* < 0: the model's default */
    long long max_tokens;      /* 0: the model's default */
    /* NULL, or a JSON object text whose members go into the request as
     * they are (tools, tool_choice, stop, ...). */
    const char *options;
    const char *request_id;
    double deadline_ms; /* the request's own deadline (monotonic ms) */
    llm_delta_fn on_delta; /* non-NULL: ask the upstream to stream */
    llm_call_fn on_call;   /* NULL: tool calls are not relayed */
    void *delta_arg;       /* of both */
    /* The client's connection, watched while the model answers (-1: not
     * watched). When it becomes readable, client_gone(watch_fd) says 1
     * (gone: cancel), 0 (still there) or -1 (cannot tell: stop watching). */
    int watch_fd;
    int (*client_gone)(int fd);
};

/* After a poll that watched call's client as w (while *watching): 1 when
 * the client went away; else 0, clearing *watching when the connection
 * cannot tell, so that a poll never spins on it. Tools use it too. */
int llm_client_left(const struct llm_call *call, const struct curl_waitfd *w,
                    unsigned *watching);

/* At most this many requests at once for one call: the one running and a
 * hedge beside it. */
#define LLM_ATTEMPTS 2

struct llm {
    const struct conf *conf;
    struct scoreboard *pool; /* provider health, shared by the pool */
    CURLM *multi;
    yajl_gen gen;
    char *urls[CONF_PROVIDERS_MAX]; /* per provider: .../chat/completions */
    char *auth[CONF_PROVIDERS_MAX]; /* "Authorization: ..." or NULL */
    struct exchange *attempts;
    /* The call in progress: */
    const struct llm_call *call;
    struct exchange *committed; /* its content has reached the client */
    size_t emitted;             /* bytes of its reply passed on */
    int client_gone;
    uint64_t rng;               /* jitter of the retry backoff */
};

/* Set up the multi handle and one reusable exchange per attempt; pool may
 * be NULL (no shared health). Returns 0, or -1 with err set. */
int llm_init(struct llm *l, const struct conf *c, struct scoreboard *pool,
             char err[ANSWER_MESSAGE_LEN]);
void llm_cleanup(struct llm *l);

/* Run one completion through the providers in order, with retries,
 * fallbacks, cooldowns and an optional hedge; streamed when call->on_delta
 * is set (a stream never moves to another provider once content reached
 * the client). Fills ans, status first. */
void llm_complete(struct llm *l, const struct llm_call *call,
                  struct answer *ans);

#endif
