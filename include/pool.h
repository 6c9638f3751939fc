/*
 * pool: the process manager's arithmetic, without processes or clocks of
 * its own: when a starting pool counts as whole, and how many workers a
 * dynamic pool forks or retires now. master.c feeds it the counts it
 * reads from the scoreboard and acts on the answers.
 */
#ifndef CHATFCGI_POOL_H
#define CHATFCGI_POOL_H

/* Forks of one round of a dynamic pool's growth, at most: it doubles
 * from 1 while connections keep waiting for a worker. */
#define POOL_SPAWN_RATE_MAX 1024

enum pool_readiness {
    POOL_NOT_YET,  /* keep waiting */
    POOL_WHOLE,    /* every worker of the pool accepts */
    POOL_PARTIAL,  /* the deadline passed with some of them accepting */
    POOL_EMPTY,    /* the deadline passed with none accepting */
};

/* up of the want workers that make the pool whole accept connections,
 * serving of them chat workers, at now_ms. A pool not whole by
 * deadline_ms is partial, or empty when no chat worker accepts (a control
 * worker alone serves no chat). */
enum pool_readiness pool_readiness(unsigned up, unsigned want,
                                   unsigned serving, double now_ms,
                                   double deadline_ms);

/* The chat workers of the current generation, by what they do. */
struct pool_counts {
    unsigned total;    /* forked and not told to stop */
    unsigned idle;     /* accepting, no request in hand */
    unsigned starting; /* forked, not accepting yet */
};

/* pm = dynamic, the limits of the configuration. */
struct pool_limits {
    unsigned min_spare;
    unsigned max_spare;
    unsigned most; /* workers */
};

/* How many chat workers to fork now. waiting: connections wait in the
 * listen queue. While they wait and no worker is idle or starting, the
 * pool is short by a number nobody knows (a unix socket does not tell its
 * queue's length): fork *rate workers, at least min_spare, and double the
 * rate for the next round, up to POOL_SPAWN_RATE_MAX. A round ends when
 * the workers it forked accept and take their connections: while some
 * still start, nothing more is forked, so the pool overshoots a burst by
 * less than one round. PHP-FPM doubles its rate the same way, but one
 * round a second and at most 32 at a time (pm.max_spawn_rate). Short of
 * spare workers only: fork what is missing. Once nothing waits and no
 * worker starts, the rate is back to 1. Never beyond most (the rate is
 * back to 1 there too). */
unsigned pool_grow(const struct pool_counts *n, int waiting,
                   const struct pool_limits *l, unsigned *rate);

/* The processes a pool of `workers` may run at once: during a reload the
 * previous generation finishes beside the new one, each with its control
 * worker, and the master. */
unsigned long pool_processes_needed(unsigned workers);

/* How many idle chat workers to retire: those over max_spare. */
unsigned pool_shrink(const struct pool_counts *n,
                     const struct pool_limits *l);

/* How often, in ms, a chat worker waiting in accept() wakes to look
 * around (the listening socket's SO_RCVTIMEO), in a pool where up to
 * `waiting` workers wait at once. A worker no longer wakes to see whether
 * the master is alive (the kernel tells it), nor for a stop (the signal
 * ends the wait). What is left needs one worker anywhere in the pool, not
 * each of them: a connection whose wake-up went to a worker that a signal
 * was stopping waits for the next worker to wake. So the pool as a whole
 * wakes about POOL_WAKES_PER_S times a second: a worker every waiting /
 * POOL_WAKES_PER_S seconds, from 1 s (small pools, as before) up to 60 s.
 * Measured: 4,000 idle workers that each woke every second took 7% of a
 * core. */
#define POOL_WAKES_PER_S 100
unsigned pool_idle_wake_ms(unsigned waiting);

#endif
