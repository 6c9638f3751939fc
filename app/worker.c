/* worker: one process's accept loop, routing and context. */
#include "worker.h"

#include <malloc.h>
#include <errno.h>
#include <fcgiapp.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <yajl/yajl_gen.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif

#include "buf.h"
#include "chat.h"
#include "clock.h"
#include "conf.h"
#include "fcgi.h"
#include "guard.h"
#include "http.h"
#include "json.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "route.h"
#include "tls.h"
#include "v1.h"

#define PATH_SCRATCH 2048
#define CONTROL_TICK_MS 50   /* how often the control worker checks the queue */
#define SPILL_WAIT_MS 50     /* the longest the control worker waits in accept() */
#define ACCEPT_RETRY_MS 100  /* after an accept() error other than those */

/* Everything a worker keeps, set up after fork. */
struct worker {
    const struct conf *conf;
    const struct worker_setup *setup;
    struct scoreboard *pool;
    struct scoreboard_slot *slot;
    FCGX_Request fcgi;  /* on the worker's own listening socket */
    FCGX_Request spill; /* control: on the chat socket, to turn requests
                           away */
    int unix_socket;    /* fcgi's socket is AF_UNIX: no close linger */
    unsigned long large_growths; /* buf_large_growths() after the last request */
    unsigned long handshakes;    /* tls_handshakes_here() after it */
    struct http_request req; /* the request in hand */
    struct route_match route; /* and its route */
    yajl_gen gen;       /* response bodies */
    struct chat *chat;
    struct metrics metrics;
    double queue_since_ms; /* control: since when requests wait unserved */
};

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t reopen_requested;
static volatile sig_atomic_t master_gone;
static pid_t watched_master; /* 0: none (single mode) */
/* Closed as soon as a stop is asked for (close() is async-signal-safe):
 * the shared listening socket must not outlive the master's own copy in
 * a worker busy with a long stream, or waiting connections stay queued. */
static volatile sig_atomic_t listen_fd_to_close = -1;

static void
close_once(volatile sig_atomic_t *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void
on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
    close_once(&listen_fd_to_close);
}

/* The kernel's word that the master died (PR_SET_PDEATHSIG): stop as on
 * SIGTERM, as nobody is left to replace this worker or stop it. The same
 * signal from anyone else, with the master alive or in single mode (no
 * master), is ignored. */
static void
on_master_gone(int sig)
{
    if (watched_master == 0 || getppid() == watched_master)
        return;
    master_gone = 1;
    on_stop(sig);
}

static void
on_reopen(int sig)
{
    (void)sig;
    reopen_requested = 1;
}

/* Only to end a wait (no SA_RESTART): see accept_within(). */
static void
on_alarm(int sig)
{
    (void)sig;
}

static void
catch_signal(int sig, void (*handler)(int))
{
    struct sigaction sa = {.sa_handler = handler};

    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* SIGTERM/SIGQUIT: finish the request in hand, then exit. SIGINT keeps its
 * default (fast stop: die now). No SA_RESTART, so that waits end at once. */
static void
install_signals(void)
{
    sigset_t none;

    catch_signal(SIGTERM, on_stop);
    catch_signal(SIGQUIT, on_stop);
    catch_signal(SIGUSR2, on_master_gone);
    catch_signal(SIGUSR1, on_reopen);
    catch_signal(SIGALRM, on_alarm);
    catch_signal(SIGPIPE, SIG_IGN); /* a gone client is an EPIPE */
    catch_signal(SIGHUP, SIG_IGN);  /* reload is the master's job */
    signal(SIGINT, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* The kernel signals the worker when the master dies, so that an idle
 * worker need not wake to look. Set here, after the switch of user (which
 * clears it); a master that died before is seen by getppid(). */
static void
watch_master(pid_t master_pid)
{
    if (master_pid == 0)
        return;
    watched_master = master_pid;
    if (prctl(PR_SET_PDEATHSIG, SIGUSR2) == -1)
        fatal("worker", "cannot ask to be told of the master's exit: %s",
              strerror(errno));
    if (getppid() != master_pid)
        raise(SIGUSR2);
}

static int
is_unix_socket(int fd)
{
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);

    return getsockname(fd, (struct sockaddr *)&sa, &len) == 0 &&
           sa.ss_family == AF_UNIX;
}

static void
worker_setup(struct worker *w, const struct worker_setup *ws)
{
    int fd = ws->role == SCOREBOARD_CONTROL ? ws->status_fd : ws->chat_fd;
    char err[CHAT_ERR_LEN];

    memset(w, 0, sizeof(*w));
    /* A fixed threshold: glibc's own rises with every large block freed,
     * after which large blocks come from the heap and stay with the
     * process. From 128 KiB up they are mapped, and unmapped when freed. */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    w->conf = ws->conf;
    w->setup = ws;
    w->pool = ws->pool;
    w->slot = scoreboard_slot(ws->pool, (uint32_t)ws->slot);
    if (FCGX_Init() != 0 ||
        FCGX_InitRequest(&w->fcgi, fd, FCGI_FAIL_ACCEPT_ON_INTR) != 0 ||
        FCGX_InitRequest(&w->spill, ws->chat_fd,
                         FCGI_FAIL_ACCEPT_ON_INTR) != 0)
        fatal("worker", "cannot initialise libfcgi");
    w->gen = json_gen_new();
    if (w->gen == NULL)
        fatal("worker", "out of memory");
    w->chat = chat_new(ws->conf, ws->pool, w->slot, err);
    if (w->chat == NULL)
        fatal("worker", "%s", err);
    metrics_init(&w->metrics, ws->conf, ws->pool, ws->chat_fd);
    w->unix_socket = is_unix_socket(fd);
}

static void
worker_cleanup(struct worker *w)
{
    metrics_cleanup(&w->metrics);
    chat_free(w->chat);
    yajl_gen_free(w->gen);
    FCGX_Free(&w->fcgi, 1);
    FCGX_Free(&w->spill, 1);
}

int
worker_check_conf(const struct conf *c, char *err, size_t size)
{
    char why[CHAT_ERR_LEN];

    char tls_err[CONF_ERR_LEN];

    if (chat_check_conf(c, why) == -1) {
        snprintf(err, size, "%s", why);
        return -1;
    }
    if (tls_check(c, tls_err) == -1) {
        snprintf(err, size, "%s", tls_err);
        return -1;
    }
    return 0;
}

static void
serve_models(struct worker *w)
{
    if (v1_gen_models(w->gen, w->conf->v1.models) != 0) {
        http_send_error(&w->req, 500, "internal_error", "out of memory");
        return;
    }
    http_send_json(&w->req, 200);
}

/* The routes every worker serves; the control worker serves no others. */
static int
dispatch_common(struct worker *w, const struct route_match *m)
{
    switch (m->id) {
    case ROUTE_HEALTHZ:
        chat_healthz(w->chat, &w->req);
        return 1;
    case ROUTE_STATUS:
        metrics_serve_status(&w->metrics, &w->req);
        return 1;
    case ROUTE_METRICS:
        metrics_serve_prometheus(&w->metrics, &w->req);
        return 1;
    case ROUTE_METHOD_NOT_ALLOWED:
        http_send_not_allowed(&w->req, m->allow);
        return 1;
    default:
        return 0;
    }
}

/* The chat API, behind the guard (CORS, client keys, client identity). */
static void
dispatch_chat(struct worker *w, const struct route_match *m)
{
    if (guard_request(w->conf, &w->req, m->allow) == -1)
        return;
    switch (m->id) {
    case ROUTE_CHAT_POST:
        chat_post(w->chat, &w->req);
        break;
    case ROUTE_SESSION_GET:
        chat_get(w->chat, &w->req, m->tail);
        break;
    case ROUTE_SESSION_DELETE:
        chat_delete(w->chat, &w->req, m->tail);
        break;
    case ROUTE_V1_MODELS:
        serve_models(w);
        break;
    case ROUTE_V1_COMPLETIONS:
        chat_completions(w->chat, &w->req);
        break;
    default:
        http_send_not_allowed(&w->req, m->allow);
    }
}

static void
dispatch(struct worker *w)
{
    const struct route_match *m = &w->route;

    /* The /v1 face answers errors, even this early, as OpenAI does. */
    if (strncmp(w->req.path, "/v1/", 4) == 0)
        w->req.errors = &v1_errors;
    if (m->guarded && w->setup->role == SCOREBOARD_CHAT)
        dispatch_chat(w, m);
    else if (!m->guarded && dispatch_common(w, m))
        return;
    else
        http_send_error(&w->req, 404, "not_found", "no such path");
}

/* The web server's REQUEST_START (nginx: $msec) tells how long a request
 * waited for a worker; past queue_timeout_ms the client is better served
 * by a quick 503 than by an answer it may have given up on. */
static int
waited_too_long(struct worker *w)
{
    const char *start = fcgi_param(w->req.fcgi, "REQUEST_START");
    double queued_ms, limit = (double)w->conf->queue_timeout_ms;
    char *end;

    if (limit <= 0 || *start == '\0')
        return 0;
    queued_ms = (double)clock_wall_ms() - strtod(start, &end) * 1000.0;
    if (*end != '\0' || queued_ms <= limit)
        return 0;
    scoreboard_add(&w->pool->queue_timeouts, 1);
    http_send_error(&w->req, 503, "unavailable", "no worker became free "
                    "within %lld ms", w->conf->queue_timeout_ms);
    return 1;
}

static void
log_slow(struct worker *w, double total_ms)
{
    const struct http_request *r = &w->req;

    if (w->conf->slowlog_ms <= 0 || total_ms < (double)w->conf->slowlog_ms)
        return;
    scoreboard_add(&w->pool->slow_requests, 1);
    log_warnx("slowlog", "%s %s took %.0f ms (status %d): redis %.0f ms, "
              "upstream %.0f ms, other %.0f ms", r->method, r->path,
              total_ms, r->status, r->redis_ms, r->upstream_ms,
              total_ms - r->redis_ms - r->upstream_ms);
}

typedef void (*serve_fn)(struct worker *w);

/* libfcgi closes with shutdown, then waits (up to 2 s) for the web server
 * to close its end first, so that unread request data cannot make TCP send
 * a reset that destroys the answer. A unix socket sends no reset, and once
 * the web server has sent the whole request nothing is left unread: then
 * close at once instead of sleeping until nginx gets round to closing. The
 * wait stays for TCP, and for a body not read to its end (an early 413,
 * while the web server may still be writing). */
static void
finish_request(struct worker *w, FCGX_Request *fr)
{
    if (w->unix_socket && fr->in != NULL && FCGX_HasSeenEOF(fr->in) == EOF)
        FCGX_Detach(fr);
    FCGX_Finish_r(fr);
}

/* After a request that needed large buffers or made a TLS handshake: the
 * heap they leave free goes back to the system (each buffer gives its own
 * back when next reset), so that each of thousands of workers does not
 * keep its largest request or its handshake's leftovers (measured: 32 KiB
 * of a held TLS stream's 350). Not after every request: malloc_trim walks
 * the heap. */
static void
give_back_memory(struct worker *w)
{
    unsigned long grown = buf_large_growths();
    unsigned long handshakes = tls_handshakes_here();

    if (json_gen_shrink(&w->gen) || grown != w->large_growths ||
        handshakes != w->handshakes)
        malloc_trim(0);
    w->large_growths = grown;
    w->handshakes = handshakes;
}

/* One request from accept to access log, whatever serves it. */
static void
serve_one(struct worker *w, FCGX_Request *fr, serve_fn serve)
{
    char scratch[PATH_SCRATCH];
    struct http_request *r = &w->req;
    struct log_access entry;
    double total_ms;

    http_begin(r, fr, w->gen);
    r->path = http_path(fr, scratch, sizeof(scratch));
    route_resolve(r->method, r->path, &w->route);
    /* The route, not the path: the status page must not show session
     * ids. */
    scoreboard_request_begin(w->pool, w->slot, r->method, w->route.pattern,
                             r->id);
    serve(w);
    give_back_memory(w);
    total_ms = clock_ms() - r->start_ms;
    scoreboard_request_end(w->pool, w->slot, r->status, total_ms,
                           r->redis_ms, r->upstream_ms);
    entry = (struct log_access){
        .method = r->method,
        .path = r->path,
        .status = r->status,
        .bytes = r->bytes_out,
        .total_ms = total_ms,
        .redis_ms = r->redis_ms,
        .upstream_ms = r->upstream_ms,
    };
    log_access_line(&entry);
    log_slow(w, total_ms);
    log_set_request_id(NULL);
}

static void
serve_routed(struct worker *w)
{
    if (!waited_too_long(w))
        dispatch(w);
}

static void
serve_shed(struct worker *w)
{
    scoreboard_add(&w->pool->queue_timeouts, 1);
    http_send_error(&w->req, 503, "unavailable", "every worker is busy; no "
                    "worker became free within %lld ms",
                    w->conf->queue_timeout_ms);
}

/* At most this many chat workers wait in accept() at once: a dynamic pool
 * retires the idle ones over max_spare_workers on every tick. */
static unsigned
workers_waiting_at_most(const struct conf *c)
{
    switch (c->pm) {
    case CONF_POOL_DYNAMIC:
        return (unsigned)c->max_spare_workers;
    case CONF_POOL_SINGLE:
        return 1;
    default:
        return (unsigned)c->workers;
    }
}

void
worker_prepare_listener(int fd, const struct conf *c)
{
    unsigned wake_ms = pool_idle_wake_ms(workers_waiting_at_most(c));
    struct timeval idle = {.tv_sec = wake_ms / 1000,
                           .tv_usec = wake_ms % 1000 * 1000};

    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof(idle)) == -1)
        log_warn("master", "cannot set an accept timeout on the listening "
                 "socket: %s", strerror(errno));
}

static void
reopen_logs_if_asked(void)
{
    if (reopen_requested) {
        reopen_requested = 0;
        log_reopen();
    }
}

/* Housekeeping between requests: logs to reopen, an orphaned worker (whose
 * stop is already asked for: the loop ends next). */
static void
between_requests(void)
{
    reopen_logs_if_asked();
    if (master_gone)
        log_error("worker", "the master is gone; exiting");
}

static int
recycle_due(const struct worker *w)
{
    long long max = w->conf->max_requests;

    if (max == 0 || w->slot->requests < (uint64_t)max)
        return 0;
    log_info("worker", "recycling after %llu requests",
             (unsigned long long)w->slot->requests);
    return 1;
}

/* accept() failed for another reason than its idle timeout or a signal:
 * the listening socket shut down by a master that is stopping (EINVAL; its
 * stop signal follows at once), or descriptors or memory running short.
 * Trying again at once would spin on the CPU, thousands of workers at a
 * time in a big pool: wait a little, or until the signal comes. A stop
 * that came between the loop's look and the accept() closed the socket
 * under it (EBADF): nothing to say, the loop ends next. */
static void
accept_failed(int rc)
{
    static int said;
    struct timespec pause = {.tv_sec = 0,
                             .tv_nsec = ACCEPT_RETRY_MS * 1000000L};

    if (rc == -EAGAIN || rc == -EWOULDBLOCK || rc == -EINTR ||
        stop_requested)
        return;
    if (rc != -EINVAL && !said) {
        said = 1;
        log_warnx("worker", "cannot accept: %s; retrying every %d ms",
                  rc < 0 && rc > -4096 ? strerror(-rc) : "libfcgi error",
                  ACCEPT_RETRY_MS);
    }
    nanosleep(&pause, NULL);
}

static void
chat_loop(struct worker *w)
{
    int rc;

    for (;;) {
        between_requests();
        if (stop_requested)
            break;
        /* Fails after a quiet while (worker_prepare_listener) or a signal:
         * look around. */
        rc = FCGX_Accept_r(&w->fcgi);
        if (rc < 0) {
            accept_failed(rc);
            continue;
        }
        reopen_logs_if_asked(); /* asked just before the accept() */
        serve_one(w, &w->fcgi, serve_routed);
        finish_request(w, &w->fcgi);
        if (recycle_due(w))
            break;
    }
}

/* accept() on the chat socket, where the connection poll() saw may be
 * taken by a chat worker first: the socket blocks, and its own timeout is
 * long in a big pool (pool_idle_wake_ms), so a one-shot timer ends the
 * wait (the request is set to fail on EINTR). */
static int
accept_within(FCGX_Request *r, long ms)
{
    struct itimerval once = {.it_value = {.tv_sec = ms / 1000,
                                          .tv_usec = ms % 1000 * 1000}};
    struct itimerval off = {0};
    int rc;

    setitimer(ITIMER_REAL, &once, NULL);
    rc = FCGX_Accept_r(r);
    setitimer(ITIMER_REAL, &off, NULL);
    return rc;
}

/* With every chat worker busy for queue_timeout_ms while connections wait,
 * take the oldest waiting one and answer 503 now rather than when the web
 * server's own timeout fires. */
static void
shed_waiting_requests(struct worker *w)
{
    struct pollfd queue = {.fd = w->setup->chat_fd, .events = POLLIN};
    double now = clock_ms();
    unsigned n[SCOREBOARD_STATES];

    /* The queue first: a walk over every slot, 20 times a second, costs
     * a pool of thousands more than one poll(). */
    if (w->conf->queue_timeout_ms <= 0 || poll(&queue, 1, 0) != 1) {
        w->queue_since_ms = 0;
        return;
    }
    scoreboard_count_states(w->pool, SCOREBOARD_CHAT, n);
    if (n[SCOREBOARD_IDLE] + n[SCOREBOARD_STARTING] > 0) {
        w->queue_since_ms = 0;
        return;
    }
    if (w->queue_since_ms == 0)
        w->queue_since_ms = now;
    if (now - w->queue_since_ms < (double)w->conf->queue_timeout_ms ||
        accept_within(&w->spill, SPILL_WAIT_MS) < 0)
        return;
    serve_one(w, &w->spill, serve_shed);
    FCGX_Finish_r(&w->spill); /* body never read: keep libfcgi's linger */
}

static void
control_loop(struct worker *w)
{
    struct pollfd own = {.fd = w->setup->status_fd, .events = POLLIN};

    scoreboard_set_state(w->slot, SCOREBOARD_IDLE);
    for (;;) {
        between_requests();
        if (stop_requested)
            break;
        if (poll(&own, 1, CONTROL_TICK_MS) == 1 &&
            FCGX_Accept_r(&w->fcgi) >= 0) {
            serve_one(w, &w->fcgi, dispatch);
            finish_request(w, &w->fcgi);
        }
        shed_waiting_requests(w);
    }
}

/* _exit(), not exit(): what the libraries' exit handlers free (OpenSSL's
 * tables, most of them built by the master and shared copy-on-write) would
 * be copied page by page only to be thrown away. Measured: a stop of 4,000
 * idle workers took 3.2 s with exit(), 1.1-1.3 s without. The logs are
 * plain write()s, with nothing buffered to flush. */
static void __attribute__((noreturn))
exit_without_handlers(void)
{
#if defined(__SANITIZE_ADDRESS__)
    __lsan_do_leak_check(); /* which exit() runs and _exit() skips */
#endif
    _exit(0);
}

void
worker_main(const struct worker_setup *ws)
{
    struct worker w;
    char role[16];

    snprintf(role, sizeof(role), "%s%d",
             ws->role == SCOREBOARD_CONTROL ? "C" : "W", ws->slot);
    log_set_role(role);
    /* Single mode has no master to stop listening for it: keep it. */
    listen_fd_to_close = ws->master_pid != 0 ? ws->chat_fd : -1;
    install_signals();
    watch_master(ws->master_pid);
    worker_setup(&w, ws);
    scoreboard_set_state(w.slot, SCOREBOARD_IDLE);
    if (ws->role == SCOREBOARD_CONTROL)
        control_loop(&w);
    else
        chat_loop(&w);
    worker_cleanup(&w);
    exit_without_handlers();
}
