/*
 * buf: a growable byte buffer with a hard maximum, so that every input we
 * hold (request body, upstream answer, SSE line) is bounded at init time.
 * The caller owns the struct; buf_cleanup() releases the memory.
 */
#ifndef CHATFCGI_BUF_H
#define CHATFCGI_BUF_H

#include <stddef.h>

struct buf {
    char *data;
    size_t len;
    size_t cap;
    size_t max;
};

/* An empty buffer that will refuse to hold more than max bytes. */
void buf_init(struct buf *b, size_t max);

/* Forget the content but keep the memory for the next use, unless it grew
 * past BUF_KEEP_BYTES: what one large request needed is given back rather
 * than kept by each of a pool's thousands of workers. */
#define BUF_KEEP_BYTES (64 * 1024)
void buf_reset(struct buf *b);

/* How many times a buffer of this process grew past BUF_KEEP_BYTES: the
 * worker gives memory back to the system after a request that did. */
unsigned long buf_large_growths(void);

void buf_cleanup(struct buf *b);

/* Append n bytes. Returns 0, or -1 when the result would exceed max or
 * memory runs out; the buffer is unchanged then. */
int buf_append(struct buf *b, const void *p, size_t n);

/* Append a NUL-terminated string (without its NUL). Same returns. */
int buf_append_str(struct buf *b, const char *s);

/* Append printf-formatted text. Same returns. */
int buf_printf(struct buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Ensure data[len] == '\0' (not counted in len) and return data, or NULL
 * when out of memory (room for the NUL is kept beyond max). */
const char *buf_cstr(struct buf *b);

#endif
