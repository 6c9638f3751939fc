/*
 * chat: both faces of the chat, served over the worker's Redis connection
 * and model client. POST /api/chat runs one turn in the contract's order
 * (validate, begin the turn in Redis, ask the model, store the turn,
 * answer); GET and DELETE /api/chat/{id} read and drop a history; POST
 * /v1/chat/completions asks the model for an OpenAI client, with rate
 * limits but no history; healthz pings Redis. This is the one place where
 * failures of chatdb and llm become HTTP errors.
 */
#ifndef CHATFCGI_CHAT_H
#define CHATFCGI_CHAT_H

#include <stddef.h>

struct conf;
struct http_request;
struct scoreboard;
struct scoreboard_slot;

#define CHAT_SESSION_ID_MAX 128
#define CHAT_ERR_LEN 256

/* A worker's chat state: its Redis connection, model client and reusable
 * buffers. */
struct chat;

/* Set up after fork (nothing is connected yet); the slot shows the phase
 * of each request. Returns NULL with the reason in err. */
struct chat *chat_new(const struct conf *c, struct scoreboard *pool,
                      struct scoreboard_slot *slot, char err[CHAT_ERR_LEN]);
void chat_free(struct chat *ch);

/* What chat_new would refuse in the configuration (the [redis] rules),
 * checked without connecting, so that a bad value stops the startup or a
 * reload rather than every worker. Returns 0, or -1 with err set. */
int chat_check_conf(const struct conf *c, char err[CHAT_ERR_LEN]);

void chat_post(struct chat *ch, struct http_request *r);
void chat_get(struct chat *ch, struct http_request *r, const char *session_id);
void chat_delete(struct chat *ch, struct http_request *r,
                 const char *session_id);
void chat_completions(struct chat *ch, struct http_request *r);
void chat_healthz(struct chat *ch, struct http_request *r);

/* 1 when s is 1-128 chars of [A-Za-z0-9_-]. */
int chat_session_id_valid(const char *s, size_t n);

/* 1 for "application/json", any case, optionally with parameters of which
 * a charset must be utf-8. */
int chat_content_type_ok(const char *content_type);

#endif
