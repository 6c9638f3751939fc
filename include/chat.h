/*
 * chat: the chat API of the contract. POST /api/chat runs one turn in the
 * contract's order (validate, load history, ask the model, store the turn,
 * answer); GET and DELETE /api/chat/{id} read and drop a history. This is
 * the one place where failures of store and llm become HTTP errors.
 */
#ifndef CHATFCGI_CHAT_H
#define CHATFCGI_CHAT_H

#include <stddef.h>

struct llm_answer;
struct llm_call;
struct worker;

#define CHAT_SESSION_ID_MAX 128

void chat_post(struct worker *w);

/* Shared with the /v1 face. Each answers the error itself and returns -1,
 * or returns 0. */

/* Read the JSON body within its cap (415, 413, 400). */
int chat_read_body(struct worker *w);

/* Run call through the worker's llm into w->answer (502, 504; nothing
 * when the client went away), counting failures in the metrics. */
int chat_ask_model(struct worker *w, const struct llm_call *call);

/* Model tokens of an answer, for the per-minute token limit: the usage the
 * upstream reports, else about 4 bytes a token. */
long long chat_answer_tokens(size_t message_len, const struct llm_answer *a);
void chat_get(struct worker *w, const char *session_id);
void chat_delete(struct worker *w, const char *session_id);

/* 1 when s is 1-128 chars of [A-Za-z0-9_-]. */
int chat_session_id_valid(const char *s, size_t n);

/* 1 for "application/json", any case, optionally with parameters of which
 * a charset must be utf-8. */
int chat_content_type_ok(const char *content_type);

#endif
