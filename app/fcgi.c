/* fcgi: request I/O over libfcgi: bounded body, responses, abandonment. */
#include "fcgi.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "buf.h"

#define READ_CHUNK 8192
#define FCGI_HEADER_LEN 8
#define FCGI_ABORT_REQUEST_TYPE 2

/* CONTENT_LENGTH as a number; -1 when absent or not a plain number. */
static long long
announced_length(FCGX_Request *r)
{
    const char *s = fcgi_param(r, "CONTENT_LENGTH");
    char *end;
    long long n;

    if (*s == '\0')
        return -1;
    errno = 0;
    n = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || n < 0)
        return -1;
    return n;
}

enum fcgi_body
fcgi_read_body(FCGX_Request *r, struct buf *body)
{
    long long announced = announced_length(r);
    char chunk[READ_CHUNK];
    int n;

    buf_reset(body);
    if (announced > (long long)body->max) {
        r->keepConnection = 0;
        return FCGI_BODY_TOO_LARGE;
    }
    /* Read to the end of the stdin stream, whatever was announced. */
    while ((n = FCGX_GetStr(chunk, sizeof(chunk), r->in)) > 0) {
        if (buf_append(body, chunk, (size_t)n) == -1) {
            r->keepConnection = 0;
            return FCGI_BODY_TOO_LARGE;
        }
    }
    if (FCGX_GetError(r->in) != 0)
        return FCGI_BODY_IO_ERROR;
    if (announced >= 0 && (size_t)announced != body->len)
        return FCGI_BODY_MISMATCH;
    return FCGI_BODY_OK;
}

const char *
fcgi_param(FCGX_Request *r, const char *name)
{
    const char *v = FCGX_GetParam(name, r->envp);

    return v ? v : "";
}

const char *
fcgi_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
    }
}

static long
write_head(FCGX_Request *r, int status, const char *content_type,
           const char *extra_headers, long long content_length)
{
    char head[1024];
    int n;

    n = snprintf(head, sizeof(head), "Status: %d %s\r\n", status,
                 fcgi_reason(status));
    if (content_type != NULL)
        n += snprintf(head + n, sizeof(head) - (size_t)n,
                      "Content-Type: %s\r\n", content_type);
    if (content_length >= 0)
        n += snprintf(head + n, sizeof(head) - (size_t)n,
                      "Content-Length: %lld\r\n", content_length);
    if (n >= (int)sizeof(head))
        return -1;
    if (FCGX_PutStr(head, n, r->out) != n ||
        FCGX_PutS(extra_headers, r->out) < 0 ||
        FCGX_PutStr("\r\n", 2, r->out) != 2)
        return -1;
    return n + (long)strlen(extra_headers) + 2;
}

long
fcgi_respond(FCGX_Request *r, int status, const char *content_type,
             const char *extra_headers, const char *body, size_t len)
{
    /* RFC 9110: no Content-Length in a 204. */
    long head = write_head(r, status, content_type, extra_headers,
                           status == 204 ? -1 : (long long)len);

    if (head < 0 || FCGX_PutStr(body, (int)len, r->out) != (int)len)
        return -1;
    return head + (long)len;
}

long
fcgi_stream_start(FCGX_Request *r, int status, const char *content_type,
                  const char *extra_headers)
{
    long head = write_head(r, status, content_type, extra_headers, -1);

    if (head < 0 || FCGX_FFlush(r->out) != 0)
        return -1;
    return head;
}

int
fcgi_stream_write(FCGX_Request *r, const char *data, size_t len)
{
    if (FCGX_PutStr(data, (int)len, r->out) != (int)len)
        return -1;
    return FCGX_FFlush(r->out) == 0 ? 0 : -1;
}

int
fcgi_client_gone(int fd)
{
    unsigned char head[FCGI_HEADER_LEN];
    ssize_t n = recv(fd, head, sizeof(head), MSG_PEEK | MSG_DONTWAIT);

    if (n == 0)
        return 1; /* the web server closed the connection */
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR
                   ? 0
                   : 1;
    if (n >= 2 && head[1] == FCGI_ABORT_REQUEST_TYPE)
        return 1;
    return -1;
}
