/*
 * worker: one process of the pool. A chat worker's loop accepts a FastCGI
 * request, routes it through the guard to the chat or the status pages,
 * and logs it; the control worker serves only healthz, status and metrics
 * on its own socket, so they answer when every chat worker is busy, and
 * turns away requests that waited too long for a chat worker. Everything
 * a worker keeps lives in one context, private to worker.c, set up after
 * fork.
 */
#ifndef CHATFCGI_WORKER_H
#define CHATFCGI_WORKER_H

#include <sys/types.h>

#include "scoreboard.h"

struct conf;

/* What the master hands to a new worker. */
struct worker_setup {
    const struct conf *conf;
    struct scoreboard *pool;
    int slot;
    enum scoreboard_role role;
    int chat_fd;      /* the listening socket of chat requests */
    int status_fd;    /* the control worker's own socket, or -1 */
    pid_t master_pid; /* exit when it goes away; 0 in single mode */
};

/* Serve requests until told to stop, then exit; never returns. Runs in the
 * child after fork (or in the only process in single mode). */
void worker_main(const struct worker_setup *ws) __attribute__((noreturn));

/* What a worker's setup would refuse in the configuration (the [redis]
 * rules), checked without connecting anything, so that a bad value stops
 * the startup or a reload rather than every worker after fork. Returns 0,
 * or -1 with the reason in err (size bytes). */
int worker_check_conf(const struct conf *c, char *err, size_t size);

/* Chat workers wait in a blocking accept() on the shared listening socket:
 * the kernel wakes exactly one waiting worker per connection (FIFO), and a
 * busy worker is not on the socket's wait queue at all, so a connection
 * costs the same with 8 workers or 500. (An epoll with EPOLLEXCLUSIVE per
 * worker kept every busy worker's entry on the queue, to be visited and
 * marked ready by each connect(), and each of them raced for the socket on
 * its return.) A signal ends the wait, and the kernel sends one when the
 * master dies (PR_SET_PDEATHSIG). SO_RCVTIMEO ends a quiet accept() after
 * pool_idle_wake_ms() for the pool c describes: that bounds the wait of a
 * connection whose wake-up went to a worker that a signal was stopping,
 * and of a log reopening asked for just before the accept(). Called by the
 * master on the socket it shares with the workers. */
void worker_prepare_listener(int fd, const struct conf *c);

#endif
