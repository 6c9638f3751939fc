/*
 * worker: one process of the pool. Its loop accepts a FastCGI request,
 * routes it, serves it and logs it; all its long-lived state (the Redis
 * connection, the curl multi handle, reusable buffers) lives in one
 * struct worker, set up after fork.
 */
#ifndef CHATFCGI_WORKER_H
#define CHATFCGI_WORKER_H

#include <fcgiapp.h>
#include <yajl/yajl_gen.h>

#include "buf.h"
#include "history.h"
#include "http.h"
#include "llm.h"
#include "store.h"

struct conf;

struct worker {
    const struct conf *conf;
    int index;
    FCGX_Request fcgi;
    struct http_request req;
    yajl_gen gen;
    struct store store;
    struct llm llm;
    struct buf body;  /* the request body, capped at max_body_bytes */
    struct buf arena; /* strings picked from the body */
    struct buf user_item; /* the user turn as stored, while the second
                             item is generated */
    struct history history;
    struct llm_answer answer;
};

/* Serve requests on listen_fd until told to stop; never returns. Runs in
 * the child after fork (or in the only process in single mode). */
void worker_main(const struct conf *c, int listen_fd, int index)
    __attribute__((noreturn));

#endif
