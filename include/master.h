/*
 * master: the process that owns the listening socket and the pool. It
 * opens the socket, forks the workers (who drop privileges), replaces any
 * that exit while the pool runs, and turns signals into actions: graceful
 * stop, fast stop, reload, reopening logs; it sizes the pool and is the
 * watchdog behind each worker's deadline. It never serves a request.
 */
#ifndef CHATFCGI_MASTER_H
#define CHATFCGI_MASTER_H

struct conf;

/* Run the pool until it is told to stop. conf_path and argv are what a
 * reload re-reads and re-executes. Returns the exit status. */
int master_run(const struct conf *c, const char *conf_path,
               char *const argv[]);

/* pm = single: serve in this very process; returns only on a setup
 * failure (status 1). */
int master_run_single(const struct conf *c);

#endif
