/*
 * Unit tests of v1, the shapes of OpenAI's chat completions API on the /v1
 * face: v1_parse_request (messages in string or text-part form, the roles,
 * the options and their defaults, and every refusal: JSON, strict mode,
 * UTF-8, roles, contents, max_tokens, option types, the text cap), and
 * the generators (streamed chunks, the usage chunk, the completion, the
 * model list, the error object), read back with yajl's tree parser.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <yajl/yajl_tree.h>

#include "answer.h"
#include "buf.h"
#include "http.h"
#include "json.h"
#include "messages.h"
#include "v1.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

/* ---- v1_parse_request ---- */

#define BODY_MAX (1u << 20)
#define SCRATCH_MAX (1u << 16)
#define TEXT_MAX (1u << 16)
#define DEF_TEMPERATURE 0.75
#define DEF_MAX_TOKENS 777LL

/* What v1_parse_request works with, as the chat holds it. */
struct parse {
    struct buf body, arena, scratch, options;
    yajl_gen gen;
    struct messages h;
    struct v1_request q;
    char err[V1_ERR_LEN];
};

static void
parse_init(struct parse *p, size_t text_max)
{
    buf_init(&p->body, BODY_MAX);
    buf_init(&p->arena, BODY_MAX);
    buf_init(&p->scratch, SCRATCH_MAX);
    buf_init(&p->options, BODY_MAX);
    p->gen = json_gen_new();
    assert_non_null(p->gen);
    messages_init(&p->h, text_max);
}

static void
parse_cleanup(struct parse *p)
{
    buf_cleanup(&p->body);
    buf_cleanup(&p->arena);
    buf_cleanup(&p->scratch);
    buf_cleanup(&p->options);
    yajl_gen_free(p->gen);
    messages_cleanup(&p->h);
}

/* Parse len bytes of text with the defaults preset in q. */
static int
parse_run(struct parse *p, const char *text, size_t len)
{
    struct v1_scratch s = {.arena = &p->arena, .scratch = &p->scratch,
                           .options = &p->options, .gen = p->gen};

    buf_reset(&p->body);
    assert_int_equal(buf_append(&p->body, text, len), 0);
    memset(&p->q, 0, sizeof(p->q));
    p->q.temperature = DEF_TEMPERATURE;
    p->q.max_tokens = DEF_MAX_TOKENS;
    p->err[0] = '\0';
    return v1_parse_request(&p->body, &s, &p->h, &p->q, p->err);
}

static const char *
role_name(enum message_role role)
{
    switch (role) {
    case MESSAGE_USER:
        return "user";
    case MESSAGE_ASSISTANT:
        return "assistant";
    case MESSAGE_SYSTEM:
        return "system";
    case MESSAGE_TOOL:
        return "tool";
    }
    return "(bad role)";
}

struct want_msg {
    enum message_role role;
    const char *content;
    size_t len;
};

#define MSG(role, s) {role, s, sizeof(s) - 1}
#define HI "{\"role\":\"user\",\"content\":\"hi\"}"
#define WITH_HI(extra) "{\"messages\":[" HI "]" extra "}"
#define HI_ONLY 1, {MSG(MESSAGE_USER, "hi")}
#define DEFAULTS 0, 0, DEF_TEMPERATURE, DEF_MAX_TOKENS

struct accept_case {
    const char *what;
    const char *body;
    size_t count;
    struct want_msg msgs[4];
    int stream, include_usage;
    double temperature;
    long long max_tokens;
};

static const struct accept_case accept_cases[] = {
    {"one user message", WITH_HI(""), HI_ONLY, DEFAULTS},
    {"the four roles",
     "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
     "{\"role\":\"developer\",\"content\":\"no markdown\"},"
     "{\"role\":\"user\",\"content\":\"2+2?\"},"
     "{\"role\":\"assistant\",\"content\":\"4\"}]}",
     4,
     {MSG(MESSAGE_SYSTEM, "be brief"), MSG(MESSAGE_SYSTEM, "no markdown"),
      MSG(MESSAGE_USER, "2+2?"), MSG(MESSAGE_ASSISTANT, "4")},
     DEFAULTS},
    {"text parts joined",
     "{\"messages\":[{\"role\":\"user\",\"content\":["
     "{\"type\":\"text\",\"text\":\"Hello, \"},"
     "{\"type\":\"text\",\"text\":\"world\"}]}]}",
     1, {MSG(MESSAGE_USER, "Hello, world")}, DEFAULTS},
    {"one text part",
     "{\"messages\":[{\"role\":\"system\",\"content\":["
     "{\"type\":\"text\",\"text\":\"sys\"}]}]}",
     1, {MSG(MESSAGE_SYSTEM, "sys")}, DEFAULTS},
    {"text parts with extra fields",
     "{\"messages\":[{\"role\":\"user\",\"content\":["
     "{\"text\":\"a\",\"type\":\"text\",\"cache_control\":{}},"
     "{\"type\":\"text\",\"text\":\"b\"}]}]}",
     1, {MSG(MESSAGE_USER, "ab")}, DEFAULTS},
    {"parts and strings mixed across messages",
     "{\"messages\":[{\"role\":\"user\",\"content\":\"one\"},"
     "{\"role\":\"assistant\",\"content\":[{\"type\":\"text\","
     "\"text\":\"two\"}]},{\"role\":\"user\",\"content\":\"three\"}]}",
     3,
     {MSG(MESSAGE_USER, "one"), MSG(MESSAGE_ASSISTANT, "two"),
      MSG(MESSAGE_USER, "three")},
     DEFAULTS},
    {"empty string content",
     "{\"messages\":[{\"role\":\"user\",\"content\":\"\"}]}", 1,
     {MSG(MESSAGE_USER, "")}, DEFAULTS},
    {"escapes and UTF-8 decoded",
     "{\"messages\":[{\"role\":\"user\",\"content\":"
     "\"a\\nb \\\"q\\\" \\\\ caf\\u00e9 \\ud83d\\ude00 \xe2\x82\xac\"}]}",
     1,
     {MSG(MESSAGE_USER, "a\nb \"q\" \\ caf\xc3\xa9 \xf0\x9f\x98\x80 "
                        "\xe2\x82\xac")},
     DEFAULTS},
    {"an escaped backslash before u0000 is no NUL",
     "{\"messages\":[{\"role\":\"user\",\"content\":\"\\\\u0000\"}]}",
     1, {MSG(MESSAGE_USER, "\\u0000")}, DEFAULTS},
    {"other escapes of control characters",
     "{\"messages\":[{\"role\":\"user\",\"content\":\"\\u0001\\u001f\"}]}",
     1, {MSG(MESSAGE_USER, "\x01\x1f")}, DEFAULTS},
    {"whitespace around the document",
     " \n\t{ \"messages\" : [ { \"role\" : \"user\" , \"content\" : \"hi\" "
     "} ] }\n ",
     HI_ONLY, DEFAULTS},
    {"stream true", WITH_HI(",\"stream\":true"), HI_ONLY, 1, 0,
     DEF_TEMPERATURE, DEF_MAX_TOKENS},
    {"stream false", WITH_HI(",\"stream\":false"), HI_ONLY, DEFAULTS},
    {"stream null", WITH_HI(",\"stream\":null"), HI_ONLY, DEFAULTS},
    {"include_usage true",
     WITH_HI(",\"stream\":true,\"stream_options\":{\"include_usage\":true}"),
     HI_ONLY, 1, 1, DEF_TEMPERATURE, DEF_MAX_TOKENS},
    {"include_usage false",
     WITH_HI(",\"stream\":true,"
             "\"stream_options\":{\"include_usage\":false}"),
     HI_ONLY, 1, 0, DEF_TEMPERATURE, DEF_MAX_TOKENS},
    {"empty stream_options", WITH_HI(",\"stream_options\":{}"), HI_ONLY,
     DEFAULTS},
    {"temperature 0.2", WITH_HI(",\"temperature\":0.2"), HI_ONLY, 0, 0, 0.2,
     DEF_MAX_TOKENS},
    {"temperature 0", WITH_HI(",\"temperature\":0"), HI_ONLY, 0, 0, 0.0,
     DEF_MAX_TOKENS},
    {"temperature 1.5", WITH_HI(",\"temperature\":1.5"), HI_ONLY, 0, 0, 1.5,
     DEF_MAX_TOKENS},
    {"temperature 2", WITH_HI(",\"temperature\":2"), HI_ONLY, 0, 0, 2.0,
     DEF_MAX_TOKENS},
    {"temperature 2e0", WITH_HI(",\"temperature\":2e0"), HI_ONLY, 0, 0,
     2.0, DEF_MAX_TOKENS},
    {"temperature -0", WITH_HI(",\"temperature\":-0"), HI_ONLY, 0, 0, 0.0,
     DEF_MAX_TOKENS},
    {"temperature null", WITH_HI(",\"temperature\":null"), HI_ONLY,
     DEFAULTS},
    {"max_tokens 100", WITH_HI(",\"max_tokens\":100"), HI_ONLY, 0, 0,
     DEF_TEMPERATURE, 100},
    {"max_tokens 1", WITH_HI(",\"max_tokens\":1"), HI_ONLY, 0, 0,
     DEF_TEMPERATURE, 1},
    {"max_tokens 2^30", WITH_HI(",\"max_tokens\":1073741824"), HI_ONLY, 0,
     0, DEF_TEMPERATURE, 1073741824LL},
    {"max_tokens null", WITH_HI(",\"max_tokens\":null"), HI_ONLY, DEFAULTS},
    {"max_completion_tokens 200",
     WITH_HI(",\"max_completion_tokens\":200"), HI_ONLY, 0, 0,
     DEF_TEMPERATURE, 200},
    {"max_completion_tokens null",
     WITH_HI(",\"max_completion_tokens\":null"), HI_ONLY, DEFAULTS},
    {"every option",
     WITH_HI(",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
             "\"temperature\":0.5,\"max_tokens\":42"),
     HI_ONLY, 1, 1, 0.5, 42},
    {"unknown fields ignored",
     "{\"model\":\"gpt-4o\",\"n\":1,\"user\":\"u-1\",\"top_p\":0.9,"
     "\"tools\":[],\"metadata\":{\"k\":[1,{\"x\":null}]},\"seed\":7,"
     "\"messages\":[{\"role\":\"user\",\"name\":\"ann\",\"content\":\"hi\","
     "\"extra\":{\"a\":1}}],\"logit_bias\":{\"50256\":-100},"
     "\"stream_options\":{\"other\":true}}",
     HI_ONLY, DEFAULTS},
};

static void
expect_messages(const char *what, const struct messages *h,
                const struct want_msg *want, size_t count)
{
    if (h->count != count)
        fail_msg("%s: %zu messages, want %zu", what, h->count, count);
    for (size_t i = 0; i < count; i++) {
        const struct message *m = &h->msgs[i];
        const char *got = messages_content(h, i);

        if (m->role != want[i].role)
            fail_msg("%s: message %zu is %s, want %s", what, i,
                     role_name(m->role), role_name(want[i].role));
        if (m->len != want[i].len || memcmp(got, want[i].content, m->len))
            fail_msg("%s: message %zu is \"%.*s\" (%zu bytes), want "
                     "\"%s\" (%zu bytes)", what, i, (int)m->len, got,
                     m->len, want[i].content, want[i].len);
        if (got[m->len] != '\0')
            fail_msg("%s: message %zu is not NUL-terminated", what, i);
    }
}

static void
test_parse_accepted(void **state)
{
    struct parse p;

    (void)state;
    parse_init(&p, TEXT_MAX);
    for (size_t i = 0; i < NELEM(accept_cases); i++) {
        const struct accept_case *c = &accept_cases[i];
        const struct v1_request *q = &p.q;

        if (parse_run(&p, c->body, strlen(c->body)) != 0)
            fail_msg("%s: refused: %s", c->what, p.err);
        expect_messages(c->what, &p.h, c->msgs, c->count);
        if (q->stream != c->stream || q->include_usage != c->include_usage)
            fail_msg("%s: stream %d include_usage %d, want %d %d", c->what,
                     q->stream, q->include_usage, c->stream,
                     c->include_usage);
        if (q->temperature != c->temperature)
            fail_msg("%s: temperature %g, want %g", c->what, q->temperature,
                     c->temperature);
        if (q->max_tokens != c->max_tokens)
            fail_msg("%s: max_tokens %lld, want %lld", c->what,
                     q->max_tokens, c->max_tokens);
    }
    parse_cleanup(&p);
}

/* The model asked for: NULL when absent or null, else its text (which
 * may be empty: the chat finds no such model). */
static void
test_parse_model(void **state)
{
    static const struct {
        const char *body;
        const char *model;
    } cases[] = {
        {WITH_HI(""), NULL},
        {WITH_HI(",\"model\":null"), NULL},
        {WITH_HI(",\"model\":\"gpt-4o\""), "gpt-4o"},
        {WITH_HI(",\"model\":\"caf\\u00e9 \\\"x\\\"\""), "caf\xc3\xa9 \"x\""},
        {WITH_HI(",\"model\":\"\""), ""},
    };
    struct parse p;

    (void)state;
    parse_init(&p, TEXT_MAX);
    for (size_t i = 0; i < NELEM(cases); i++) {
        if (parse_run(&p, cases[i].body, strlen(cases[i].body)) != 0)
            fail_msg("%s: refused: %s", cases[i].body, p.err);
        if (cases[i].model == NULL && p.q.model != NULL)
            fail_msg("%s: model \"%s\", want none", cases[i].body,
                     p.q.model);
        if (cases[i].model != NULL &&
            (p.q.model == NULL || strcmp(p.q.model, cases[i].model) != 0 ||
             p.q.model_len != strlen(cases[i].model)))
            fail_msg("%s: model \"%s\", want \"%s\"", cases[i].body,
                     p.q.model ? p.q.model : "(none)", cases[i].model);
    }
    parse_cleanup(&p);
}

/* More messages than the list's first allocation; the list is reset by
 * each parse, so a second, shorter body leaves only its own. */
static void
test_parse_many_messages(void **state)
{
    static const struct want_msg second[] = {MSG(MESSAGE_USER, "hi")};
    struct buf body;
    struct parse p;
    const size_t n = 100;

    (void)state;
    parse_init(&p, TEXT_MAX);
    buf_init(&body, BODY_MAX);
    assert_int_equal(buf_append_str(&body, "{\"messages\":["), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(buf_printf(&body, "%s{\"role\":\"%s\",\"content\":"
                                    "\"m%zu\"}", i ? "," : "",
                                    i % 2 ? "assistant" : "user", i),
                         0);
    assert_int_equal(buf_append_str(&body, "]}"), 0);
    if (parse_run(&p, body.data, body.len) != 0)
        fail_msg("%zu messages refused: %s", n, p.err);
    assert_int_equal(p.h.count, n);
    for (size_t i = 0; i < n; i++) {
        char want[16];

        snprintf(want, sizeof(want), "m%zu", i);
        if (strcmp(messages_content(&p.h, i), want) != 0 ||
            p.h.msgs[i].len != strlen(want))
            fail_msg("message %zu is \"%s\", want \"%s\"", i,
                     messages_content(&p.h, i), want);
        if (p.h.msgs[i].role != (i % 2 ? MESSAGE_ASSISTANT : MESSAGE_USER))
            fail_msg("message %zu is %s", i, role_name(p.h.msgs[i].role));
    }
    if (parse_run(&p, WITH_HI(""), strlen(WITH_HI(""))) != 0)
        fail_msg("the second body refused: %s", p.err);
    expect_messages("the second body", &p.h, second, NELEM(second));
    buf_cleanup(&body);
    parse_cleanup(&p);
}

struct refuse_case {
    const char *what;
    const char *body;
    size_t len;       /* 0: strlen(body) */
    const char *why;  /* in err; NULL: any reason */
};

#define MSGS(m) "{\"messages\":[" m "]}"
#define CONTENT(c) MSGS("{\"role\":\"user\",\"content\":" c "}")
#define DEEP "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]"

static const struct refuse_case refuse_cases[] = {
    /* not JSON */
    {"empty body", "", 0, NULL},
    {"plain text", "hello", 0, NULL},
    {"cut short", "{\"messages\":[" HI "]", 0, NULL},
    {"trailing garbage", WITH_HI("") " x", 0, NULL},
    {"two documents", WITH_HI("") WITH_HI(""), 0, NULL},
    {"single quotes", "{'messages':[]}", 0, NULL},
    {"trailing comma", "{\"messages\":[" HI ",]}", 0, NULL},
    {"NUL byte after the document", WITH_HI("") "\0", sizeof(WITH_HI("")),
     NULL},
    {"nested deeper than 16", WITH_HI(",\"x\":" DEEP), 0, "deep"},
    /* not an object */
    {"an array", "[" HI "]", 0, "object"},
    {"a string", "\"messages\"", 0, "object"},
    {"a number", "42", 0, "object"},
    {"null", "null", 0, "object"},
    {"true", "true", 0, "object"},
    /* strict mode */
    {"duplicate messages", "{\"messages\":[" HI "],\"messages\":[" HI "]}",
     0, "duplicate"},
    {"duplicate stream", WITH_HI(",\"stream\":true,\"stream\":false"), 0,
     "duplicate"},
    {"duplicate unknown field", WITH_HI(",\"x\":1,\"x\":1"), 0,
     "duplicate"},
    {"duplicate role in a message",
     MSGS("{\"role\":\"user\",\"role\":\"system\",\"content\":\"hi\"}"), 0,
     "duplicate"},
    {"duplicate include_usage",
     WITH_HI(",\"stream_options\":{\"include_usage\":true,"
             "\"include_usage\":false}"),
     0, "duplicate"},
    {"invalid UTF-8 byte", CONTENT("\"caf\xe9\""), 0, "UTF-8"},
    {"overlong UTF-8", CONTENT("\"\xc0\xaf\""), 0, "UTF-8"},
    {"UTF-8 surrogate", CONTENT("\"\xed\xa0\x80\""), 0, "UTF-8"},
    {"truncated UTF-8", CONTENT("\"\xe2\x82\""), 0, "UTF-8"},
    {"invalid UTF-8 in a key", WITH_HI(",\"\xff\":1"), 0, "UTF-8"},
    {"lone surrogate escape", CONTENT("\"\\ud800\""), 0, NULL},
    {"lone low surrogate escape", CONTENT("\"\\udc00x\""), 0, NULL},
    /* messages */
    {"messages missing", "{\"model\":\"m\"}", 0, "messages"},
    {"empty object", "{}", 0, "messages"},
    {"messages empty", "{\"messages\":[]}", 0, "messages"},
    {"messages an object", "{\"messages\":" HI "}", 0, "messages"},
    {"messages a string", "{\"messages\":\"hi\"}", 0, "messages"},
    {"messages null", "{\"messages\":null}", 0, "messages"},
    {"messages nested in another field", "{\"body\":{\"messages\":[" HI
     "]}}", 0, "messages"},
    /* roles */
    {"a message that is a string", MSGS("\"hi\""), 0, "role"},
    {"a message that is null", MSGS("null"), 0, "role"},
    {"no role", MSGS("{\"content\":\"hi\"}"), 0, "role"},
    {"role function",
     MSGS("{\"role\":\"function\",\"name\":\"f\",\"content\":\"42\"}"), 0,
     "role"},
    {"role unknown", MSGS("{\"role\":\"bot\",\"content\":\"hi\"}"), 0,
     "role"},
    {"role in capitals", MSGS("{\"role\":\"User\",\"content\":\"hi\"}"), 0,
     "role"},
    {"role empty", MSGS("{\"role\":\"\",\"content\":\"hi\"}"), 0, "role"},
    {"role a number", MSGS("{\"role\":1,\"content\":\"hi\"}"), 0, "role"},
    {"role null", MSGS("{\"role\":null,\"content\":\"hi\"}"), 0, "role"},
    {"a bad role after a good message",
     MSGS(HI ",{\"role\":\"function\",\"content\":\"x\"}"), 0, "role"},
    /* contents */
    {"content missing", MSGS("{\"role\":\"user\"}"), 0, "content"},
    {"content a number", CONTENT("42"), 0, "content"},
    {"content null", CONTENT("null"), 0, "content"},
    {"content true", CONTENT("true"), 0, "content"},
    {"content an object", CONTENT("{\"type\":\"text\",\"text\":\"hi\"}"), 0,
     "content"},
    {"an image_url part",
     CONTENT("[{\"type\":\"image_url\",\"image_url\":"
             "{\"url\":\"https://x/y.png\"}}]"),
     0, "content"},
    {"an image_url part after a text part",
     CONTENT("[{\"type\":\"text\",\"text\":\"see\"},{\"type\":\"image_url\","
             "\"image_url\":{\"url\":\"https://x/y.png\"}}]"),
     0, "content"},
    {"an input_audio part",
     CONTENT("[{\"type\":\"input_audio\",\"input_audio\":{}}]"), 0,
     "content"},
    {"a part without text", CONTENT("[{\"type\":\"text\"}]"), 0,
     "content"},
    {"a part with null text", CONTENT("[{\"type\":\"text\",\"text\":null}]"),
     0, "content"},
    {"a part with a number text",
     CONTENT("[{\"type\":\"text\",\"text\":5}]"), 0, "content"},
    {"a part without type", CONTENT("[{\"text\":\"hi\"}]"), 0, "content"},
    {"a part that is a string", CONTENT("[\"hi\"]"), 0, "content"},
    {"a part that is null", CONTENT("[null]"), 0, "content"},
    /* max_tokens */
    {"max_tokens 0", WITH_HI(",\"max_tokens\":0"), 0, "max_tokens"},
    {"max_tokens negative", WITH_HI(",\"max_tokens\":-5"), 0, "max_tokens"},
    {"max_tokens fractional", WITH_HI(",\"max_tokens\":1.5"), 0,
     "max_tokens"},
    {"max_tokens 10.0", WITH_HI(",\"max_tokens\":10.0"), 0, "max_tokens"},
    {"max_tokens 2^30 + 1", WITH_HI(",\"max_tokens\":1073741825"), 0,
     "max_tokens"},
    {"max_tokens beyond 64 bits",
     WITH_HI(",\"max_tokens\":99999999999999999999"), 0, "max_tokens"},
    {"max_tokens a string", WITH_HI(",\"max_tokens\":\"100\""), 0, NULL},
    {"max_tokens true", WITH_HI(",\"max_tokens\":true"), 0, NULL},
    {"max_completion_tokens 0", WITH_HI(",\"max_completion_tokens\":0"), 0,
     "max_tokens"},
    {"max_completion_tokens negative",
     WITH_HI(",\"max_completion_tokens\":-1"), 0, "max_tokens"},
    {"max_completion_tokens over 2^30",
     WITH_HI(",\"max_completion_tokens\":2000000000"), 0, "max_tokens"},
    {"a good max_tokens, a bad max_completion_tokens",
     WITH_HI(",\"max_tokens\":10,\"max_completion_tokens\":0"), 0,
     "max_tokens"},
    /* other option types */
    {"stream a string", WITH_HI(",\"stream\":\"true\""), 0, "stream"},
    {"stream a number", WITH_HI(",\"stream\":1"), 0, "stream"},
    {"stream an object", WITH_HI(",\"stream\":{}"), 0, "stream"},
    {"include_usage a string",
     WITH_HI(",\"stream_options\":{\"include_usage\":\"yes\"}"), 0,
     "include_usage"},
    {"temperature a string", WITH_HI(",\"temperature\":\"0.5\""), 0,
     "temperature"},
    {"temperature an array", WITH_HI(",\"temperature\":[0.5]"), 0,
     "temperature"},
    {"model a number", WITH_HI(",\"model\":4"), 0, "model"},
    {"model an object", WITH_HI(",\"model\":{\"id\":\"m\"}"), 0, "model"},
    /* NUL, which yajl's tree strings would silently cut the text at */
    {"NUL in content", CONTENT("\"a\\u0000b\""), 0, "NUL"},
    {"NUL at the start of content", CONTENT("\"\\u0000 rest\""), 0, "NUL"},
    {"NUL in a text part",
     CONTENT("[{\"type\":\"text\",\"text\":\"x\\u0000\"}]"), 0, "NUL"},
    {"NUL after an escaped backslash", CONTENT("\"\\\\\\u0000\""), 0,
     "NUL"},
    {"NUL in a role", MSGS("{\"role\":\"user\\u0000\",\"content\":\"x\"}"),
     0, "NUL"},
    /* temperature outside OpenAI's 0 to 2 */
    {"temperature 5", WITH_HI(",\"temperature\":5"), 0, "temperature"},
    {"temperature just above 2", WITH_HI(",\"temperature\":2.0001"), 0,
     "temperature"},
    {"temperature negative", WITH_HI(",\"temperature\":-5"), 0,
     "temperature"},
    {"temperature just below 0", WITH_HI(",\"temperature\":-0.001"), 0,
     "temperature"},
    {"temperature beyond a double", WITH_HI(",\"temperature\":1e400"), 0,
     "temperature"},
    {"temperature far below", WITH_HI(",\"temperature\":-1e400"), 0,
     "temperature"},
};

static void
test_parse_refused(void **state)
{
    struct parse p;

    (void)state;
    parse_init(&p, TEXT_MAX);
    for (size_t i = 0; i < NELEM(refuse_cases); i++) {
        const struct refuse_case *c = &refuse_cases[i];
        size_t len = c->len ? c->len : strlen(c->body);
        int rc = parse_run(&p, c->body, len);

        if (rc != -1)
            fail_msg("%s: returned %d, want -1", c->what, rc);
        if (p.err[0] == '\0' || memchr(p.err, '\0', V1_ERR_LEN) == NULL)
            fail_msg("%s: no reason given", c->what);
        if (c->why != NULL && strstr(p.err, c->why) == NULL)
            fail_msg("%s: reason \"%s\" does not mention \"%s\"", c->what,
                     p.err, c->why);
    }
    parse_cleanup(&p);
}

/* The messages' text cap counts each content and its NUL; a body beyond
 * it is refused, never cut to fit. */
struct cap_case {
    const char *what;
    size_t text_max;
    size_t lens[3]; /* contents of 'a's; 0 ends the list */
    int parts;      /* each content as two text parts */
    int want;
};

static const struct cap_case cap_cases[] = {
    {"one message that fits exactly", 64, {63}, 0, 0},
    {"one message a byte over", 64, {64}, 0, -1},
    {"one message far over", 64, {1000}, 0, -1},
    {"two messages that fit exactly", 64, {31, 31}, 0, 0},
    {"the second message over", 64, {31, 32}, 0, -1},
    {"the third message over", 64, {20, 20, 30}, 0, -1},
    {"text parts that fit exactly", 64, {63}, 1, 0},
    {"text parts a byte over", 64, {64}, 1, -1},
    {"text parts far over", 64, {900}, 1, -1},
};

static void
cap_body(struct buf *body, const struct cap_case *c)
{
    static char as[1024];

    memset(as, 'a', sizeof(as));
    buf_reset(body);
    assert_int_equal(buf_append_str(body, "{\"messages\":["), 0);
    for (size_t i = 0; i < NELEM(c->lens) && c->lens[i]; i++) {
        int n = (int)c->lens[i], half = n / 2;

        assert_true(c->lens[i] <= sizeof(as));
        if (c->parts)
            assert_int_equal(buf_printf(body, "%s{\"role\":\"user\","
                                        "\"content\":[{\"type\":\"text\","
                                        "\"text\":\"%.*s\"},{\"type\":"
                                        "\"text\",\"text\":\"%.*s\"}]}",
                                        i ? "," : "", half, as, n - half,
                                        as),
                             0);
        else
            assert_int_equal(buf_printf(body, "%s{\"role\":\"user\","
                                        "\"content\":\"%.*s\"}",
                                        i ? "," : "", n, as),
                             0);
    }
    assert_int_equal(buf_append_str(body, "]}"), 0);
}

static void
test_parse_text_cap(void **state)
{
    struct buf body;

    (void)state;
    buf_init(&body, BODY_MAX);
    for (size_t i = 0; i < NELEM(cap_cases); i++) {
        const struct cap_case *c = &cap_cases[i];
        struct parse p;
        int rc;

        parse_init(&p, c->text_max);
        cap_body(&body, c);
        rc = parse_run(&p, body.data, body.len);
        if (rc != c->want)
            fail_msg("%s: returned %d (%s), want %d", c->what, rc, p.err,
                     c->want);
        if (rc == -1 && p.err[0] == '\0')
            fail_msg("%s: no reason given", c->what);
        for (size_t k = 0; rc == 0 && k < NELEM(c->lens) && c->lens[k];
             k++) {
            const char *got = messages_content(&p.h, k);

            if (p.h.msgs[k].len != c->lens[k] ||
                strspn(got, "a") != c->lens[k])
                fail_msg("%s: message %zu has %zu bytes, want %zu",
                         c->what, k, p.h.msgs[k].len, c->lens[k]);
        }
        parse_cleanup(&p);
    }
    buf_cleanup(&body);
}

/* ---- the generators ---- */

#define ID "chatcmpl-0123456789abcdef"
#define CREATED 1700000000LL
#define MODEL "llama3:8b"

/* The generator's document, parsed; the caller frees it. */
static yajl_val
doc_of(yajl_gen g, const char *what)
{
    const unsigned char *out;
    char text[8192], err[128];
    size_t len;
    yajl_val v;

    assert_int_equal(yajl_gen_get_buf(g, &out, &len), yajl_gen_status_ok);
    if (len >= sizeof(text))
        fail_msg("%s: %zu bytes of JSON", what, len);
    memcpy(text, out, len);
    text[len] = '\0';
    v = yajl_tree_parse(text, err, sizeof(err));
    if (v == NULL)
        fail_msg("%s: the JSON does not parse (%s): %s", what, err, text);
    if (!YAJL_IS_OBJECT(v))
        fail_msg("%s: not an object: %s", what, text);
    return v;
}

static yajl_val
field(yajl_val obj, const char *name)
{
    const char *path[] = {name, NULL};

    return yajl_tree_get(obj, path, yajl_t_any);
}

static void
expect_str(const char *what, yajl_val obj, const char *name,
           const char *want)
{
    yajl_val v = field(obj, name);

    if (!YAJL_IS_STRING(v))
        fail_msg("%s: \"%s\" is not a string", what, name);
    if (strcmp(v->u.string, want) != 0)
        fail_msg("%s: \"%s\" is \"%s\", want \"%s\"", what, name,
                 v->u.string, want);
}

static void
expect_int(const char *what, yajl_val obj, const char *name,
           long long want)
{
    yajl_val v = field(obj, name);

    if (!YAJL_IS_INTEGER(v))
        fail_msg("%s: \"%s\" is not an integer", what, name);
    if (YAJL_GET_INTEGER(v) != want)
        fail_msg("%s: \"%s\" is %lld, want %lld", what, name,
                 YAJL_GET_INTEGER(v), want);
}

static void
expect_null(const char *what, yajl_val obj, const char *name)
{
    yajl_val v = field(obj, name);

    if (v == NULL || !YAJL_IS_NULL(v))
        fail_msg("%s: \"%s\" is not null", what, name);
}

static void
expect_absent(const char *what, yajl_val obj, const char *name)
{
    if (field(obj, name) != NULL)
        fail_msg("%s: \"%s\" is present", what, name);
}

static yajl_val
expect_object(const char *what, yajl_val obj, const char *name)
{
    yajl_val v = field(obj, name);

    if (!YAJL_IS_OBJECT(v))
        fail_msg("%s: \"%s\" is not an object", what, name);
    return v;
}

static yajl_val
expect_array(const char *what, yajl_val obj, const char *name, size_t len)
{
    yajl_val v = field(obj, name);

    if (!YAJL_IS_ARRAY(v))
        fail_msg("%s: \"%s\" is not an array", what, name);
    if (v->u.array.len != len)
        fail_msg("%s: \"%s\" has %zu elements, want %zu", what, name,
                 v->u.array.len, len);
    return v;
}

/* id, object, created, model: what every chunk and completion repeats. */
static void
expect_head(const char *what, yajl_val doc, const char *object)
{
    expect_str(what, doc, "id", ID);
    expect_str(what, doc, "object", object);
    expect_int(what, doc, "created", CREATED);
    expect_str(what, doc, "model", MODEL);
}

/* The only element of choices, an object with index 0. */
static yajl_val
only_choice(const char *what, yajl_val doc)
{
    yajl_val choice = expect_array(what, doc, "choices", 1)->u.array
                          .values[0];

    if (!YAJL_IS_OBJECT(choice))
        fail_msg("%s: choices[0] is not an object", what);
    expect_int(what, choice, "index", 0);
    return choice;
}

static void
completion_init(struct v1_completion *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->id, sizeof(c->id), "%s", ID);
    c->created = CREATED;
    c->model = MODEL;
}

/* A content chunk, or for NULL text the last chunk of an answer with no
 * finish reason of its own: "stop". */
static int
chunk_or_finish(yajl_gen g, struct v1_completion *c, const char *text,
                size_t len)
{
    struct answer a;
    int rc;

    if (text != NULL)
        return v1_gen_chunk(g, c, text, len);
    answer_init(&a, 16);
    rc = v1_gen_finish_chunk(g, c, &a);
    answer_cleanup(&a);
    return rc;
}

struct chunk_step {
    const char *what;
    const char *text; /* NULL: the last chunk */
    size_t len;
    const char *content; /* want; NULL: no content */
    int role;
};

#define STEP(what, s, role) {what, s, sizeof(s) - 1, s, role}

static const struct chunk_step chunk_steps[] = {
    STEP("the first chunk", "Hel", 1),
    STEP("the second chunk", "lo", 0),
    STEP("quotes, backslash, newline", "\"q\" \\ \n\t</script>", 0),
    {"text cut by len", "world!!!", 5, "world", 0},
    STEP("an empty piece", "", 0),
    STEP("UTF-8", "caf\xc3\xa9 \xf0\x9f\x98\x80", 0),
    {"the last chunk", NULL, 0, NULL, 0},
};

static void
test_chunk_sequence(void **state)
{
    struct v1_completion c;
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    completion_init(&c);
    for (size_t i = 0; i < NELEM(chunk_steps); i++) {
        const struct chunk_step *s = &chunk_steps[i];
        yajl_val doc, choice, delta;

        if (chunk_or_finish(g, &c, s->text, s->len) != 0)
            fail_msg("%s: the generator failed", s->what);
        if (!c.sent_role)
            fail_msg("%s: sent_role not set", s->what);
        doc = doc_of(g, s->what);
        expect_head(s->what, doc, "chat.completion.chunk");
        expect_absent(s->what, doc, "usage");
        choice = only_choice(s->what, doc);
        delta = expect_object(s->what, choice, "delta");
        if (s->role)
            expect_str(s->what, delta, "role", "assistant");
        else
            expect_absent(s->what, delta, "role");
        if (s->content) {
            expect_str(s->what, delta, "content", s->content);
            expect_null(s->what, choice, "finish_reason");
        } else {
            expect_absent(s->what, delta, "content");
            expect_str(s->what, choice, "finish_reason", "stop");
        }
        yajl_tree_free(doc);
    }
    yajl_gen_free(g);
}

/* An empty reply: the last chunk is also the first, with the role. Each
 * completion sends the role once, on its own first chunk. */
static void
test_chunk_stop_first(void **state)
{
    static const char *const what[] = {"the first completion",
                                       "the second completion"};
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    for (size_t i = 0; i < NELEM(what); i++) {
        struct v1_completion c;
        yajl_val doc, choice, delta;

        completion_init(&c);
        assert_int_equal(chunk_or_finish(g, &c, NULL, 0), 0);
        doc = doc_of(g, what[i]);
        expect_head(what[i], doc, "chat.completion.chunk");
        choice = only_choice(what[i], doc);
        delta = expect_object(what[i], choice, "delta");
        expect_str(what[i], delta, "role", "assistant");
        expect_absent(what[i], delta, "content");
        expect_str(what[i], choice, "finish_reason", "stop");
        yajl_tree_free(doc);
    }
    yajl_gen_free(g);
}

struct usage_case {
    const char *what;
    long long prompt, completion; /* in the answer; -1: not reported */
    long long want_prompt, want_completion;
};

static const struct usage_case usage_cases[] = {
    {"both reported", 12, 7, 12, 7},
    {"both zero", 0, 0, 0, 0},
    {"neither reported", -1, -1, 0, 0},
    {"prompt not reported", -1, 5, 0, 5},
    {"completion not reported", 9, -1, 9, 0},
    {"large counts", 3000000000LL, 4000000000LL, 3000000000LL,
     4000000000LL},
};

static void
expect_usage(const char *what, yajl_val doc, const struct usage_case *u)
{
    yajl_val usage = expect_object(what, doc, "usage");

    expect_int(what, usage, "prompt_tokens", u->want_prompt);
    expect_int(what, usage, "completion_tokens", u->want_completion);
    expect_int(what, usage, "total_tokens",
               u->want_prompt + u->want_completion);
}

static void
test_usage_chunk(void **state)
{
    struct v1_completion c;
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    completion_init(&c);
    c.sent_role = 1;
    for (size_t i = 0; i < NELEM(usage_cases); i++) {
        const struct usage_case *u = &usage_cases[i];
        struct answer a;
        yajl_val doc;

        answer_init(&a, 64);
        a.prompt_tokens = u->prompt;
        a.completion_tokens = u->completion;
        if (v1_gen_usage_chunk(g, &c, &a) != 0)
            fail_msg("%s: the generator failed", u->what);
        doc = doc_of(g, u->what);
        expect_head(u->what, doc, "chat.completion.chunk");
        expect_array(u->what, doc, "choices", 0);
        expect_usage(u->what, doc, u);
        yajl_tree_free(doc);
        answer_cleanup(&a);
    }
    yajl_gen_free(g);
}

struct completion_case {
    const char *what;
    const char *reply;
    struct usage_case usage;
};

static const struct completion_case completion_cases[] = {
    {"a plain reply", "Hello! How can I help?", {"", 12, 7, 12, 7}},
    {"an empty reply", "", {"", 3, 0, 3, 0}},
    {"escapes and UTF-8", "\"q\"\n\\ caf\xc3\xa9 \xf0\x9f\x98\x80",
     {"", -1, -1, 0, 0}},
    {"usage half reported", "x", {"", 5, -1, 5, 0}},
};

static void
test_completion(void **state)
{
    struct v1_completion c;
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    completion_init(&c);
    for (size_t i = 0; i < NELEM(completion_cases); i++) {
        const struct completion_case *k = &completion_cases[i];
        struct answer a;
        yajl_val doc, choice, message;

        answer_init(&a, 4096);
        assert_int_equal(buf_append_str(&a.reply, k->reply), 0);
        snprintf(a.model, sizeof(a.model), "%s", "other-model");
        a.prompt_tokens = k->usage.prompt;
        a.completion_tokens = k->usage.completion;
        if (v1_gen_completion(g, &c, &a) != 0)
            fail_msg("%s: the generator failed", k->what);
        doc = doc_of(g, k->what);
        expect_head(k->what, doc, "chat.completion");
        choice = only_choice(k->what, doc);
        expect_absent(k->what, choice, "delta");
        message = expect_object(k->what, choice, "message");
        expect_str(k->what, message, "role", "assistant");
        expect_str(k->what, message, "content", k->reply);
        expect_str(k->what, choice, "finish_reason", "stop");
        expect_usage(k->what, doc, &k->usage);
        yajl_tree_free(doc);
        answer_cleanup(&a);
    }
    yajl_gen_free(g);
}

struct models_case {
    const char *list; /* a configured list, as [v1] models holds it */
    const char *ids[4];
    size_t n;
};

static const struct models_case models_cases[] = {
    {"gpt-4o-mini", {"gpt-4o-mini"}, 1},
    {MODEL, {MODEL}, 1},
    {"caf\xc3\xa9/\"m\"", {"caf\xc3\xa9/\"m\""}, 1},
    {"chat, big", {"chat", "big"}, 2},
    {" a,b  c ,", {"a", "b", "c"}, 3},
    {"", {NULL}, 0},
};

static void
test_models(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    for (size_t i = 0; i < NELEM(models_cases); i++) {
        const struct models_case *k = &models_cases[i];
        yajl_val doc, data, m;

        if (v1_gen_models(g, k->list) != 0)
            fail_msg("models \"%s\": the generator failed", k->list);
        doc = doc_of(g, k->list);
        expect_str(k->list, doc, "object", "list");
        data = expect_array(k->list, doc, "data", k->n);
        for (size_t j = 0; j < k->n; j++) {
            m = data->u.array.values[j];
            if (!YAJL_IS_OBJECT(m))
                fail_msg("models \"%s\": data[%zu] is not an object",
                         k->list, j);
            expect_str(k->list, m, "id", k->ids[j]);
            expect_str(k->list, m, "object", "model");
            expect_str(k->list, m, "owned_by", "chatfcgi");
            if (!YAJL_IS_INTEGER(field(m, "created")))
                fail_msg("models \"%s\": created is not an integer",
                         k->list);
        }
        yajl_tree_free(doc);
    }
    yajl_gen_free(g);
}

struct error_case {
    int status;
    const char *code;
    const char *message;
    const char *type;
};

static const struct error_case error_cases[] = {
    {400, "invalid_request", "'messages' must be a non-empty array",
     "invalid_request_error"},
    {401, "unauthorized", "a valid API key is required",
     "authentication_error"},
    {403, "forbidden", "no", "invalid_request_error"},
    {404, "not_found", "no such route", "invalid_request_error"},
    {405, "method_not_allowed", "use POST", "invalid_request_error"},
    {409, "conflict", "busy", "invalid_request_error"},
    {413, "too_large", "the body is too large", "invalid_request_error"},
    {415, "unsupported_media_type", "JSON only", "invalid_request_error"},
    {429, "rate_limited", "slow down", "rate_limit_error"},
    {499, "client_gone", "gone", "invalid_request_error"},
    {500, "internal", "oops \"quoted\"\n", "api_error"},
    {502, "upstream_error", "caf\xc3\xa9", "api_error"},
    {503, "unavailable", "try later", "api_error"},
    {504, "upstream_timeout", "", "api_error"},
};

static void
test_errors(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    assert_non_null(v1_errors.gen);
    assert_null(v1_errors.event);
    for (size_t i = 0; i < NELEM(error_cases); i++) {
        const struct error_case *e = &error_cases[i];
        char what[64];
        yajl_val doc, err;

        snprintf(what, sizeof(what), "%d %s", e->status, e->code);
        json_gen_restart(g);
        if (v1_errors.gen(g, e->status, e->code, e->message) != 0)
            fail_msg("%s: the generator failed", what);
        doc = doc_of(g, what);
        if (doc->u.object.len != 1)
            fail_msg("%s: %zu top-level keys, want only \"error\"", what,
                     doc->u.object.len);
        err = expect_object(what, doc, "error");
        expect_str(what, err, "message", e->message);
        expect_str(what, err, "type", e->type);
        expect_null(what, err, "param");
        expect_str(what, err, "code", e->code);
        yajl_tree_free(doc);
    }
    yajl_gen_free(g);
}

/* Text that is not valid UTF-8 fails the generator instead of making bad
 * JSON; the generator is good for the next document after. */
struct bad_utf8_case {
    const char *what;
    const char *bytes;
};

static const struct bad_utf8_case bad_utf8_cases[] = {
    {"a Latin-1 byte", "caf\xe9"},
    {"a lone continuation byte", "\x80"},
    {"a byte 0xff", "\xff"},
    {"an overlong slash", "\xc0\xaf"},
    {"an overlong NUL", "\xc0\x80"},
    {"a surrogate", "\xed\xa0\x80"},
    {"above U+10FFFF", "\xf4\x90\x80\x80"},
    {"a sequence cut at the end", "ok \xe2\x82"},
};

/* After a failure, a good chunk still makes a whole document. */
static void
expect_recovers(const char *what, yajl_gen g)
{
    struct v1_completion c;
    yajl_val doc;

    completion_init(&c);
    if (v1_gen_chunk(g, &c, "ok", 2) != 0)
        fail_msg("%s: the next chunk failed", what);
    doc = doc_of(g, what);
    expect_str(what, expect_object(what, only_choice(what, doc), "delta"),
               "content", "ok");
    yajl_tree_free(doc);
}

static void
test_bad_utf8(void **state)
{
    yajl_gen g = json_gen_new();

    (void)state;
    assert_non_null(g);
    for (size_t i = 0; i < NELEM(bad_utf8_cases); i++) {
        const struct bad_utf8_case *b = &bad_utf8_cases[i];
        size_t len = strlen(b->bytes);
        struct v1_completion c;
        struct answer a;

        completion_init(&c);
        if (v1_gen_chunk(g, &c, b->bytes, len) == 0)
            fail_msg("%s: a chunk with it was generated", b->what);
        expect_recovers(b->what, g);

        c.sent_role = 1;
        if (v1_gen_chunk(g, &c, b->bytes, len) == 0)
            fail_msg("%s: a later chunk with it was generated", b->what);
        expect_recovers(b->what, g);

        answer_init(&a, 64);
        assert_int_equal(buf_append(&a.reply, b->bytes, len), 0);
        a.prompt_tokens = a.completion_tokens = 1;
        if (v1_gen_completion(g, &c, &a) == 0)
            fail_msg("%s: a completion with it was generated", b->what);
        expect_recovers(b->what, g);
        answer_cleanup(&a);

        c.model = b->bytes;
        if (v1_gen_chunk(g, &c, "x", 1) == 0)
            fail_msg("%s: a chunk of that model was generated", b->what);
        expect_recovers(b->what, g);

        if (v1_gen_models(g, b->bytes) == 0)
            fail_msg("%s: a model list with it was generated", b->what);
        expect_recovers(b->what, g);

        json_gen_restart(g);
        if (v1_errors.gen(g, 502, "upstream_error", b->bytes) == 0)
            fail_msg("%s: an error with it was generated", b->what);
        expect_recovers(b->what, g);
    }
    yajl_gen_free(g);
}

/* ---- function calling ---- */

#define TOOL_MSGS                                                              \
    "{\"role\":\"user\",\"content\":\"time?\"},"                              \
    "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"      \
    "\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"now\","         \
    "\"arguments\":\"{}\"},\"extra\":1}]},"                                    \
    "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"12:00\"}"

/* A tool exchange in messages[] keeps its calls and ids, in OpenAI's
 * shape (what else a call carried is left out). */
static void
test_parse_tool_messages(void **state)
{
    static const char body[] = MSGS(TOOL_MSGS);
    struct parse p;

    (void)state;
    parse_init(&p, TEXT_MAX);
    if (parse_run(&p, body, strlen(body)) != 0)
        fail_msg("refused: %s", p.err);
    assert_int_equal(p.h.count, 3);
    assert_int_equal(p.h.msgs[1].role, MESSAGE_ASSISTANT);
    assert_int_equal(p.h.msgs[1].len, 0);
    assert_string_equal(messages_extra(&p.h, 1),
                        "[{\"id\":\"call_1\",\"type\":\"function\","
                        "\"function\":{\"name\":\"now\",\"arguments\":"
                        "\"{}\"}}]");
    assert_int_equal(p.h.msgs[2].role, MESSAGE_TOOL);
    assert_string_equal(messages_extra(&p.h, 2), "call_1");
    assert_string_equal(messages_content(&p.h, 2), "12:00");
    assert_int_equal(p.h.msgs[0].extra_len, 0);
    assert_string_equal(p.q.options, "{}");
    parse_cleanup(&p);
}

/* The options passed through come back as one object, in the table's
 * order, numbers as written; nulls are left out. */
static void
test_parse_passed_options(void **state)
{
    static const char body[] =
        WITH_HI(",\"user\":\"u1\",\"seed\":1234567890123,"
                "\"top_p\":0.5,\"stop\":[\"a\",\"b\"],\"tool_choice\":"
                "\"auto\",\"tools\":[{\"type\":\"function\",\"function\":"
                "{\"name\":\"get_time\",\"parameters\":{\"type\":"
                "\"object\"}}}],\"parallel_tool_calls\":false,"
                "\"presence_penalty\":-2,\"frequency_penalty\":null,"
                "\"response_format\":{\"type\":\"json_object\"},"
                "\"unknown\":[1]");
    struct parse p;

    (void)state;
    parse_init(&p, TEXT_MAX);
    if (parse_run(&p, body, strlen(body)) != 0)
        fail_msg("refused: %s", p.err);
    assert_string_equal(
        p.q.options,
        "{\"tools\":[{\"type\":\"function\",\"function\":{\"name\":"
        "\"get_time\",\"parameters\":{\"type\":\"object\"}}}],"
        "\"tool_choice\":\"auto\",\"parallel_tool_calls\":false,"
        "\"response_format\":{\"type\":\"json_object\"},\"stop\":"
        "[\"a\",\"b\"],\"seed\":1234567890123,\"top_p\":0.5,"
        "\"presence_penalty\":-2,\"user\":\"u1\"}");
    parse_cleanup(&p);
}

static const struct refuse_case tool_refuse_cases[] = {
    {"a tool message without tool_call_id",
     MSGS("{\"role\":\"tool\",\"content\":\"x\"}"), 0, "tool_call_id"},
    {"a tool message with an empty tool_call_id",
     MSGS("{\"role\":\"tool\",\"tool_call_id\":\"\",\"content\":\"x\"}"),
     0, "tool_call_id"},
    {"a tool message without content",
     MSGS("{\"role\":\"tool\",\"tool_call_id\":\"c\"}"), 0, "content"},
    {"tool_calls without an id",
     MSGS("{\"role\":\"assistant\",\"tool_calls\":[{\"type\":"
          "\"function\",\"function\":{\"name\":\"f\",\"arguments\":"
          "\"{}\"}}]}"), 0, "tool_calls"},
    {"tool_calls with a bad name",
     MSGS("{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c\","
          "\"type\":\"function\",\"function\":{\"name\":\"a b\","
          "\"arguments\":\"{}\"}}]}"), 0, "tool_calls"},
    {"empty tool_calls and no content",
     MSGS("{\"role\":\"assistant\",\"tool_calls\":[]}"), 0,
     "tool_calls"},
    {"tools not an array", WITH_HI(",\"tools\":{}"), 0, "tools"},
    {"a tool of another type",
     WITH_HI(",\"tools\":[{\"type\":\"code\",\"function\":{\"name\":"
             "\"f\"}}]"), 0, "tool"},
    {"a tool name over 64",
     WITH_HI(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":"
             "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\""
             "}}]"), 0, "tool"},
    {"tool_choice unknown", WITH_HI(",\"tool_choice\":\"always\""), 0,
     "tool_choice"},
    {"parallel_tool_calls a string",
     WITH_HI(",\"parallel_tool_calls\":\"yes\""), 0, "parallel_tool_calls"},
    {"response_format without type", WITH_HI(",\"response_format\":{}"), 0,
     "response_format"},
    {"five stops", WITH_HI(",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]"), 0,
     "stop"},
    {"a stop not a string", WITH_HI(",\"stop\":[1]"), 0, "stop"},
    {"seed a fraction", WITH_HI(",\"seed\":1.5"), 0, "seed"},
    {"seed over 64 bits", WITH_HI(",\"seed\":12345678901234567890"), 0,
     "seed"},
    {"top_p over 1", WITH_HI(",\"top_p\":1.01"), 0, "top_p"},
    {"a penalty under -2", WITH_HI(",\"presence_penalty\":-2.5"), 0,
     "penalt"},
    {"user a number", WITH_HI(",\"user\":7"), 0, "user"},
};

static void
test_parse_tools_refused(void **state)
{
    struct parse p;
    struct buf body;

    (void)state;
    parse_init(&p, TEXT_MAX);
    for (size_t i = 0; i < NELEM(tool_refuse_cases); i++) {
        const struct refuse_case *c = &tool_refuse_cases[i];

        if (parse_run(&p, c->body, strlen(c->body)) != -1)
            fail_msg("%s: accepted", c->what);
        if (strstr(p.err, c->why) == NULL)
            fail_msg("%s: reason \"%s\" does not mention \"%s\"", c->what,
                     p.err, c->why);
    }
    /* 129 tools, one over OpenAI's limit; 128 pass */
    buf_init(&body, BODY_MAX);
    for (size_t n = V1_MAX_TOOLS; n <= V1_MAX_TOOLS + 1; n++) {
        buf_reset(&body);
        assert_int_equal(buf_append_str(&body, WITH_HI(",\"tools\":[")), 0);
        body.len--; /* the closing brace of WITH_HI */
        for (size_t i = 0; i < n; i++)
            assert_int_equal(buf_printf(&body, "%s{\"type\":\"function\","
                                        "\"function\":{\"name\":\"f%zu\"}}",
                                        i ? "," : "", i), 0);
        assert_int_equal(buf_append_str(&body, "]}"), 0);
        assert_int_equal(parse_run(&p, body.data, body.len),
                         n == V1_MAX_TOOLS ? 0 : -1);
    }
    buf_cleanup(&body);
    parse_cleanup(&p);
}

/* A fragment re-streamed: index, id and type with the id, the name when
 * given, the arguments piece always. */
static void
test_call_chunks(void **state)
{
    struct answer_piece first = {.index = 1, .id = "call_9", .name = "now",
                                 .arguments = "", .arguments_len = 0};
    struct answer_piece more = {.index = 1, .arguments = "{\"tz\"",
                                .arguments_len = 5};
    struct v1_completion c;
    yajl_gen g = json_gen_new();
    yajl_val doc, delta, call, fn;

    (void)state;
    completion_init(&c);
    assert_int_equal(v1_gen_call_chunk(g, &c, &first), 0);
    doc = doc_of(g, "first fragment");
    delta = expect_object("first", only_choice("first", doc), "delta");
    expect_str("first", delta, "role", "assistant");
    call = expect_array("first", delta, "tool_calls", 1)->u.array.values[0];
    expect_int("first", call, "index", 1);
    expect_str("first", call, "id", "call_9");
    expect_str("first", call, "type", "function");
    fn = expect_object("first", call, "function");
    expect_str("first", fn, "name", "now");
    expect_str("first", fn, "arguments", "");
    yajl_tree_free(doc);
    assert_int_equal(v1_gen_call_chunk(g, &c, &more), 0);
    doc = doc_of(g, "next fragment");
    delta = expect_object("next", only_choice("next", doc), "delta");
    expect_absent("next", delta, "role");
    call = expect_array("next", delta, "tool_calls", 1)->u.array.values[0];
    expect_absent("next", call, "id");
    expect_absent("next", call, "type");
    fn = expect_object("next", call, "function");
    expect_absent("next", fn, "name");
    expect_str("next", fn, "arguments", "{\"tz\"");
    yajl_tree_free(doc);
    yajl_gen_free(g);
}

/* A completion with tool calls: content null, the calls, finish_reason
 * tool_calls unless the model said otherwise. */
static void
test_completion_tool_calls(void **state)
{
    struct answer_piece p = {.index = 0, .id = "c1", .name = "now",
                             .arguments = "{}", .arguments_len = 2};
    struct v1_completion c;
    struct answer a;
    yajl_gen g = json_gen_new();
    yajl_val doc, choice, message, call;

    (void)state;
    completion_init(&c);
    answer_init(&a, 4096);
    assert_int_equal(answer_add_piece(&a, &p), 0);
    assert_int_equal(v1_gen_completion(g, &c, &a), 0);
    doc = doc_of(g, "tool calls");
    choice = only_choice("tool calls", doc);
    message = expect_object("tool calls", choice, "message");
    expect_null("tool calls", message, "content");
    call = expect_array("tool calls", message, "tool_calls", 1)
               ->u.array.values[0];
    expect_absent("tool calls", call, "index");
    expect_str("tool calls", call, "id", "c1");
    expect_str("tool calls", expect_object("tool calls", call, "function"),
               "arguments", "{}");
    expect_str("tool calls", choice, "finish_reason", "tool_calls");
    yajl_tree_free(doc);
    answer_set_finish(&a, "length", 6);
    assert_int_equal(v1_gen_finish_chunk(g, &c, &a), 0);
    doc = doc_of(g, "finish");
    expect_str("finish", only_choice("finish", doc), "finish_reason",
               "length");
    yajl_tree_free(doc);
    answer_cleanup(&a);
    yajl_gen_free(g);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_accepted),
        cmocka_unit_test(test_parse_model),
        cmocka_unit_test(test_parse_many_messages),
        cmocka_unit_test(test_parse_refused),
        cmocka_unit_test(test_parse_text_cap),
        cmocka_unit_test(test_parse_tool_messages),
        cmocka_unit_test(test_parse_passed_options),
        cmocka_unit_test(test_parse_tools_refused),
        cmocka_unit_test(test_call_chunks),
        cmocka_unit_test(test_completion_tool_calls),
        cmocka_unit_test(test_chunk_sequence),
        cmocka_unit_test(test_chunk_stop_first),
        cmocka_unit_test(test_usage_chunk),
        cmocka_unit_test(test_completion),
        cmocka_unit_test(test_models),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_bad_utf8),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
