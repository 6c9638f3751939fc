/* conf: the configuration table, its parser and its rules. */
#include "conf.h"

#include <ctype.h>
#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "buf.h"
#include "json.h"
#include "log.h"

#define CONF_LINE_MAX 4096
#define CONF_FILE_MAX (1024 * 1024)
#define CONF_NAME_MAX 96
#define ENV_PREFIX "CHATFCGI_"
#define INCLUDE_DEPTH_MAX 8 /* an include that includes itself stops */
#define INCLUDED_ERROR (-2)  /* why is a whole message: file:line: reason */
#define PARAMETERS_MAX (64 * 1024)
#define PARAMETERS_DEPTH 32
#define NAMED_KEYS_MAX 8
#define NAMED_MAX 16

enum conf_type { CONF_STRING, CONF_INT, CONF_MODE, CONF_CHOICE, CONF_DECIMAL };

struct conf_key {
    const char *section; /* "" for keys outside any section */
    const char *name;
    enum conf_type type;
    long long min, max; /* for CONF_INT; CONF_DECIMAL uses them too */
    const char *def;
    size_t offset;
    const char *env_alias; /* a second, shorter variable name, or NULL */
    const char *const *choices; /* CONF_CHOICE: the words, index = value */
};

/* In the order of enum log_level and enum conf_pool; no is 0, yes 1. */
static const char *const level_words[] = {"debug", "info", "warn", "error",
                                          NULL};
static const char *const pool_words[] = {"static", "dynamic", "single",
                                         NULL};
static const char *const yes_no_words[] = {"no", "yes", NULL};

#define F(field) offsetof(struct conf, field)
#define MS_MAX (24LL * 3600 * 1000)
#define STR(sec, name, def, field)                                             \
    {sec, name, CONF_STRING, 0, 0, def, F(field), NULL, NULL}
#define INT(sec, name, min, max, def, field)                                   \
    {sec, name, CONF_INT, min, max, def, F(field), NULL, NULL}
#define CHOICE(sec, name, words, def, field)                                   \
    {sec, name, CONF_CHOICE, 0, 0, def, F(field), NULL, words}

/* Every key, its bounds and default; conf/chatfcgi.conf documents each. */
static const struct conf_key keys[] = {
    STR("", "listen", "/run/chatfcgi/chatfcgi.sock", listen),
    STR("", "listen_owner", "", listen_owner),
    STR("", "listen_group", "", listen_group),
    {"", "listen_mode", CONF_MODE, 0, 0777, "0660", F(listen_mode), NULL,
     NULL},
    INT("", "listen_backlog", 0, 65535, "0", listen_backlog),
    CHOICE("", "pm", pool_words, "static", pm),
    INT("", "workers", 1, 16384, "8", workers),
    INT("", "start_workers", 1, 16384, "2", start_workers),
    INT("", "min_spare_workers", 1, 16384, "1", min_spare_workers),
    INT("", "max_spare_workers", 1, 16384, "3", max_spare_workers),
    INT("", "max_requests", 0, 1LL << 40, "0", max_requests),
    INT("", "request_timeout_s", 1, 86400, "150", request_timeout_s),
    INT("", "graceful_timeout_s", 0, 86400, "180", graceful_timeout_s),
    INT("", "slowlog_ms", 0, MS_MAX, "30000", slowlog_ms),
    INT("", "queue_timeout_ms", 0, MS_MAX, "5000", queue_timeout_ms),
    STR("", "status_listen", "/run/chatfcgi/status.sock", status_listen),
    STR("", "status_allow", "127.0.0.1, ::1", status_allow),
    STR("", "client_keys", "", client_keys),
    STR("", "trusted_proxies", "", trusted_proxies),
    STR("", "cors_origins", "", cors_origins),
    INT("", "idempotency_ttl_s", 1, 30LL * 86400, "86400", idempotency_ttl_s),
    STR("", "user", "", user),
    STR("", "group", "", group),
    CHOICE("", "log_level", level_words, "info", log_level),
    STR("", "error_log", "stderr", error_log),
    STR("", "access_log", "stderr", access_log),
    STR("", "pid_file", "", pid_file),
    STR("", "include", "", include),

    STR("redis", "url", "redis://127.0.0.1:6379/0", redis.url),
    INT("redis", "connect_timeout_ms", 1, MS_MAX, "1000",
        redis.connect_timeout_ms),
    INT("redis", "command_timeout_ms", 1, MS_MAX, "5000",
        redis.command_timeout_ms),
    STR("redis", "sentinels", "", redis.sentinels),
    STR("redis", "master_name", "mymaster", redis.master_name),
    STR("redis", "sentinel_password", "", redis.sentinel_password),
    INT("redis", "wait_replicas", 0, 1000, "0", redis.wait_replicas),
    INT("redis", "wait_timeout_ms", 1, MS_MAX, "1000",
        redis.wait_timeout_ms),

    STR("upstream", "url", "https://api.openai.com/v1", upstream.url),
    {"upstream", "api_key", CONF_STRING, 0, 0, "", F(upstream.api_key),
     "CHATFCGI_API_KEY", NULL},
    {"upstream", "model", CONF_STRING, 0, 0, "gpt-4o-mini",
     F(upstream.model), "CHATFCGI_MODEL", NULL},
    STR("upstream", "system_prompt", "", upstream.system_prompt),
    {"upstream", "temperature", CONF_DECIMAL, 0, 2, "",
     F(upstream.temperature), NULL, NULL},
    INT("upstream", "max_tokens", 0, 1000000, "0", upstream.max_tokens),
    INT("upstream", "connect_timeout_ms", 1, MS_MAX, "5000",
        upstream.connect_timeout_ms),
    INT("upstream", "timeout_ms", 1, MS_MAX, "120000", upstream.timeout_ms),
    INT("upstream", "max_response_bytes", 1024, 64LL << 20, "1048576",
        upstream.max_response_bytes),
    INT("upstream", "first_token_timeout_ms", 0, MS_MAX, "0",
        upstream.first_token_timeout_ms),
    INT("upstream", "idle_timeout_ms", 0, MS_MAX, "0",
        upstream.idle_timeout_ms),
    INT("upstream", "retries", 0, 10, "1", upstream.retries),
    INT("upstream", "retry_base_ms", 1, 60000, "200", upstream.retry_base_ms),
    INT("upstream", "hedge_after_ms", 0, MS_MAX, "0", upstream.hedge_after_ms),
    INT("upstream", "cooldown_failures", 1, 1000, "3",
        upstream.cooldown_failures),
    INT("upstream", "cooldown_s", 0, 86400, "30", upstream.cooldown_s),
    STR("upstream", "ca_file", "", upstream.ca_file),
    STR("upstream", "ca_path", "", upstream.ca_path),
    INT("upstream", "tls_handshakes", 1, CONF_TLS_HANDSHAKES_MAX, "4",
        upstream.tls_handshakes),

    INT("chat", "max_body_bytes", 64, 16LL << 20, "65536",
        chat.max_body_bytes),
    INT("chat", "max_message_bytes", 1, 16LL << 20, "32768",
        chat.max_message_bytes),
    INT("chat", "history_max_messages", 2, 10000, "20",
        chat.history_max_messages),
    INT("chat", "history_max_bytes", 1, 64LL << 20, "65536",
        chat.history_max_bytes),
    INT("chat", "history_ttl_seconds", 1, 365LL * 86400, "86400",
        chat.history_ttl_seconds),
    INT("chat", "max_tool_rounds", 0, 10, "3", chat.max_tool_rounds),

    INT("rate_limit", "rpm", 0, 1LL << 40, "0", rate_limit.rpm),
    INT("rate_limit", "tpm", 0, 1LL << 40, "0", rate_limit.tpm),

    CHOICE("v1", "allow_system_messages", yes_no_words, "yes",
           v1.allow_system_messages),
    STR("v1", "models", "", v1.models),
};

#define NKEYS (sizeof(keys) / sizeof(*keys))

#define P(field) offsetof(struct conf_provider, field)

/* The keys of a [provider NAME] section; offsets into its conf_provider.
 * Empty and 0 mean "as in [upstream]". */
static const struct conf_key provider_keys[] = {
    {"provider", "url", CONF_STRING, 0, 0, "", P(url), NULL, NULL},
    {"provider", "api_key", CONF_STRING, 0, 0, "", P(api_key), NULL, NULL},
    {"provider", "api_key_env", CONF_STRING, 0, 0, "", P(api_key_env), NULL,
     NULL},
    {"provider", "model", CONF_STRING, 0, 0, "", P(model), NULL, NULL},
    {"provider", "connect_timeout_ms", CONF_INT, 0, MS_MAX, "0",
     P(connect_timeout_ms), NULL, NULL},
    {"provider", "timeout_ms", CONF_INT, 0, MS_MAX, "0", P(timeout_ms), NULL,
     NULL},
    {"provider", "ca_file", CONF_STRING, 0, 0, "", P(ca_file), NULL, NULL},
    {"provider", "ca_path", CONF_STRING, 0, 0, "", P(ca_path), NULL, NULL},
};

#define NPKEYS (sizeof(provider_keys) / sizeof(*provider_keys))

#define T(field) offsetof(struct conf_tool, field)

/* The keys of a [tool NAME] section; offsets into its conf_tool. */
static const struct conf_key tool_keys[] = {
    {"tool", "url", CONF_STRING, 0, 0, "", T(url), NULL, NULL},
    {"tool", "description", CONF_STRING, 0, 0, "", T(description), NULL,
     NULL},
    {"tool", "parameters", CONF_STRING, 0, 0,
     "{\"type\":\"object\",\"properties\":{}}", T(parameters), NULL, NULL},
    {"tool", "parameters_file", CONF_STRING, 0, 0, "", T(parameters_file),
     NULL, NULL},
    {"tool", "timeout_ms", CONF_INT, 1, MS_MAX, "10000", T(timeout_ms), NULL,
     NULL},
};

#define NTKEYS (sizeof(tool_keys) / sizeof(*tool_keys))

/* A kind of named section, "[provider NAME]" or "[tool NAME]": its keys,
 * its names, and where its entries live in struct conf (each entry
 * begins with its char *name). */
struct named_kind {
    const char *word;
    const struct conf_key *keys;
    size_t nkeys;
    size_t max;
    size_t size;   /* of one entry */
    size_t array;  /* offset of the entries in struct conf */
    size_t count;  /* offset of their size_t count */
    const char *name_chars;
    size_t name_max;
};

static const struct named_kind named_kinds[] = {
    {"provider", provider_keys, NPKEYS, CONF_PROVIDERS_MAX,
     sizeof(struct conf_provider), F(providers), F(nproviders),
     "abcdefghijklmnopqrstuvwxyz0123456789", CONF_PROVIDER_NAME_MAX},
    {"tool", tool_keys, NTKEYS, CONF_TOOLS_MAX, sizeof(struct conf_tool),
     F(tools), F(ntools), "abcdefghijklmnopqrstuvwxyz0123456789_",
     CONF_TOOL_NAME_MAX},
};

#define NKINDS (sizeof(named_kinds) / sizeof(*named_kinds))

static size_t *
named_count(struct conf *c, const struct named_kind *k)
{
    return (size_t *)((char *)c + k->count);
}

static void *
named_entry(struct conf *c, const struct named_kind *k, size_t i)
{
    return (char *)c + k->array + i * k->size;
}

static const char *
named_name(struct conf *c, const struct named_kind *k, size_t i)
{
    return *(char **)named_entry(c, k, i);
}

static const struct conf_key *
named_key_find(const struct named_kind *kind, const char *name)
{
    for (size_t i = 0; i < kind->nkeys; i++)
        if (strcmp(kind->keys[i].name, name) == 0)
            return &kind->keys[i];
    return NULL;
}

static const struct conf_key *
key_find(const char *section, const char *name)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].section, section) == 0 &&
            strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

/* A whole-string integer in [min, max] in the given base. */
static int
parse_ll(const char *s, int base, long long min, long long max,
         long long *out)
{
    char *end;
    long long v;

    if (*s == '\0' || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    v = strtoll(s, &end, base);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static int
parse_decimal(const char *s, const struct conf_key *k, double *out)
{
    char *end;
    double v;

    if (*s == '\0') {
        *out = -1; /* unset */
        return 0;
    }
    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || *end != '\0' || end == s || !(v >= (double)k->min) ||
        !(v <= (double)k->max))
        return -1;
    *out = v;
    return 0;
}

static int
parse_choice(const char *value, const char *const *words, long long *out,
             char *err, size_t errlen)
{
    size_t n;

    for (size_t i = 0; words[i] != NULL; i++) {
        if (strcmp(value, words[i]) == 0) {
            *out = (long long)i;
            return 0;
        }
    }
    n = (size_t)snprintf(err, errlen, "not one of");
    for (size_t i = 0; words[i] != NULL && n < errlen; i++)
        n += (size_t)snprintf(err + n, errlen - n, "%s %s", i ? "," : "",
                              words[i]);
    return -1;
}

static int
set_string(char **slot, const char *value)
{
    char *copy = strdup(value);

    if (copy == NULL)
        return -1;
    free(*slot);
    *slot = copy;
    return 0;
}

/* Parse value for key k into the struct at base (a conf, or a provider).
 * Returns 0, or -1 with why in err. */
static int
key_set(void *base, const struct conf_key *k, const char *value, char *err,
        size_t errlen)
{
    void *slot = (char *)base + k->offset;

    switch (k->type) {
    case CONF_STRING:
        if (set_string(slot, value) == 0)
            return 0;
        snprintf(err, errlen, "out of memory");
        return -1;
    case CONF_INT:
        if (parse_ll(value, 10, k->min, k->max, slot) == 0)
            return 0;
        snprintf(err, errlen, "not an integer from %lld to %lld", k->min,
                 k->max);
        return -1;
    case CONF_MODE:
        if (parse_ll(value, 8, k->min, k->max, slot) == 0)
            return 0;
        snprintf(err, errlen, "not an octal file mode such as 0660");
        return -1;
    case CONF_CHOICE:
        return parse_choice(value, k->choices, slot, err, errlen);
    case CONF_DECIMAL:
        if (parse_decimal(value, k, slot) == 0)
            return 0;
        snprintf(err, errlen, "not empty or a number from %lld to %lld",
                 k->min, k->max);
        return -1;
    }
    return -1;
}

int
conf_defaults(struct conf *c, char err[CONF_ERR_LEN])
{
    char why[128];

    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < NKEYS; i++) {
        if (key_set(c, &keys[i], keys[i].def, why, sizeof(why)) == -1) {
            snprintf(err, CONF_ERR_LEN, "default of %s: %s", keys[i].name,
                     why);
            return -1;
        }
    }
    return 0;
}

static char *
trim(char *s)
{
    char *end;

    while (isspace((unsigned char)*s))
        s++;
    end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

/* Per-key line where the file set it, to refuse duplicates. */
struct parse_state {
    char section[CONF_NAME_MAX];
    const struct named_kind *kind; /* of the named section being read */
    size_t entry;                  /* its index */
    int set_on_line[NKEYS];
    int named_set_on_line[NKINDS][NAMED_MAX][NAMED_KEYS_MAX];
    unsigned depth; /* of include */
};

static int
valid_section_name(const struct named_kind *k, const char *s)
{
    size_t n = strspn(s, k->name_chars);

    return n > 0 && n < k->name_max && s[n] == '\0';
}

/* "[provider NAME]" or "[tool NAME]": a new entry, in file order. */
static int
open_named(struct conf *c, struct parse_state *st,
           const struct named_kind *k, const char *name, char *why,
           size_t whylen)
{
    size_t *count = named_count(c, k);
    void *entry;

    if (!valid_section_name(k, name)) {
        snprintf(why, whylen, "a %s name is 1-%zu of %s", k->word,
                 k->name_max - 1, k->name_chars);
        return -1;
    }
    for (size_t i = 0; i < *count; i++) {
        if (strcmp(named_name(c, k, i), name) == 0) {
            snprintf(why, whylen, "%s '%s' is defined twice", k->word, name);
            return -1;
        }
    }
    if (*count == k->max) {
        snprintf(why, whylen, "at most %zu %ss", k->max, k->word);
        return -1;
    }
    entry = named_entry(c, k, *count);
    for (size_t i = 0; i < k->nkeys; i++)
        if (key_set(entry, &k->keys[i], k->keys[i].def, why, whylen) == -1)
            return -1;
    if (set_string(entry, name) == -1) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    st->kind = k;
    st->entry = (*count)++;
    snprintf(st->section, sizeof(st->section), "%s", k->word);
    return 0;
}

/* "[name]", "[provider NAME]" or "[tool NAME]". Returns 0, or -1 with
 * why set. */
static int
parse_section(struct conf *c, struct parse_state *st, char *line, char *why,
              size_t whylen)
{
    size_t len = strlen(line);
    char *name;

    if (len < 2 || line[len - 1] != ']') {
        snprintf(why, whylen, "malformed section");
        return -1;
    }
    line[len - 1] = '\0';
    name = trim(line + 1);
    for (size_t i = 0; i < NKINDS; i++) {
        size_t n = strlen(named_kinds[i].word);

        if (strncmp(name, named_kinds[i].word, n) == 0 && name[n] == ' ')
            return open_named(c, st, &named_kinds[i], trim(name + n), why,
                              whylen);
    }
    st->kind = NULL;
    for (size_t i = 0; i < NKEYS; i++) {
        if (keys[i].section[0] != '\0' && strcmp(keys[i].section, name) == 0) {
            snprintf(st->section, sizeof(st->section), "%s", name);
            return 0;
        }
    }
    snprintf(why, whylen, "unknown section");
    return -1;
}

/* A value may be wrapped in double quotes to keep outer spaces. */
static char *
unquote(char *v)
{
    size_t len = strlen(v);

    if (len >= 2 && v[0] == '"' && v[len - 1] == '"') {
        v[len - 1] = '\0';
        return v + 1;
    }
    return v;
}

static int include_files(struct conf *c, const char *patterns,
                         unsigned depth, char *why, size_t whylen);

static int
parse_assignment(struct conf *c, struct parse_state *st, char *line,
                 int lineno, char *why, size_t whylen)
{
    char *eq = strchr(line, '=');
    const struct conf_key *k;
    char *name, detail[160];
    int *seen;
    void *base;

    if (eq == NULL) {
        snprintf(why, whylen, "expected 'key = value' or '[section]'");
        return -1;
    }
    *eq = '\0';
    name = trim(line);
    k = st->kind ? named_key_find(st->kind, name)
                 : key_find(st->section, name);
    if (k == NULL) {
        snprintf(why, whylen, "unknown key '%s'%s%s", name,
                 st->section[0] ? " in section " : "", st->section);
        return -1;
    }
    seen = st->kind ? &st->named_set_on_line[st->kind - named_kinds]
                                            [st->entry][k - st->kind->keys]
                    : &st->set_on_line[k - keys];
    if (*seen) {
        snprintf(why, whylen, "'%s' was already set on line %d", name,
                 *seen);
        return -1;
    }
    *seen = lineno;
    base = st->kind ? named_entry(c, st->kind, st->entry) : (void *)c;
    if (k->offset == F(include) && base == c)
        return include_files(c, unquote(trim(eq + 1)), st->depth + 1, why,
                             whylen);
    if (key_set(base, k, unquote(trim(eq + 1)), detail, sizeof(detail)) == 0)
        return 0;
    /* Name the key, not the value: it may be a secret. */
    snprintf(why, whylen, "'%s': %s", name, detail);
    return -1;
}

static int
parse_line(struct conf *c, struct parse_state *st, char *raw, int lineno,
           char *why, size_t whylen)
{
    char *line = trim(raw);

    if (line[0] == '\0' || line[0] == '#' || line[0] == ';')
        return 0;
    if (line[0] == '[')
        return parse_section(c, st, line, why, whylen);
    return parse_assignment(c, st, line, lineno, why, whylen);
}

static int
parse_text(struct conf *c, const char *text, const char *name,
           unsigned depth, char err[CONF_ERR_LEN])
{
    struct parse_state *st = calloc(1, sizeof(*st));
    char line[CONF_LINE_MAX], why[256];
    const char *p = text;
    int lineno = 0, rc;

    if (st == NULL) {
        snprintf(err, CONF_ERR_LEN, "%s: out of memory", name);
        return -1;
    }
    st->depth = depth;

    while (*p != '\0') {
        size_t len = strcspn(p, "\n");

        lineno++;
        if (len >= sizeof(line)) {
            snprintf(err, CONF_ERR_LEN, "%s:%d: line too long", name, lineno);
            free(st);
            return -1;
        }
        memcpy(line, p, len);
        line[len] = '\0';
        p += len + (p[len] == '\n');
        rc = parse_line(c, st, line, lineno, why, sizeof(why));
        if (rc != 0) {
            if (rc == INCLUDED_ERROR)
                snprintf(err, CONF_ERR_LEN, "%s", why);
            else
                snprintf(err, CONF_ERR_LEN, "%s:%d: %s", name, lineno, why);
            free(st);
            return -1;
        }
    }
    free(st);
    return 0;
}

int
conf_parse(struct conf *c, const char *text, const char *name,
           char err[CONF_ERR_LEN])
{
    return parse_text(c, text, name, 0, err);
}

/* CHATFCGI_<SECTION>_<KEY> or CHATFCGI_<KEY>, upper case. */
static void
env_name(const struct conf_key *k, char *out, size_t size)
{
    size_t n;

    snprintf(out, size, ENV_PREFIX "%s%s%s", k->section,
             k->section[0] ? "_" : "", k->name);
    for (n = 0; out[n] != '\0'; n++)
        out[n] = (char)toupper((unsigned char)out[n]);
}

static const struct conf_key *
key_for_env(const char *var, size_t len)
{
    char name[CONF_NAME_MAX];

    for (size_t i = 0; i < NKEYS; i++) {
        env_name(&keys[i], name, sizeof(name));
        if (strlen(name) == len && memcmp(name, var, len) == 0)
            return &keys[i];
        if (keys[i].env_alias && strlen(keys[i].env_alias) == len &&
            memcmp(keys[i].env_alias, var, len) == 0)
            return &keys[i];
    }
    return NULL;
}

/* CHATFCGI_<KIND>_<NAME>_<KEY> (CHATFCGI_PROVIDER_A_URL,
 * CHATFCGI_TOOL_CLOCK_TIMEOUT_MS), for the sections the file defines. */
static const struct conf_key *
named_key_for_env(struct conf *c, const char *var, size_t len, void **base)
{
    char name[CONF_NAME_MAX + CONF_TOOL_NAME_MAX];

    for (const struct named_kind *k = named_kinds; k < named_kinds + NKINDS;
         k++) {
        for (size_t e = 0; e < *named_count(c, k); e++) {
            for (size_t i = 0; i < k->nkeys; i++) {
                snprintf(name, sizeof(name), ENV_PREFIX "%s_%s_%s", k->word,
                         named_name(c, k, e), k->keys[i].name);
                for (size_t n = 0; name[n] != '\0'; n++)
                    name[n] = (char)toupper((unsigned char)name[n]);
                if (strlen(name) == len && memcmp(name, var, len) == 0) {
                    *base = named_entry(c, k, e);
                    return &k->keys[i];
                }
            }
        }
    }
    return NULL;
}

int
conf_apply_env(struct conf *c, char *const envp[], char err[CONF_ERR_LEN])
{
    char why[256];

    for (size_t i = 0; envp && envp[i]; i++) {
        const char *eq = strchr(envp[i], '=');
        const struct conf_key *k;
        void *base = c;
        size_t len;

        if (strncmp(envp[i], ENV_PREFIX, strlen(ENV_PREFIX)) != 0 || !eq)
            continue;
        len = (size_t)(eq - envp[i]);
        k = key_for_env(envp[i], len);
        if (k == NULL)
            k = named_key_for_env(c, envp[i], len, &base);
        if (k == NULL) {
            snprintf(err, CONF_ERR_LEN, "%.*s: no such setting (a typo?); "
                     "see chatfcgi.conf for the keys", (int)len, envp[i]);
            return -1;
        }
        if (key_set(base, k, eq + 1, why, sizeof(why)) == -1) {
            snprintf(err, CONF_ERR_LEN, "%.*s: %s", (int)len, envp[i], why);
            return -1;
        }
    }
    return 0;
}

static char *
read_file(const char *path, char err[CONF_ERR_LEN])
{
    FILE *f = fopen(path, "re");
    char *text;
    size_t n;

    if (f == NULL) {
        snprintf(err, CONF_ERR_LEN, "%s: %s", path, strerror(errno));
        return NULL;
    }
    text = malloc(CONF_FILE_MAX + 1);
    if (text == NULL) {
        snprintf(err, CONF_ERR_LEN, "%s: out of memory", path);
        fclose(f);
        return NULL;
    }
    n = fread(text, 1, CONF_FILE_MAX + 1, f);
    if (ferror(f) || n > CONF_FILE_MAX || memchr(text, '\0', n)) {
        snprintf(err, CONF_ERR_LEN, "%s: unreadable, binary or over 1 MiB",
                 path);
        free(text);
        fclose(f);
        return NULL;
    }
    text[n] = '\0';
    fclose(f);
    return text;
}

/* One file an include names: parsed as if it stood alone (a drop-in
 * file starts outside any section). */
static int
include_file(struct conf *c, const char *path, unsigned depth, char *why,
             size_t whylen)
{
    char err[CONF_ERR_LEN];
    char *text = read_file(path, err);
    int rc;

    if (text == NULL) {
        snprintf(why, whylen, "include: %s", err);
        return -1;
    }
    rc = parse_text(c, text, path, depth, err);
    free(text);
    if (rc == 0)
        return 0;
    snprintf(why, whylen, "%s", err); /* names its own file and line */
    return INCLUDED_ERROR;
}

/* A directory of a glob that does not exist is an empty drop-in
 * directory; one that cannot be read stops the glob. */
static int
glob_error(const char *path, int error)
{
    (void)path;
    return error != ENOENT && error != ENOTDIR;
}

/* include = FILE or GLOB, several separated by commas or spaces, read in
 * name order where the key stands, as nginx's include and PHP-FPM's
 * include= do. A glob that matches nothing is an empty drop-in
 * directory; a plain path that does not exist is an error. */
static int
include_files(struct conf *c, const char *patterns, unsigned depth,
              char *why, size_t whylen)
{
    const char *entry;
    char pattern[CONF_LINE_MAX];
    size_t len;
    int rc = 0;

    if (depth > INCLUDE_DEPTH_MAX) {
        snprintf(why, whylen, "include: nested over %d deep (a file that "
                 "includes itself?)", INCLUDE_DEPTH_MAX);
        return -1;
    }
    while (rc == 0 && (entry = conf_list_next(&patterns, &len)) != NULL) {
        glob_t g;
        int found;

        snprintf(pattern, sizeof(pattern), "%.*s", (int)len, entry);
        found = glob(pattern, 0, glob_error, &g);
        if (found == GLOB_NOMATCH && strpbrk(pattern, "*?[") == NULL) {
            snprintf(why, whylen, "include: %s: no such file", pattern);
            rc = -1;
        } else if (found != 0 && found != GLOB_NOMATCH) {
            snprintf(why, whylen, "include: %s cannot be read", pattern);
            rc = -1;
        }
        for (size_t i = 0; found == 0 && rc == 0 && i < g.gl_pathc; i++)
            rc = include_file(c, g.gl_pathv[i], depth, why, whylen);
        globfree(&g);
    }
    return rc;
}

/* An API key in a file others can read is a leak waiting to happen. */
static void
warn_if_key_exposed(const struct conf *c, const char *path)
{
    int has_key = c->upstream.api_key[0] != '\0';
    struct stat st;

    for (size_t i = 0; i < c->nproviders; i++)
        has_key |= c->providers[i].api_key[0] != '\0';
    if (has_key && stat(path, &st) == 0 && (st.st_mode & S_IROTH))
        log_warnx("conf", "%s holds an API key and is world-readable: "
                  "chmod o-r it, or keep keys in the environment "
                  "(CHATFCGI_API_KEY, api_key_env)", path);
}

/* What a provider section leaves out comes from [upstream]; a key named
 * by api_key_env is read from the environment (keys stay out of files). */
static int
complete_provider(struct conf_provider *p, const struct conf *c,
                  char err[CONF_ERR_LEN])
{
    const char *key;

    /* A provider's own ca_file or ca_path replaces both of [upstream]'s. */
    int own_cas = p->ca_file[0] != '\0' || p->ca_path[0] != '\0';

    if ((p->url[0] == '\0' && set_string(&p->url, c->upstream.url)) ||
        (p->model[0] == '\0' && set_string(&p->model, c->upstream.model)) ||
        (!own_cas && (set_string(&p->ca_file, c->upstream.ca_file) ||
                      set_string(&p->ca_path, c->upstream.ca_path))))
        goto oom;
    if (p->connect_timeout_ms == 0)
        p->connect_timeout_ms = c->upstream.connect_timeout_ms;
    if (p->timeout_ms == 0)
        p->timeout_ms = c->upstream.timeout_ms;
    if (p->api_key_env[0] == '\0') {
        if (p->api_key[0] == '\0' &&
            set_string(&p->api_key, c->upstream.api_key))
            goto oom;
        return 0;
    }
    key = getenv(p->api_key_env);
    if (key == NULL) {
        snprintf(err, CONF_ERR_LEN, "provider %s: api_key_env %s is not set "
                 "in the environment", p->name, p->api_key_env);
        return -1;
    }
    if (set_string(&p->api_key, key) == 0)
        return 0;
oom:
    snprintf(err, CONF_ERR_LEN, "out of memory");
    return -1;
}

/* Without [provider] sections: one provider per URL of [upstream] url
 * (comma-separated), sharing its key, model and timeouts. */
static int
providers_from_upstream(struct conf *c, char err[CONF_ERR_LEN])
{
    const char *p = c->upstream.url;

    while (*p != '\0' && c->nproviders < CONF_PROVIDERS_MAX) {
        struct conf_provider *pr = &c->providers[c->nproviders];
        size_t n;
        char name[CONF_PROVIDER_NAME_MAX], url[2048];

        p += strspn(p, " ,");
        n = strcspn(p, " ,");
        if (n == 0)
            break;
        snprintf(url, sizeof(url), "%.*s", (int)n, p);
        snprintf(name, sizeof(name), "upstream%zu", c->nproviders + 1);
        memset(pr, 0, sizeof(*pr));
        if (set_string(&pr->name, name) || set_string(&pr->url, url) ||
            set_string(&pr->api_key, "") || set_string(&pr->api_key_env, "") ||
            set_string(&pr->model, "") || set_string(&pr->ca_file, "") ||
            set_string(&pr->ca_path, "")) {
            snprintf(err, CONF_ERR_LEN, "out of memory");
            return -1;
        }
        c->nproviders++;
        p += n;
    }
    return 0;
}

static int
finish_providers(struct conf *c, char err[CONF_ERR_LEN])
{
    if (c->nproviders == 0 && providers_from_upstream(c, err) == -1)
        return -1;
    for (size_t i = 0; i < c->nproviders; i++) {
        const char *url;

        if (complete_provider(&c->providers[i], c, err) == -1)
            return -1;
        url = c->providers[i].url;
        if (strncmp(url, "http://", 7) != 0 &&
            strncmp(url, "https://", 8) != 0) {
            snprintf(err, CONF_ERR_LEN, "provider %s: its url must start "
                     "with http:// or https://", c->providers[i].name);
            return -1;
        }
    }
    if (c->nproviders == 0) {
        snprintf(err, CONF_ERR_LEN, "no model provider: set [upstream] url");
        return -1;
    }
    return 0;
}

/* A tool's parameters: a JSON object (its schema), from its file when
 * parameters_file is set. */
static int
load_parameters(struct conf_tool *t, char err[CONF_ERR_LEN])
{
    struct json_field whole = {.path = "", .accept = JSON_OBJECT};
    char why[JSON_ERR_LEN];
    struct buf arena;
    int rc;

    if (t->parameters_file[0] != '\0') {
        char *text = read_file(t->parameters_file, err);

        if (text == NULL)
            return -1;
        free(t->parameters);
        t->parameters = text;
    }
    buf_init(&arena, strlen(t->parameters) + 8);
    rc = json_pick(t->parameters, strlen(t->parameters), &whole, 1, &arena,
                   PARAMETERS_DEPTH, JSON_STRICT, why);
    buf_cleanup(&arena);
    if (rc == 0 && strlen(t->parameters) <= PARAMETERS_MAX)
        return 0;
    snprintf(err, CONF_ERR_LEN, "tool %s: parameters must be a JSON object "
             "(a JSON Schema) of at most 64 KiB: %s", t->name,
             rc ? why : "too large");
    return -1;
}

static int
finish_tools(struct conf *c, char err[CONF_ERR_LEN])
{
    for (size_t i = 0; i < c->ntools; i++) {
        struct conf_tool *t = &c->tools[i];

        if (strncmp(t->url, "http://", 7) != 0 &&
            strncmp(t->url, "https://", 8) != 0) {
            snprintf(err, CONF_ERR_LEN, "tool %s: its url must start with "
                     "http:// or https://", t->name);
            return -1;
        }
        if (load_parameters(t, err) == -1)
            return -1;
    }
    return 0;
}

/* CHATFCGI_INCLUDE: drop-in files for the local stack, read after the
 * file and before the other variables (which win over both). */
static int
include_from_env(struct conf *c, char *const envp[], char err[CONF_ERR_LEN])
{
    static const char var[] = ENV_PREFIX "INCLUDE=";
    char why[CONF_ERR_LEN - 32];

    for (size_t i = 0; envp && envp[i]; i++) {
        if (strncmp(envp[i], var, sizeof(var) - 1) != 0)
            continue;
        switch (include_files(c, envp[i] + sizeof(var) - 1, 1, why,
                              sizeof(why))) {
        case 0:
            return 0;
        case INCLUDED_ERROR:
            snprintf(err, CONF_ERR_LEN, "%s", why);
            return -1;
        }
        snprintf(err, CONF_ERR_LEN, ENV_PREFIX "INCLUDE: %s", why);
        return -1;
    }
    return 0;
}

/* [v1] models left empty offers the model of the first provider, the one
 * an answer names when the provider does not. */
static int
finish_v1(struct conf *c, char err[CONF_ERR_LEN])
{
    if (c->v1.models[0] != '\0' ||
        set_string(&c->v1.models, c->providers[0].model) == 0)
        return 0;
    snprintf(err, CONF_ERR_LEN, "out of memory");
    return -1;
}

const char *
conf_list_next(const char **list, size_t *len)
{
    const char *s = *list + strspn(*list, " ,");

    if (*s == '\0')
        return NULL;
    *len = strcspn(s, " ,");
    *list = s + *len;
    return s;
}

int
conf_list_has(const char *list, const char *s, size_t n)
{
    const char *entry;
    size_t len;

    while ((entry = conf_list_next(&list, &len)) != NULL)
        if ((len == 1 && entry[0] == '*') ||
            (len == n && n > 0 && memcmp(entry, s, n) == 0))
            return 1;
    return 0;
}

static int
parse_digest(const char *s, size_t n, unsigned char out[CONF_DIGEST_LEN])
{
    if (n != 2 * CONF_DIGEST_LEN)
        return -1;
    for (size_t i = 0; i < CONF_DIGEST_LEN; i++) {
        int hi = json_hex_digit(s[2 * i]), lo = json_hex_digit(s[2 * i + 1]);

        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi * 16 + lo);
    }
    return 0;
}

int
conf_parse_digests(const char *list, unsigned char (**out)[CONF_DIGEST_LEN],
                   size_t *n)
{
    const char *p = list, *entry;
    size_t len, count = 0;

    *out = NULL;
    *n = 0;
    while (conf_list_next(&p, &len) != NULL)
        count++;
    if (count == 0)
        return 0;
    *out = calloc(count, CONF_DIGEST_LEN);
    if (*out == NULL)
        return -1;
    for (p = list; (entry = conf_list_next(&p, &len)) != NULL; (*n)++) {
        if (parse_digest(entry, len, (*out)[*n]) == -1) {
            free(*out);
            *out = NULL;
            *n = 0;
            return -1;
        }
    }
    return 0;
}

/* Rules across keys, and values parsed once here for every worker. */
static int
conf_check(struct conf *c, char err[CONF_ERR_LEN])
{
    if (conf_parse_digests(c->client_keys, &c->client_digests,
                           &c->nclient_digests) == -1) {
        snprintf(err, CONF_ERR_LEN, "client_keys must be SHA-256 digests, "
                 "64 hex digits each, separated by commas");
        return -1;
    }
    /* X-Forwarded-For is walked from the right while the hop is trusted:
     * with "*" the leftmost entry, which the client writes, would win. */
    if (conf_list_has(c->trusted_proxies, "*", 1)) {
        snprintf(err, CONF_ERR_LEN, "trusted_proxies cannot be *: it would "
                 "let clients choose their own address; list the proxies");
        return -1;
    }
    if (c->pm == CONF_POOL_DYNAMIC &&
        (c->min_spare_workers > c->max_spare_workers ||
         c->start_workers > c->workers ||
         c->min_spare_workers > c->workers)) {
        snprintf(err, CONF_ERR_LEN, "pm dynamic needs min_spare_workers <= "
                 "max_spare_workers and start_workers, min_spare_workers "
                 "<= workers");
        return -1;
    }
    return 0;
}

int
conf_load(struct conf *c, const char *path, char *const envp[],
          char err[CONF_ERR_LEN])
{
    char *text;
    int rc;

    if (conf_defaults(c, err) == -1)
        return -1;
    if (path != NULL) {
        text = read_file(path, err);
        if (text == NULL)
            return -1;
        rc = conf_parse(c, text, path, err);
        free(text);
        if (rc == -1)
            return -1;
        warn_if_key_exposed(c, path);
    }
    if (include_from_env(c, envp, err) == -1 ||
        conf_apply_env(c, envp, err) == -1 ||
        finish_providers(c, err) == -1 || finish_tools(c, err) == -1 ||
        finish_v1(c, err) == -1)
        return -1;
    return conf_check(c, err);
}

void
conf_free(struct conf *c)
{
    free(c->client_digests);
    for (const struct named_kind *k = named_kinds; k < named_kinds + NKINDS;
         k++) {
        for (size_t e = 0; e < *named_count(c, k); e++) {
            char *entry = named_entry(c, k, e);

            free(*(char **)entry);
            for (size_t i = 0; i < k->nkeys; i++)
                if (k->keys[i].type == CONF_STRING)
                    free(*(char **)(entry + k->keys[i].offset));
        }
    }
    for (size_t i = 0; i < NKEYS; i++)
        if (keys[i].type == CONF_STRING)
            free(*(char **)((char *)c + keys[i].offset));
    memset(c, 0, sizeof(*c));
}
