/*
 * fuzz_route: request routing as the worker does it, with the method and
 * path that the web server passes in REQUEST_METHOD and DOCUMENT_URI.
 * Input: the method, a NUL or newline, then the path; without either, the
 * whole input is the path and the method is empty.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "chat.h"
#include "route.h"

#define SESSION_PREFIX "/api/chat/"

/* A heap copy of exactly n + 1 bytes, so that ASan sees reads past it. */
static char *
copy(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);

    check(s != NULL);
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

static void
check_match(const char *method, const char *path, const struct route_match *m)
{
    size_t path_len = strlen(path);

    switch (m->id) {
    case ROUTE_NOT_FOUND:
        check(m->tail == NULL && m->allow == NULL);
        return;
    case ROUTE_METHOD_NOT_ALLOWED:
        check(m->allow != NULL && m->allow[0] != '\0');
        break;
    case ROUTE_CHAT_POST:
        check(strcmp(method, "POST") == 0 && strcmp(path, "/api/chat") == 0);
        break;
    case ROUTE_SESSION_GET:
    case ROUTE_SESSION_DELETE:
        check(strcmp(method, m->id == ROUTE_SESSION_GET ? "GET" : "DELETE") ==
              0);
        check(strncmp(path, SESSION_PREFIX, strlen(SESSION_PREFIX)) == 0);
        check(m->tail == path + strlen(SESSION_PREFIX));
        break;
    case ROUTE_HEALTHZ:
    case ROUTE_STATUS:
    case ROUTE_METRICS:
    case ROUTE_V1_MODELS:
        check(strcmp(method, "GET") == 0);
        break;
    case ROUTE_V1_COMPLETIONS:
        check(strcmp(method, "POST") == 0 &&
              strcmp(path, "/v1/chat/completions") == 0);
        break;
    default:
        check(0);
    }
    /* Every matched route has a tail, inside the path given. */
    check(m->tail != NULL && m->tail >= path && m->tail <= path + path_len);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *sep = memchr(data, '\0', size);
    const uint8_t *nl = memchr(data, '\n', size);
    struct route_match m;
    char *method, *path;

    if (sep == NULL || (nl != NULL && nl < sep))
        sep = nl;
    if (sep == NULL) {
        method = copy(data, 0);
        path = copy(data, size);
    } else {
        method = copy(data, (size_t)(sep - data));
        path = copy(sep + 1, size - (size_t)(sep - data) - 1);
    }
    route_resolve(method, path, &m);
    check_match(method, path, &m);
    if (m.id == ROUTE_SESSION_GET || m.id == ROUTE_SESSION_DELETE ||
        (m.id == ROUTE_METHOD_NOT_ALLOWED &&
         m.tail == path + strlen(SESSION_PREFIX))) {
        size_t n = strlen(m.tail);

        /* The worker then checks the tail as a session id. */
        if (chat_session_id_valid(m.tail, n))
            check(n >= 1 && n <= CHAT_SESSION_ID_MAX &&
                  strspn(m.tail, "abcdefghijklmnopqrstuvwxyz"
                                 "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") ==
                      n);
    }
    free(method);
    free(path);
    return 0;
}
