/* metrics: the status page and Prometheus text, from the scoreboard. */
#include "metrics.h"

#include <netinet/in.h>
#include <stddef.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

#include "clock.h"
#include "conf.h"
#include "fcgi.h"
#include "json.h"
#include "http.h"
#include "scoreboard.h"
#include "tls.h"
#include "tools.h"

static const char *const upstream_error_names[SCOREBOARD_UP_KINDS] = {
    "timeout", "unreachable", "http_error", "bad_answer", "failed",
    "client_gone",
};

#define METRICS_TEXT_MAX (1024 * 1024)

void
metrics_init(struct metrics *m, const struct conf *c, struct scoreboard *pool,
             int chat_fd)
{
    m->conf = c;
    m->pool = pool;
    m->chat_fd = chat_fd;
    buf_init(&m->text, METRICS_TEXT_MAX);
}

void
metrics_cleanup(struct metrics *m)
{
    buf_cleanup(&m->text);
}

static int
check_client(const struct metrics *m, struct http_request *r)
{
    const char *addr = fcgi_param(r->fcgi, "REMOTE_ADDR");

    if (conf_list_has(m->conf->status_allow, addr, strlen(addr)))
        return 0;
    http_send_error(r, 403, "forbidden", "status and metrics are only "
                    "for the addresses in status_allow");
    return -1;
}

/* Connections waiting in a TCP listen queue; -1 where the OS does not tell
 * (unix sockets). */
static long
listen_queue(int fd)
{
    struct tcp_info info;
    socklen_t len = sizeof(info);

    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == -1)
        return -1;
    return (long)info.tcpi_unacked;
}

static const char *
pm_name(const struct conf *c)
{
    static const char *const names[] = {"static", "dynamic", "single"};

    return names[c->pm];
}

static int
gen_counter(yajl_gen g, const char *key, const uint64_t *counter)
{
    return json_gen_key_int(g, key, (long long)scoreboard_read(counter));
}

static int
gen_process(yajl_gen g, const struct scoreboard_slot *s, int64_t now)
{
    int64_t began = s->request_at_ms;

    return yajl_gen_map_open(g) || json_gen_key_int(g, "pid", s->pid) ||
           json_gen_key_cstr(g, "role", s->role == SCOREBOARD_CONTROL
                                            ? "control"
                                            : "chat") ||
           json_gen_key_cstr(g, "state", scoreboard_state_name(s->state)) ||
           json_gen_key_int(g, "start_time", s->started_at_ms / 1000) ||
           json_gen_key_int(g, "requests", (long long)s->requests) ||
           json_gen_key_int(g, "request_duration_ms",
                            began ? now - began : 0) ||
           /* Cut at its size: the worker may not have ended it. */
           json_gen_key_str(g, "request", s->request,
                            began ? strnlen(s->request, sizeof(s->request))
                                  : 0) ||
           yajl_gen_map_close(g);
}

static int
gen_processes(yajl_gen g, const struct scoreboard *p)
{
    int64_t now = clock_wall_ms();
    uint32_t nslots = scoreboard_nslots(p);

    if (json_gen_cstr(g, "processes") || yajl_gen_array_open(g))
        return -1;
    for (uint32_t i = 0; i < nslots; i++)
        if (scoreboard_slot(p, i)->pid != 0 &&
            gen_process(g, scoreboard_slot(p, i), now))
            return -1;
    return yajl_gen_array_close(g) ? -1 : 0;
}

static int
gen_listen_queue(yajl_gen g, int fd)
{
    long queue = listen_queue(fd);

    if (json_gen_cstr(g, "listen_queue"))
        return -1;
    return (queue < 0 ? yajl_gen_null(g) : yajl_gen_integer(g, queue)) ? -1
                                                                       : 0;
}

static int
gen_status(yajl_gen g, const struct metrics *m)
{
    const struct scoreboard *p = m->pool;
    unsigned n[SCOREBOARD_STATES], active = 0;

    scoreboard_count_states(p, SCOREBOARD_CHAT, n);
    for (int i = SCOREBOARD_READING; i < SCOREBOARD_STATES; i++)
        active += n[i];
    return yajl_gen_map_open(g) || json_gen_key_cstr(g, "pool", "chatfcgi") ||
           json_gen_key_cstr(g, "process_manager", pm_name(m->conf)) ||
           json_gen_key_int(g, "start_time", p->started_at_ms / 1000) ||
           json_gen_key_int(g, "start_since",
                            (clock_wall_ms() - p->started_at_ms) / 1000) ||
           gen_counter(g, "accepted_conn", &p->accepted) ||
           gen_listen_queue(g, m->chat_fd) ||
           json_gen_key_int(g, "idle_processes", n[SCOREBOARD_IDLE]) ||
           json_gen_key_int(g, "active_processes", active) ||
           json_gen_key_int(g, "total_processes",
                            active + n[SCOREBOARD_IDLE] +
                                n[SCOREBOARD_STARTING]) ||
           gen_counter(g, "max_active_processes", &p->max_active) ||
           gen_counter(g, "max_children_reached", &p->max_children_reached) ||
           gen_counter(g, "slow_requests", &p->slow_requests) ||
           gen_counter(g, "queue_timeouts", &p->queue_timeouts) ||
           gen_counter(g, "worker_deaths", &p->worker_deaths) ||
           gen_counter(g, "worker_recycles", &p->worker_recycles) ||
           gen_counter(g, "watchdog_kills", &p->watchdog_kills) ||
           gen_processes(g, p) || yajl_gen_map_close(g);
}

void
metrics_serve_status(struct metrics *m, struct http_request *r)
{
    if (check_client(m, r) == -1)
        return;
    json_gen_restart(r->gen);
    if (gen_status(r->gen, m) != 0) {
        http_send_error(r, 500, "internal_error",
                        "the status cannot be encoded");
        return;
    }
    http_send_json(r, 200);
}

static int
put_histogram(struct buf *b, const char *name, const char *help,
              const struct scoreboard_histogram *h)
{
    uint64_t cumulative = 0;
    int rc = buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help,
                        name);

    for (size_t i = 0; i < SCOREBOARD_BUCKETS && rc == 0; i++) {
        unsigned bound = scoreboard_bucket_bound_ms(i);

        cumulative += scoreboard_read(&h->buckets[i]);
        if (i < SCOREBOARD_BUCKETS - 1)
            rc = buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name,
                            bound / 1000.0, (unsigned long long)cumulative);
        else
            rc = buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name,
                            (unsigned long long)cumulative);
    }
    return rc || buf_printf(b, "%s_sum %.6f\n%s_count %llu\n", name,
                            (double)scoreboard_read(&h->sum_us) / 1e6, name,
                            (unsigned long long)scoreboard_read(&h->count));
}

static int
put_counter(struct buf *b, const char *name, const char *help,
            const uint64_t *counter)
{
    return buf_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name,
                      help, name, name,
                      (unsigned long long)scoreboard_read(counter));
}

static int
put_requests(struct buf *b, const struct scoreboard *p)
{
    static const char name[] = "chatfcgi_requests_total";
    int rc = buf_printf(b, "# HELP %s Requests answered, by HTTP status "
                        "(499: the client went away).\n# TYPE %s counter\n",
                        name, name);

    for (int i = 0; i < SCOREBOARD_STATUS_OTHER && rc == 0; i++)
        rc = buf_printf(b, "%s{status=\"%d\"} %llu\n", name,
                        scoreboard_status_code(i),
                        (unsigned long long)scoreboard_read(
                            &p->by_status[i]));
    return rc || buf_printf(b, "%s{status=\"other\"} %llu\n", name,
                            (unsigned long long)scoreboard_read(
                                &p->by_status[SCOREBOARD_STATUS_OTHER]));
}

static int
put_upstream_errors(struct buf *b, const struct scoreboard *p)
{
    static const char name[] = "chatfcgi_upstream_errors_total";
    int rc = buf_printf(b, "# HELP %s Failed model calls, by kind.\n"
                        "# TYPE %s counter\n", name, name);

    for (int i = 0; i < SCOREBOARD_UP_KINDS && rc == 0; i++)
        rc = buf_printf(b, "%s{kind=\"%s\"} %llu\n", name,
                        upstream_error_names[i],
                        (unsigned long long)scoreboard_read(
                            &p->upstream_errors[i]));
    return rc;
}

static int
put_workers(struct buf *b, const struct scoreboard *p)
{
    static const char name[] = "chatfcgi_workers";
    unsigned n[SCOREBOARD_STATES];
    int rc = buf_printf(b, "# HELP %s Chat workers, by state.\n"
                        "# TYPE %s gauge\n", name, name);

    scoreboard_count_states(p, SCOREBOARD_CHAT, n);
    for (int i = 0; i < SCOREBOARD_STATES && rc == 0; i++)
        rc = buf_printf(b, "%s{state=\"%s\"} %u\n", name,
                        scoreboard_state_name(i), n[i]);
    return rc;
}

/* One counter of every provider, from its offset in its struct. */
static int
put_provider_counter(struct buf *b, const struct scoreboard *p,
                     const char *name, const char *help, size_t offset)
{
    int rc = buf_printf(b, "# HELP %s %s\n# TYPE %s counter\n", name, help,
                        name);

    for (size_t i = 0; i < SCOREBOARD_PROVIDERS && rc == 0; i++) {
        const struct scoreboard_provider *pr = &p->providers[i];

        if (pr->name[0] != '\0')
            rc = buf_printf(b, "%s{provider=\"%s\"} %llu\n", name, pr->name,
                            (unsigned long long)scoreboard_read(
                                (const uint64_t *)((const char *)pr +
                                                   offset)));
    }
    return rc;
}

static int
put_provider_health(struct buf *b, const struct scoreboard *p)
{
    static const char errors[] = "chatfcgi_provider_errors_total";
    static const char cooling[] = "chatfcgi_provider_cooling_down";
    int64_t now = clock_wall_ms();
    int rc = buf_printf(b, "# HELP %s Failed attempts, by provider and "
                        "kind.\n# TYPE %s counter\n", errors, errors);

    for (size_t i = 0; i < SCOREBOARD_PROVIDERS && rc == 0; i++)
        for (int k = 0; k < SCOREBOARD_UP_KINDS && rc == 0 &&
                        p->providers[i].name[0] != '\0';
             k++)
            rc = buf_printf(b, "%s{provider=\"%s\",kind=\"%s\"} %llu\n",
                            errors, p->providers[i].name,
                            upstream_error_names[k],
                            (unsigned long long)scoreboard_read(
                                &p->providers[i].errors[k]));
    rc = rc || buf_printf(b, "# HELP %s 1 while every worker skips the "
                          "provider.\n# TYPE %s gauge\n", cooling, cooling);
    for (size_t i = 0; i < SCOREBOARD_PROVIDERS && rc == 0; i++)
        if (p->providers[i].name[0] != '\0')
            rc = buf_printf(b, "%s{provider=\"%s\"} %d\n", cooling,
                            p->providers[i].name,
                            p->providers[i].cooldown_until_ms > now);
    return rc;
}

/* The pool's TLS handshakes with each provider: full ones cost the
 * certificate chain's verification, resumed ones reuse a session. */
static int
put_tls(struct buf *b, const struct scoreboard *p)
{
    static const char name[] = "chatfcgi_tls_handshakes_total";
    int rc = buf_printf(b, "# HELP %s TLS handshakes with the provider, "
                        "full or resumed.\n# TYPE %s counter\n", name, name);

    for (size_t i = 0; i < SCOREBOARD_PROVIDERS && rc == 0; i++) {
        struct tls_counts n;

        if (p->providers[i].name[0] == '\0')
            continue;
        tls_counts(i, &n);
        rc = buf_printf(b, "%s{provider=\"%s\",kind=\"full\"} %llu\n"
                        "%s{provider=\"%s\",kind=\"resumed\"} %llu\n",
                        name, p->providers[i].name,
                        (unsigned long long)n.full, name,
                        p->providers[i].name, (unsigned long long)n.resumed);
    }
    return rc;
}

#define PROVIDER_COUNTER(field, help)                                          \
    put_provider_counter(b, p, "chatfcgi_provider_" #field "_total", help,    \
                         offsetof(struct scoreboard_provider, field))

static int
put_providers(struct buf *b, const struct scoreboard *p)
{
    return PROVIDER_COUNTER(attempts, "Requests sent to the provider.") ||
           PROVIDER_COUNTER(successes, "Attempts that gave the answer.") ||
           PROVIDER_COUNTER(retries, "Attempts in a retry round.") ||
           PROVIDER_COUNTER(hedges, "Attempts started as a hedge.") ||
           PROVIDER_COUNTER(hedges_won, "Hedges that gave the answer.") ||
           PROVIDER_COUNTER(cooldowns, "Times the provider was skipped "
                                       "for its failures.") ||
           put_provider_health(b, p) || put_tls(b, p);
}

/* Tool calls by tool and outcome, named after the configured tools. */
static int
put_tools(struct buf *b, const struct scoreboard *p, const struct conf *c)
{
    static const char name[] = "chatfcgi_tool_calls_total";
    int rc = buf_printf(b, "# HELP %s Tool calls of /api/chat, by tool and "
                        "outcome.\n# TYPE %s counter\n", name, name);

    for (size_t t = 0; t < SCOREBOARD_TOOLS && rc == 0; t++) {
        const char *tool = t < c->ntools ? c->tools[t].name
                         : t == SCOREBOARD_TOOLS - 1 ? "(unconfigured)"
                                                     : NULL;

        for (unsigned o = 0; tool && o < SCOREBOARD_TOOL_OUTCOMES && rc == 0;
             o++)
            rc = buf_printf(b, "%s{tool=\"%s\",outcome=\"%s\"} %llu\n",
                            name, tool, tools_outcome_name(o),
                            (unsigned long long)scoreboard_read(
                                &p->tool_calls[t][o]));
    }
    return rc || put_histogram(b, "chatfcgi_tool_duration_seconds",
                               "Time of each tool call made.",
                               &p->tool_latency);
}

static int
put_all(struct buf *b, const struct scoreboard *p, const struct conf *c)
{
    return put_requests(b, p) ||
           put_histogram(b, "chatfcgi_request_duration_seconds",
                         "Time from accept to the last byte.", &p->total) ||
           put_histogram(b, "chatfcgi_redis_duration_seconds",
                         "Time in Redis per request.", &p->redis) ||
           put_histogram(b, "chatfcgi_upstream_duration_seconds",
                         "Time in model calls per request.", &p->upstream) ||
           put_upstream_errors(b, p) || put_workers(b, p) ||
           put_counter(b, "chatfcgi_worker_deaths_total",
                       "Workers that died (signal or failure status).",
                       &p->worker_deaths) ||
           put_counter(b, "chatfcgi_worker_recycles_total",
                       "Workers that exited cleanly and were replaced.",
                       &p->worker_recycles) ||
           put_counter(b, "chatfcgi_watchdog_kills_total",
                       "Workers ended by the watchdog.", &p->watchdog_kills) ||
           put_counter(b, "chatfcgi_slow_requests_total",
                       "Requests slower than slowlog_ms.", &p->slow_requests) ||
           put_counter(b, "chatfcgi_queue_timeouts_total",
                       "Requests turned away after queue_timeout_ms.",
                       &p->queue_timeouts) ||
           put_counter(b, "chatfcgi_max_children_reached_total",
                       "Times the dynamic pool hit its maximum.",
                       &p->max_children_reached) ||
           put_providers(b, p) || put_tools(b, p, c);
}

void
metrics_serve_prometheus(struct metrics *m, struct http_request *r)
{
    if (check_client(m, r) == -1)
        return;
    buf_reset(&m->text);
    if (put_all(&m->text, m->pool, m->conf) != 0) {
        http_send_error(r, 500, "internal_error", "the metrics do not fit");
        return;
    }
    http_send_text(r, 200, "text/plain; version=0.0.4", m->text.data,
                   m->text.len);
}
