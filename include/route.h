/*
 * route: maps a request's method and path to the handler that serves it,
 * or to the contract's 404 and 405 (with the Allow list). Pure logic; the
 * handlers themselves live with their modules.
 */
#ifndef CHATFCGI_ROUTE_H
#define CHATFCGI_ROUTE_H

enum route_id {
    ROUTE_NOT_FOUND,
    ROUTE_METHOD_NOT_ALLOWED,
    ROUTE_CHAT_POST,
    ROUTE_SESSION_GET,
    ROUTE_SESSION_DELETE,
    ROUTE_HEALTHZ,
    ROUTE_STATUS,
    ROUTE_METRICS,
    ROUTE_V1_MODELS,
    ROUTE_V1_COMPLETIONS,
};

struct route_match {
    enum route_id id;
    const char *allow; /* for ROUTE_METHOD_NOT_ALLOWED: "GET, DELETE" */
    const char *tail;  /* for session routes: the path after the prefix,
                          pointing into the path given (not validated) */
    int guarded;       /* the chat API: client keys, CORS and limits apply */
    const char *pattern; /* the route as the status page shows it, e.g.
                            "/api/chat/{id}": never the client's own text,
                            which may hold a session id */
};

/* Resolve method and path (without query string). Never fails. */
void route_resolve(const char *method, const char *path,
                   struct route_match *m);

#endif
