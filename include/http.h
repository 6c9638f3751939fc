/*
 * http: one request as the handlers see it (id, method, path, client,
 * timings, what was sent) and the responses of the contract: JSON bodies,
 * the error object (or another face's, such as OpenAI's on /v1), 204, and
 * event streams. Every response carries X-Request-Id. The worker owns the
 * struct and resets it per request.
 */
#ifndef CHATFCGI_HTTP_H
#define CHATFCGI_HTTP_H

#include <fcgiapp.h>
#include <stddef.h>
#include <yajl/yajl_gen.h>

#define HTTP_ID_LEN 65
#define HTTP_STATUS_CLIENT_GONE 499 /* nginx's code, for the access log */
#define HTTP_CORS_LEN 512
#define HTTP_CLIENT_LEN 72

/* How errors look on a face of the API other than the contract's. */
struct http_error_style {
    /* The error document for status, code and message, into g. */
    int (*gen)(yajl_gen g, int status, const char *code, const char *message);
    const char *event; /* a streamed error's event name; NULL: bare data */
};

struct http_request {
    FCGX_Request *fcgi;
    yajl_gen gen; /* for response bodies; reused */
    char id[HTTP_ID_LEN];
    const char *method;
    const char *path;
    int status;    /* 0 until a response was sent */
    int retry_after_s; /* for a 429 or 503; 0: one second */
    char cors[HTTP_CORS_LEN]; /* CORS header lines for an allowed origin */
    int streaming; /* an event stream has begun: errors become events */
    const struct http_error_style *errors; /* NULL: the contract's */
    char client[HTTP_CLIENT_LEN]; /* who the request is from (guard) */
    size_t bytes_out;
    double start_ms, redis_ms, upstream_ms;
};

/* Start a request: take the web server's REQUEST_ID when it is sane,
 * else make a random one. */
void http_begin(struct http_request *r, FCGX_Request *fcgi, yajl_gen gen);

/* Send the document in r->gen with status. */
void http_send_json(struct http_request *r, int status);

/* Send a body of another type (metrics text). */
void http_send_text(struct http_request *r, int status,
                    const char *content_type, const char *body, size_t len);

/* Send {"error":{"code","message"}}; 503 and 429 carry Retry-After. Once
 * an event stream has begun, it is sent as one "event: error" instead. */
void http_send_error(struct http_request *r, int status, const char *code,
                     const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* 405 with its Allow header. */
void http_send_not_allowed(struct http_request *r, const char *allow);

void http_send_no_content(struct http_request *r);

/* Start a text/event-stream response (headers flushed). Returns 0 or -1. */
int http_stream_begin(struct http_request *r);

/* One SSE event "event: NAME\ndata: <r->gen document>\n\n", flushed
 * (NULL name: a bare "data:" event, as OpenAI streams them). Returns 0, or
 * -1 when the client went away. */
int http_stream_event(struct http_request *r, const char *name);

/* The same with text as the data ("[DONE]"). Returns 0 or -1. */
int http_stream_text(struct http_request *r, const char *name,
                     const char *text);

/* The path as routed: DOCUMENT_URI when the web server sends it, else
 * REQUEST_URI without its query string (into scratch). */
const char *http_path(FCGX_Request *fcgi, char *scratch, size_t size);

/* Fill out with 2*n random hex digits from getrandom(). Returns 0 or -1. */
int http_random_hex(char *out, size_t n);

#endif
