/*
 * fuzz_answer: what a model upstream sends back in one body, as exchange.c reads
 * it: exchange_parse_answer() for a 2xx chat completion and exchange_error_message()
 * for an error body. The input is the raw body. The reply cap is small so
 * that "too long" is reached too.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "exchange.h"
#include "fuzz.h"
#include "json.h"

#define REPLY_MAX 4096
#define TOKENS_MAX (1LL << 40) /* exchange.c's pick_usage() bound */

static int
tokens_ok(long long n)
{
    return n == -1 || (n >= 0 && n <= TOKENS_MAX);
}

static void
fuzz_parse_answer(const char *body, size_t len)
{
    struct answer a;

    answer_init(&a, REPLY_MAX);
    /* As exchange_start() leaves it before parsing. */
    memcpy(a.model, "preset", sizeof("preset"));
    a.prompt_tokens = a.completion_tokens = -1;
    if (exchange_parse_answer(body, len, &a) == 0) {
        /* The reply goes into JSON and SSE as is: it must be UTF-8. */
        check(a.reply.len <= REPLY_MAX);
        check(json_utf8_valid(a.reply.data, a.reply.len));
        check(memchr(a.model, '\0', sizeof(a.model)) != NULL);
        check(tokens_ok(a.prompt_tokens) && tokens_ok(a.completion_tokens));
    } else {
        check(a.reply.len == 0);
        check(a.message[0] != '\0');
        check(memchr(a.message, '\0', sizeof(a.message)) != NULL);
    }
    answer_cleanup(&a);
}

static void
fuzz_error_message(const char *body, size_t len)
{
    char out[ANSWER_MESSAGE_LEN];

    memset(out, 0x55, sizeof(out));
    if (exchange_error_message(body, len, out, sizeof(out)) == 0)
        check(out[0] != '\0' && memchr(out, '\0', sizeof(out)) != NULL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_parse_answer((const char *)data, size);
    fuzz_error_message((const char *)data, size);
    return 0;
}
