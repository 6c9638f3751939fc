/* pool: when a pool is whole; how many workers to fork or retire. */
#include "pool.h"

enum pool_readiness
pool_readiness(unsigned up, unsigned want, unsigned serving, double now_ms,
               double deadline_ms)
{
    if (up >= want)
        return POOL_WHOLE;
    if (now_ms < deadline_ms)
        return POOL_NOT_YET;
    return serving > 0 ? POOL_PARTIAL : POOL_EMPTY;
}

unsigned
pool_grow(const struct pool_counts *n, int waiting,
          const struct pool_limits *l, unsigned *rate)
{
    unsigned spare = n->idle + n->starting, room, want = 0;

    room = n->total < l->most ? l->most - n->total : 0;
    if (*rate < 1)
        *rate = 1;
    if (waiting && spare == 0) {
        want = *rate > l->min_spare ? *rate : l->min_spare;
        if (*rate < POOL_SPAWN_RATE_MAX)
            *rate *= 2;
    } else if (spare < l->min_spare) {
        want = l->min_spare - spare;
    } else if (!waiting && n->starting == 0) {
        *rate = 1; /* the burst is met: the next one starts over */
    }
    if (want >= room) {
        want = room;
        *rate = 1; /* at the top: the next shortage starts over */
    }
    return want;
}

unsigned long
pool_processes_needed(unsigned workers)
{
    return 2 * ((unsigned long)workers + 1) + 1;
}

unsigned
pool_shrink(const struct pool_counts *n, const struct pool_limits *l)
{
    return n->idle > l->max_spare ? n->idle - l->max_spare : 0;
}

unsigned
pool_idle_wake_ms(unsigned waiting)
{
    enum { FLOOR_MS = 1000, CEILING_MS = 60000 };
    unsigned long ms = (unsigned long)waiting * 1000 / POOL_WAKES_PER_S;

    if (ms < FLOOR_MS)
        return FLOOR_MS;
    return ms > CEILING_MS ? CEILING_MS : (unsigned)ms;
}
