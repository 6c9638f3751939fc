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
#define ANSWER_MAX_CALLS 16     /* tool calls in one answer */
#define ANSWER_CALL_ID_LEN 96
#define ANSWER_TOOL_NAME_LEN 65 /* OpenAI's 64 characters, and a NUL */
#define ANSWER_FINISH_LEN 24

enum answer_status {
    ANSWER_OK,
    ANSWER_CLIENT_GONE,  /* the web server dropped the request: cancelled */
    ANSWER_TIMEOUT,      /* connect or total timeout */
    ANSWER_UNREACHABLE,  /* connection refused, DNS failure, TLS failure */
    ANSWER_HTTP_ERROR,   /* a non-2xx status; message is the provider's */
    ANSWER_BAD,          /* 2xx that is not a chat completion, or too big */
    ANSWER_FAILED,       /* anything else: transfer broke, out of memory */
};

/* A tool call the model asked for: its arguments are JSON text as the
 * model wrote it (not checked: the tool, or the client, judges them). */
struct answer_call {
    char id[ANSWER_CALL_ID_LEN];
    char name[ANSWER_TOOL_NAME_LEN];
    struct buf arguments;
};

/* One fragment of a tool call, as a stream brings it (a whole answer
 * brings each call as one). Strings are NUL-terminated and owned by the
 * caller; NULL when the fragment does not carry them. */
struct answer_piece {
    long long index;         /* set to the call's own by answer_add_piece */
    const char *id;
    const char *name;
    const char *arguments;
    size_t arguments_len;
};

struct answer {
    enum answer_status status;
    long http_status;
    struct buf reply;
    char model[ANSWER_MODEL_LEN];
    long long prompt_tokens, completion_tokens; /* -1: not reported */
    struct answer_call calls[ANSWER_MAX_CALLS];
    size_t ncalls;
    /* The call the provider's index i now stands for (-1: call i): one
     * that reuses an index for another call moves it on. */
    long long index_map[ANSWER_MAX_CALLS];
    char finish_reason[ANSWER_FINISH_LEN]; /* "" when none was given */
    char message[ANSWER_MESSAGE_LEN]; /* why it failed */
    double ms;
};

void answer_init(struct answer *a, size_t max_reply);
void answer_cleanup(struct answer *a);

/* Forget the reply, calls and finish reason of the last answer. */
void answer_reset(struct answer *a);

/* Add a tool-call fragment to its call. Providers that number every call
 * 0 (some Ollama versions) are normalised: a fragment that names another
 * id, or a function when its call has one already, starts the next call.
 * p->index becomes the call's index. Returns 0, or -1 with a->message
 * set (too many calls, an index out of order, a name or an id too long
 * or not UTF-8, arguments over the reply's cap). */
int answer_add_piece(struct answer *a, struct answer_piece *p);

/* Exchange what two answers said (reply, calls, finish reason), buffers
 * and all, so that the winner's moves without a copy. */
void answer_swap_content(struct answer *a, struct answer *b);

/* Keep the finish reason a provider gave, when it is a short word. */
void answer_set_finish(struct answer *a, const char *text, size_t len);

/* The metrics' kind of a failure. */
enum scoreboard_upstream_error answer_error_kind(enum answer_status status);

/* Model tokens of a request, for the per-minute token limit: the usage
 * the upstream reports, else about 4 bytes a token of the new message
 * (message_len) and the reply. */
long long answer_tokens(size_t message_len, const struct answer *a);

#endif
