/* sse: Server-Sent Events, parsed as they arrive and framed to send. */
#include "sse.h"

#include <stdio.h>
#include <string.h>

void
sse_init(struct sse_parser *p, size_t max_line, size_t max_event,
         sse_event_fn on_event, void *arg)
{
    buf_init(&p->line, max_line);
    buf_init(&p->data, max_event);
    p->on_event = on_event;
    p->arg = arg;
    sse_reset(p);
}

void
sse_reset(struct sse_parser *p)
{
    buf_reset(&p->line);
    buf_reset(&p->data);
    p->has_data = 0;
    p->after_cr = 0;
}

void
sse_cleanup(struct sse_parser *p)
{
    buf_cleanup(&p->line);
    buf_cleanup(&p->data);
}

/* A blank line ends the event: pass it on if it had data. */
static int
end_event(struct sse_parser *p)
{
    int rc = 0;

    if (p->has_data)
        rc = p->on_event(p->arg, p->data.data, p->data.len);
    buf_reset(&p->data);
    p->has_data = 0;
    return rc;
}

/* One complete line, without its terminator (the spec's field rules). */
static int
process_line(struct sse_parser *p, const char *s, size_t n)
{
    const char *colon;
    size_t name_len;
    const char *value;
    size_t value_len;

    if (n == 0)
        return end_event(p);
    if (s[0] == ':')
        return 0; /* a comment, such as a keep-alive */
    colon = memchr(s, ':', n);
    name_len = colon ? (size_t)(colon - s) : n;
    if (name_len != 4 || memcmp(s, "data", 4) != 0)
        return 0; /* event, id, retry: nothing we need */
    value = colon ? colon + 1 : s + n;
    value_len = (size_t)(s + n - value);
    if (value_len > 0 && value[0] == ' ') {
        value++;
        value_len--;
    }
    if (p->has_data && buf_append(&p->data, "\n", 1) == -1)
        return -1;
    p->has_data = 1;
    return buf_append(&p->data, value, value_len);
}

/* Bytes up to the first CR or LF, or n when there is none. */
static size_t
line_length(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n')
            return i;
    return n;
}

/* Lines end in LF, CR or CRLF; a CRLF may be split between two feeds. */
int
sse_feed(struct sse_parser *p, const char *bytes, size_t n)
{
    size_t i = 0;

    if (n == 0)
        return 0; /* nothing, and a pending CR stays pending */
    if (p->after_cr && bytes[0] == '\n')
        i = 1;
    p->after_cr = 0;
    while (i < n) {
        size_t run = line_length(bytes + i, n - i);
        int rc;

        if (i + run == n)
            return buf_append(&p->line, bytes + i, run);
        if (p->line.len == 0) {
            if (run > p->line.max)
                return -1;
            rc = process_line(p, bytes + i, run);
        } else if (buf_append(&p->line, bytes + i, run) == -1) {
            return -1;
        } else {
            rc = process_line(p, p->line.data, p->line.len);
            buf_reset(&p->line);
        }
        if (rc == -1)
            return -1;
        i += run;
        if (bytes[i] == '\r') {
            if (i + 1 == n)
                p->after_cr = 1;
            else if (bytes[i + 1] == '\n')
                i++;
        }
        i++;
    }
    return 0;
}

size_t
sse_event_head(char out[SSE_HEAD_MAX], const char *name)
{
    int n = name ? snprintf(out, SSE_HEAD_MAX, "event: %s\ndata: ", name)
                 : snprintf(out, SSE_HEAD_MAX, "data: ");

    return n < SSE_HEAD_MAX ? (size_t)n : SSE_HEAD_MAX - 1;
}
