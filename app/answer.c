/* answer: a model's answer or failure, and what it counts for. */
#include "answer.h"

#include <stdio.h>
#include <string.h>

#include "json.h"

void
answer_init(struct answer *a, size_t max_reply)
{
    memset(a, 0, sizeof(*a));
    buf_init(&a->reply, max_reply);
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++)
        buf_init(&a->calls[i].arguments, max_reply);
    answer_reset(a);
}

void
answer_reset(struct answer *a)
{
    buf_reset(&a->reply);
    for (size_t i = 0; i < a->ncalls; i++) {
        a->calls[i].id[0] = a->calls[i].name[0] = '\0';
        buf_reset(&a->calls[i].arguments);
    }
    a->ncalls = 0;
    a->finish_reason[0] = '\0';
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++)
        a->index_map[i] = -1;
}

static int
refuse_piece(struct answer *a, const char *why)
{
    snprintf(a->message, sizeof(a->message), "the model's tool call %s",
             why);
    return -1;
}

/* Which call a fragment belongs to; see answer_add_piece. */
static long long
call_index(struct answer *a, const struct answer_piece *p)
{
    const struct answer_call *c;
    long long i;

    if (p->index < 0 || p->index >= ANSWER_MAX_CALLS)
        return p->index;
    i = a->index_map[p->index] >= 0 ? a->index_map[p->index] : p->index;
    if ((size_t)i >= a->ncalls)
        return i;
    c = &a->calls[i];
    if ((p->id != NULL && c->id[0] != '\0' && strcmp(p->id, c->id) != 0) ||
        (p->name != NULL && c->name[0] != '\0')) {
        a->index_map[p->index] = (long long)a->ncalls;
        return (long long)a->ncalls;
    }
    return i;
}

/* Append a piece of an id or name to a fixed field, whole or not at all. */
static int
append_text(char *field, size_t size, const char *text)
{
    size_t have = strlen(field), n = strlen(text);

    if (have + n >= size || !json_utf8_valid(text, n))
        return -1;
    memcpy(field + have, text, n + 1);
    return 0;
}

int
answer_add_piece(struct answer *a, struct answer_piece *p)
{
    long long i = call_index(a, p);
    struct answer_call *c;

    if (i < 0 || (size_t)i > a->ncalls)
        return refuse_piece(a, "has an index out of order");
    if ((size_t)i == ANSWER_MAX_CALLS)
        return refuse_piece(a, "is one too many");
    c = &a->calls[i];
    if ((size_t)i == a->ncalls)
        a->ncalls++;
    p->index = i;
    if (p->id != NULL && c->id[0] == '\0' &&
        append_text(c->id, sizeof(c->id), p->id) == -1)
        return refuse_piece(a, "has an id too long or not UTF-8");
    if (p->name != NULL &&
        append_text(c->name, sizeof(c->name), p->name) == -1)
        return refuse_piece(a, "has a name too long or not UTF-8");
    if (p->arguments_len > 0 &&
        (!json_utf8_valid(p->arguments, p->arguments_len) ||
         buf_append(&c->arguments, p->arguments, p->arguments_len) == -1))
        return refuse_piece(a, "has arguments too long or not UTF-8");
    return 0;
}

#define SWAP(x, y)                                                             \
    do {                                                                       \
        __typeof__(x) t_ = (x);                                                \
        (x) = (y);                                                             \
        (y) = t_;                                                              \
    } while (0)

void
answer_swap_content(struct answer *a, struct answer *b)
{
    char finish[ANSWER_FINISH_LEN];

    SWAP(a->reply, b->reply);
    SWAP(a->ncalls, b->ncalls);
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++) {
        SWAP(a->calls[i], b->calls[i]);
        SWAP(a->index_map[i], b->index_map[i]);
    }
    memcpy(finish, a->finish_reason, sizeof(finish));
    memcpy(a->finish_reason, b->finish_reason, sizeof(finish));
    memcpy(b->finish_reason, finish, sizeof(finish));
}
#undef SWAP

void
answer_set_finish(struct answer *a, const char *text, size_t len)
{
    if (len == 0 || len >= sizeof(a->finish_reason))
        return;
    for (size_t i = 0; i < len; i++)
        if (!((text[i] >= 'a' && text[i] <= 'z') || text[i] == '_'))
            return;
    memcpy(a->finish_reason, text, len);
    a->finish_reason[len] = '\0';
}

void
answer_cleanup(struct answer *a)
{
    buf_cleanup(&a->reply);
    for (size_t i = 0; i < ANSWER_MAX_CALLS; i++)
        buf_cleanup(&a->calls[i].arguments);
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
