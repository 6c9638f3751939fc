/*
 * fcgi: request I/O over libfcgi. Reads a body with a hard cap without
 * trusting CONTENT_LENGTH, writes complete or streamed responses, and tells
 * whether the web server has abandoned a request. The FCGX_Request belongs
 * to the worker; nothing here keeps state.
 */
#ifndef CHATFCGI_FCGI_H
#define CHATFCGI_FCGI_H

#include <fcgiapp.h>
#include <stddef.h>

struct buf;

enum fcgi_body {
    FCGI_BODY_OK,
    FCGI_BODY_TOO_LARGE,   /* over the buffer's max; the rest is unread */
    FCGI_BODY_MISMATCH,    /* not the length CONTENT_LENGTH announced */
    FCGI_BODY_IO_ERROR,
};

/* Read the whole request body into body (whose max is the cap). A body the
 * caller did not read to the end makes the connection unusable for the next
 * request, so TOO_LARGE also marks it to be closed. */
enum fcgi_body fcgi_read_body(FCGX_Request *r, struct buf *body);

/* A request parameter, or "" when absent. */
const char *fcgi_param(FCGX_Request *r, const char *name);

/* Write a whole response: "Status:", Content-Type, Content-Length, the
 * extra header lines (each ending in \r\n, may be ""), then the body.
 * Returns the bytes written, or -1 when the web server went away. */
long fcgi_respond(FCGX_Request *r, int status, const char *content_type,
                  const char *extra_headers, const char *body, size_t len);

/* Start a streamed response: headers only, flushed at once. Returns the
 * bytes written or -1. */
long fcgi_stream_start(FCGX_Request *r, int status, const char *content_type,
                       const char *extra_headers);

/* Write and flush one piece of a streamed response. Returns 0 or -1. */
int fcgi_stream_write(FCGX_Request *r, const char *data, size_t len);

/* 1 when the web server has closed the request's connection or sent
 * FCGI_ABORT_REQUEST; 0 when it is still there; -1 when unknown (data we
 * cannot interpret is waiting), so the caller should stop watching. */
int fcgi_client_gone(int fd);

const char *fcgi_reason(int status);

#endif
