/*
 * worker: one process of the pool. A chat worker's loop accepts a FastCGI
 * request, routes it, serves it and logs it; the control worker serves
 * only healthz, status and metrics on its own socket, so they answer when
 * every chat worker is busy, and turns away requests that waited too long
 * for a chat worker. All long-lived state (the Redis connection, the curl
 * multi handle, reusable buffers, the scoreboard slot) lives in one
 * struct worker, set up after fork.
 */
#ifndef CHATFCGI_WORKER_H
#define CHATFCGI_WORKER_H

#include <fcgiapp.h>
#include <yajl/yajl_gen.h>

#include "buf.h"
#include "guard.h"
#include "history.h"
#include "http.h"
#include "llm.h"
#include "store.h"

struct conf;
struct sb_pool;
struct sb_slot;

enum worker_role { WORKER_CHAT, WORKER_CONTROL };

/* What the master hands to a new worker. */
struct worker_setup {
    const struct conf *conf;
    struct sb_pool *pool;
    int slot;
    enum worker_role role;
    int chat_fd;      /* the listening socket of chat requests */
    int status_fd;    /* the control worker's own socket, or -1 */
    pid_t master_pid; /* exit when it goes away; 0 in single mode */
};

struct worker {
    const struct conf *conf;
    const struct worker_setup *setup;
    struct sb_pool *pool;
    struct sb_slot *slot;
    FCGX_Request fcgi;  /* on the worker's own listening socket */
    FCGX_Request spill; /* control: on the chat socket, to turn requests
                           away */
    int unix_socket;    /* fcgi's socket is AF_UNIX: no close linger */
    struct http_request req;
    yajl_gen gen;
    struct store store;
    struct llm llm;
    struct buf body;      /* the request body, capped at max_body_bytes */
    struct buf arena;     /* strings picked from the body */
    struct buf user_item;      /* the history items as stored */
    struct buf assistant_item;
    struct buf replay;         /* an answer stored for Idempotency-Key */
    struct guard guard;
    char client[GUARD_CLIENT_LEN]; /* who the request is from */
    struct history history;
    struct llm_answer answer;
    struct buf text;      /* metrics exposition */
    double queue_since_ms; /* control: since when requests wait unserved */
};

/* Serve requests until told to stop, then exit; never returns. Runs in the
 * child after fork (or in the only process in single mode). */
void worker_main(const struct worker_setup *ws) __attribute__((noreturn));

/* Chat workers wait in a blocking accept() on the shared listening socket:
 * the kernel wakes exactly one waiting worker per connection (FIFO), and a
 * busy worker is not on the socket's wait queue at all, so a connection
 * costs the same with 8 workers or 500. (An epoll with EPOLLEXCLUSIVE per
 * worker kept every busy worker's entry on the queue, to be visited and
 * marked ready by each connect(), and each of them raced for the socket on
 * its return.) SO_RCVTIMEO ends a quiet accept() after IDLE_WAKE_MS for
 * the housekeeping between requests; it also bounds the wait of a
 * connection whose wake-up went to a worker that a signal was stopping.
 * Called by the master on the socket it shares with the workers. */
void worker_prepare_listener(int fd);

/* Mark the phase of the request in hand, for the status page. */
void worker_phase(struct worker *w, int sb_state);

#endif
