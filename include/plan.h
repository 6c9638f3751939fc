/*
 * plan: which model provider an llm call asks next, and when. A round
 * tries the providers in order, skipping those that cool down; a failed
 * round is retried after an exponential backoff with jitter, or after the
 * Retry-After a provider asked for, within the request's deadline. It also
 * keeps each provider's health in the scoreboard, shared by the pool: a
 * provider failing cooldown_failures times in a row is skipped by every
 * worker for cooldown_s. No I/O; llm runs what the plan decides.
 */
#ifndef CHATFCGI_PLAN_H
#define CHATFCGI_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "answer.h"
#include "conf.h"

struct scoreboard_provider;

struct plan {
    const struct conf *conf;
    struct scoreboard_provider *health; /* one per provider, or NULL */
    uint64_t *rng;          /* the jitter's state, the caller's */
    size_t order[CONF_PROVIDERS_MAX];
    size_t n, next;         /* providers of this round; the next to try */
    long long round;        /* 0, then one per retry */
    double retry_at_ms;     /* the next round's start; 0: none pending */
    double retry_after_ms;  /* the longest wait a provider asked for */
    int retryable;          /* a failure of this round is worth a retry */
    int done;               /* nothing more to try */
};

/* Round 0. health may be NULL (no shared health: no cooldowns). */
void plan_begin(struct plan *p, const struct conf *c,
                struct scoreboard_provider *health, uint64_t *rng);

/* The next round, after retry_at_ms has come. */
void plan_next_round(struct plan *p);

/* 1 while the round has a provider left to try. */
int plan_has_next(const struct plan *p);

/* The round's next provider (an index into conf->providers). */
size_t plan_take(struct plan *p);

/* The provider plan_take would give, without taking it. */
size_t plan_peek(const struct plan *p);

/* A failed request to a provider: remembers whether a retry is worth it
 * and how long the provider asked to wait; a failure the request caused
 * itself (a 4xx other than 408 and 429) ends the plan. */
void plan_failed(struct plan *p, enum answer_status status, long http_status,
                 long retry_after_s);

/* Every request of the round failed: set retry_at_ms for the next round,
 * or end the plan when no failure was worth a retry, the retries are
 * spent, or the wait would pass deadline_ms (0: none). */
void plan_schedule_retry(struct plan *p, double now_ms, double deadline_ms);

/* The wait before retry round round + 1: retry_base_ms * 2^round, then
 * half to all of it (jitter), at most PLAN_BACKOFF_MAX_MS. */
#define PLAN_BACKOFF_MAX_MS 5000.0
double plan_backoff_ms(const struct conf *c, long long round, uint64_t *rng);

/* Provider health, in the scoreboard. */
int plan_cooling_down(const struct plan *p, size_t provider);
void plan_note_success(struct plan *p, size_t provider, int hedge);
void plan_note_failure(struct plan *p, size_t provider,
                       enum answer_status status, const char *why);

/* A failure that is not the provider's doing (its TLS handshake timed out
 * while this host was short of CPU, as in a burst): counted among its
 * errors, never toward its cooldown. */
void plan_note_local_failure(struct plan *p, size_t provider,
                             enum answer_status status);

/* Count a request started to provider (a retry, a hedge) in its health. */
void plan_note_start(struct plan *p, size_t provider, int hedge);

#endif
