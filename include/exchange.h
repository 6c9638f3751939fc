/*
 * exchange: one HTTP request to one model provider and its response, on
 * the worker's curl multi handle: the curl easy handle, the request body,
 * the answer as it arrives (whole, or as Server-Sent Events parsed as
 * they come) and, when it ends, what it amounts to (an answer, or a
 * failure of some kind). llm runs several (retries, fallbacks, a hedge)
 * and picks the one that wins. Owned by struct llm; reused across calls.
 */
#ifndef CHATFCGI_EXCHANGE_H
#define CHATFCGI_EXCHANGE_H

#include <curl/curl.h>

#include "answer.h"
#include "buf.h"
#include "sse.h"
#include "tls.h"

/* What an exchange needs to start. */
struct exchange_spec {
    const char *url;         /* {base}/chat/completions */
    const char *auth_header; /* "Authorization: Bearer ..." or NULL */
    const char *request_id;
    const char *body;        /* copied */
    size_t body_len;
    long connect_timeout_ms;
    long timeout_ms;
    int stream;
};

struct exchange {
    CURL *easy;
    int active;          /* added to the multi handle */
    size_t provider;     /* index in conf->providers */
    int hedge;           /* started as a hedge beside another */
    double started_ms;
    double last_bytes_ms;
    int got_bytes;       /* any response body arrived */
    int got_content;     /* content text arrived */
    int want_stream;     /* the call asked for a stream */
    int streaming;       /* the answer is read as events */
    struct buf body;     /* the request body; curl reads it from here */
    struct buf response; /* a whole (non-streamed) answer */
    int response_too_large;
    struct sse_parser sse;
    struct buf arena;    /* strings picked from one event */
    struct buf event;    /* one event with tool calls, NUL-terminated */
    /* The tool-call fragments of the event on_content is called for: */
    struct answer_piece pieces[ANSWER_MAX_CALLS];
    size_t npieces;
    int stream_complete; /* [DONE] or a finish_reason arrived */
    int stream_failed;   /* the stream broke: ans says why */
    int stopped;         /* on_content stopped it: not the provider's doing */
    /* It timed out before the request went out (TCP connect or TLS
     * handshake), which a host short of CPU (a burst) makes as likely as
     * the provider: a failure, but not one that counts toward the
     * provider's cooldown, and one worth another try (nothing was sent). */
    int connect_timeout;
    struct tls_handshake tls;
    struct answer ans;
    struct curl_slist *headers;
    char errbuf[CURL_ERROR_SIZE];
    /* Called when content was appended to ans.reply; -1 cancels. */
    int (*on_content)(struct exchange *a, void *arg);
    void *arg;
};

/* What every POST of ours sets on its easy handle, a provider's or a
 * tool's (after curl_easy_reset): the URL (http or https only), the body,
 * headers, where the answer goes, the handle's private pointer and error
 * buffer, no signals, no Nagle, the total timeout, the pool's TLS set-up
 * (tls_use). */
struct exchange_post {
    const char *url;
    const char *body;
    size_t body_len;
    struct curl_slist *headers;
    curl_write_callback on_body;
    void *arg; /* WRITEDATA and PRIVATE */
    char *errbuf;
    long timeout_ms;
    struct tls_handshake *tls; /* its peer set */
};
void exchange_post_options(CURL *e, const struct exchange_post *p);

/* The headers of such a POST: JSON, no 100-continue round trip, the
 * request id, and auth_header unless NULL. The caller frees them
 * (curl_slist_free_all); NULL when out of memory. */
struct curl_slist *exchange_headers(const char *auth_header,
                                    const char *request_id);

/* Returns 0, or -1 when out of memory. */
int exchange_init(struct exchange *a, size_t max_reply);
void exchange_cleanup(struct exchange *a);

/* Start the request on multi. Returns 0, or -1 with a->ans set. */
int exchange_start(struct exchange *a, CURLM *multi,
                  const struct exchange_spec *spec, const char *model);

/* Take the exchange off multi (closing its connection if it is still
 * running, so the provider sees the request abandoned). */
void exchange_stop(struct exchange *a, CURLM *multi);

/* Judge a transfer that ended with rc: a->ans.status and message. */
void exchange_judge(struct exchange *a, CURLcode rc);

/* Parse a non-streaming answer body into ans (reply, tool calls, finish
 * reason, model, usage).
 * Returns 0, or -1 with ans->message set. Pure; exposed for tests. */
int exchange_parse_answer(const char *body, size_t len, struct answer *ans);

/* The provider's error message from an error body, whatever its shape
 * ({"error":{"message"}}, {"error":"..."}, {"message"}, {"detail"}).
 * Returns 0 and fills out, or -1 when the body has none. */
int exchange_error_message(const char *body, size_t len, char *out,
                          size_t size);

/* Seconds the provider asked to wait with Retry-After, or 0. */
long exchange_retry_after_s(struct exchange *a);

/* Fail a running exchange for a reason of the caller's (a timeout). */
void exchange_fail(struct exchange *a, CURLM *multi, enum answer_status status,
                  const char *why);

#endif
