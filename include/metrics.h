/*
 * metrics: the pool seen from outside, read from the scoreboard. GET
 * /api/status is PHP-FPM's full status page in JSON; GET /api/metrics is
 * Prometheus text for the whole pool. Both are only for the client
 * addresses in status_allow.
 */
#ifndef CHATFCGI_METRICS_H
#define CHATFCGI_METRICS_H

struct worker;

void metrics_serve_status(struct worker *w);
void metrics_serve_prometheus(struct worker *w);

/* 1 when addr is in the comma-separated list allow ("*" allows all). */
int metrics_client_allowed(const char *allow, const char *addr);

#endif
