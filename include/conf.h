/*
 * conf: the configuration. One table describes every key (section, name,
 * type, bounds, default); values come from the defaults, then the INI file,
 * then CHATFCGI_* environment variables, which win. conf_load also parses
 * the values every worker would otherwise parse again (client_keys). The
 * struct is filled once at startup and read-only afterwards; conf_free()
 * releases it. It also owns the syntax of configured lists.
 */
#ifndef CHATFCGI_CONF_H
#define CHATFCGI_CONF_H

#include <stddef.h>

#define CONF_ERR_LEN 512

enum conf_pool { CONF_POOL_STATIC, CONF_POOL_DYNAMIC, CONF_POOL_SINGLE };

#define CONF_PROVIDERS_MAX 8
/* Most tls_handshakes: the pool's shared slots for full handshakes with
 * one provider (tls.c). */
#define CONF_TLS_HANDSHAKES_MAX 64
#define CONF_DIGEST_LEN 32 /* SHA-256 */
#define CONF_PROVIDER_NAME_MAX 32

#define CONF_TOOLS_MAX 16
#define CONF_TOOL_NAME_MAX 65 /* OpenAI's 64 characters, and a NUL */

/* One tool the server runs for /api/chat: a [tool NAME] section. Only
 * these URLs are ever called, with a POST of the model's arguments. */
struct conf_tool {
    char *name;
    char *url;
    char *description;
    char *parameters;      /* a JSON Schema object; from parameters_file
                              when that is set */
    char *parameters_file;
    long long timeout_ms;
};

/* One model provider: a [provider NAME] section, or one of the URLs of
 * [upstream] url. Keys a section leaves out come from [upstream]. */
struct conf_provider {
    char *name;
    char *url;
    char *api_key;     /* the key itself, once api_key_env is resolved */
    char *api_key_env; /* the name of a variable holding the key */
    char *model;
    long long connect_timeout_ms; /* 0: [upstream]'s */
    long long timeout_ms;
    char *ca_file; /* both "": the system's CAs */
    char *ca_path;
};

struct conf {
    char *listen; /* unix socket path, or host:port */
    char *listen_owner;
    char *listen_group;
    long long listen_mode;
    long long listen_backlog; /* 0: sized to the pool */
    long long pm; /* enum conf_pool */
    long long workers; /* static: the pool; dynamic: the most at once */
    long long start_workers;
    long long min_spare_workers;
    long long max_spare_workers;
    long long max_requests; /* 0: never recycle */
    long long request_timeout_s;
    long long graceful_timeout_s;
    long long slowlog_ms; /* 0: off */
    long long queue_timeout_ms;
    char *status_listen; /* "off": none */
    char *status_allow;  /* client addresses for status and metrics */
    char *client_keys;     /* SHA-256 hex digests of client API keys */
    unsigned char (*client_digests)[CONF_DIGEST_LEN]; /* the same, parsed */
    size_t nclient_digests;
    char *trusted_proxies; /* addresses whose X-Forwarded-For is believed */
    char *cors_origins;    /* origins allowed by CORS; "" for none */
    long long idempotency_ttl_s;
    char *user;
    char *group;
    long long log_level; /* enum log_level */
    char *error_log;
    char *access_log;
    char *pid_file;
    char *include; /* files or globs read where the key stands */

    struct {
        char *url;
        long long connect_timeout_ms;
        long long command_timeout_ms;
        char *sentinels; /* "": none, url names the server */
        char *master_name;
        char *sentinel_password;
        long long wait_replicas; /* 0: no WAIT after a turn's commit */
        long long wait_timeout_ms;
    } redis;

    struct {
        char *url;
        char *api_key;
        char *model;
        char *system_prompt;
        double temperature; /* < 0: not sent, the model's default applies */
        long long max_tokens; /* 0: not sent */
        long long connect_timeout_ms;
        long long timeout_ms;
        long long max_response_bytes;
        long long first_token_timeout_ms; /* 0: off */
        long long idle_timeout_ms;        /* 0: off */
        long long retries;      /* more attempts on one provider */
        long long retry_base_ms;
        long long hedge_after_ms; /* 0: no hedging */
        long long cooldown_failures;
        long long cooldown_s;
        char *ca_file; /* PEM bundle trusted instead of the system's */
        char *ca_path; /* c_rehash'd directory, the same */
        long long tls_handshakes; /* full handshakes at once per provider */
    } upstream;

    /* Tried in this order; filled by conf_load from [provider] sections
     * or [upstream]. */
    struct conf_provider providers[CONF_PROVIDERS_MAX];
    size_t nproviders;

    struct {
        long long max_body_bytes;
        long long max_message_bytes;
        long long history_max_messages;
        long long history_max_bytes;
        long long history_ttl_seconds;
        long long max_tool_rounds; /* model calls that may ask for tools */
    } chat;

    /* [tool NAME] sections, in file order. */
    struct conf_tool tools[CONF_TOOLS_MAX];
    size_t ntools;

    struct {
        long long rpm; /* turns per minute per client; 0: off */
        long long tpm; /* model tokens per minute per client; 0: off */
    } rate_limit;

    struct {
        long long allow_system_messages; /* 1 yes, 0 no (then a 400) */
        char *models; /* offered, the first as the providers' own; filled
                         by conf_load with the first provider's model
                         when left empty */
    } v1;
};

/* Fill every key with its default. Returns 0, or -1 when memory runs out. */
int conf_defaults(struct conf *c, char err[CONF_ERR_LEN]);

/* Apply INI text; name is used in messages ("name:line: ..."). Unknown
 * keys, duplicates and bad values are errors. Returns 0 or -1. */
int conf_parse(struct conf *c, const char *text, const char *name,
               char err[CONF_ERR_LEN]);

/* Apply CHATFCGI_* variables from envp (NULL-terminated). A bad value and
 * an unknown CHATFCGI_ name are errors naming the variable, as a typo in
 * the file is (a launcher keeps its own CHATFCGI_ variables to itself).
 * Returns 0 or -1. */
int conf_apply_env(struct conf *c, char *const envp[], char err[CONF_ERR_LEN]);

/* Defaults, then the file at path (NULL: none), then the environment;
 * then the rules across keys. */
int conf_load(struct conf *c, const char *path, char *const envp[],
              char err[CONF_ERR_LEN]);

void conf_free(struct conf *c);

/* Configured lists (client_keys, trusted_proxies, cors_origins,
 * status_allow, [v1] models) separate their entries with commas or
 * spaces. */

/* The next entry of *list (len bytes), advancing *list; NULL at the end. */
const char *conf_list_next(const char **list, size_t *len);

/* 1 when s (n bytes) is an entry of list, or list has the entry "*". */
int conf_list_has(const char *list, const char *s, size_t n);

/* Parse a list of 64-hex-digit SHA-256 digests. Returns 0, or -1 when an
 * entry is malformed (or memory runs out). The caller frees *out (NULL
 * when the list is empty). */
int conf_parse_digests(const char *list,
                       unsigned char (**out)[CONF_DIGEST_LEN], size_t *n);

#endif
