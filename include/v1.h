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
struct buf;
struct messages;

#define V1_ERR_LEN 160
#define V1_ID_LEN 96
#define V1_DONE "[DONE]" /* the data of a stream's last event */

/* The options of a POST /v1/chat/completions. */
struct v1_request {
    int stream;
    int include_usage;     /* stream_options.include_usage */
    double temperature;    /* the caller's default unless given (0-2) */
    long long max_tokens;  /* the caller's default unless given */
    const char *model;     /* the model asked for, in arena; NULL: none */
    size_t model_len;
};

/* Read body into q (whose temperature and max_tokens hold the defaults)
 * and its messages into h, using arena and scratch. Returns 0, or -1 with
 * the reason for a 400 in err. */
int v1_parse_request(struct buf *body, struct buf *arena,
                     struct buf *scratch, struct messages *h,
                     struct v1_request *q, char err[V1_ERR_LEN]);

/* One completion being answered: what every chunk repeats. */
struct v1_completion {
    char id[V1_ID_LEN];
    long long created;
    const char *model;
    int sent_role;   /* the first chunk carries the role */
};

/* A streamed chunk with content, or the last one (text NULL: the finish
 * reason "stop"). */
int v1_gen_chunk(yajl_gen g, struct v1_completion *c, const char *text,
                 size_t len);

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
