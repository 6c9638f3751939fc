/*
 * history: one session's messages in memory, oldest first, as loaded from
 * Redis, plus the pure rules on them: the stored JSON form of a message and
 * how many of the oldest to drop after a turn. The caller owns the struct.
 */
#ifndef CHATFCGI_HISTORY_H
#define CHATFCGI_HISTORY_H

#include <stddef.h>

#include "buf.h"

/* Stored histories hold user and assistant messages; system messages come
 * only from a /v1 request. */
enum history_role { HISTORY_USER, HISTORY_ASSISTANT, HISTORY_SYSTEM };

struct history_msg {
    enum history_role role;
    size_t off, len; /* content in history.text */
};

struct history {
    struct history_msg *msgs;
    size_t count, cap;
    struct buf text;
    size_t skipped; /* stored items before msgs[0] that were not loaded */
};

void history_init(struct history *h, size_t max_text);
void history_reset(struct history *h);
void history_cleanup(struct history *h);

/* Append a message (content copied). Returns 0 or -1 (over the text cap
 * or out of memory). */
int history_add(struct history *h, enum history_role role,
                const char *content, size_t len);

const char *history_content(const struct history *h, size_t i);

/* Remove the message added last. */
void history_drop_last(struct history *h);

/* Reverse the order of the messages (a history read newest first). */
void history_reverse(struct history *h);

const char *history_role_name(enum history_role role);

/* Parse one stored item {"role":"user"|"assistant","content":"..."} and
 * append it. Returns 0, or -1 when the item is not of that form. */
int history_add_json(struct history *h, const char *json, size_t len);

/* How many of the oldest stored messages to drop so that at most
 * max_messages messages and max_bytes bytes of content remain: whole
 * pairs only, never the newest pair, which the turn just added, and all
 * of those that were too old to be loaded (h->skipped). */
size_t history_trim_start(const struct history *h, size_t max_messages,
                          size_t max_bytes);

#endif
