/*
 * clock: the two clocks chatfcgi reads. Durations and deadlines use the
 * monotonic clock (no jump when the time is set); what other processes
 * compare (the scoreboard's request start, cooldowns, nginx's $msec) uses
 * the wall clock.
 */
#ifndef CHATFCGI_CLOCK_H
#define CHATFCGI_CLOCK_H

#include <stdint.h>

/* Milliseconds on the monotonic clock. */
double clock_ms(void);

/* Milliseconds since the epoch. */
int64_t clock_wall_ms(void);

#endif
