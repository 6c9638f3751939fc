/*
 * answer: what a model answered, or why it did not: the status of a call,
 * the reply text, the model's name and its token usage. An exchange fills
 * one per request it makes; llm hands the winner's to the chat. The caller
 * owns the struct and reuses it across requests.
 */
#ifndef CHATFCGI_ANSWER_H
#define CHATFCGI_ANSWER_H

#include <stddef.h>

#include "buf.h"
#include "scoreboard.h"

#define ANSWER_MESSAGE_LEN 256
#define ANSWER_MODEL_LEN 128

enum answer_status {
    ANSWER_OK,
    ANSWER_CLIENT_GONE,  /* the web server dropped the request: cancelled */
    ANSWER_TIMEOUT,      /* connect or total timeout */
    ANSWER_UNREACHABLE,  /* connection refused, DNS failure, TLS failure */
    ANSWER_HTTP_ERROR,   /* a non-2xx status; message is the provider's */
    ANSWER_BAD,          /* 2xx that is not a chat completion, or too big */
    ANSWER_FAILED,       /* anything else: transfer broke, out of memory */
};

struct answer {
    enum answer_status status;
    long http_status;
    struct buf reply;
    char model[ANSWER_MODEL_LEN];
    long long prompt_tokens, completion_tokens; /* -1: not reported */
    char message[ANSWER_MESSAGE_LEN]; /* why it failed */
    double ms;
};

void answer_init(struct answer *a, size_t max_reply);
void answer_cleanup(struct answer *a);

/* The metrics' kind of a failure. */
enum scoreboard_upstream_error answer_error_kind(enum answer_status status);

/* Model tokens of a request, for the per-minute token limit: the usage
 * the upstream reports, else about 4 bytes a token of the new message
 * (message_len) and the reply. */
long long answer_tokens(size_t message_len, const struct answer *a);

#endif
