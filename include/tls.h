/*
 * tls: TLS set up once for the pool, before fork, so that a burst of calls
 * to an HTTPS provider from a thousand workers costs what one call costs.
 *
 * - Trust: the master parses the trusted CAs (the system's bundle, or a
 *   ca_file/ca_path) into one X509_STORE per distinct setting; every
 *   worker's connections use it, shared copy-on-write, instead of each
 *   process parsing the bundle again (tens of ms of CPU and about a MiB).
 * - Sessions: the master makes a handshake with each provider at start
 *   (tls_prime), and whichever process gets a TLS session later publishes
 *   it in shared memory; every worker resumes it, so a worker's first
 *   call is an abbreviated handshake (no certificate chain to verify).
 * - Bursts: full handshakes to one provider are bounded across the pool
 *   (tls_handshakes); a worker that would need one waits, its time not
 *   counted against the provider, until a slot or a session frees it.
 *
 * This needs libcurl built on OpenSSL (Debian's libcurl4-openssl-dev); with
 * another TLS backend, tls_init says so and curl's own defaults apply.
 */
#ifndef CHATFCGI_TLS_H
#define CHATFCGI_TLS_H

#include <curl/curl.h>
#include <stddef.h>
#include <stdint.h>

#include "conf.h"

/* The peer of tool calls: [upstream]'s trust, no shared session. */
#define TLS_TOOLS CONF_PROVIDERS_MAX

/* In the master, before the workers fork (again after a reload's exec):
 * the CA stores of [upstream], each provider, and the shared memory of
 * sessions. Returns 0, or -1 with err set (a CA file that cannot be
 * loaded). A later call replaces what an earlier one set up. */
int tls_init(const struct conf *c, char err[CONF_ERR_LEN]);
void tls_cleanup(void);

/* In the master, after tls_init and before the workers fork: one
 * handshake with each HTTPS provider (CONNECT_ONLY: no request), bounded
 * by its connect_timeout_ms and at most 2 s. Its session is published for
 * the pool and kept decoded, so every worker's first call resumes it
 * without parsing the provider's certificates; and what OpenSSL builds for
 * a handshake is built here once, shared copy-on-write, not in each
 * worker. A provider that cannot be reached is logged, and the first
 * worker to call it makes the full handshake, as without this. */
void tls_prime(const struct conf *c);

/* What chatfcgi -t and a reload check: every ca_file and ca_path can be
 * loaded. Returns 0, or -1 with err set. */
int tls_check(const struct conf *c, char err[CONF_ERR_LEN]);

/* The TLS handshake of one transfer's new connection, as far as it got. */
struct tls_handshake {
    size_t peer; /* a provider's index, or TLS_TOOLS */
    int done;
};

/* Have easy handle e, before a transfer to h->peer, use the pool's CA
 * store and, for a provider, its shared session; h (which must outlive
 * e's connections: the caller's reused struct) learns how far a new
 * connection's handshake got. Nothing when tls_init has not run or could
 * not apply. */
void tls_use(CURL *e, struct tls_handshake *h);

/* Before a call to provider p: 1 when it may start now (no full handshake
 * needed, or one of the pool's tls_handshakes slots taken for it), 0 when
 * it must wait and ask again. */
int tls_admit(size_t p);

/* After a call to provider p ended: give back a slot it still holds. */
void tls_release(size_t p);

/* The TLS handshakes this process has completed so far (with anyone):
 * one leaves the heap with what it built and dropped (about 30 KiB that
 * malloc_trim gives back). */
unsigned long tls_handshakes_here(void);

/* The pool's handshakes with provider p so far. */
struct tls_counts {
    uint64_t full;
    uint64_t resumed;
};
void tls_counts(size_t p, struct tls_counts *out);

#endif
