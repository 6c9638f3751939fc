/*
 * messages: a list of chat messages in memory (role and content, oldest
 * first): a session's history as loaded from Redis, or the messages of a
 * /v1 request. The caller owns the struct and reuses it across requests.
 */
#ifndef CHATFCGI_MESSAGES_H
#define CHATFCGI_MESSAGES_H

#include <stddef.h>

#include "buf.h"

/* Stored histories hold user, assistant and tool messages; system
 * messages come only from a /v1 request. */
enum message_role {
    MESSAGE_USER,
    MESSAGE_ASSISTANT,
    MESSAGE_SYSTEM,
    MESSAGE_TOOL,
};

struct message {
    enum message_role role;
    size_t off, len; /* content in messages.text */
    /* In messages.text too, len 0 when none: an assistant message's
     * tool_calls (a JSON array), or a tool message's tool_call_id. */
    size_t extra_off, extra_len;
};

struct messages {
    struct message *msgs;
    size_t count, cap;
    struct buf text;
};

void messages_init(struct messages *h, size_t max_text);
void messages_reset(struct messages *h);
void messages_cleanup(struct messages *h);

/* Append a message (content copied). Returns 0 or -1 (over the text cap
 * or out of memory). */
int messages_add(struct messages *h, enum message_role role,
                 const char *content, size_t len);

/* The same with the extra of a tool exchange (see struct message). */
int messages_add_extra(struct messages *h, enum message_role role,
                       const char *content, size_t len, const char *extra,
                       size_t extra_len);

/* Message i's extra, NUL-terminated (its length is msgs[i].extra_len). */
const char *messages_extra(const struct messages *h, size_t i);

/* Message i's content, NUL-terminated (its length is msgs[i].len). */
const char *messages_content(const struct messages *h, size_t i);

/* Remove the message added last. */
void messages_drop_last(struct messages *h);

/* Keep the first count messages only. */
void messages_truncate(struct messages *h, size_t count);

/* Reverse the order of the messages (a list read newest first). */
void messages_reverse(struct messages *h);

const char *messages_role_name(enum message_role role);

#endif
