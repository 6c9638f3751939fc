/*
 * v1: the shapes of OpenAI's chat completions API, for the /v1 face that
 * lets an OpenAI client use chatfcgi as its base URL: the request body
 * (messages and options) read into a message list, and the completion,
 * the streamed chunks, the model list and the error object written with
 * a JSON generator. No I/O and no state: the chat runs the request.
 */
#ifndef CHATFCGI_V1_H
#define CHATFCGI_V1_H

#include <stddef.h>
#include <yajl/yajl_gen.h>

#include "http.h"

struct answer;
struct answer_piece;
struct buf;
struct messages;

#define V1_ERR_LEN 160
#define V1_ID_LEN 96
#define V1_DONE "[DONE]" /* the data of a stream's last event */
#define V1_MAX_TOOLS 128   /* OpenAI's own limits */
#define V1_MAX_CALLS 128   /* tool calls in one assistant message */
#define V1_MAX_STOP 4
#define V1_CALL_ID_MAX 256 /* bytes of a tool_call_id */
#define V1_USER_MAX 256

/* The options of a POST /v1/chat/completions. */
struct v1_request {
    int stream;
    int include_usage;     /* stream_options.include_usage */
    double temperature;    /* the caller's default unless given (0-2) */
    long long max_tokens;  /* the caller's default unless given */
    const char *model;     /* the model asked for, in arena; NULL: none */
    size_t model_len;
    /* The options passed through to the model (tools, tool_choice,
     * parallel_tool_calls, response_format, stop, seed, top_p, the
     * penalties, user) as one JSON object text, in options. */
    const char *options;
};

/* The caller's buffers a parse uses; what q points at lives in them. */
struct v1_scratch {
    struct buf *arena;   /* picked strings */
    struct buf *scratch; /* a message's text parts joined */
    struct buf *options; /* v1_request.options */
    yajl_gen gen;
};

/* Read body into q (whose temperature and max_tokens hold the defaults)
 * and its messages into h (with their tool calls and tool_call_ids).
 * Returns 0, or -1 with the reason for a 400 in err. */
int v1_parse_request(struct buf *body, struct v1_scratch *s,
                     struct messages *h, struct v1_request *q,
                     char err[V1_ERR_LEN]);

/* 1 when s is a function name OpenAI allows: 1-64 of a-z A-Z 0-9 _ -. */
int v1_function_name_valid(const char *s);

/* One completion being answered: what every chunk repeats. */
struct v1_completion {
    char id[V1_ID_LEN];
    long long created;
    const char *model;
    int sent_role;   /* the first chunk carries the role */
};

/* A streamed chunk with content. */
int v1_gen_chunk(yajl_gen g, struct v1_completion *c, const char *text,
                 size_t len);

/* A streamed chunk with a fragment of a tool call, as the model sent it
 * (its index normalised). */
int v1_gen_call_chunk(yajl_gen g, struct v1_completion *c,
                      const struct answer_piece *p);

/* The finish reason the model gave; without one, "tool_calls" for an
 * answer with tool calls, else "stop". */
const char *v1_finish_reason(const struct answer *a);

/* The last chunk of a stream: its finish reason. */
int v1_gen_finish_chunk(yajl_gen g, struct v1_completion *c,
                        const struct answer *a);

/* The chunk with the usage, when the client asked for it. */
int v1_gen_usage_chunk(yajl_gen g, const struct v1_completion *c,
                       const struct answer *a);

/* The whole completion, not streamed. */
int v1_gen_completion(yajl_gen g, const struct v1_completion *c,
                      const struct answer *a);

/* GET /v1/models: the models offered, a configured list (see
 * conf_list_next), in its order. */
int v1_gen_models(yajl_gen g, const char *models);

/* OpenAI's error object, {"error": {message, type, param, code}}, and
 * errors in a stream as bare data events. */
extern const struct http_error_style v1_errors;

#endif
