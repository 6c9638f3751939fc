/*
 * fuzz_conf: the configuration as conf_load() builds it: the defaults, the
 * INI text, then CHATFCGI_* variables. The input is the file's text, but
 * its lines that start with CHATFCGI_ make up the environment instead (in
 * the text they become comments, so that the lines after them still
 * parse).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "conf.h"
#include "scoreboard.h"
#include "log.h"

#define ENV_PREFIX "CHATFCGI_"
#define ENV_MAX 64

int LLVMFuzzerInitialize(int *argc, char ***argv);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char err[LOG_ERR_LEN];

    (void)argc;
    (void)argv;
    /* conf may log (an exposed key): format those lines (debug is the
     * most that is formatted), but keep them out of the fuzzer's output. */
    if (log_open("/dev/null", "off", LOG_DEBUG, err) == -1)
        abort();
    return 0;
}

/* Move the text's CHATFCGI_ lines into env, each a NUL-terminated copy,
 * NULL at the end, and comment them out in text. Returns the count. */
static size_t
build_env(char *text, size_t size, char **env)
{
    size_t n = 0, prefix = strlen(ENV_PREFIX);
    char *p = text, *end = text + size;

    while (p < end && n < ENV_MAX) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);

        if (len >= prefix && memcmp(p, ENV_PREFIX, prefix) == 0) {
            env[n] = strndup(p, len);
            check(env[n] != NULL);
            n++;
            p[0] = '#';
        }
        p += len + 1;
    }
    env[n] = NULL;
    return n;
}

/* Whatever failed, every value is one the program can run with: a parse
 * writes a key only once its value passed. */
static void
check_conf(const struct conf *c)
{
    const char *const strings[] = {
        c->listen,      c->listen_owner,        c->listen_group,
        c->status_listen, c->status_allow,      c->user,
        c->group,       c->error_log,           c->access_log,
        c->pid_file,    c->redis.url,           c->upstream.url,
        c->upstream.api_key, c->upstream.model, c->upstream.system_prompt,
    };

    for (size_t i = 0; i < sizeof(strings) / sizeof(*strings); i++)
        check(strings[i] != NULL);
    check(c->listen_mode >= 0 && c->listen_mode <= 0777);
    check(c->pm >= CONF_POOL_STATIC && c->pm <= CONF_POOL_SINGLE);
    check(c->log_level >= LOG_DEBUG && c->log_level <= LOG_ERROR);
    check(c->workers >= 1 && c->workers <= SCOREBOARD_WORKERS_MAX);
    check(c->upstream.temperature == -1 ||
          (c->upstream.temperature >= 0 && c->upstream.temperature <= 2));
    check(c->upstream.max_response_bytes >= 1024);
    check(c->chat.max_body_bytes >= 64);
}

static void
check_err(int rc, const char *err)
{
    if (rc == -1)
        check(err[0] != '\0' && memchr(err, '\0', CONF_ERR_LEN) != NULL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *env[ENV_MAX + 1], err[CONF_ERR_LEN];
    char *text = malloc(size + 1);
    struct conf c;
    size_t nenv;
    int rc;

    check(text != NULL);
    memcpy(text, data, size);
    text[size] = '\0';
    nenv = build_env(text, size, env);
    check(conf_defaults(&c, err) == 0);
    err[0] = '\0';
    rc = conf_parse(&c, text, "fuzz.conf", err);
    check_err(rc, err);
    check_conf(&c);
    err[0] = '\0';
    rc = conf_apply_env(&c, env, err);
    check_err(rc, err);
    check_conf(&c);
    conf_free(&c);
    for (size_t i = 0; i < nenv; i++)
        free(env[i]);
    free(text);
    return 0;
}
