/*
 * tools: the tool calls of one round of a chat turn, run all at once on
 * the worker's curl multi handle. Each call POSTs the model's arguments
 * (a JSON object) to its configured URL; the answer, JSON or text, is
 * the result; a failure, a timeout, an unknown tool or bad arguments give
 * the model an error result instead. Only configured URLs are called.
 * Owned by the chat; the easy handles, made at their first call, stay
 * warm across rounds.
 */
#ifndef CHATFCGI_TOOLS_H
#define CHATFCGI_TOOLS_H

#include <curl/curl.h>

#include "answer.h"
#include "buf.h"
#include "conf.h"
#include "llm.h"
#include "tls.h"

#define TOOLS_RESULT_MAX (64 * 1024) /* bytes of one result */

enum tool_outcome {
    TOOL_OK,
    TOOL_FAILED,  /* unreachable, a non-2xx status, a result unusable */
    TOOL_TIMEOUT, /* its timeout_ms or the request's deadline */
    TOOL_REFUSED, /* no such tool, or arguments that are no JSON object */
};

/* One call of a round. */
struct tool_run {
    const struct conf_tool *tool; /* NULL: the model named no such tool */
    const char *name;             /* as the model named it */
    const char *arguments;
    size_t arguments_len;
    enum tool_outcome outcome;
    struct buf result; /* the tool message's content */
    double ms;
    /* Private: */
    CURL *easy;
    struct tls_handshake tls;
    struct curl_slist *headers;
    int active;
    char errbuf[CURL_ERROR_SIZE];
};

struct tools {
    const struct conf *conf;
    CURLM *multi; /* the llm's: borrowed */
    struct tool_run runs[ANSWER_MAX_CALLS];
};

/* The easy handles are made as calls need them. */
void tools_init(struct tools *t, const struct conf *c, CURLM *multi);
void tools_cleanup(struct tools *t);

/* Run the calls of ans, each into t->runs[i], at once, until all have
 * ended or the deadline of call (the model call that asked for them)
 * passed; never longer than the slowest tool's timeout_ms. Watches call's
 * client: returns -1, the calls cancelled, as soon as it went away;
 * else 0. */
int tools_run(struct tools *t, const struct answer *ans,
              const struct llm_call *call);

/* "ok", "failed", "timeout" or "refused". */
const char *tools_outcome_name(enum tool_outcome o);

#endif
