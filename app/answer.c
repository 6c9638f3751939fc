/* answer: a model's answer or failure, and what it counts for. */
#include "answer.h"

#include <string.h>

void
answer_init(struct answer *a, size_t max_reply)
{
    memset(a, 0, sizeof(*a));
    buf_init(&a->reply, max_reply);
}

void
answer_cleanup(struct answer *a)
{
    buf_cleanup(&a->reply);
}

enum scoreboard_upstream_error
answer_error_kind(enum answer_status status)
{
    switch (status) {
    case ANSWER_TIMEOUT:
        return SCOREBOARD_UP_TIMEOUT;
    case ANSWER_UNREACHABLE:
        return SCOREBOARD_UP_UNREACHABLE;
    case ANSWER_HTTP_ERROR:
        return SCOREBOARD_UP_HTTP_ERROR;
    case ANSWER_BAD:
        return SCOREBOARD_UP_BAD_ANSWER;
    case ANSWER_CLIENT_GONE:
        return SCOREBOARD_UP_CLIENT_GONE;
    case ANSWER_OK:
    case ANSWER_FAILED:
        break;
    }
    return SCOREBOARD_UP_FAILED;
}

long long
answer_tokens(size_t message_len, const struct answer *a)
{
    if (a->prompt_tokens >= 0 && a->completion_tokens >= 0)
        return a->prompt_tokens + a->completion_tokens;
    return (long long)((message_len + a->reply.len) / 4 + 1);
}
