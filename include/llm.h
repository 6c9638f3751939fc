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
#include "sse.h"

struct conf;
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

/* How the body of the current upstream answer is read. */
enum llm_body { LLM_BODY_UNKNOWN, LLM_BODY_WHOLE, LLM_BODY_EVENTS };

struct llm {
    const struct conf *conf;
    CURLM *multi;
    CURL *easy;
    yajl_gen gen;
    char *url;         /* {base}/chat/completions */
    char *auth_header; /* "Authorization: Bearer ..." or NULL */
    char errbuf[CURL_ERROR_SIZE];

    /* State of the call in progress: */
    const struct llm_call *call;
    struct llm_answer *ans;
    enum llm_body body_mode;
    struct buf response; /* a whole (non-streamed) body */
    int response_too_large;
    struct sse_parser sse;
    struct buf event_arena; /* strings picked from one event */
    size_t emitted;         /* bytes of ans->reply passed to on_delta */
    int stream_complete;    /* [DONE] or a finish_reason was seen */
    int client_gone;
    int stream_failed;      /* the stream broke; ans has the reason */
};

/* Set up the multi and easy handles. Returns 0, or -1 with err set. */
int llm_init(struct llm *l, const struct conf *c, char err[LLM_MESSAGE_LEN]);
void llm_cleanup(struct llm *l);

void llm_answer_init(struct llm_answer *a, size_t max_reply);
void llm_answer_cleanup(struct llm_answer *a);

/* Run one completion, streamed when call->on_delta is set; fills ans
 * (status first). */
void llm_complete(struct llm *l, const struct llm_call *call,
                  struct llm_answer *ans);

/* Parse a non-streaming answer body into ans (reply, model, usage).
 * Returns 0, or -1 with ans->message set. Pure; exposed for tests. */
int llm_parse_answer(const char *body, size_t len, struct llm_answer *ans);

/* The provider's error message from an error body, whatever its shape
 * ({"error":{"message"}}, {"error":"..."}, {"message"}, {"detail"}).
 * Returns 0 and fills out, or -1 when the body has none. */
int llm_error_message(const char *body, size_t len, char *out, size_t size);

#endif
