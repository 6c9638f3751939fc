/*
 * metrics: the pool seen from outside, read from the scoreboard. GET
 * /api/status is PHP-FPM's full status page in JSON; GET /api/metrics is
 * Prometheus text for the whole pool. Both are only for the client
 * addresses in status_allow.
 */
#ifndef CHATFCGI_METRICS_H
#define CHATFCGI_METRICS_H

#include "buf.h"

struct conf;
struct http_request;
struct scoreboard;

/* What a worker keeps to serve them. */
struct metrics {
    const struct conf *conf;
    struct scoreboard *pool;
    int chat_fd;     /* the chat socket, for its listen queue */
    struct buf text; /* the Prometheus exposition */
};

void metrics_init(struct metrics *m, const struct conf *c,
                  struct scoreboard *pool, int chat_fd);
void metrics_cleanup(struct metrics *m);

void metrics_serve_status(struct metrics *m, struct http_request *r);
void metrics_serve_prometheus(struct metrics *m, struct http_request *r);

#endif
