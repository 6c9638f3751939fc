/*
 * master: the process that owns the listening socket and the pool. It
 * opens the socket, forks the workers (who drop privileges), replaces any
 * that exit while the pool runs, and turns signals into actions: graceful
 * stop, fast stop, reopening logs. It never serves a request itself.
 */
#ifndef CHATFCGI_MASTER_H
#define CHATFCGI_MASTER_H

struct conf;

/* Run the pool until it is told to stop. Returns the exit status. */
int master_run(const struct conf *c);

#endif
