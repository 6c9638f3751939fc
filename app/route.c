/* route: method and path to a route, 404 or 405. */
#include "route.h"

#include <string.h>

/* One path pattern and the handler for each method it allows. */
struct route_entry {
    const char *path;
    const char *prefix_of; /* NULL: path matches whole; else path is a
                              prefix, the rest is the tail, and this is
                              the route's pattern, the tail named */
    int guarded;
    const char *allow;
    struct {
        const char *method;
        enum route_id id;
    } methods[3];
};

static const struct route_entry routes[] = {
    {"/api/chat", NULL, 1, "POST", {{"POST", ROUTE_CHAT_POST}}},
    {"/api/chat/", "/api/chat/{id}", 1, "GET, DELETE",
     {{"GET", ROUTE_SESSION_GET}, {"DELETE", ROUTE_SESSION_DELETE}}},
    {"/api/healthz", NULL, 0, "GET", {{"GET", ROUTE_HEALTHZ}}},
    {"/api/status", NULL, 0, "GET", {{"GET", ROUTE_STATUS}}},
    {"/api/metrics", NULL, 0, "GET", {{"GET", ROUTE_METRICS}}},
    {"/v1/models", NULL, 1, "GET", {{"GET", ROUTE_V1_MODELS}}},
    {"/v1/chat/completions", NULL, 1, "POST",
     {{"POST", ROUTE_V1_COMPLETIONS}}},
};

static const char *
path_tail(const struct route_entry *r, const char *path)
{
    size_t n = strlen(r->path);

    if (r->prefix_of != NULL)
        return strncmp(path, r->path, n) == 0 ? path + n : NULL;
    return strcmp(path, r->path) == 0 ? path + n : NULL;
}

void
route_resolve(const char *method, const char *path, struct route_match *m)
{
    m->id = ROUTE_NOT_FOUND;
    m->allow = NULL;
    m->tail = NULL;
    m->guarded = 0;
    m->pattern = "(no route)";
    for (size_t i = 0; i < sizeof(routes) / sizeof(*routes); i++) {
        const struct route_entry *r = &routes[i];
        const char *tail = path_tail(r, path);

        if (tail == NULL)
            continue;
        m->tail = tail;
        m->allow = r->allow;
        m->guarded = r->guarded;
        m->pattern = r->prefix_of != NULL ? r->prefix_of : r->path;
        m->id = ROUTE_METHOD_NOT_ALLOWED;
        for (size_t j = 0; j < 3 && r->methods[j].method; j++) {
            if (strcmp(method, r->methods[j].method) == 0) {
                m->id = r->methods[j].id;
                return;
            }
        }
        return;
    }
}
