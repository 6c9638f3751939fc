/* http: the request in hand and the contract's responses. */
#include "http.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "clock.h"
#include "fcgi.h"
#include "json.h"
#include "log.h"
#include "sse.h"

#define HEADERS_LEN 1024
#define ERROR_MESSAGE_LEN 512
#define REQUEST_ID_BYTES 16

int
http_random_hex(char *out, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    unsigned char raw[64];

    if (n > sizeof(raw) || getrandom(raw, n, 0) != (ssize_t)n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[raw[i] >> 4];
        out[2 * i + 1] = digits[raw[i] & 15];
    }
    out[2 * n] = '\0';
    return 0;
}

static int
id_is_sane(const char *s)
{
    size_t n = strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         "0123456789_-");

    return n > 0 && n < HTTP_ID_LEN && s[n] == '\0';
}

void
http_begin(struct http_request *r, FCGX_Request *fcgi, yajl_gen gen)
{
    const char *id = fcgi_param(fcgi, "REQUEST_ID");

    memset(r, 0, sizeof(*r));
    r->fcgi = fcgi;
    r->gen = gen;
    r->start_ms = clock_ms();
    r->method = fcgi_param(fcgi, "REQUEST_METHOD");
    if (id_is_sane(id))
        snprintf(r->id, sizeof(r->id), "%s", id);
    else if (http_random_hex(r->id, REQUEST_ID_BYTES) == -1)
        snprintf(r->id, sizeof(r->id), "unknown");
    log_set_request_id(r->id);
}

const char *
http_path(FCGX_Request *fcgi, char *scratch, size_t size)
{
    const char *doc = fcgi_param(fcgi, "DOCUMENT_URI");
    const char *uri;

    if (*doc != '\0')
        return doc;
    uri = fcgi_param(fcgi, "REQUEST_URI");
    snprintf(scratch, size, "%.*s", (int)strcspn(uri, "?"), uri);
    return scratch;
}

static void
extra_headers(const struct http_request *r, char out[HEADERS_LEN],
              const char *more)
{
    snprintf(out, HEADERS_LEN,
             "X-Request-Id: %s\r\nCache-Control: no-store\r\n%s%s", r->id,
             r->cors, more);
}

static void
send_body(struct http_request *r, int status, const char *more,
          const char *content_type, const char *body, size_t len)
{
    char headers[HEADERS_LEN];
    long n;

    extra_headers(r, headers, more);
    n = fcgi_respond(r->fcgi, status, len ? content_type : NULL, headers,
                     body, len);
    r->status = status;
    r->bytes_out = n > 0 ? (size_t)n : 0;
    if (n < 0)
        log_info("http", "the client went away before the response");
}

void
http_send_json(struct http_request *r, int status)
{
    const unsigned char *body;
    size_t len;

    yajl_gen_get_buf(r->gen, &body, &len);
    send_body(r, status, "", "application/json", (const char *)body, len);
}

void
http_send_text(struct http_request *r, int status, const char *content_type,
               const char *body, size_t len)
{
    send_body(r, status, "", content_type, body, len);
}

/* The contract's error object, {"error": {message, code}}. */
static int
gen_contract_error(yajl_gen g, int status, const char *code,
                   const char *message)
{
    (void)status;
    return yajl_gen_map_open(g) || json_gen_cstr(g, "error") ||
           yajl_gen_map_open(g) || json_gen_key_cstr(g, "message", message) ||
           json_gen_key_cstr(g, "code", code) || yajl_gen_map_close(g) ||
           yajl_gen_map_close(g);
}

/* The error object of the request's face. Messages that are not valid
 * UTF-8 (say, an upstream's) are replaced rather than breaking the JSON. */
static int
gen_error(const struct http_request *r, int status, const char *code,
          const char *message)
{
    json_gen_restart(r->gen);
    if (!json_utf8_valid(message, strlen(message)))
        message = "(the reason contained invalid UTF-8)";
    if (r->errors != NULL)
        return r->errors->gen(r->gen, status, code, message);
    return gen_contract_error(r->gen, status, code, message);
}

static void
send_error(struct http_request *r, int status, const char *code,
           const char *more, const char *message)
{
    const unsigned char *body;
    size_t len;

    if (gen_error(r, status, code, message) != 0)
        gen_error(r, status, code, "(no description)");
    if (status >= 500)
        log_warnx("http", "%d %s: %s%s", status, code, message,
                  r->streaming ? " (after the stream began)" : "");
    else
        log_debug("http", "%d %s: %s", status, code, message);
    if (r->streaming) {
        if (http_stream_event(r, r->errors ? r->errors->event : "error") ==
            -1)
            log_info("http", "the client went away before the error event");
        return;
    }
    yajl_gen_get_buf(r->gen, &body, &len);
    send_body(r, status, more, "application/json", (const char *)body, len);
}

void
http_send_error(struct http_request *r, int status, const char *code,
                const char *fmt, ...)
{
    char message[ERROR_MESSAGE_LEN], more[64] = "";
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    if (status == 503 || status == 429)
        snprintf(more, sizeof(more), "Retry-After: %d\r\n",
                 r->retry_after_s > 0 ? r->retry_after_s : 1);
    else if (status == 401)
        snprintf(more, sizeof(more), "WWW-Authenticate: Bearer\r\n");
    send_error(r, status, code, more, message);
}

void
http_send_not_allowed(struct http_request *r, const char *allow)
{
    char more[128], message[128];

    snprintf(more, sizeof(more), "Allow: %s\r\n", allow);
    snprintf(message, sizeof(message), "%s is not allowed here; use %s",
             r->method, allow);
    send_error(r, 405, "method_not_allowed", more, message);
}

void
http_send_no_content(struct http_request *r)
{
    send_body(r, 204, "", NULL, "", 0);
}

int
http_stream_begin(struct http_request *r)
{
    char headers[HEADERS_LEN];
    long n;

    /* X-Accel-Buffering: nginx must pass each event on at once. */
    extra_headers(r, headers, "X-Accel-Buffering: no\r\n");
    n = fcgi_stream_start(r->fcgi, 200, "text/event-stream; charset=utf-8",
                          headers);
    r->status = 200;
    r->streaming = 1;
    if (n < 0)
        return -1;
    r->bytes_out += (size_t)n;
    return 0;
}

/* One event, written and flushed: no copy of data. */
static int
stream_event(struct http_request *r, const char *name, const char *data,
             size_t len)
{
    static const size_t end_len = sizeof(SSE_EVENT_END) - 1;
    char head[SSE_HEAD_MAX];
    size_t n = sse_event_head(head, name);

    if (FCGX_PutStr(head, (int)n, r->fcgi->out) != (int)n ||
        FCGX_PutStr(data, (int)len, r->fcgi->out) != (int)len ||
        fcgi_stream_write(r->fcgi, SSE_EVENT_END, end_len) == -1)
        return -1;
    r->bytes_out += n + len + end_len;
    return 0;
}

int
http_stream_event(struct http_request *r, const char *name)
{
    const unsigned char *data;
    size_t len;

    yajl_gen_get_buf(r->gen, &data, &len);
    return stream_event(r, name, (const char *)data, len);
}

int
http_stream_text(struct http_request *r, const char *name, const char *text)
{
    return stream_event(r, name, text, strlen(text));
}
