/*
 * messages: a list of chat messages in memory (role and content, oldest
 * first): a session's history as loaded from Redis, or the messages of a
 * /v1 request. The caller owns the struct and reuses it across requests.
 */
#ifndef CHATFCGI_MESSAGES_H
#define CHATFCGI_MESSAGES_H

#include <stddef.h>

#include <yajl/yajl_gen.h>

#include "buf.h"

/* Stored histories hold user, assistant and tool messages; system
 * messages come only from a /v1 request. */
enum message_role {
    MESSAGE_USER,
    MESSAGE_ASSISTANT,
    MESSAGE_SYSTEM,
    MESSAGE_TOOL,
};

/* What a message carries beside its content, in OpenAI's shapes. */
enum message_extra {
    MESSAGE_PLAIN,
    MESSAGE_CALLS,    /* an assistant's tool_calls: a JSON array */
    MESSAGE_CALL_ID,  /* a tool message's tool_call_id */
    MESSAGE_EXCHANGE, /* a stored turn's final answer: the tool exchange
                         before it, a JSON array of messages */
};

struct message {
    enum message_role role;
    size_t off, len; /* content in messages.text */
    enum message_extra extra_kind;
    size_t extra_off, extra_len; /* the extra in messages.text */
    /* The whole message as JSON in OpenAI's shape, in messages.json, when
     * it came so (json_len 0: messages_gen writes it from the parts). */
    size_t json_off, json_len;
};

struct messages {
    struct message *msgs;
    size_t count, cap;
    struct buf text;
    struct buf json; /* capped like text: what does not fit is not kept */
};

void messages_init(struct messages *h, size_t max_text);
void messages_reset(struct messages *h);
void messages_cleanup(struct messages *h);

/* Append a message (content copied). Returns 0 or -1 (over the text cap
 * or out of memory). */
int messages_add(struct messages *h, enum message_role role,
                 const char *content, size_t len);

/* The same with an extra (see enum message_extra). */
int messages_add_extra(struct messages *h, enum message_role role,
                       const char *content, size_t len,
                       enum message_extra kind, const char *extra,
                       size_t extra_len);

/* The message added last is exactly this JSON text, of ours or checked,
 * in OpenAI's shape: messages_gen() writes it as it is. Returns 0, or -1
 * when it does not fit (messages_gen() then writes it from its parts). */
int messages_attach_json(struct messages *h, const char *json, size_t len);

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

/* Message i into g in OpenAI's shape: {role, content[, tool_calls |
 * tool_call_id]}, an assistant's content null when it only calls tools;
 * a MESSAGE_EXCHANGE answer is its exchange's messages, then itself.
 * Returns 0 or -1. */
int messages_gen(yajl_gen g, const struct messages *h, size_t i);

#endif
