/*
 * guard: who may call the chat API, as whom, and from where, before any
 * handler runs. Client API keys are checked against the SHA-256 digests
 * of client_keys in constant time; the client's identity (its key, or its
 * address, believing X-Forwarded-For only from trusted proxies) scopes
 * rate limits and idempotency; CORS answers browsers. It keeps no state.
 */
#ifndef CHATFCGI_GUARD_H
#define CHATFCGI_GUARD_H

#include "http.h"

struct conf;

#define GUARD_IDEMPOTENCY_MAX 128

/* With keys configured: 1 when authorization is "Bearer <key>" for one of
 * them, and client gets "key:<first 16 hex of its digest>"; else 0. With
 * none configured: 1 and client is left alone. */
int guard_check_key(const struct conf *c, const char *authorization,
                    char client[HTTP_CLIENT_LEN]);

/* "addr:<ip>": remote, or, when remote is a trusted proxy, the rightmost
 * X-Forwarded-For entry that is not one. */
void guard_client_address(const char *remote, const char *forwarded_for,
                          const char *trusted, char client[HTTP_CLIENT_LEN]);

/* 1 when s is 1-128 printable ASCII characters. */
int guard_idempotency_key_valid(const char *s);

/* 1 when origin is in the configured list (or the list is "*"). */
int guard_origin_allowed(const char *list, const char *origin);

/* Before an API route: CORS headers (and the preflight answer), the
 * client key (401) and the client's identity in r->client. Returns 0 to
 * go on, or -1 when the request has been answered. */
int guard_request(const struct conf *c, struct http_request *r,
                  const char *allow);

#endif
