/* guard: client keys, client identity and CORS, before the chat API. */
#include "guard.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "conf.h"
#include "fcgi.h"

#define CLIENT_KEY_MAX 512
#define CORS_MAX_AGE_S 600

static int
sha256(const char *s, size_t n, unsigned char out[CONF_DIGEST_LEN])
{
    unsigned int len = 0;

    return EVP_Digest(s, n, out, &len, EVP_sha256(), NULL) == 1 &&
                   len == CONF_DIGEST_LEN
               ? 0
               : -1;
}

int
guard_check_key(const struct conf *c, const char *authorization,
                char client[HTTP_CLIENT_LEN])
{
    unsigned char digest[CONF_DIGEST_LEN];
    const char *key = authorization + 7;
    size_t n;
    int match = 0;

    if (c->nclient_digests == 0)
        return 1;
    if (strncasecmp(authorization, "Bearer ", 7) != 0)
        return 0;
    n = strlen(key);
    if (n == 0 || n > CLIENT_KEY_MAX || sha256(key, n, digest) == -1)
        return 0;
    /* Compare with every digest, in constant time, so that neither the
     * time nor the position tells anything about the keys. */
    for (size_t i = 0; i < c->nclient_digests; i++)
        match |= CRYPTO_memcmp(digest, c->client_digests[i],
                               CONF_DIGEST_LEN) == 0;
    if (match)
        snprintf(client, HTTP_CLIENT_LEN,
                 "key:%02x%02x%02x%02x%02x%02x%02x%02x", digest[0],
                 digest[1], digest[2], digest[3], digest[4], digest[5],
                 digest[6], digest[7]);
    return match;
}

void
guard_client_address(const char *remote, const char *forwarded_for,
                     const char *trusted, char client[HTTP_CLIENT_LEN])
{
    const char *end = forwarded_for + strlen(forwarded_for);
    const char *addr = remote;
    size_t len = strlen(remote);

    /* From the right: each hop a trusted proxy vouches for the next. */
    while (conf_list_has(trusted, addr, len) && end > forwarded_for) {
        const char *start = end;

        while (start > forwarded_for && start[-1] != ',')
            start--;
        addr = start + strspn(start, " ");
        len = (size_t)(end - addr);
        while (len > 0 && addr[len - 1] == ' ')
            len--;
        end = start > forwarded_for ? start - 1 : start;
    }
    snprintf(client, HTTP_CLIENT_LEN, "addr:%.*s", (int)len, addr);
}

int
guard_idempotency_key_valid(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > GUARD_IDEMPOTENCY_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return 0;
    return 1;
}

int
guard_origin_allowed(const char *list, const char *origin)
{
    return *origin != '\0' && conf_list_has(list, origin, strlen(origin));
}

/* CORS headers for an allowed Origin; a preflight (OPTIONS) is answered
 * here. Returns 1 when the request has been answered. */
static int
cors(const struct conf *c, struct http_request *r, const char *allow)
{
    const char *origin = fcgi_param(r->fcgi, "HTTP_ORIGIN");
    int preflight = strcmp(r->method, "OPTIONS") == 0;

    if (!guard_origin_allowed(c->cors_origins, origin))
        return 0;
    snprintf(r->cors, sizeof(r->cors),
             "Access-Control-Allow-Origin: %.200s\r\nVary: Origin\r\n"
             "Access-Control-Expose-Headers: X-Request-Id, Retry-After\r\n",
             origin);
    if (!preflight)
        return 0;
    snprintf(r->cors + strlen(r->cors), sizeof(r->cors) - strlen(r->cors),
             "Access-Control-Allow-Methods: %s\r\n"
             "Access-Control-Allow-Headers: Content-Type, Authorization, "
             "Idempotency-Key\r\nAccess-Control-Max-Age: %d\r\n",
             allow, CORS_MAX_AGE_S);
    http_send_no_content(r);
    return 1;
}

int
guard_request(const struct conf *c, struct http_request *r, const char *allow)
{
    if (cors(c, r, allow))
        return -1;
    if (!guard_check_key(c, fcgi_param(r->fcgi, "HTTP_AUTHORIZATION"),
                         r->client)) {
        http_send_error(r, 401, "unauthorized",
                        "a valid client key is required: "
                        "Authorization: Bearer <key>");
        return -1;
    }
    if (c->nclient_digests == 0)
        guard_client_address(fcgi_param(r->fcgi, "REMOTE_ADDR"),
                             fcgi_param(r->fcgi, "HTTP_X_FORWARDED_FOR"),
                             c->trusted_proxies, r->client);
    return 0;
}
