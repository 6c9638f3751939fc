/*
 * scoreboard: the pool's shared memory. One slot per worker (its state,
 * requests served, the request in hand, and the pid and role the master
 * shows there), and pool-wide counters and latency histograms updated with
 * atomic adds, so totals never go backwards when a worker dies. It lives
 * in a memfd that survives an exec of the master (reload), so the totals
 * survive that too. Every worker can write all of it: it is for display
 * and counting, and the master acts only on its own records.
 */
#ifndef CHATFCGI_SCOREBOARD_H
#define CHATFCGI_SCOREBOARD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* What kind of worker holds a slot. */
enum scoreboard_role {
    SCOREBOARD_CHAT,    /* serves the chat socket */
    SCOREBOARD_CONTROL, /* serves healthz, status and metrics */
};

enum scoreboard_state {
    SCOREBOARD_STARTING, /* forked, not yet accepting */
    SCOREBOARD_IDLE,
    SCOREBOARD_READING,
    SCOREBOARD_REDIS,
    SCOREBOARD_UPSTREAM,
    SCOREBOARD_STREAMING,
    SCOREBOARD_WRITING,
    SCOREBOARD_STATES
};

/* Statuses counted one by one; anything else is counted as "other". */
#define SCOREBOARD_STATUS_CODES                                                \
    X(200) X(204) X(400) X(401) X(404) X(405) X(409) X(413) X(415) X(422)     \
    X(429) X(499) X(500) X(502) X(503) X(504)
enum scoreboard_status_index {
#define X(code) SCOREBOARD_STATUS_##code,
    SCOREBOARD_STATUS_CODES
#undef X
    SCOREBOARD_STATUS_OTHER,
    SCOREBOARD_STATUS_SLOTS
};

/* Kinds of upstream failure, as llm reports them. */
enum scoreboard_upstream_error {
    SCOREBOARD_UP_TIMEOUT,
    SCOREBOARD_UP_UNREACHABLE,
    SCOREBOARD_UP_HTTP_ERROR,
    SCOREBOARD_UP_BAD_ANSWER,
    SCOREBOARD_UP_FAILED,
    SCOREBOARD_UP_CLIENT_GONE,
    SCOREBOARD_UP_KINDS
};

/* Histogram bucket bounds in milliseconds; one more bucket is +Inf. */
#define SCOREBOARD_BUCKET_BOUNDS_MS                                            \
    {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000}
#define SCOREBOARD_BUCKETS 14

struct scoreboard_histogram {
    uint64_t buckets[SCOREBOARD_BUCKETS]; /* non-cumulative counts */
    uint64_t count;
    uint64_t sum_us;
};

#define SCOREBOARD_REQUEST_LEN 72

struct scoreboard_slot {
    pid_t pid; /* 0: no worker */
    int state; /* enum scoreboard_state */
    int role;  /* enum scoreboard_role */
    uint64_t requests;   /* served by this process */
    int64_t started_at_ms;  /* when the process started (wall clock) */
    int64_t request_at_ms;  /* when the request in hand began; 0: none */
    char request[SCOREBOARD_REQUEST_LEN]; /* "GET /api/chat/{id} req=…" */
};

/* One model provider's health and counters, shared by every worker: a
 * provider failing again and again is skipped by all until it cools down. */
#define SCOREBOARD_PROVIDERS 8
#define SCOREBOARD_PROVIDER_NAME 32
struct scoreboard_provider {
    char name[SCOREBOARD_PROVIDER_NAME];
    uint32_t failures;          /* in a row */
    int64_t cooldown_until_ms;  /* wall clock; 0: not cooling down */
    uint64_t attempts, successes, retries, hedges, hedges_won, cooldowns;
    uint64_t errors[SCOREBOARD_UP_KINDS];
};

/* Tool calls of /api/chat by tool (its index among the configured ones;
 * the last counts calls of tools that are not configured) and outcome
 * (enum tool_outcome's order). */
#define SCOREBOARD_TOOLS 17
#define SCOREBOARD_TOOL_OUTCOMES 4

/* Slots for the most workers conf.c allows (16384), twice (the old and the
 * new generation during a reload), each with its control worker. The size
 * is fixed so that every process knows from the type alone how far it may
 * read, whatever a worker writes into nslots. The memfd is sparse: only
 * the slots in use take memory. */
#define SCOREBOARD_WORKERS_MAX 16384
#define SCOREBOARD_SLOTS_MAX (2 * (SCOREBOARD_WORKERS_MAX + 1))
/* The slots of builds that allowed 4096 workers stay where those builds
 * put them; the others come after everything else (more_slots), so that a
 * reload from such a build keeps every offset it used. scoreboard_slot()
 * finds slot i in either. */
#define SCOREBOARD_SLOTS_FIRST (2 * (4096 + 1))

struct scoreboard {
    uint64_t magic;
    int64_t started_at_ms;
    uint32_t nslots;             /* in use: the master's count, published
                                    for the readers; see scoreboard_nslots */
    uint32_t generation;
    uint64_t accepted;
    uint64_t by_status[SCOREBOARD_STATUS_SLOTS];
    uint64_t upstream_errors[SCOREBOARD_UP_KINDS];
    uint64_t slow_requests;
    uint64_t queue_timeouts;     /* 503s because no worker came in time */
    uint64_t worker_deaths;      /* exits by signal or failure status */
    uint64_t worker_recycles;    /* clean exits (max_requests, retirement) */
    uint64_t watchdog_kills;
    uint64_t max_active;
    uint64_t max_children_reached;
    struct scoreboard_histogram total, redis, upstream;
    struct scoreboard_provider providers[SCOREBOARD_PROVIDERS];
    struct scoreboard_slot slots[SCOREBOARD_SLOTS_FIRST];
    /* After the slots, so that a reload from a build without them keeps
     * every offset the older build used. */
    uint64_t tool_calls[SCOREBOARD_TOOLS][SCOREBOARD_TOOL_OUTCOMES];
    struct scoreboard_histogram tool_latency; /* of the calls made */
    struct scoreboard_slot more_slots[SCOREBOARD_SLOTS_MAX -
                                      SCOREBOARD_SLOTS_FIRST];
    /* Chat workers between request begin and end, for max_active: kept
     * as they come and go, since counting the slots at every request
     * cost a pool of 10,000 a walk over 10,000 slots per request. A
     * worker that dies in a request is taken off by the master. */
    uint64_t active_chat;
};

/* Slot i (< SCOREBOARD_SLOTS_MAX) of either array. Like strchr(), it
 * takes a const scoreboard for the readers and returns a slot the
 * writers can write. */
static inline struct scoreboard_slot *
scoreboard_slot(const struct scoreboard *p, uint32_t i)
{
    return (struct scoreboard_slot *)(i < SCOREBOARD_SLOTS_FIRST
                                          ? &p->slots[i]
                                          : &p->more_slots[i -
                                                SCOREBOARD_SLOTS_FIRST]);
}

/* Create the shared memory, or adopt the one inherited on fd (after a
 * reload's exec; -1: none), grown to this build's size when an older one
 * made it smaller. Returns the mapping, or NULL (errno set; EINVAL: fd is
 * not a scoreboard). nslots is 0 in a new one. */
struct scoreboard *scoreboard_open(int fd, int *out_fd);

/* The slots in use as published in p, never more than there are: the count
 * for whoever reads the slots, since any worker can write nslots. */
uint32_t scoreboard_nslots(const struct scoreboard *p);

/* Counts of the slots of workers with a role, by state, into
 * n[SCOREBOARD_STATES]. */
void scoreboard_count_states(const struct scoreboard *p,
                             enum scoreboard_role role,
                             unsigned n[SCOREBOARD_STATES]);

/* Worker side: the slot's state and the request in hand. The request is
 * shown by its route ("/api/chat/{id}"), never by its path, which may
 * hold a session id. */
void scoreboard_set_state(struct scoreboard_slot *s,
                          enum scoreboard_state state);
void scoreboard_request_begin(struct scoreboard *p, struct scoreboard_slot *s,
                              const char *method, const char *route,
                              const char *request_id);
void scoreboard_request_end(struct scoreboard *p, struct scoreboard_slot *s,
                            int status, double total_ms, double redis_ms,
                            double upstream_ms);

void scoreboard_count_upstream_error(struct scoreboard *p,
                                     enum scoreboard_upstream_error kind);

/* One tool call that ended with outcome; made calls (ms > 0) also go
 * into the latency histogram. */
void scoreboard_count_tool(struct scoreboard *p, size_t tool,
                           unsigned outcome, double ms);

/* Name the provider slots after the configured providers; a slot whose
 * name changed (a reload with other providers) starts from zero. */
void scoreboard_name_providers(struct scoreboard *p, const char *const *names,
                               size_t n);

/* Atomic add to one pool counter. */
void scoreboard_add(uint64_t *counter, uint64_t n);
/* One less, unless already 0 (a request a worker of an older build
 * began, which did not count it). */
void scoreboard_take_one(uint64_t *counter);
/* Whether a slot's worker is in a request (counted in active_chat). */
int scoreboard_in_request(const struct scoreboard_slot *s);
uint64_t scoreboard_read(const uint64_t *counter);

/* Index into by_status for an HTTP status. */
enum scoreboard_status_index scoreboard_status_index(int status);
int scoreboard_status_code(enum scoreboard_status_index i);

const char *scoreboard_state_name(enum scoreboard_state state);

/* Upper bound of histogram bucket i in ms (0 for the last, +Inf). */
unsigned scoreboard_bucket_bound_ms(size_t i);

#endif
