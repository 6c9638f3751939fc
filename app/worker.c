#include "worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "conf.h"
#include "json.h"
#include "log.h"
#include "route.h"

#define PATH_SCRATCH 2048
#define ITEM_OVERHEAD 64
#define JSON_ESCAPE_GROWTH 6 /* a byte may become \u00XX */

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t reopen_requested;

static void
on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void
on_reopen(int sig)
{
    (void)sig;
    reopen_requested = 1;
}

/* SIGTERM/SIGQUIT: finish the request in hand, then exit. SIGINT keeps its
 * default (fast stop: die now). No SA_RESTART, so that a worker waiting in
 * accept() notices at once. */
static void
install_signals(void)
{
    struct sigaction stop = {.sa_handler = on_stop};
    struct sigaction reopen = {.sa_handler = on_reopen};
    struct sigaction ignore = {.sa_handler = SIG_IGN};
    sigset_t none;

    sigemptyset(&stop.sa_mask);
    sigemptyset(&reopen.sa_mask);
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGQUIT, &stop, NULL);
    sigaction(SIGUSR1, &reopen, NULL);
    sigaction(SIGPIPE, &ignore, NULL); /* a gone client is an EPIPE */
    sigaction(SIGHUP, &ignore, NULL);  /* reload is the master's job */
    signal(SIGINT, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void
worker_setup(struct worker *w, const struct conf *c, int listen_fd,
             int index)
{
    size_t max_msg = (size_t)c->chat.max_message_bytes;
    size_t max_reply = (size_t)c->upstream.max_response_bytes;
    char err[LLM_MESSAGE_LEN];

    memset(w, 0, sizeof(*w));
    w->conf = c;
    w->index = index;
    if (FCGX_Init() != 0 ||
        FCGX_InitRequest(&w->fcgi, listen_fd, FCGI_FAIL_ACCEPT_ON_INTR) != 0)
        fatal("worker", "cannot initialise libfcgi");
    w->gen = json_gen_new();
    if (w->gen == NULL)
        fatal("worker", "out of memory");
    if (store_init(&w->store, c) == -1)
        fatal("worker", "%s", w->store.err);
    if (llm_init(&w->llm, c, err) == -1)
        fatal("worker", "%s", err);
    buf_init(&w->body, (size_t)c->chat.max_body_bytes);
    buf_init(&w->arena, (size_t)c->chat.max_body_bytes + ITEM_OVERHEAD);
    buf_init(&w->user_item, max_msg * JSON_ESCAPE_GROWTH + ITEM_OVERHEAD);
    history_init(&w->history, (size_t)c->chat.history_max_bytes + max_msg +
                                  max_reply + ITEM_OVERHEAD);
    llm_answer_init(&w->answer, max_reply);
}

static void
worker_cleanup(struct worker *w)
{
    llm_answer_cleanup(&w->answer);
    history_cleanup(&w->history);
    buf_cleanup(&w->user_item);
    buf_cleanup(&w->arena);
    buf_cleanup(&w->body);
    llm_cleanup(&w->llm);
    store_cleanup(&w->store);
    yajl_gen_free(w->gen);
    FCGX_Free(&w->fcgi, 1);
}

static void
serve_healthz(struct worker *w)
{
    int up = store_ping(&w->store) == 0;
    yajl_gen g = w->gen;

    json_gen_restart(g);
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "status", up ? "ok" : "unavailable") ||
        json_gen_key_cstr(g, "redis", up ? "ok" : "down") ||
        yajl_gen_map_close(g)) {
        http_send_error(&w->req, 500, "internal_error", "out of memory");
        return;
    }
    http_send_json(&w->req, up ? 200 : 503);
}

static void
dispatch(struct worker *w)
{
    struct route_match m;

    route_resolve(w->req.method, w->req.path, &m);
    switch (m.id) {
    case ROUTE_CHAT_POST:
        chat_post(w);
        break;
    case ROUTE_SESSION_GET:
        chat_get(w, m.tail);
        break;
    case ROUTE_SESSION_DELETE:
        chat_delete(w, m.tail);
        break;
    case ROUTE_HEALTHZ:
        serve_healthz(w);
        break;
    case ROUTE_METHOD_NOT_ALLOWED:
        http_send_not_allowed(&w->req, m.allow);
        break;
    case ROUTE_NOT_FOUND:
        http_send_error(&w->req, 404, "not_found", "no such path");
        break;
    }
}

static void
serve_one(struct worker *w)
{
    char scratch[PATH_SCRATCH];
    struct http_request *r = &w->req;
    struct log_access entry;

    http_begin(r, &w->fcgi, w->gen);
    r->path = http_path(&w->fcgi, scratch, sizeof(scratch));
    dispatch(w);
    entry = (struct log_access){
        .method = r->method,
        .path = r->path,
        .status = r->status,
        .bytes = r->bytes_out,
        .total_ms = http_now_ms() - r->start_ms,
        .redis_ms = r->redis_ms,
        .upstream_ms = r->upstream_ms,
    };
    log_access_line(&entry);
    log_set_request_id(NULL);
}

void
worker_main(const struct conf *c, int listen_fd, int index)
{
    struct worker w;
    char role[16];

    snprintf(role, sizeof(role), "W%d", index);
    log_set_role(role);
    install_signals();
    worker_setup(&w, c, listen_fd, index);
    log_debug("worker", "ready");
    while (!stop_requested) {
        if (reopen_requested) {
            reopen_requested = 0;
            log_reopen();
        }
        if (FCGX_Accept_r(&w.fcgi) < 0) {
            if (errno == EINTR || stop_requested)
                continue;
            log_warn("worker", "accept failed");
            break;
        }
        serve_one(&w);
        FCGX_Finish_r(&w.fcgi);
    }
    worker_cleanup(&w);
    exit(stop_requested ? 0 : 1);
}
