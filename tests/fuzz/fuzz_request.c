/*
 * fuzz_request: the POST /api/chat body as chat.c's parse_turn() and
 * check_fields() read it: json_pick() in strict mode with the contract's
 * fields, then the UTF-8 and session id checks on what was picked. The input
 * is the raw body.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fuzz.h"
#include "buf.h"
#include "chat.h"
#include "json.h"

#define REQUEST_DEPTH 16 /* as chat.c */
/* chat.c's arena: max_body_bytes (default 64 KiB) plus ITEM_OVERHEAD. */
#define ARENA_MAX (65536 + 64)

enum { SID, MSG, STREAM, NFIELDS };

static void
pick(const char *doc, size_t len, struct json_field *f, struct buf *arena,
     unsigned flags, int *rc, char *err)
{
    f[SID] = (struct json_field){.path = "session_id",
                                 .accept = JSON_STRING | JSON_NULL};
    f[MSG] = (struct json_field){.path = "message", .accept = JSON_STRING};
    f[STREAM] = (struct json_field){.path = "stream",
                                    .accept = JSON_BOOL | JSON_NULL};
    err[0] = '\0';
    *rc = json_pick(doc, len, f, NFIELDS, arena, REQUEST_DEPTH, flags, err);
}

/* Every picked field has an accepted type; its text lies in the arena with
 * a NUL just after it. */
static void
check_fields(const struct json_field *f, const struct buf *arena)
{
    for (int i = 0; i < NFIELDS; i++) {
        if (f[i].type == 0)
            continue;
        check((f[i].type & f[i].accept) == f[i].type);
        check((f[i].type & (f[i].type - 1)) == 0);
        if (f[i].type != JSON_STRING)
            continue;
        check(f[i].off <= arena->len && f[i].len < arena->len - f[i].off);
        check(json_field_text(&f[i], arena)[f[i].len] == '\0');
    }
}

/* What check_fields() in chat.c then does with the picked strings. */
static void
check_values(const struct json_field *f, const struct buf *arena)
{
    if (f[MSG].type == JSON_STRING) {
        const char *msg = json_field_text(&f[MSG], arena);

        /* The contract promises the model valid UTF-8, and chat.c relies
         * on strict mode for it: it does not check the message again. */
        check(json_utf8_valid(msg, f[MSG].len));
    }
    if (f[SID].type == JSON_STRING &&
        chat_session_id_valid(json_field_text(&f[SID], arena), f[SID].len))
        /* chat.c copies len + 1 bytes into a CHAT_SESSION_ID_MAX + 1 array */
        check(f[SID].len >= 1 && f[SID].len <= CHAT_SESSION_ID_MAX);
}

/* A document strict mode takes is an object, so it opens with '{' after
 * whitespace (yajl also skips \v and \f). */
static int
opens_object(const char *doc, size_t len)
{
    size_t i = 0;

    while (i < len && strchr(" \t\n\r\v\f", doc[i]) != NULL && doc[i] != '\0')
        i++;
    return i < len && doc[i] == '{';
}

/* Lenient mode must pick the same fields from a document strict mode took:
 * strict only adds refusals. */
static void
check_same_as_lenient(const char *doc, size_t len, const struct json_field *f,
                      const struct buf *arena)
{
    struct json_field g[NFIELDS];
    char err[JSON_ERR_LEN];
    struct buf arena2;
    int rc;

    buf_init(&arena2, ARENA_MAX);
    pick(doc, len, g, &arena2, 0, &rc, err);
    check(rc == 0);
    for (int i = 0; i < NFIELDS; i++) {
        check(g[i].type == f[i].type);
        if (f[i].type == JSON_BOOL)
            check(g[i].boolean == f[i].boolean);
        if (f[i].type == JSON_STRING)
            check(g[i].len == f[i].len &&
                  memcmp(json_field_text(&g[i], &arena2),
                         json_field_text(&f[i], arena), f[i].len) == 0);
    }
    buf_cleanup(&arena2);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *doc = (const char *)data;
    struct json_field f[NFIELDS];
    char err[JSON_ERR_LEN];
    struct buf arena;
    int rc;

    buf_init(&arena, ARENA_MAX);
    pick(doc, size, f, &arena, JSON_STRICT, &rc, err);
    check(rc == 0 || rc == -1);
    if (rc == -1) {
        /* A reason for the 400, within its buffer. */
        check(err[0] != '\0' && memchr(err, '\0', JSON_ERR_LEN) != NULL);
    } else {
        check(json_utf8_valid(doc, size));
        check(opens_object(doc, size));
        check_fields(f, &arena);
        check_values(f, &arena);
        check_same_as_lenient(doc, size, f, &arena);
    }
    buf_cleanup(&arena);
    return 0;
}
