/*
 * sse: Server-Sent Events in both directions. Reading, an incremental
 * parser of what an upstream sends: bytes arrive in arbitrary pieces (a
 * line may be split anywhere, several events may come in one read); the
 * parser calls back once per complete event with its data lines joined.
 * Comments and fields other than data are skipped; line and event sizes
 * are capped. Writing, the framing of the events a client reads.
 */
#ifndef CHATFCGI_SSE_H
#define CHATFCGI_SSE_H

#include <stddef.h>

#include "buf.h"

/* Called with an event's data (not NUL-terminated); return 0 to go on, or
 * -1 to stop the parse (sse_feed then returns -1). */
typedef int (*sse_event_fn)(void *arg, const char *data, size_t len);

struct sse_parser {
    struct buf line;   /* the current, incomplete line */
    struct buf data;   /* data lines of the current event */
    int has_data;      /* the current event has a data field */
    int after_cr;      /* the last byte fed was a CR: skip a following LF */
    sse_event_fn on_event;
    void *arg;
};

/* max_line caps one line, max_event one event's data. */
void sse_init(struct sse_parser *p, size_t max_line, size_t max_event,
              sse_event_fn on_event, void *arg);
void sse_reset(struct sse_parser *p);
void sse_cleanup(struct sse_parser *p);

/* Feed n bytes. Returns 0, or -1 when a line or event is over its cap or
 * the callback stopped the parse. */
int sse_feed(struct sse_parser *p, const char *bytes, size_t n);

/* Writing an event: its head, then its data (one line: compact JSON has
 * no raw newline), then SSE_EVENT_END. */
#define SSE_HEAD_MAX 64
#define SSE_EVENT_END "\n\n"

/* "event: NAME\ndata: " into out, or "data: " alone when name is NULL (a
 * bare event, as OpenAI streams them). Returns its length. */
size_t sse_event_head(char out[SSE_HEAD_MAX], const char *name);

#endif
