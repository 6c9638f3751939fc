/*
 * fuzz_sse: the incremental SSE parser as exchange.c feeds it from curl's write
 * callback, where a stream may be cut anywhere. A differential check: the
 * stream fed in pieces, and one byte at a time, must give the same events
 * and the same outcome as the stream fed whole.
 *
 * Input: a header, then the stream.
 *   byte 0: bits 0-2 the number of cuts (0-7); bits 3-4 the line cap and
 *           bits 5-6 the event cap (8, 64, 1024 or 1 MiB bytes); bit 7: the
 *           callback stops the parse at the third event.
 *   then 2 bytes (little-endian) per cut: its offset in the stream, modulo
 *           the stream's length + 1. Equal offsets make empty feeds.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "buf.h"
#include "sse.h"

#define MAX_CUTS 7
#define STOP_AT 3
#define RECORD_MAX (8u << 20)

static const size_t caps[] = {8, 64, 1024, 1u << 20};

struct setup {
    size_t max_line, max_event;
    int stop;
    size_t cuts[MAX_CUTS + 2]; /* 0, the cuts in order, len */
    size_t ncuts;
    const char *stream;
    size_t len;
};

/* The events of one run: each as its length, then its data. */
struct run {
    struct buf events;
    size_t count;
    size_t max_event;
    int stop;
    int rc;
};

static int
on_event(void *arg, const char *data, size_t len)
{
    struct run *r = arg;

    check(len <= r->max_event);
    check(len == 0 || data != NULL);
    check(buf_append(&r->events, &len, sizeof(len)) == 0);
    check(buf_append(&r->events, data, len) == 0);
    r->count++;
    return r->stop && r->count == STOP_AT ? -1 : 0;
}

static int
cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;

    return x < y ? -1 : x > y;
}

/* Returns 0, or -1 when the input is too short for its header. */
static int
read_setup(const uint8_t *data, size_t size, struct setup *s)
{
    size_t hdr;

    if (size < 1)
        return -1;
    s->ncuts = data[0] & 7;
    s->max_line = caps[(data[0] >> 3) & 3];
    s->max_event = caps[(data[0] >> 5) & 3];
    s->stop = data[0] >> 7;
    hdr = 1 + 2 * s->ncuts;
    if (size < hdr)
        return -1;
    s->stream = (const char *)data + hdr;
    s->len = size - hdr;
    s->cuts[0] = 0;
    for (size_t i = 0; i < s->ncuts; i++)
        s->cuts[i + 1] = (data[1 + 2 * i] | (size_t)data[2 + 2 * i] << 8) %
                         (s->len + 1);
    qsort(s->cuts + 1, s->ncuts, sizeof(*s->cuts), cmp_size);
    s->cuts[s->ncuts + 1] = s->len;
    return 0;
}

static void
run_init(struct run *r, const struct setup *s, struct sse_parser *p)
{
    buf_init(&r->events, RECORD_MAX);
    r->count = 0;
    r->max_event = s->max_event;
    r->stop = s->stop;
    r->rc = 0;
    sse_init(p, s->max_line, s->max_event, on_event, r);
}

/* Feed the pieces [cuts[i], cuts[i + 1]); stop at the first failure, as
 * curl does when the write callback refuses. Each piece is a heap copy of
 * its own size, so that ASan sees reads past it. */
static void
feed_pieces(struct run *r, const struct setup *s, const size_t *cuts,
            size_t npieces)
{
    struct sse_parser p;

    run_init(r, s, &p);
    for (size_t i = 0; i < npieces && r->rc == 0; i++) {
        size_t n = cuts[i + 1] - cuts[i];
        char *piece = malloc(n ? n : 1);

        check(piece != NULL);
        memcpy(piece, s->stream + cuts[i], n);
        r->rc = sse_feed(&p, piece, n);
        check(r->rc == 0 || r->rc == -1);
        free(piece);
    }
    sse_cleanup(&p);
}

static void
feed_bytes(struct run *r, const struct setup *s)
{
    struct sse_parser p;

    run_init(r, s, &p);
    for (size_t i = 0; i < s->len && r->rc == 0; i++)
        r->rc = sse_feed(&p, s->stream + i, 1);
    sse_cleanup(&p);
}

static void
check_same(const struct run *a, const struct run *b)
{
    check(a->rc == b->rc);
    check(a->count == b->count);
    check(a->events.len == b->events.len);
    check(a->events.len == 0 ||
          memcmp(a->events.data, b->events.data, a->events.len) == 0);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t whole_cuts[2];
    struct run whole, pieces, bytes;
    struct setup s;

    if (read_setup(data, size, &s) == -1)
        return 0;
    whole_cuts[0] = 0;
    whole_cuts[1] = s.len;
    feed_pieces(&whole, &s, whole_cuts, 1);
    feed_pieces(&pieces, &s, s.cuts, s.ncuts + 1);
    check_same(&whole, &pieces);
    if (s.len <= 4096) {
        feed_bytes(&bytes, &s);
        check_same(&whole, &bytes);
        buf_cleanup(&bytes.events);
    }
    buf_cleanup(&whole.events);
    buf_cleanup(&pieces.events);
    return 0;
}
