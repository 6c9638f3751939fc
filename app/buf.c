/* buf: a growable byte buffer with a hard maximum. */
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_MIN_CAP 256

static unsigned long large_growths;

void
buf_init(struct buf *b, size_t max)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

void
buf_reset(struct buf *b)
{
    if (b->cap > BUF_KEEP_BYTES) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
    b->len = 0;
}

void
buf_cleanup(struct buf *b)
{
    free(b->data);
    buf_init(b, b->max);
}

/* Room for need bytes in total, plus one for a terminating NUL. */
static int
buf_reserve(struct buf *b, size_t need)
{
    size_t cap;
    char *p;

    if (need > b->max)
        return -1;
    if (need < b->cap)
        return 0;
    cap = b->cap ? b->cap : BUF_MIN_CAP;
    while (cap <= need)
        cap *= 2;
    if (cap > b->max + 1)
        cap = b->max + 1;
    p = realloc(b->data, cap);
    if (p == NULL)
        return -1;
    b->data = p;
    b->cap = cap;
    large_growths += cap > BUF_KEEP_BYTES;
    return 0;
}

unsigned long
buf_large_growths(void)
{
    return large_growths;
}

int
buf_append(struct buf *b, const void *p, size_t n)
{
    if (n > b->max - b->len || buf_reserve(b, b->len + n) == -1)
        return -1;
    if (n > 0)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

int
buf_append_str(struct buf *b, const char *s)
{
    return buf_append(b, s, strlen(s));
}

int
buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n > b->max - b->len ||
        buf_reserve(b, b->len + (size_t)n) == -1)
        return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

const char *
buf_cstr(struct buf *b)
{
    if (buf_reserve(b, b->len) == -1)
        return NULL;
    b->data[b->len] = '\0';
    return b->data;
}
