#include "guard.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "conf.h"
#include "fcgi.h"
#include "json.h"
#include "worker.h"

#define CLIENT_KEY_MAX 512
#define CORS_MAX_AGE_S 600

static int
parse_digest(const char *s, size_t n, unsigned char out[GUARD_DIGEST_LEN])
{
    if (n != 2 * GUARD_DIGEST_LEN)
        return -1;
    for (size_t i = 0; i < GUARD_DIGEST_LEN; i++) {
        int hi = json_hex_digit(s[2 * i]), lo = json_hex_digit(s[2 * i + 1]);

        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi * 16 + lo);
    }
    return 0;
}

/* The next entry of a comma- or space-separated list; NULL at the end. */
static const char *
next_entry(const char **list, size_t *len)
{
    const char *s = *list + strspn(*list, " ,");

    if (*s == '\0')
        return NULL;
    *len = strcspn(s, " ,");
    *list = s + *len;
    return s;
}

int
guard_parse_digests(const char *list,
                    unsigned char (**out)[GUARD_DIGEST_LEN], size_t *n)
{
    const char *p = list, *entry;
    size_t len, count = 0;

    *out = NULL;
    *n = 0;
    while (next_entry(&p, &len) != NULL)
        count++;
    if (count == 0)
        return 0;
    *out = calloc(count, GUARD_DIGEST_LEN);
    if (*out == NULL)
        return -1;
    for (p = list; (entry = next_entry(&p, &len)) != NULL; (*n)++) {
        if (parse_digest(entry, len, (*out)[*n]) == -1) {
            free(*out);
            *out = NULL;
            *n = 0;
            return -1;
        }
    }
    return 0;
}

int
guard_init(struct guard *g, const char *client_keys)
{
    return guard_parse_digests(client_keys, &g->digests, &g->ndigests);
}

void
guard_cleanup(struct guard *g)
{
    free(g->digests);
    g->digests = NULL;
    g->ndigests = 0;
}

static int
sha256(const char *s, size_t n, unsigned char out[GUARD_DIGEST_LEN])
{
    unsigned int len = 0;

    return EVP_Digest(s, n, out, &len, EVP_sha256(), NULL) == 1 &&
                   len == GUARD_DIGEST_LEN
               ? 0
               : -1;
}

int
guard_check_key(const struct guard *g, const char *authorization,
                char client[GUARD_CLIENT_LEN])
{
    unsigned char digest[GUARD_DIGEST_LEN];
    const char *key = authorization + 7;
    size_t n;
    int match = 0;

    if (g->ndigests == 0)
        return 1;
    if (strncasecmp(authorization, "Bearer ", 7) != 0)
        return 0;
    n = strlen(key);
    if (n == 0 || n > CLIENT_KEY_MAX || sha256(key, n, digest) == -1)
        return 0;
    /* Compare with every digest, in constant time, so that neither the
     * time nor the position tells anything about the keys. */
    for (size_t i = 0; i < g->ndigests; i++)
        match |= CRYPTO_memcmp(digest, g->digests[i], GUARD_DIGEST_LEN) == 0;
    if (match)
        snprintf(client, GUARD_CLIENT_LEN,
                 "key:%02x%02x%02x%02x%02x%02x%02x%02x", digest[0],
                 digest[1], digest[2], digest[3], digest[4], digest[5],
                 digest[6], digest[7]);
    return match;
}

static int
in_list(const char *list, const char *s, size_t n)
{
    const char *entry;
    size_t len;

    while ((entry = next_entry(&list, &len)) != NULL)
        if ((len == 1 && entry[0] == '*') ||
            (len == n && n > 0 && memcmp(entry, s, n) == 0))
            return 1;
    return 0;
}

void
guard_client_address(const char *remote, const char *forwarded_for,
                     const char *trusted, char client[GUARD_CLIENT_LEN])
{
    const char *end = forwarded_for + strlen(forwarded_for);
    const char *addr = remote;
    size_t len = strlen(remote);

    /* From the right: each hop a trusted proxy vouches for the next. */
    while (in_list(trusted, addr, len) && end > forwarded_for) {
        const char *start = end;

        while (start > forwarded_for && start[-1] != ',')
            start--;
        addr = start + strspn(start, " ");
        len = (size_t)(end - addr);
        while (len > 0 && addr[len - 1] == ' ')
            len--;
        end = start > forwarded_for ? start - 1 : start;
    }
    snprintf(client, GUARD_CLIENT_LEN, "addr:%.*s", (int)len, addr);
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
    return *origin != '\0' && in_list(list, origin, strlen(origin));
}

/* CORS headers for an allowed Origin; a preflight (OPTIONS) is answered
 * here. Returns 1 when the request has been answered. */
static int
cors(struct worker *w, const char *allow)
{
    const char *origin = fcgi_param(w->req.fcgi, "HTTP_ORIGIN");
    int preflight = strcmp(w->req.method, "OPTIONS") == 0;

    if (!guard_origin_allowed(w->conf->cors_origins, origin))
        return 0;
    snprintf(w->req.cors, sizeof(w->req.cors),
             "Access-Control-Allow-Origin: %.200s\r\nVary: Origin\r\n"
             "Access-Control-Expose-Headers: X-Request-Id, Retry-After\r\n",
             origin);
    if (!preflight)
        return 0;
    snprintf(w->req.cors + strlen(w->req.cors),
             sizeof(w->req.cors) - strlen(w->req.cors),
             "Access-Control-Allow-Methods: %s\r\n"
             "Access-Control-Allow-Headers: Content-Type, Authorization, "
             "Idempotency-Key\r\nAccess-Control-Max-Age: %d\r\n",
             allow, CORS_MAX_AGE_S);
    http_send_no_content(&w->req);
    return 1;
}

int
guard_request(struct worker *w, const char *allow)
{
    const struct conf *c = w->conf;

    if (cors(w, allow))
        return -1;
    if (!guard_check_key(&w->guard,
                         fcgi_param(w->req.fcgi, "HTTP_AUTHORIZATION"),
                         w->client)) {
        http_send_error(&w->req, 401, "unauthorized",
                        "a valid client key is required: "
                        "Authorization: Bearer <key>");
        return -1;
    }
    if (w->guard.ndigests == 0)
        guard_client_address(fcgi_param(w->req.fcgi, "REMOTE_ADDR"),
                             fcgi_param(w->req.fcgi, "HTTP_X_FORWARDED_FOR"),
                             c->trusted_proxies, w->client);
    return 0;
}
