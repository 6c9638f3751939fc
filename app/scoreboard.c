/* scoreboard: the pool's shared memory: slots, counters, histograms. */
#include "scoreboard.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"

#define SCOREBOARD_MAGIC 0x63686174736231ULL /* "chatsb1" */

static const unsigned bucket_bounds_ms[SCOREBOARD_BUCKETS - 1] =
    SCOREBOARD_BUCKET_BOUNDS_MS;

static const char *const state_names[SCOREBOARD_STATES] = {
    "starting", "idle", "reading", "redis", "upstream", "streaming",
    "writing",
};

static struct scoreboard *
map_pool(int fd)
{
    void *p = mmap(NULL, sizeof(struct scoreboard), PROT_READ | PROT_WRITE,
                   MAP_SHARED, fd, 0);

    return p == MAP_FAILED ? NULL : p;
}

/* An inherited scoreboard: one of ours (its magic), grown when an older
 * build made it smaller, so that no read of the mapping finds its end. */
static struct scoreboard *
adopt(int fd)
{
    struct stat st;
    struct scoreboard *p;

    if (fstat(fd, &st) == -1)
        return NULL;
    if ((size_t)st.st_size < sizeof(p->magic)) {
        errno = EINVAL;
        return NULL;
    }
    p = map_pool(fd);
    if (p == NULL)
        return NULL;
    if (p->magic != SCOREBOARD_MAGIC) {
        munmap(p, sizeof(*p));
        errno = EINVAL;
        return NULL;
    }
    if ((size_t)st.st_size < sizeof(*p) &&
        ftruncate(fd, (off_t)sizeof(*p)) == -1) {
        munmap(p, sizeof(*p));
        return NULL;
    }
    return p;
}

static struct scoreboard *
create(int *out_fd)
{
    /* No MFD_CLOEXEC: a reload execs the master, which adopts it. */
    int fd = memfd_create("chatfcgi-scoreboard", 0);
    struct scoreboard *p;

    if (fd == -1)
        return NULL;
    if (ftruncate(fd, (off_t)sizeof(*p)) == -1 ||
        (p = map_pool(fd)) == NULL) {
        close(fd);
        return NULL;
    }
    p->magic = SCOREBOARD_MAGIC;
    p->started_at_ms = clock_wall_ms();
    *out_fd = fd;
    return p;
}

struct scoreboard *
scoreboard_open(int fd, int *out_fd)
{
    if (fd < 0)
        return create(out_fd);
    *out_fd = fd;
    return adopt(fd);
}

uint32_t
scoreboard_nslots(const struct scoreboard *p)
{
    uint32_t n = __atomic_load_n(&p->nslots, __ATOMIC_RELAXED);

    return n < SCOREBOARD_SLOTS_MAX ? n : SCOREBOARD_SLOTS_MAX;
}

void
scoreboard_name_providers(struct scoreboard *p, const char *const *names,
                          size_t n)
{
    for (size_t i = 0; i < n && i < SCOREBOARD_PROVIDERS; i++) {
        struct scoreboard_provider *pr = &p->providers[i];

        if (strncmp(pr->name, names[i], sizeof(pr->name)) == 0)
            continue;
        memset(pr, 0, sizeof(*pr));
        snprintf(pr->name, sizeof(pr->name), "%s", names[i]);
    }
}

void
scoreboard_count_states(const struct scoreboard *p,
                        enum scoreboard_role role,
                        unsigned n[SCOREBOARD_STATES])
{
    uint32_t nslots = scoreboard_nslots(p);

    memset(n, 0, SCOREBOARD_STATES * sizeof(*n));
    for (uint32_t i = 0; i < nslots; i++) {
        const struct scoreboard_slot *s = scoreboard_slot(p, i);
        int state = __atomic_load_n(&s->state, __ATOMIC_RELAXED);

        if (s->pid != 0 && s->role == (int)role && state >= 0 &&
            state < SCOREBOARD_STATES)
            n[state]++;
    }
}

void
scoreboard_add(uint64_t *counter, uint64_t n)
{
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

void
scoreboard_take_one(uint64_t *counter)
{
    uint64_t seen = __atomic_load_n(counter, __ATOMIC_RELAXED);

    while (seen > 0 &&
           !__atomic_compare_exchange_n(counter, &seen, seen - 1, 1,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

int
scoreboard_in_request(const struct scoreboard_slot *s)
{
    int state = __atomic_load_n(&s->state, __ATOMIC_RELAXED);

    return s->role == SCOREBOARD_CHAT && state >= SCOREBOARD_READING &&
           state < SCOREBOARD_STATES;
}

uint64_t
scoreboard_read(const uint64_t *counter)
{
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

void
scoreboard_set_state(struct scoreboard_slot *s, enum scoreboard_state state)
{
    __atomic_store_n(&s->state, (int)state, __ATOMIC_RELAXED);
}

static void
raise_max_active(struct scoreboard *p)
{
    uint64_t active = __atomic_add_fetch(&p->active_chat, 1,
                                         __ATOMIC_RELAXED);
    uint64_t seen = scoreboard_read(&p->max_active);

    while (active > seen &&
           !__atomic_compare_exchange_n(&p->max_active, &seen, active, 1,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

void
scoreboard_request_begin(struct scoreboard *p, struct scoreboard_slot *s,
                         const char *method, const char *route,
                         const char *request_id)
{
    snprintf(s->request, sizeof(s->request), "%s %.40s req=%s", method,
             route, request_id);
    s->request_at_ms = clock_wall_ms();
    scoreboard_set_state(s, SCOREBOARD_READING);
    scoreboard_add(&p->accepted, 1);
    if (s->role == SCOREBOARD_CHAT)
        raise_max_active(p);
}

static void
observe(struct scoreboard_histogram *h, double ms)
{
    size_t b = 0;

    while (b < SCOREBOARD_BUCKETS - 1 && ms > bucket_bounds_ms[b])
        b++;
    scoreboard_add(&h->buckets[b], 1);
    scoreboard_add(&h->count, 1);
    scoreboard_add(&h->sum_us, ms > 0 ? (uint64_t)(ms * 1000.0) : 0);
}

void
scoreboard_request_end(struct scoreboard *p, struct scoreboard_slot *s,
                       int status, double total_ms, double redis_ms,
                       double upstream_ms)
{
    scoreboard_add(&p->by_status[scoreboard_status_index(status)], 1);
    observe(&p->total, total_ms);
    if (redis_ms > 0)
        observe(&p->redis, redis_ms);
    if (upstream_ms > 0)
        observe(&p->upstream, upstream_ms);
    s->requests++;
    s->request_at_ms = 0;
    /* Idle first: a worker that dies in between stays counted (one too
     * many), where the other order would let the master take it off
     * twice. */
    scoreboard_set_state(s, SCOREBOARD_IDLE);
    if (s->role == SCOREBOARD_CHAT)
        scoreboard_take_one(&p->active_chat);
}

void
scoreboard_count_upstream_error(struct scoreboard *p,
                                enum scoreboard_upstream_error k)
{
    scoreboard_add(&p->upstream_errors[k], 1);
}

void
scoreboard_count_tool(struct scoreboard *p, size_t tool, unsigned outcome,
                      double ms)
{
    if (tool >= SCOREBOARD_TOOLS || outcome >= SCOREBOARD_TOOL_OUTCOMES)
        return;
    scoreboard_add(&p->tool_calls[tool][outcome], 1);
    if (ms > 0)
        observe(&p->tool_latency, ms);
}

enum scoreboard_status_index
scoreboard_status_index(int status)
{
    switch (status) {
#define X(code)                                                                \
    case code:                                                                 \
        return SCOREBOARD_STATUS_##code;
        SCOREBOARD_STATUS_CODES
#undef X
    }
    return SCOREBOARD_STATUS_OTHER;
}

int
scoreboard_status_code(enum scoreboard_status_index i)
{
    static const int codes[] = {
#define X(code) code,
        SCOREBOARD_STATUS_CODES
#undef X
    };

    return i < SCOREBOARD_STATUS_OTHER ? codes[i] : 0;
}

const char *
scoreboard_state_name(enum scoreboard_state state)
{
    return state < SCOREBOARD_STATES ? state_names[state] : "unknown";
}

unsigned
scoreboard_bucket_bound_ms(size_t i)
{
    return i < SCOREBOARD_BUCKETS - 1 ? bucket_bounds_ms[i] : 0;
}
