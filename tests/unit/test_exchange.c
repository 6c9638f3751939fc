/*
 * Unit tests of exchange's pure parsers: exchange_parse_answer (an
 * OpenAI-compatible chat completion) and exchange_error_message (the provider's error text,
 * whatever the provider's error shape).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "json.h"
#include "exchange.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))
#define PRESET "preset-model"

/* An answer as llm_complete prepares it: the configured model, tokens not
 * reported. */
static void
preset_answer(struct answer *a, size_t max_reply)
{
    answer_init(a, max_reply);
    snprintf(a->model, sizeof(a->model), "%s", PRESET);
    a->prompt_tokens = a->completion_tokens = -1;
}

static int
parse(struct answer *a, const char *body)
{
    return exchange_parse_answer(body, strlen(body), a);
}

static void
expect_reply(struct answer *a, const char *want, size_t len)
{
    assert_int_equal(a->reply.len, len);
    assert_memory_equal(a->reply.data, want, len);
}

static const char openai_answer[] =
    "{\"id\":\"chatcmpl-123\",\"object\":\"chat.completion\","
    "\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\","
    "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"Hello! How can I help?\",\"refusal\":null},"
    "\"logprobs\":null,\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,"
    "\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":0}},"
    "\"system_fingerprint\":\"fp_1\"}";

static void
test_answer_openai(void **state)
{
    struct answer a;

    (void)state;
    preset_answer(&a, 4096);
    assert_int_equal(parse(&a, openai_answer), 0);
    expect_reply(&a, "Hello! How can I help?", 22);
    assert_string_equal(a.model, "gpt-4o-mini-2024-07-18");
    assert_true(a.prompt_tokens == 12);
    assert_true(a.completion_tokens == 7);
    answer_cleanup(&a);
}

/* Escapes in the reply are decoded: newlines, quotes, UTF-8, NUL. */
static void
test_answer_escapes(void **state)
{
    static const char body[] =
        "{\"choices\":[{\"message\":{\"content\":\"line1\\nline2 \\\"q\\\" "
        "\\u00e9\\ud83d\\ude00 \xe2\x82\xac \\u0000end\"}}]}";
    static const char want[] = "line1\nline2 \"q\" \xc3\xa9\xf0\x9f\x98\x80 "
                               "\xe2\x82\xac \0end";
    struct answer a;

    (void)state;
    preset_answer(&a, 4096);
    assert_int_equal(exchange_parse_answer(body, sizeof(body) - 1, &a), 0);
    expect_reply(&a, want, sizeof(want) - 1);
    answer_cleanup(&a);
}

/* llama.cpp, vLLM and Ollama answer in the same shape, with their own
 * extras; only the first choice is the reply. */
static void
test_answer_first_choice_only(void **state)
{
    static const char body[] =
        "{\"choices\":[{\"message\":{\"content\":\"first\"}},"
        "{\"message\":{\"content\":\"second\"}}],\"model\":\"m\","
        "\"timings\":{\"predicted_ms\":1.5}}";
    struct answer a;

    (void)state;
    preset_answer(&a, 4096);
    assert_int_equal(parse(&a, body), 0);
    expect_reply(&a, "first", 5);
    answer_cleanup(&a);
}

/* An empty reply is still a reply. */
static void
test_answer_empty_content(void **state)
{
    struct answer a;

    (void)state;
    preset_answer(&a, 4096);
    assert_int_equal(parse(&a, "{\"choices\":[{\"message\":{\"content\":\"\""
                               "}}]}"),
                     0);
    assert_int_equal(a.reply.len, 0);
    answer_cleanup(&a);
}

/* Without usage, or with usage that is not two integers, the token
 * counts are -1 ("not reported"), each on its own. */
static void
test_answer_usage(void **state)
{
    static const struct {
        const char *usage;
        long long prompt, completion;
    } cases[] = {
        {"", -1, -1},
        {",\"usage\":null", -1, -1},
        {",\"usage\":{}", -1, -1},
        {",\"usage\":{\"prompt_tokens\":5}", 5, -1},
        {",\"usage\":{\"completion_tokens\":9}", -1, 9},
        {",\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0}", 0, 0},
        {",\"usage\":{\"prompt_tokens\":\"5\",\"completion_tokens\":1.5}", -1,
         -1},
        {",\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":null}", -1,
         -1},
        {",\"usage\":{\"prompt_tokens\":99999999999999999999,"
         "\"completion_tokens\":2}",
         -1, 2},
        {",\"usage\":[1,2]", -1, -1},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        char body[256];
        struct answer a;

        snprintf(body, sizeof(body),
                 "{\"choices\":[{\"message\":{\"content\":\"x\"}}]%s}",
                 cases[i].usage);
        preset_answer(&a, 64);
        a.prompt_tokens = a.completion_tokens = 77; /* must be overwritten */
        if (parse(&a, body) != 0)
            fail_msg("%s refused: %s", body, a.message);
        if (a.prompt_tokens != cases[i].prompt ||
            a.completion_tokens != cases[i].completion)
            fail_msg("%s: tokens %lld/%lld, want %lld/%lld", body,
                     a.prompt_tokens, a.completion_tokens, cases[i].prompt,
                     cases[i].completion);
        answer_cleanup(&a);
    }
}

/* The model the upstream reports, or the preset one when it reports none
 * (absent, empty, not a string). */
static void
test_answer_model(void **state)
{
    static const struct {
        const char *model;
        const char *want;
    } cases[] = {
        {"", PRESET},
        {",\"model\":\"\"", PRESET},
        {",\"model\":null", PRESET},
        {",\"model\":42", PRESET},
        {",\"model\":{\"name\":\"x\"}", PRESET},
        {",\"model\":\"llama3:8b\"", "llama3:8b"},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        char body[256];
        struct answer a;

        snprintf(body, sizeof(body),
                 "{\"choices\":[{\"message\":{\"content\":\"x\"}}]%s}",
                 cases[i].model);
        preset_answer(&a, 64);
        if (parse(&a, body) != 0)
            fail_msg("%s refused: %s", body, a.message);
        if (strcmp(a.model, cases[i].want) != 0)
            fail_msg("%s: model \"%s\", want \"%s\"", body, a.model,
                     cases[i].want);
        answer_cleanup(&a);
    }
}

/* A model name longer than the field is cut, never overflowing it. */
static void
test_answer_long_model(void **state)
{
    char body[1024], name[600];
    struct answer a;

    (void)state;
    memset(name, 'm', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    snprintf(body, sizeof(body),
             "{\"model\":\"%s\",\"choices\":[{\"message\":{\"content\":"
             "\"x\"}}]}",
             name);
    preset_answer(&a, 64);
    assert_int_equal(parse(&a, body), 0);
    assert_int_equal(strlen(a.model), ANSWER_MODEL_LEN - 1);
    answer_cleanup(&a);
}

/* Bodies that are not a chat completion: -1 with a message, and no
 * reply. */
static void
test_answer_refused(void **state)
{
    static const char *const bodies[] = {
        "{\"choices\":[{\"message\":{\"content\":null,\"tool_calls\":[]}}]}",
        "{\"choices\":[{\"message\":{\"role\":\"assistant\"}}]}",
        "{\"choices\":[]}",
        "{\"choices\":null}",
        "{\"choices\":{}}",
        "{\"choices\":[{}]}",
        "{\"choices\":[null]}",
        "{}",
        "{\"message\":{\"content\":\"ollama native shape\"}}",
        "{\"choices\":[{\"delta\":{\"content\":\"stream chunk\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":42}}]}",
        "{\"choices\":[{\"message\":{\"content\":[{\"type\":\"text\"}]}}]}",
        "{\"choices\":[{\"message\":{\"content\":true}}]}",
        "[]",
        "null",
        "\"just a string\"",
        "",
        "not json",
        "<html><body>502 Bad Gateway</body></html>",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}]",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}]} trailing",
        "{\"choices\":[{\"message\":{\"content\":\"bad \\q escape\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\xff\"}}]}",
    };

    (void)state;
    for (size_t i = 0; i < NELEM(bodies); i++) {
        struct answer a;

        preset_answer(&a, 4096);
        a.message[0] = '\0';
        if (parse(&a, bodies[i]) != -1)
            fail_msg("accepted: %s", bodies[i]);
        if (a.message[0] == '\0')
            fail_msg("%s: no message", bodies[i]);
        assert_int_equal(a.reply.len, 0);
        assert_string_equal(a.model, PRESET);
        answer_cleanup(&a);
    }
}

/* The body need not be NUL-terminated. */
static void
test_answer_not_nul_terminated(void **state)
{
    static const char text[] =
        "{\"choices\":[{\"message\":{\"content\":\"ok\"}}]}";
    char *body = malloc(sizeof(text) - 1);
    struct answer a;

    (void)state;
    assert_non_null(body);
    memcpy(body, text, sizeof(text) - 1);
    preset_answer(&a, 64);
    assert_int_equal(exchange_parse_answer(body, sizeof(text) - 1, &a), 0);
    expect_reply(&a, "ok", 2);
    answer_cleanup(&a);
    free(body);
}

/* The reply is bounded by the answer's max: exactly max fits, one more
 * byte is an error (not a truncated reply). */
static void
test_answer_reply_max(void **state)
{
    size_t max = 1000;
    size_t body_size = max + 128;
    char *body = malloc(body_size);
    struct answer a;
    int n;

    (void)state;
    assert_non_null(body);
    for (size_t len = max - 1; len <= max + 1; len++) {
        n = snprintf(body, body_size,
                     "{\"choices\":[{\"message\":{\"content\":\"%0*d\"}}]}",
                     (int)len, 0);
        assert_true(n > 0 && (size_t)n < body_size);
        preset_answer(&a, max);
        if (len <= max) {
            assert_int_equal(exchange_parse_answer(body, (size_t)n, &a), 0);
            assert_int_equal(a.reply.len, len);
        } else {
            assert_int_equal(exchange_parse_answer(body, (size_t)n, &a), -1);
            assert_non_null(strstr(a.message, "too long"));
            assert_int_equal(a.reply.len, 0);
        }
        answer_cleanup(&a);
    }
    free(body);
}

/* A big reply (1 MiB) under a big max goes through whole. */
static void
test_answer_big_reply(void **state)
{
    size_t len = 1 << 20;
    char *body = malloc(len + 128);
    struct answer a;
    size_t o;

    (void)state;
    assert_non_null(body);
    o = (size_t)sprintf(body, "{\"choices\":[{\"message\":{\"content\":\"");
    memset(body + o, 'z', len);
    o += len;
    o += (size_t)sprintf(body + o, "\"}}]}");
    preset_answer(&a, len);
    assert_int_equal(exchange_parse_answer(body, o, &a), 0);
    assert_int_equal(a.reply.len, len);
    assert_int_equal(a.reply.data[len - 1], 'z');
    answer_cleanup(&a);
    preset_answer(&a, len - 1);
    assert_int_equal(exchange_parse_answer(body, o, &a), -1);
    answer_cleanup(&a);
    free(body);
}

/* The reply is sent to the client as a JSON string and stored: it must be
 * well-formed UTF-8 whatever the upstream sent, so an answer whose content
 * decodes to something else is a bad answer. yajl's loose parse lets lone
 * surrogate escapes and overlong raw bytes through. */
static void
test_answer_reply_is_utf8(void **state)
{
    static const char *const bodies[] = {
        "{\"choices\":[{\"message\":{\"content\":\"a\\udc00b\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\\ud800\\u0041\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\xc0\x80\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\xed\xa0\x80\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"a\xf4\x90\x80\x80\"}}]}",
    };
    char bad[512] = "";
    size_t used = 0;

    (void)state;
    for (size_t i = 0; i < NELEM(bodies); i++) {
        struct answer a;

        preset_answer(&a, 4096);
        if (parse(&a, bodies[i]) == 0 &&
            !json_utf8_valid(a.reply.data, a.reply.len) &&
            used < sizeof(bad))
            used += (size_t)snprintf(bad + used, sizeof(bad) - used,
                                     "%s#%zu", used ? ", " : "", i);
        answer_cleanup(&a);
    }
    if (used > 0)
        fail_msg("BUG exchange.c exchange_parse_answer: reply not valid UTF-8 for "
                 "bodies %s",
                 bad);
}

struct error_case {
    const char *body;
    int rc;
    const char *message;
};

static void
test_error_message(void **state)
{
    static const struct error_case cases[] = {
        /* OpenAI, vLLM, llama.cpp */
        {"{\"error\":{\"message\":\"Rate limit reached\",\"type\":"
         "\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}",
         0, "Rate limit reached"},
        {"{\"error\":{\"message\":\"x\",\"code\":\"rate_limit\"}}", 0, "x"},
        {"{\"error\":{\"message\":\"x\",\"code\":429}}", 0, "x"},
        {"{\"error\":{\"code\":500,\"message\":\"llama says no\",\"type\":"
         "\"server_error\"}}",
         0, "llama says no"},
        /* Ollama */
        {"{\"error\":\"model not found\"}", 0, "model not found"},
        {"{\"error\":\"model \\\"x\\\" not found, try pulling it first\"}", 0,
         "model \"x\" not found, try pulling it first"},
        /* others */
        {"{\"message\":\"x\"}", 0, "x"},
        {"{\"detail\":\"x\"}", 0, "x"},
        {"{\"detail\":\"Not Found\"}", 0, "Not Found"},
        /* preference: error.message, error, message, detail */
        {"{\"detail\":\"d\",\"message\":\"m\",\"error\":{\"message\":\"e\"}}",
         0, "e"},
        {"{\"detail\":\"d\",\"message\":\"m\"}", 0, "m"},
        {"{\"error\":{\"message\":\"\"},\"message\":\"m\"}", 0, "m"},
        {"{\"error\":{\"code\":429},\"detail\":\"d\"}", 0, "d"},
        /* no message */
        {"{\"error\":{\"code\":429}}", -1, NULL},
        {"{\"error\":{\"message\":\"\"}}", -1, NULL},
        {"{\"error\":\"\"}", -1, NULL},
        {"{\"error\":null}", -1, NULL},
        {"{\"error\":{\"message\":42}}", -1, NULL},
        {"{\"detail\":[{\"loc\":[\"body\"],\"msg\":\"field required\"}]}", -1,
         NULL},
        {"{}", -1, NULL},
        {"[]", -1, NULL},
        {"\"error\"", -1, NULL},
        {"", -1, NULL},
        {"<html><head><title>502 Bad Gateway</title></head></html>", -1,
         NULL},
        {"Internal Server Error", -1, NULL},
        {"{\"error\":{\"message\":\"unterminated", -1, NULL},
        /* Regression from the fuzzer: a message that is only a NUL is no
         * message, and a message cut at 255 bytes stays whole UTF-8. */
        {"{\"error\":\"\\u0000\"}", -1, NULL},
        {"{\"error\":\"\\u0000\",\"detail\":\"d\"}", 0, "d"},
    };

    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        char out[ANSWER_MESSAGE_LEN];
        int rc;

        strcpy(out, "untouched");
        rc = exchange_error_message(cases[i].body, strlen(cases[i].body), out,
                               sizeof(out));
        if (rc != cases[i].rc)
            fail_msg("%s: rc %d, want %d", cases[i].body, rc, cases[i].rc);
        if (rc == 0 && strcmp(out, cases[i].message) != 0)
            fail_msg("%s: \"%s\", want \"%s\"", cases[i].body, out,
                     cases[i].message);
    }
}

/* The message is cut to the size given, always NUL-terminated, and never
 * inside a UTF-8 character. */
static void
test_error_message_truncated(void **state)
{
    static const char body[] = "{\"error\":{\"message\":\"0123456789\"}}";
    static const char accents[] = "{\"error\":\"\xc3\xa9\xc3\xa9\xc3\xa9\"}";
    char out[6];

    (void)state;
    memset(out, 'X', sizeof(out));
    assert_int_equal(exchange_error_message(body, sizeof(body) - 1, out,
                                       sizeof(out)),
                     0);
    assert_string_equal(out, "01234");
    assert_int_equal(exchange_error_message(accents, sizeof(accents) - 1, out,
                                       sizeof(out)),
                     0);
    assert_string_equal(out, "\xc3\xa9\xc3\xa9"); /* not 2.5 of them */
}

/* A tool-call answer: content null, the calls in order (an element
 * without an index is the one at its position), the finish reason. */
static void
test_answer_tool_calls(void **state)
{
    static const char body[] =
        "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":"
        "null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
        "\"function\":{\"name\":\"now\",\"arguments\":\"{}\"}},"
        "{\"id\":\"c2\",\"type\":\"function\",\"function\":{\"name\":"
        "\"calc\",\"arguments\":\"{\\\"x\\\":1}\"}}]},"
        "\"finish_reason\":\"tool_calls\"}]}";
    struct answer a;

    (void)state;
    preset_answer(&a, 4096);
    assert_int_equal(parse(&a, body), 0);
    assert_int_equal(a.reply.len, 0);
    assert_int_equal(a.ncalls, 2);
    assert_string_equal(a.calls[0].id, "c1");
    assert_string_equal(a.calls[0].name, "now");
    assert_string_equal(a.calls[1].name, "calc");
    assert_int_equal(a.calls[1].arguments.len, 7);
    assert_memory_equal(a.calls[1].arguments.data, "{\"x\":1}", 7);
    assert_string_equal(a.finish_reason, "tool_calls");
    answer_cleanup(&a);
}

/* Tool calls that cannot be used: a bad answer, never a crash. */
static void
test_answer_tool_calls_refused(void **state)
{
    static const char *const bodies[] = {
        /* index out of order */
        "{\"choices\":[{\"message\":{\"content\":null,\"tool_calls\":"
        "[{\"index\":3,\"id\":\"c\",\"function\":{\"name\":\"f\"}}]}}]}",
        /* a name over 64 bytes */
        "{\"choices\":[{\"message\":{\"content\":null,\"tool_calls\":"
        "[{\"id\":\"c\",\"function\":{\"name\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}}]}}]}",
        /* tool_calls not an array, no content */
        "{\"choices\":[{\"message\":{\"content\":null,\"tool_calls\":{}}}]}",
        /* content, then calls the tree cannot find: "choices" twice
         * (found by fuzz_answer; the content was left in the reply) */
        "{\"choices\":[{\"message\":{\"content\":\"Hello\"}}],"
        "\"choices\":[{\"message\":{\"tool_calls\":[]}}]}",
    };

    (void)state;
    for (size_t i = 0; i < sizeof(bodies) / sizeof(*bodies); i++) {
        struct answer a;

        preset_answer(&a, 4096);
        if (parse(&a, bodies[i]) != -1)
            fail_msg("body %zu accepted", i);
        assert_true(a.message[0] != '\0');
        /* a refused answer keeps no part of itself */
        assert_int_equal(a.reply.len, 0);
        assert_int_equal(a.ncalls, 0);
        answer_cleanup(&a);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_answer_openai),
        cmocka_unit_test(test_answer_tool_calls),
        cmocka_unit_test(test_answer_tool_calls_refused),
        cmocka_unit_test(test_answer_escapes),
        cmocka_unit_test(test_answer_first_choice_only),
        cmocka_unit_test(test_answer_empty_content),
        cmocka_unit_test(test_answer_usage),
        cmocka_unit_test(test_answer_model),
        cmocka_unit_test(test_answer_long_model),
        cmocka_unit_test(test_answer_refused),
        cmocka_unit_test(test_answer_not_nul_terminated),
        cmocka_unit_test(test_answer_reply_max),
        cmocka_unit_test(test_answer_big_reply),
        cmocka_unit_test(test_answer_reply_is_utf8),
        cmocka_unit_test(test_error_message),
        cmocka_unit_test(test_error_message_truncated),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
