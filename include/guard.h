/*
 * guard: who may call, as whom, and from where. Client API keys are
 * checked against their SHA-256 digests in constant time; the client's
 * identity (its key, or its address, believing X-Forwarded-For only from
 * trusted proxies) scopes rate limits and idempotency; CORS answers
 * browsers. Per worker it keeps only the parsed digests.
 */
#ifndef CHATFCGI_GUARD_H
#define CHATFCGI_GUARD_H

#include <stddef.h>

#define GUARD_DIGEST_LEN 32
#define GUARD_CLIENT_LEN 72
#define GUARD_IDEMPOTENCY_MAX 128

struct worker;

struct guard {
    unsigned char (*digests)[GUARD_DIGEST_LEN];
    size_t ndigests;
};

/* Parse a comma-separated list of 64-hex-digit SHA-256 digests. Returns 0,
 * or -1 when an entry is malformed (or memory runs out). The caller frees
 * *out (NULL when the list is empty). */
int guard_parse_digests(const char *list,
                        unsigned char (**out)[GUARD_DIGEST_LEN], size_t *n);

int guard_init(struct guard *g, const char *client_keys);
void guard_cleanup(struct guard *g);

/* With keys configured: 1 when authorization is "Bearer <key>" for one of
 * them, and client gets "key:<first 16 hex of its digest>"; else 0. With
 * none configured: 1 and client is left alone. */
int guard_check_key(const struct guard *g, const char *authorization,
                    char client[GUARD_CLIENT_LEN]);

/* "addr:<ip>": remote, or, when remote is a trusted proxy, the rightmost
 * X-Forwarded-For entry that is not one. */
void guard_client_address(const char *remote, const char *forwarded_for,
                          const char *trusted, char client[GUARD_CLIENT_LEN]);

/* 1 when s is 1-128 printable ASCII characters. */
int guard_idempotency_key_valid(const char *s);

/* 1 when origin is in the comma-separated list (or the list is "*"). */
int guard_origin_allowed(const char *list, const char *origin);

/* Before an API route: CORS headers (and the preflight answer), the
 * client key (401) and the client's identity in w->client. Returns 0 to
 * go on, or -1 when the request has been answered. */
int guard_request(struct worker *w, const char *allow);

#endif
