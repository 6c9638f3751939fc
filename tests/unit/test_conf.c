/*
 * Unit tests of conf: the defaults, the INI parser (values, quoting,
 * comments, and errors that name the line) and the CHATFCGI_* environment.
 * Every struct conf is freed, so that LeakSanitizer checks the parser.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "conf.h"
#include "log.h"

/* conf logs warnings (a key readable by others); keep the test output to
 * the test results. */
static int
quiet_log(void **state)
{
    char err[LOG_ERR_LEN];

    (void)state;
    return log_open("stderr", "off", LOG_ERROR, err);
}

static void
load_defaults(struct conf *c)
{
    char err[CONF_ERR_LEN] = "";

    assert_int_equal(conf_defaults(c, err), 0);
}

/* Parse text over the defaults and expect success. */
static void
parse_ok(struct conf *c, const char *text)
{
    char err[CONF_ERR_LEN] = "";

    load_defaults(c);
    if (conf_parse(c, text, "t.conf", err) != 0)
        fail_msg("conf_parse refused: %s", err);
}

static void
test_defaults(void **state)
{
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_string_equal(c.listen, "/run/chatfcgi/chatfcgi.sock");
    assert_string_equal(c.listen_owner, "");
    assert_string_equal(c.listen_group, "");
    assert_int_equal(c.listen_mode, 0660);
    assert_int_equal(c.listen_backlog, 0);
    assert_int_equal(c.workers, 8);
    assert_string_equal(c.user, "");
    assert_string_equal(c.group, "");
    assert_int_equal(c.log_level, LOG_INFO);
    assert_string_equal(c.error_log, "stderr");
    assert_string_equal(c.access_log, "stderr");
    assert_string_equal(c.pid_file, "");

    assert_string_equal(c.redis.url, "redis://127.0.0.1:6379/0");
    assert_int_equal(c.redis.connect_timeout_ms, 1000);
    assert_int_equal(c.redis.command_timeout_ms, 5000);

    assert_string_equal(c.upstream.url, "https://api.openai.com/v1");
    assert_string_equal(c.upstream.api_key, "");
    assert_string_equal(c.upstream.model, "gpt-4o-mini");
    assert_string_equal(c.upstream.system_prompt, "");
    assert_true(c.upstream.temperature < 0); /* not sent */
    assert_int_equal(c.upstream.max_tokens, 0);
    assert_int_equal(c.upstream.connect_timeout_ms, 5000);
    assert_int_equal(c.upstream.timeout_ms, 120000);
    assert_int_equal(c.upstream.max_response_bytes, 1048576);

    assert_int_equal(c.chat.max_body_bytes, 65536);
    assert_int_equal(c.chat.max_message_bytes, 32768);
    assert_int_equal(c.chat.history_max_messages, 20);
    assert_int_equal(c.chat.history_max_bytes, 65536);
    assert_int_equal(c.chat.history_ttl_seconds, 86400);

    assert_int_equal(c.v1.allow_system_messages, 1);
    assert_string_equal(c.v1.models, "");
    conf_free(&c);
}

static const char full_file[] =
    "# chatfcgi test configuration\n"
    "; a comment in the other style\n"
    "\n"
    "listen = 127.0.0.1:9000\n"
    "listen_owner = www-data\n"
    "listen_group=www-data\n"
    "listen_mode = 0600\n"
    "listen_backlog = 1024\n"
    "   workers   =   16   \n"
    "user = chatfcgi\n"
    "group = chatfcgi\n"
    "log_level = debug\n"
    "error_log = /var/log/chatfcgi/error.log\n"
    "access_log = off\n"
    "pid_file = /run/chatfcgi.pid\n"
    "\n"
    "[redis]\n"
    "   # indented comment\n"
    "url = redis://:secret@10.0.0.1:6380/2\n"
    "connect_timeout_ms = 250\n"
    "command_timeout_ms = 750\n"
    "\t\n"
    "[ upstream ]\n"
    "url = http://127.0.0.1:8080/v1\n"
    "api_key = sk-test\n"
    "model = llama3\n"
    "system_prompt = \"  You are terse.  \"\n"
    "temperature = 0.7\n"
    "max_tokens = 512\n"
    "connect_timeout_ms = 100\n"
    "timeout_ms = 30000\n"
    "max_response_bytes = 2048\n"
    "\n"
    "[chat]\r\n"
    "max_body_bytes = 4096\r\n"
    "max_message_bytes = 1000\n"
    "history_max_messages = 6\n"
    "history_max_bytes = 5000\n"
    "history_ttl_seconds = 3600"; /* no final newline */

static void
test_parse_full_file(void **state)
{
    struct conf c;

    (void)state;
    parse_ok(&c, full_file);
    assert_string_equal(c.listen, "127.0.0.1:9000");
    assert_string_equal(c.listen_owner, "www-data");
    assert_string_equal(c.listen_group, "www-data");
    assert_int_equal(c.listen_mode, 0600);
    assert_int_equal(c.listen_backlog, 1024);
    assert_int_equal(c.workers, 16);
    assert_string_equal(c.user, "chatfcgi");
    assert_string_equal(c.group, "chatfcgi");
    assert_int_equal(c.log_level, LOG_DEBUG);
    assert_string_equal(c.error_log, "/var/log/chatfcgi/error.log");
    assert_string_equal(c.access_log, "off");
    assert_string_equal(c.pid_file, "/run/chatfcgi.pid");
    assert_string_equal(c.redis.url, "redis://:secret@10.0.0.1:6380/2");
    assert_int_equal(c.redis.connect_timeout_ms, 250);
    assert_int_equal(c.redis.command_timeout_ms, 750);
    assert_string_equal(c.upstream.url, "http://127.0.0.1:8080/v1");
    assert_string_equal(c.upstream.api_key, "sk-test");
    assert_string_equal(c.upstream.model, "llama3");
    assert_string_equal(c.upstream.system_prompt, "  You are terse.  ");
    assert_true(c.upstream.temperature > 0.69 && c.upstream.temperature < 0.71);
    assert_int_equal(c.upstream.max_tokens, 512);
    assert_int_equal(c.upstream.connect_timeout_ms, 100);
    assert_int_equal(c.upstream.timeout_ms, 30000);
    assert_int_equal(c.upstream.max_response_bytes, 2048);
    assert_int_equal(c.chat.max_body_bytes, 4096);
    assert_int_equal(c.chat.max_message_bytes, 1000);
    assert_int_equal(c.chat.history_max_messages, 6);
    assert_int_equal(c.chat.history_max_bytes, 5000);
    assert_int_equal(c.chat.history_ttl_seconds, 3600);
    conf_free(&c);
}

/* Keys the file leaves out keep their defaults; an empty file is fine. */
static void
test_parse_partial_keeps_defaults(void **state)
{
    struct conf c;

    (void)state;
    parse_ok(&c, "");
    assert_int_equal(c.workers, 8);
    conf_free(&c);

    parse_ok(&c, "\n\n# only comments\n;\n[chat]\nhistory_max_messages=4\n");
    assert_int_equal(c.chat.history_max_messages, 4);
    assert_int_equal(c.workers, 8);
    assert_string_equal(c.upstream.model, "gpt-4o-mini");
    conf_free(&c);
}

/* Values: empty strings, quotes, '=' inside a value, '#' not a comment
 * after a value, a lone quote kept as it is. */
static void
test_parse_values(void **state)
{
    struct conf c;

    (void)state;
    parse_ok(&c, "user =\n"
                 "group = \"\"\n"
                 "[upstream]\n"
                 "system_prompt = a = b # not a comment\n"
                 "model = \"half\n"
                 "api_key = \" \"\n");
    assert_string_equal(c.user, "");
    assert_string_equal(c.group, "");
    assert_string_equal(c.upstream.system_prompt, "a = b # not a comment");
    assert_string_equal(c.upstream.model, "\"half");
    assert_string_equal(c.upstream.api_key, " ");
    conf_free(&c);
}

/* Bounds are inclusive; temperature may be empty (not sent). */
static void
test_parse_bounds_accepted(void **state)
{
    struct conf c;

    (void)state;
    parse_ok(&c, "workers = 1\nlisten_mode = 0\nlisten_backlog = 65535\n"
                 "[upstream]\ntemperature = 0\nmax_tokens = 1000000\n"
                 "max_response_bytes = 1024\n"
                 "[chat]\nhistory_max_messages = 2\n");
    assert_int_equal(c.workers, 1);
    assert_int_equal(c.listen_mode, 0);
    assert_int_equal(c.listen_backlog, 65535);
    assert_true(c.upstream.temperature == 0.0);
    assert_int_equal(c.upstream.max_tokens, 1000000);
    assert_int_equal(c.upstream.max_response_bytes, 1024);
    assert_int_equal(c.chat.history_max_messages, 2);
    conf_free(&c);

    parse_ok(&c, "workers = 16384\nlisten_mode = 0777\n"
                 "[upstream]\ntemperature = 2\n");
    assert_int_equal(c.workers, 16384);
    assert_int_equal(c.listen_mode, 0777);
    assert_true(c.upstream.temperature == 2.0);
    conf_free(&c);

    parse_ok(&c, "[upstream]\ntemperature = 1\n");
    conf_free(&c);
    parse_ok(&c, "[upstream]\ntemperature =\n");
    assert_true(c.upstream.temperature < 0);
    conf_free(&c);
}

/* A line of 4095 bytes (the longest a 4096-byte line buffer holds) is
 * read whole. */
static void
test_parse_long_line_accepted(void **state)
{
    static const char prefix[] = "[upstream]\nsystem_prompt = ";
    size_t line_len = 4095, value_len = line_len - strlen("system_prompt = ");
    char *text = malloc(sizeof(prefix) + value_len + 2);
    struct conf c;

    (void)state;
    assert_non_null(text);
    memcpy(text, prefix, sizeof(prefix) - 1);
    memset(text + sizeof(prefix) - 1, 'p', value_len);
    strcpy(text + sizeof(prefix) - 1 + value_len, "\n");
    parse_ok(&c, text);
    assert_int_equal(strlen(c.upstream.system_prompt), value_len);
    assert_int_equal(c.upstream.system_prompt[value_len - 1], 'p');
    conf_free(&c);
    free(text);
}

/* Error cases: the message starts with "t.conf:LINE: " and holds a word
 * of the reason. */
struct bad_case {
    const char *text;
    int line;
    const char *reason; /* a substring of the message */
};

static const struct bad_case bad_cases[] = {
    /* unknown key */
    {"workers = 2\nthreads = 4\n", 2, "unknown key 'threads'"},
    /* unknown section */
    {"[redis]\nurl = redis://x\n[cache]\n", 3, "section"},
    {"[]\n", 1, "section"},
    {"[redis\n", 1, "section"},
    /* a key of another section */
    {"[redis]\nworkers = 4\n", 2, "unknown key 'workers' in section redis"},
    {"[chat]\ntimeout_ms = 4\n", 2, "unknown key 'timeout_ms'"},
    {"\n\n[upstream]\n\n\nmax_body_bytes = 100\n", 6,
     "unknown key 'max_body_bytes'"},
    /* a key of a section used before any section */
    {"model = x\n", 1, "unknown key 'model'"},
    /* the same key name in two sections is not a duplicate, but twice in
     * one section is, and the message names the first line */
    {"# c\nworkers = 2\n\nworkers = 3\n", 4, "already set on line 2"},
    {"[redis]\nurl = a\n[upstream]\nurl = b\n[redis]\nurl = c\n", 6,
     "already set on line 2"},
    /* integers: range and syntax */
    {"workers = 0\n", 1, "not an integer from 1 to 16384"},
    {"workers = 16385\n", 1, "not an integer from 1 to 16384"},
    {"workers = -1\n", 1, "integer"},
    {"workers = 99999999999999999999999\n", 1, "integer"},
    {"workers = eight\n", 1, "integer"},
    {"workers = 8x\n", 1, "integer"},
    {"workers = 0x10\n", 1, "integer"},
    {"workers = 1.5\n", 1, "integer"},
    {"workers =\n", 1, "integer"},
    {"workers = \"\"\n", 1, "integer"},
    {"[chat]\nhistory_max_messages = 1\n", 2, "integer"},
    {"[upstream]\nmax_response_bytes = 1023\n", 2, "integer"},
    {"[redis]\nconnect_timeout_ms = 0\n", 2, "integer"},
    {"[redis]\nconnect_timeout_ms = 86400001\n", 2, "integer"},
    /* octal modes */
    {"listen_mode = 0999\n", 1, "octal"},
    {"listen_mode = 0o660\n", 1, "octal"},
    {"listen_mode = 1000\n", 1, "octal"},
    {"listen_mode = rw-rw----\n", 1, "octal"},
    {"listen_mode = -1\n", 1, "octal"},
    {"listen_mode =\n", 1, "octal"},
    /* log levels */
    {"log_level = verbose\n", 1, "debug, info, warn, error"},
    {"log_level =\n", 1, "debug"},
    /* temperature */
    {"[upstream]\ntemperature = 2.5\n", 2, "number from 0 to 2"},
    {"[upstream]\ntemperature = -0.1\n", 2, "number from 0 to 2"},
    {"[upstream]\ntemperature = warm\n", 2, "number"},
    {"[upstream]\ntemperature = 0.5x\n", 2, "number"},
    {"[upstream]\ntemperature = nan\n", 2, "number"},
    {"[upstream]\ntemperature = inf\n", 2, "number"},
    /* lines without '=' */
    {"workers 8\n", 1, "key = value"},
    {"\n\n\nlisten\n", 4, "key = value"},
    {"[redis]\nurl\n", 2, "key = value"},
};

static void
test_parse_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(*bad_cases); i++) {
        const struct bad_case *bc = &bad_cases[i];
        char err[CONF_ERR_LEN] = "", prefix[32];
        struct conf c;

        load_defaults(&c);
        if (conf_parse(&c, bc->text, "t.conf", err) != -1)
            fail_msg("case %zu accepted: %s", i, bc->text);
        snprintf(prefix, sizeof(prefix), "t.conf:%d: ", bc->line);
        if (strncmp(err, prefix, strlen(prefix)) != 0 ||
            strstr(err, bc->reason) == NULL)
            fail_msg("case %zu: got \"%s\", want \"%s...%s\"", i, err, prefix,
                     bc->reason);
        conf_free(&c);
    }
}

/* The message names the file, the line and the key, but never repeats
 * the value: it may be a secret. */
static void
test_parse_error_shows_line(void **state)
{
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_int_equal(conf_parse(&c, "# x\n   workers = lots   \n", "my.conf",
                                err),
                     -1);
    assert_non_null(strstr(err, "my.conf:2: 'workers': "));
    assert_null(strstr(err, "lots"));
    conf_free(&c);
    load_defaults(&c);
    assert_int_equal(conf_parse(&c, "[upstream]\napi_key = sk-1\n"
                                "api_key = sk-2\n", "k.conf", err),
                     -1);
    assert_non_null(strstr(err, "k.conf:3: "));
    assert_null(strstr(err, "sk-"));
    conf_free(&c);
}

static void
test_parse_line_too_long(void **state)
{
    static const char head[] = "workers = 2\n[upstream]\nsystem_prompt = ";
    size_t n = 5000;
    char *text = malloc(sizeof(head) + n);
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    assert_non_null(text);
    memcpy(text, head, sizeof(head) - 1);
    memset(text + sizeof(head) - 1, 'q', n);
    text[sizeof(head) - 1 + n] = '\0';
    load_defaults(&c);
    assert_int_equal(conf_parse(&c, text, "t.conf", err), -1);
    assert_non_null(strstr(err, "t.conf:3: "));
    assert_non_null(strstr(err, "too long"));
    conf_free(&c);

    /* 4096 bytes exactly is one too many for the 4096-byte line buffer */
    memset(text, '#', 4096);
    strcpy(text + 4096, "\n");
    load_defaults(&c);
    assert_int_equal(conf_parse(&c, text, "t.conf", err), -1);
    assert_non_null(strstr(err, "t.conf:1: line too long"));
    conf_free(&c);
    free(text);
}

/* Environment: CHATFCGI_<KEY> and CHATFCGI_<SECTION>_<KEY>. */
static void
test_env_basic(void **state)
{
    char *envp[] = {
        "CHATFCGI_WORKERS=3",
        "CHATFCGI_UPSTREAM_TIMEOUT_MS=30000",
        "CHATFCGI_REDIS_URL=unix:///run/redis.sock",
        "CHATFCGI_LISTEN_MODE=0600",
        "CHATFCGI_LOG_LEVEL=warn",
        "CHATFCGI_UPSTREAM_TEMPERATURE=1.5",
        "CHATFCGI_CHAT_HISTORY_MAX_MESSAGES=10",
        "CHATFCGI_V1_ALLOW_SYSTEM_MESSAGES=no",
        "CHATFCGI_V1_MODELS=chat, big",
        NULL,
    };
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_int_equal(c.workers, 3);
    assert_int_equal(c.upstream.timeout_ms, 30000);
    assert_int_equal(c.upstream.connect_timeout_ms, 5000); /* untouched */
    assert_int_equal(c.redis.connect_timeout_ms, 1000);
    assert_string_equal(c.redis.url, "unix:///run/redis.sock");
    assert_int_equal(c.listen_mode, 0600);
    assert_int_equal(c.log_level, LOG_WARN);
    assert_true(c.upstream.temperature > 1.49 &&
                c.upstream.temperature < 1.51);
    assert_int_equal(c.chat.history_max_messages, 10);
    assert_int_equal(c.v1.allow_system_messages, 0);
    assert_string_equal(c.v1.models, "chat, big");
    conf_free(&c);
}

/* An unknown CHATFCGI_ variable is an error naming it, like an unknown
 * key in the file: a typo must not be ignored. */
static void
test_env_unknown_is_an_error(void **state)
{
    static const char *const unknown[] = {
        "CHATFCGI_WORKRES", "CHATFCGI_BIN", "CHATFCGI_", "CHATFCGI_WORKERSX",
        "CHATFCGI_REDIS_WORKERS", "CHATFCGI_CHAT_URL",
    };

    (void)state;
    for (size_t i = 0; i < sizeof(unknown) / sizeof(*unknown); i++) {
        char var[64], err[CONF_ERR_LEN] = "";
        char *envp[] = {"CHATFCGI_WORKERS=3", var, NULL};
        struct conf c;

        snprintf(var, sizeof(var), "%s=4", unknown[i]);
        load_defaults(&c);
        if (conf_apply_env(&c, envp, err) != -1)
            fail_msg("%s was accepted", unknown[i]);
        if (strstr(err, unknown[i]) == NULL ||
            strstr(err, "no such setting") == NULL)
            fail_msg("%s: the error does not name it: %s", unknown[i], err);
        conf_free(&c);
    }
}

static void
test_env_aliases(void **state)
{
    char *envp[] = {"CHATFCGI_API_KEY=sk-env", "CHATFCGI_MODEL=mistral",
                    NULL};
    char *full[] = {"CHATFCGI_UPSTREAM_API_KEY=sk-full",
                    "CHATFCGI_UPSTREAM_MODEL=qwen", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_string_equal(c.upstream.api_key, "sk-env");
    assert_string_equal(c.upstream.model, "mistral");
    assert_int_equal(conf_apply_env(&c, full, err), 0);
    assert_string_equal(c.upstream.api_key, "sk-full");
    assert_string_equal(c.upstream.model, "qwen");
    conf_free(&c);
}

static void
test_env_wins_over_file(void **state)
{
    char *envp[] = {"CHATFCGI_WORKERS=12", "CHATFCGI_API_KEY=sk-env",
                    "CHATFCGI_UPSTREAM_SYSTEM_PROMPT=", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    parse_ok(&c, "workers = 2\n[upstream]\napi_key = sk-file\n"
                 "system_prompt = be nice\nmodel = from-file\n");
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_int_equal(c.workers, 12);
    assert_string_equal(c.upstream.api_key, "sk-env");
    assert_string_equal(c.upstream.system_prompt, ""); /* set to empty */
    assert_string_equal(c.upstream.model, "from-file");
    conf_free(&c);
}

/* conf_load: defaults, then the file, then the environment. */
static void
test_load_order(void **state)
{
    char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    static const char text[] = "workers = 2\nlisten_backlog = 7\n";
    char *envp[] = {"CHATFCGI_WORKERS=5", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;
    FILE *f;
    int fd;

    (void)state;
    fd = mkstemp(path);
    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, sizeof(text) - 1, f), sizeof(text) - 1);
    assert_int_equal(fclose(f), 0);

    if (conf_load(&c, path, envp, err) != 0)
        fail_msg("conf_load: %s", err);
    assert_int_equal(c.workers, 5);
    assert_int_equal(c.listen_backlog, 7);
    assert_int_equal(c.chat.history_max_messages, 20);
    conf_free(&c);

    /* an error in the file names the file and line */
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("workers = 2\nworkers = 3\n", f);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(conf_load(&c, path, envp, err), -1);
    assert_non_null(strstr(err, ":2: "));
    assert_non_null(strstr(err, path));
    conf_free(&c);
    unlink(path);

    /* a missing file is an error that names it */
    assert_int_equal(conf_load(&c, path, envp, err), -1);
    assert_non_null(strstr(err, path));
    conf_free(&c);

    /* no file: defaults and environment */
    assert_int_equal(conf_load(&c, NULL, envp, err), 0);
    assert_int_equal(c.workers, 5);
    conf_free(&c);
}

struct env_bad_case {
    const char *var;
    const char *name; /* the variable as it must appear in the message */
};

static const struct env_bad_case env_bad_cases[] = {
    {"CHATFCGI_WORKERS=many", "CHATFCGI_WORKERS"},
    {"CHATFCGI_WORKERS=0", "CHATFCGI_WORKERS"},
    {"CHATFCGI_WORKERS=", "CHATFCGI_WORKERS"},
    {"CHATFCGI_UPSTREAM_TIMEOUT_MS=-5", "CHATFCGI_UPSTREAM_TIMEOUT_MS"},
    {"CHATFCGI_UPSTREAM_TIMEOUT_MS=10s", "CHATFCGI_UPSTREAM_TIMEOUT_MS"},
    {"CHATFCGI_LISTEN_MODE=0888", "CHATFCGI_LISTEN_MODE"},
    {"CHATFCGI_LOG_LEVEL=loud", "CHATFCGI_LOG_LEVEL"},
    {"CHATFCGI_UPSTREAM_TEMPERATURE=3", "CHATFCGI_UPSTREAM_TEMPERATURE"},
    {"CHATFCGI_CHAT_MAX_BODY_BYTES=1", "CHATFCGI_CHAT_MAX_BODY_BYTES"},
    {"CHATFCGI_V1_ALLOW_SYSTEM_MESSAGES=maybe",
     "CHATFCGI_V1_ALLOW_SYSTEM_MESSAGES"},
};

static void
test_env_bad_value(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(env_bad_cases) / sizeof(*env_bad_cases);
         i++) {
        char *envp[] = {"CHATFCGI_MODEL=m", (char *)env_bad_cases[i].var,
                        NULL};
        char err[CONF_ERR_LEN] = "";
        struct conf c;

        load_defaults(&c);
        if (conf_apply_env(&c, envp, err) != -1)
            fail_msg("accepted %s", env_bad_cases[i].var);
        if (strncmp(err, env_bad_cases[i].name,
                    strlen(env_bad_cases[i].name)) != 0 ||
            err[strlen(env_bad_cases[i].name)] != ':')
            fail_msg("%s: message \"%s\" does not start with the name",
                     env_bad_cases[i].var, err);
        conf_free(&c);
    }
}

/* Unknown CHATFCGI_ names (launchers share the prefix) and variables of
 * others are not errors and change nothing. */
static void
test_env_ignored(void **state)
{
    char *envp[] = {
        "chatfcgi_workers=3",
        "WORKERS=3",
        "PATH=/usr/bin:/bin",
        "XCHATFCGI_WORKERS=3",
        "CHATFCGI_WORKERS", /* no '=' */
        "",
        NULL,
    };
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_int_equal(c.workers, 8);
    assert_string_equal(c.redis.url, "redis://127.0.0.1:6379/0");
    assert_string_equal(c.upstream.url, "https://api.openai.com/v1");
    conf_free(&c);

    /* a NULL environment is empty */
    load_defaults(&c);
    assert_int_equal(conf_apply_env(&c, NULL, err), 0);
    conf_free(&c);
}

/* A value may itself contain '='. */
static void
test_env_value_with_equals(void **state)
{
    char *envp[] = {"CHATFCGI_UPSTREAM_SYSTEM_PROMPT=a=b=c", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    load_defaults(&c);
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_string_equal(c.upstream.system_prompt, "a=b=c");
    conf_free(&c);
}

/* Setting a string twice (file, then env) frees the first copy: ASan's
 * leak check fails this test otherwise. */
static void
test_strings_replaced_without_leak(void **state)
{
    char *envp[] = {"CHATFCGI_LISTEN=/tmp/a.sock", "CHATFCGI_LISTEN=/tmp/b",
                    NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    parse_ok(&c, "listen = /tmp/file.sock\n");
    assert_int_equal(conf_apply_env(&c, envp, err), 0);
    assert_string_equal(c.listen, "/tmp/b");
    conf_free(&c);
    assert_null(c.listen);
}

/* Write text to a temporary file; the caller unlinks path. */
static void
write_conf(char *path, const char *text)
{
    int fd = mkstemp(path);
    FILE *f;

    assert_true(fd >= 0);
    f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* Replace the text of a file write_conf made. */
static void
rewrite_conf(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* [provider NAME] sections: file order, what they leave out from
 * [upstream], keys from api_key_env, and the environment's overrides. */
static void
test_providers(void **state)
{
    static const char text[] =
        "[upstream]\nmodel = m0\napi_key = k0\ntimeout_ms = 9000\n"
        "[provider b]\nurl = http://b/v1\napi_key_env = B_KEY\n"
        "[provider a]\nurl = https://a/v1\nmodel = ma\ntimeout_ms = 100\n";
    char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    char *envp[] = {"CHATFCGI_PROVIDER_A_MODEL=mx", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    write_conf(path, text);
    setenv("B_KEY", "kb", 1);
    if (conf_load(&c, path, envp, err) != 0)
        fail_msg("conf_load: %s", err);
    assert_int_equal(c.nproviders, 2);
    assert_string_equal(c.providers[0].name, "b");
    assert_string_equal(c.providers[0].api_key, "kb");
    assert_string_equal(c.providers[0].model, "m0");
    assert_int_equal(c.providers[0].timeout_ms, 9000);
    assert_string_equal(c.providers[1].url, "https://a/v1");
    assert_string_equal(c.providers[1].api_key, "k0");
    assert_string_equal(c.providers[1].model, "mx");
    assert_int_equal(c.providers[1].timeout_ms, 100);
    conf_free(&c);
    unsetenv("B_KEY");
    assert_int_equal(conf_load(&c, path, envp, err), -1);
    assert_non_null(strstr(err, "B_KEY"));
    conf_free(&c);
    unlink(path);
}

/* [v1] models left empty offers the first provider's model, whether
 * that comes from a [provider] section or from [upstream]. */
static void
test_v1_models(void **state)
{
    static const struct {
        const char *text;
        const char *models;
    } cases[] = {
        {"", "gpt-4o-mini"},
        {"[upstream]\nmodel = m0\n", "m0"},
        {"[upstream]\nmodel = m0\n[provider a]\nmodel = ma\n"
         "[provider b]\nmodel = mb\n", "ma"},
        {"[v1]\nmodels = chat, big\nallow_system_messages = no\n",
         "chat, big"},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
        char err[CONF_ERR_LEN] = "";
        char *envp[] = {NULL};
        struct conf c;

        write_conf(path, cases[i].text);
        if (conf_load(&c, path, envp, err) != 0)
            fail_msg("conf_load: %s", err);
        assert_string_equal(c.v1.models, cases[i].models);
        conf_free(&c);
        unlink(path);
    }
}

/* Without sections: one provider per URL of [upstream] url. */
static void
test_providers_from_url_list(void **state)
{
    char *envp[] = {"CHATFCGI_UPSTREAM_URL=http://x/v1, http://y/v1", NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    if (conf_load(&c, NULL, envp, err) != 0)
        fail_msg("conf_load: %s", err);
    assert_int_equal(c.nproviders, 2);
    assert_string_equal(c.providers[0].name, "upstream1");
    assert_string_equal(c.providers[1].url, "http://y/v1");
    assert_string_equal(c.providers[1].model, "gpt-4o-mini");
    conf_free(&c);
}

static void
test_provider_errors(void **state)
{
    static const char *const bad[] = {
        "[provider A]\n",                         /* upper case */
        "[provider]\n",                           /* no name */
        "[provider a]\n[provider a]\n",           /* twice */
        "[provider a]\nurl = ftp://x\n",          /* scheme */
        "[provider a]\nurl = http://x\nurl = http://y\n", /* duplicate */
        "[provider a]\nworkers = 3\n",            /* not a provider key */
        "[provider a]\n[provider b]\n[provider c]\n[provider d]\n"
        "[provider e]\n[provider f]\n[provider g]\n[provider h]\n"
        "[provider i]\n",                         /* too many */
    };

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
        char err[CONF_ERR_LEN] = "";
        char *envp[] = {NULL};
        struct conf c;

        write_conf(path, bad[i]);
        if (conf_load(&c, path, envp, err) != -1)
            fail_msg("accepted: %s", bad[i]);
        conf_free(&c);
        unlink(path);
    }
}

/* "*" in trusted_proxies would believe every X-Forwarded-For hop, so a
 * client would name its own address (and its own rate-limit bucket):
 * refused at load, alone or among other entries, from a file or the
 * environment; addresses alone, and "*" in the other lists, still load. */
static void
test_trusted_proxies_star_refused(void **state)
{
    static const char *const lists[] = {"*", "10.0.0.1, *", "* 10.0.0.1"};
    char *good[] = {"CHATFCGI_TRUSTED_PROXIES=10.0.0.1, ::1",
                    "CHATFCGI_CORS_ORIGINS=*", "CHATFCGI_STATUS_ALLOW=*",
                    NULL};
    char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    char err[CONF_ERR_LEN] = "";
    char var[80];
    char *envp[] = {var, NULL};
    struct conf c;

    (void)state;
    write_conf(path, "trusted_proxies = 10.0.0.1, *\n");
    assert_int_equal(conf_load(&c, path, NULL, err), -1);
    assert_non_null(strstr(err, "trusted_proxies"));
    conf_free(&c);
    unlink(path);
    for (size_t i = 0; i < sizeof(lists) / sizeof(*lists); i++) {
        snprintf(var, sizeof(var), "CHATFCGI_TRUSTED_PROXIES=%s", lists[i]);
        if (conf_load(&c, NULL, envp, err) != -1)
            fail_msg("trusted_proxies \"%s\" accepted", lists[i]);
        if (strstr(err, "trusted_proxies") == NULL)
            fail_msg("\"%s\": err \"%s\"", lists[i], err);
        conf_free(&c);
    }
    if (conf_load(&c, NULL, good, err) != 0)
        fail_msg("conf_load: %s", err);
    conf_free(&c);
}

/* [tool NAME] sections, from a drop-in file read by include and by
 * CHATFCGI_INCLUDE: defaults, a schema from parameters_file, the
 * environment's overrides, file order. */
static void
test_tools_and_include(void **state)
{
    char schema[] = "/tmp/chatfcgi-test-schema-XXXXXX";
    char dropin[] = "/tmp/chatfcgi-test-dropin-XXXXXX";
    char later[] = "/tmp/chatfcgi-test-later-XXXXXX";
    char main_conf[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    char text[512], env_include[64];
    char *envp[] = {env_include, "CHATFCGI_TOOL_CLOCK_TIMEOUT_MS=250",
                    NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    write_conf(schema, "{\"type\": \"object\",\n \"properties\": {}}\n");
    snprintf(text, sizeof(text), "[tool clock]\nurl = http://t/time\n"
             "[tool search_2]\nurl = https://t/s\ndescription = find\n"
             "parameters_file = %s\n", schema);
    write_conf(dropin, text);
    write_conf(later, "[tool late]\nurl = http://t/late\n");
    snprintf(text, sizeof(text), "workers = 3\ninclude = %s\n"
             "[chat]\nmax_tool_rounds = 2\n", dropin);
    write_conf(main_conf, text);
    snprintf(env_include, sizeof(env_include), "CHATFCGI_INCLUDE=%s", later);
    if (conf_load(&c, main_conf, envp, err) != 0)
        fail_msg("conf_load: %s", err);
    assert_int_equal(c.ntools, 3);
    assert_string_equal(c.tools[0].name, "clock");
    assert_int_equal(c.tools[0].timeout_ms, 250);
    assert_string_equal(c.tools[0].parameters,
                        "{\"type\":\"object\",\"properties\":{}}");
    assert_string_equal(c.tools[1].description, "find");
    assert_non_null(strstr(c.tools[1].parameters, "\"properties\": {}"));
    assert_string_equal(c.tools[2].name, "late");
    assert_int_equal(c.chat.max_tool_rounds, 2);
    assert_int_equal(c.workers, 3);
    conf_free(&c);
    unlink(schema);
    unlink(dropin);
    unlink(later);
    unlink(main_conf);
}

struct tool_bad_case {
    const char *text;
    const char *why; /* in the message */
};

static const struct tool_bad_case tool_bad_cases[] = {
    {"[tool Bad]\nurl = http://t\n", "tool name"},
    {"[tool a]\nurl = http://t\n[tool a]\nurl = http://t\n", "twice"},
    {"[tool a]\nurl = ftp://t\n", "http"},
    {"[tool a]\n", "http"},
    {"[tool a]\nurl = http://t\nparameters = [1]\n", "JSON object"},
    {"[tool a]\nurl = http://t\nparameters = {\"a\":1,\"a\":2}\n",
     "JSON object"},
    {"[tool a]\nurl = http://t\nparameters_file = /nonexistent/x\n",
     "nonexistent"},
    {"[tool a]\nurl = http://t\ntimeout_ms = 0\n", "timeout_ms"},
    {"[tool a]\nurl = http://t\nmodel = x\n", "unknown key"},
    {"include = /nonexistent/chatfcgi.conf\n", "no such file"},
    {"[chat]\nmax_tool_rounds = 11\n", "max_tool_rounds"},
};

static void
test_tools_refused(void **state)
{
    char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    char *envp[] = {NULL};
    char err[CONF_ERR_LEN];
    struct conf c;

    (void)state;
    for (size_t i = 0; i < sizeof(tool_bad_cases) / sizeof(*tool_bad_cases);
         i++) {
        snprintf(path, sizeof(path), "/tmp/chatfcgi-test-conf-XXXXXX");
        write_conf(path, tool_bad_cases[i].text);
        err[0] = '\0';
        if (conf_load(&c, path, envp, err) != -1)
            fail_msg("accepted: %s", tool_bad_cases[i].text);
        if (strstr(err, tool_bad_cases[i].why) == NULL)
            fail_msg("\"%s\" does not say %s", err, tool_bad_cases[i].why);
        conf_free(&c);
        unlink(path);
    }
}

/* A glob matching nothing is an empty drop-in directory; a file that
 * includes itself stops at the nesting limit, not in a loop. */
static void
test_include_glob_and_loop(void **state)
{
    char path[] = "/tmp/chatfcgi-test-conf-XXXXXX";
    char text[128];
    char *envp[] = {NULL};
    char err[CONF_ERR_LEN] = "";
    struct conf c;

    (void)state;
    write_conf(path, "include = /nonexistent-dir/*.conf\nworkers = 4\n");
    if (conf_load(&c, path, envp, err) != 0)
        fail_msg("conf_load: %s", err);
    assert_int_equal(c.workers, 4);
    conf_free(&c);
    unlink(path);
    /* the name is known only once the file exists: write it twice */
    snprintf(path, sizeof(path), "/tmp/chatfcgi-test-conf-XXXXXX");
    write_conf(path, "");
    snprintf(text, sizeof(text), "include = %s\n", path);
    rewrite_conf(path, text);
    assert_int_equal(conf_load(&c, path, envp, err), -1);
    assert_non_null(strstr(err, "nested"));
    conf_free(&c);
    unlink(path);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_parse_full_file),
        cmocka_unit_test(test_parse_partial_keeps_defaults),
        cmocka_unit_test(test_parse_values),
        cmocka_unit_test(test_parse_bounds_accepted),
        cmocka_unit_test(test_parse_long_line_accepted),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_parse_error_shows_line),
        cmocka_unit_test(test_parse_line_too_long),
        cmocka_unit_test(test_env_basic),
        cmocka_unit_test(test_env_unknown_is_an_error),
        cmocka_unit_test(test_env_aliases),
        cmocka_unit_test(test_env_wins_over_file),
        cmocka_unit_test(test_load_order),
        cmocka_unit_test(test_env_bad_value),
        cmocka_unit_test(test_env_ignored),
        cmocka_unit_test(test_env_value_with_equals),
        cmocka_unit_test(test_strings_replaced_without_leak),
        cmocka_unit_test(test_providers),
        cmocka_unit_test(test_tools_and_include),
        cmocka_unit_test(test_tools_refused),
        cmocka_unit_test(test_include_glob_and_loop),
        cmocka_unit_test(test_providers_from_url_list),
        cmocka_unit_test(test_v1_models),
        cmocka_unit_test(test_provider_errors),
        cmocka_unit_test(test_trusted_proxies_star_refused),
    };

    return cmocka_run_group_tests(tests, quiet_log, NULL);
}
