/* tls: the pool's CA stores and TLS sessions, set up before fork. */
#include "tls.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"

#define SESSION_MAX 8192  /* DER of one session with its ticket */
#define HOLD_MAX_MS 30000 /* a slot held longer was lost by its holder */
/* TLS 1.3 sends the session after the handshake: the slot stays taken
 * this long for it, so that the workers waiting resume it instead of
 * making full handshakes of their own. */
#define TICKET_GRACE_MS 250
#define LOCK_TRIES 100
/* The master's handshake with a provider gives up after the provider's
 * connect_timeout_ms, or this, whichever is less: a provider down at
 * start delays the pool by no more. */
#define PRIME_MAX_MS 2000
#define NPEERS (CONF_PROVIDERS_MAX + 1)

/* A worker doing a full handshake with the provider. */
struct holder {
    pid_t pid;          /* 0: free */
    int64_t expires_ms; /* wall clock; 0 while being taken or given back */
};

/* Per provider, in memory shared by the pool. */
struct shared_peer {
    uint32_t lock; /* guards len, der and generation */
    uint32_t len;  /* of der; 0: no session yet */
    uint32_t generation; /* sessions published so far */
    unsigned char der[SESSION_MAX];
    struct holder holders[CONF_TLS_HANDSHAKES_MAX];
    uint64_t full, resumed;
};

/* Per peer, in each process. */
struct peer {
    X509_STORE *store;          /* NULL: curl's own defaults */
    struct shared_peer *shared; /* NULL: tool calls */
    int https;
    int warm; /* a handshake completed here: curl keeps its session */
    int held; /* 1 + the slot this process holds; 0: none */
    /* The master's session, which the workers inherit already decoded:
     * theirs to resume while it is the one published (primed_generation). */
    SSL_SESSION *primed;
    uint32_t primed_generation;
};

static struct {
    int ready;
    int peer_index;      /* of the peer in an SSL_CTX's ex_data */
    int handshake_index; /* of the tls_handshake */
    long bound;   /* tls_handshakes */
    struct peer peers[NPEERS];
    struct shared_peer *shared; /* CONF_PROVIDERS_MAX of them */
    int (*curl_new_session)(SSL *, SSL_SESSION *);
    unsigned long handshakes_here;
    int priming; /* the master's handshakes: keep their sessions */
} tls;

/* ---------------------------------------------------------------- stores */

/* Every PEM file of dir, now: OpenSSL's own directory lookup would read
 * them later, in the workers, which may not be allowed to. Returns how
 * many files gave certificates. */
static int
load_dir(X509_STORE *st, const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[PATH_MAX];
    int loaded = 0;

    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' ||
            snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >=
                (int)sizeof(path))
            continue;
        loaded += X509_STORE_load_file(st, path) == 1;
    }
    closedir(d);
    ERR_clear_error(); /* the files that were no certificates */
    return loaded;
}

static X509_STORE *
load_store(const char *file, const char *dir, char err[CONF_ERR_LEN])
{
    X509_STORE *st = X509_STORE_new();

    if (st == NULL) {
        snprintf(err, CONF_ERR_LEN, "out of memory");
        return NULL;
    }
    if ((file[0] != '\0' && !X509_STORE_load_file(st, file)) ||
        (dir[0] != '\0' && load_dir(st, dir) == 0)) {
        snprintf(err, CONF_ERR_LEN, "cannot load the CA certificates of "
                 "%s: no PEM certificate can be read there",
                 file[0] != '\0' ? file : dir);
        X509_STORE_free(st);
        return NULL;
    }
    /* What curl sets on every connection's store, set once here. */
    X509_STORE_set_flags(st, X509_V_FLAG_TRUSTED_FIRST |
                                 X509_V_FLAG_PARTIAL_CHAIN);
    return st;
}

/* The CAs curl would trust by default: its bundle (Debian: the
 * ca-certificates one), else its directory, which holds the same
 * certificates; NULL, with a warning, when they cannot be read, so that
 * curl's own message says why a call fails. */
static X509_STORE *
system_store(void)
{
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
    char err[CONF_ERR_LEN];
    X509_STORE *st;

    if (v->cainfo != NULL && access(v->cainfo, R_OK) == 0)
        st = load_store(v->cainfo, "", err);
    else
        st = load_store("", v->capath ? v->capath : "", err);
    if (st == NULL)
        log_warnx("tls", "%s; calls use curl's defaults", err);
    return st;
}

static int
same(const char *a, const char *b)
{
    return strcmp(a, b) == 0;
}

/* The store of CAs file and dir: one already loaded for the same pair, or
 * a new one; the system's when both are "". */
static X509_STORE *
store_for(const char *file, const char *dir, const char *const *files,
          const char *const *dirs, size_t n, char err[CONF_ERR_LEN])
{
    for (size_t i = 0; i < n; i++) {
        X509_STORE *st = tls.peers[i].store;

        if (same(files[i], file) && same(dirs[i], dir) &&
            (st == NULL || X509_STORE_up_ref(st)))
            return st;
    }
    if (file[0] == '\0' && dir[0] == '\0')
        return system_store();
    return load_store(file, dir, err);
}

static int
is_https(const char *url)
{
    return strncmp(url, "https://", 8) == 0;
}

static int
any_https(const struct conf *c)
{
    for (size_t i = 0; i < c->nproviders; i++)
        if (is_https(c->providers[i].url))
            return 1;
    for (size_t i = 0; i < c->ntools; i++)
        if (is_https(c->tools[i].url))
            return 1;
    return 0;
}

/* The CA settings of provider i, or of the tools (i == nproviders:
 * [upstream]'s). Returns the peer's index in tls.peers. */
static size_t
cas_of(const struct conf *c, size_t i, const char **file, const char **dir)
{
    int tools = i == c->nproviders;

    *file = tools ? c->upstream.ca_file : c->providers[i].ca_file;
    *dir = tools ? c->upstream.ca_path : c->providers[i].ca_path;
    return tools ? TLS_TOOLS : i;
}

/* A store per peer (the tools' last, with [upstream]'s CAs); a CA file
 * that cannot be read is an error even when no URL is https yet. */
static int
load_stores(const struct conf *c, char err[CONF_ERR_LEN])
{
    const char *files[NPEERS], *dirs[NPEERS];
    int needed = any_https(c);

    for (size_t n = 0; n <= c->nproviders; n++) {
        size_t peer = cas_of(c, n, &files[n], &dirs[n]);
        int configured = files[n][0] != '\0' || dirs[n][0] != '\0';

        if (!needed && !configured)
            continue;
        tls.peers[peer].store =
            store_for(files[n], dirs[n], files, dirs, n, err);
        if (tls.peers[peer].store == NULL && configured)
            return -1;
    }
    return 0;
}

int
tls_check(const struct conf *c, char err[CONF_ERR_LEN])
{
    for (size_t i = 0; i <= c->nproviders; i++) {
        const char *file, *dir;
        X509_STORE *st;

        cas_of(c, i, &file, &dir);
        if (file[0] == '\0' && dir[0] == '\0')
            continue;
        st = load_store(file, dir, err);
        if (st == NULL)
            return -1;
        X509_STORE_free(st);
    }
    return 0;
}

/* ------------------------------------------------------- shared sessions */

static int
lock(uint32_t *l)
{
    for (int i = 0; i < LOCK_TRIES; i++) {
        if (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE) == 0)
            return 1;
        sched_yield();
    }
    return 0; /* its holder is not running: do without */
}

static void
unlock(uint32_t *l)
{
    __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

/* Returns the session's generation, or 0 when it was not published. */
static uint32_t
publish(struct shared_peer *s, SSL_SESSION *sess)
{
    unsigned char der[SESSION_MAX], *w = der;
    int len = i2d_SSL_SESSION(sess, NULL);
    uint32_t generation;

    if (len <= 0 || len > SESSION_MAX || !SSL_SESSION_is_resumable(sess) ||
        i2d_SSL_SESSION(sess, &w) != len || !lock(&s->lock))
        return 0;
    memcpy(s->der, der, (size_t)len);
    __atomic_store_n(&s->len, (uint32_t)len, __ATOMIC_RELEASE);
    generation = __atomic_add_fetch(&s->generation, 1, __ATOMIC_RELEASE);
    unlock(&s->lock);
    return generation;
}

/* The published session, or NULL. */
static SSL_SESSION *
take_published(struct shared_peer *s)
{
    unsigned char der[SESSION_MAX];
    const unsigned char *r = der;
    uint32_t len;

    if (__atomic_load_n(&s->len, __ATOMIC_ACQUIRE) == 0 || !lock(&s->lock))
        return NULL;
    len = s->len;
    memcpy(der, s->der, len);
    unlock(&s->lock);
    return d2i_SSL_SESSION(NULL, &r, (long)len);
}

/* ------------------------------------------------------ handshake slots */

static int
lost(const struct holder *h, pid_t pid, int64_t now)
{
    int64_t expires = __atomic_load_n(&h->expires_ms, __ATOMIC_RELAXED);

    return (expires != 0 && now > expires) ||
           (kill(pid, 0) == -1 && errno == ESRCH);
}

static int
take_slot(struct peer *p)
{
    int64_t now = clock_wall_ms();

    for (long i = 0; i < tls.bound; i++) {
        struct holder *h = &p->shared->holders[i];
        pid_t pid = __atomic_load_n(&h->pid, __ATOMIC_ACQUIRE);

        if (pid != 0 && !lost(h, pid, now))
            continue;
        if (__atomic_compare_exchange_n(&h->pid, &pid, getpid(), 0,
                                        __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED)) {
            __atomic_store_n(&h->expires_ms, now + HOLD_MAX_MS,
                             __ATOMIC_RELAXED);
            p->held = (int)i + 1;
            return 1;
        }
    }
    return 0;
}

/* Free the slot this process holds, unless it expired and another
 * worker has taken it since. */
static void
give_back(struct peer *p)
{
    pid_t me;
    struct holder *h;

    if (!p->held)
        return; /* the usual case: no getpid() for nothing */
    me = getpid();
    h = &p->shared->holders[p->held - 1];
    p->held = 0;
    if (__atomic_load_n(&h->pid, __ATOMIC_ACQUIRE) != me)
        return;
    __atomic_store_n(&h->expires_ms, 0, __ATOMIC_RELAXED);
    __atomic_compare_exchange_n(&h->pid, &me, 0, 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_RELAXED);
}

/* The handshake is done, its session may follow: the slot frees itself
 * TICKET_GRACE_MS from now, or when the session is published. */
static void
expire_soon(struct peer *p)
{
    if (p->held)
        __atomic_store_n(&p->shared->holders[p->held - 1].expires_ms,
                         clock_wall_ms() + TICKET_GRACE_MS,
                         __ATOMIC_RELAXED);
}

/* ------------------------------------------------------ OpenSSL's hooks */

static void *
ex_data(const SSL *ssl, int index)
{
    return SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), index);
}

/* A handshake starts: without a session of curl's own, resume the pool's.
 * OpenSSL reads the session as it writes the ClientHello, after this.
 * The master's is taken as it is: decoding a session costs a worker the
 * parse of the provider's certificate chain. */
static void
resume_published(struct peer *p, SSL *ssl)
{
    SSL_SESSION *sess;

    if (SSL_get_session(ssl) != NULL)
        return;
    if (p->primed != NULL &&
        __atomic_load_n(&p->shared->generation, __ATOMIC_ACQUIRE) ==
            p->primed_generation) {
        SSL_set_session(ssl, p->primed);
        return;
    }
    sess = take_published(p->shared);
    if (sess == NULL)
        return;
    SSL_set_session(ssl, sess);
    SSL_SESSION_free(sess);
}

static void
on_info(const SSL *ssl, int where, int ret)
{
    struct tls_handshake *h = ex_data(ssl, tls.handshake_index);
    struct peer *p = ex_data(ssl, tls.peer_index);

    (void)ret;
    if (h == NULL || p == NULL)
        return;
    if (where & SSL_CB_HANDSHAKE_START) {
        /* The SSL is curl's, not yet connecting: ours to prepare. */
        if (p->shared != NULL)
            resume_published(p, (SSL *)ssl);
    } else if ((where & SSL_CB_HANDSHAKE_DONE) && !h->done) {
        h->done = 1;
        tls.handshakes_here++;
        if (p->shared == NULL)
            return;
        p->warm = 1;
        if (SSL_session_reused(ssl)) {
            __atomic_add_fetch(&p->shared->resumed, 1, __ATOMIC_RELAXED);
            give_back(p); /* a session was out before it: none to wait for */
            return;
        }
        __atomic_add_fetch(&p->shared->full, 1, __ATOMIC_RELAXED);
        expire_soon(p);
    }
}

/* A session from the provider (TLS 1.3: a ticket after the handshake):
 * published for the pool, then passed on to curl's own cache. */
static int
on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    struct peer *p = ex_data(ssl, tls.peer_index);

    if (p != NULL && p->shared != NULL) {
        uint32_t generation = publish(p->shared, sess);

        give_back(p);
        if (tls.priming && generation != 0) {
            SSL_SESSION_free(p->primed);
            SSL_SESSION_up_ref(sess);
            p->primed = sess;
            p->primed_generation = generation;
        }
    }
    return tls.curl_new_session ? tls.curl_new_session(ssl, sess) : 0;
}

/* A new connection of curl's: its SSL_CTX is its own, ours to set up. */
static CURLcode
on_ssl_ctx(CURL *e, void *ssl_ctx, void *arg)
{
    SSL_CTX *ctx = ssl_ctx;
    struct tls_handshake *h = arg;
    struct peer *p = &tls.peers[h->peer];

    (void)e;
    SSL_CTX_set1_cert_store(ctx, p->store);
    /* curl turns TLS 1.2 tickets off, leaving only session ids, which a
     * provider without a server-side cache (nginx's default) or behind
     * a load balancer never resumes: every worker paid a full handshake.
     * A ticket is what lets a session made by one worker serve all. */
    SSL_CTX_clear_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_ex_data(ctx, tls.peer_index, p);
    SSL_CTX_set_ex_data(ctx, tls.handshake_index, h);
    SSL_CTX_set_info_callback(ctx, on_info);
    if (p->shared != NULL) {
        tls.curl_new_session = SSL_CTX_sess_get_new_cb(ctx);
        SSL_CTX_sess_set_new_cb(ctx, on_new_session);
    }
    return CURLE_OK;
}

/* ------------------------------------------------------------ interface */

static int
curl_uses_openssl(void)
{
    const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);

    return v->ssl_version != NULL &&
           strncmp(v->ssl_version, "OpenSSL/", 8) == 0;
}

static int
map_shared(void)
{
    size_t size = CONF_PROVIDERS_MAX * sizeof(struct shared_peer);
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    if (m == MAP_FAILED)
        return -1;
    tls.shared = m;
    return 0;
}

/* OpenSSL's algorithms and tables, fetched once here and inherited by
 * every worker instead of each fetching them on its first call. */
static void
warm_openssl(void)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

    if (ctx != NULL)
        SSL_free(SSL_new(ctx));
    SSL_CTX_free(ctx);
}

int
tls_init(const struct conf *c, char err[CONF_ERR_LEN])
{
    tls_cleanup();
    if (!curl_uses_openssl()) {
        log_warnx("tls", "libcurl is not built on OpenSSL: every worker "
                  "loads its CAs and makes its TLS sessions itself");
        return 0;
    }
    tls.peer_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    tls.handshake_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL,
                                                   NULL);
    if (tls.peer_index < 0 || tls.handshake_index < 0 ||
        map_shared() == -1) {
        snprintf(err, CONF_ERR_LEN, "cannot set up TLS: out of memory");
        return -1;
    }
    if (load_stores(c, err) == -1) {
        tls_cleanup();
        return -1;
    }
    tls.bound = (long)c->upstream.tls_handshakes;
    for (size_t i = 0; i < c->nproviders; i++) {
        tls.peers[i].shared = &tls.shared[i];
        tls.peers[i].https = is_https(c->providers[i].url);
    }
    warm_openssl();
    tls.ready = 1;
    return 0;
}

/* A TLS 1.3 provider sends its session after the handshake, where curl
 * with CONNECT_ONLY reads nothing: read once it is there (OpenSSL takes
 * the session in, and finds no data), or give up after TICKET_GRACE_MS. */
static void
await_session(CURL *e)
{
    curl_socket_t fd;
    struct pollfd ready;
    char byte;
    size_t n;

    if (curl_easy_getinfo(e, CURLINFO_ACTIVESOCKET, &fd) != CURLE_OK ||
        fd == CURL_SOCKET_BAD)
        return;
    ready = (struct pollfd){.fd = fd, .events = POLLIN};
    if (poll(&ready, 1, TICKET_GRACE_MS) == 1)
        curl_easy_recv(e, &byte, sizeof(byte), &n);
}

/* The master's handshake with provider i (no request), whose session
 * on_new_session publishes and keeps (tls.priming); the log says how it
 * went. */
static void
prime(const struct conf_provider *cp, size_t i)
{
    struct tls_handshake h = {.peer = i};
    char why[CURL_ERROR_SIZE] = "";
    long timeout_ms = cp->connect_timeout_ms < PRIME_MAX_MS
                          ? (long)cp->connect_timeout_ms
                          : PRIME_MAX_MS;
    CURL *e = curl_easy_init();
    CURLcode rc;

    if (e == NULL)
        return;
    curl_easy_setopt(e, CURLOPT_URL, cp->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, why);
    tls_use(e, &h);
    rc = curl_easy_perform(e);
    if (rc == CURLE_OK && tls.peers[i].primed == NULL)
        await_session(e);
    curl_easy_cleanup(e);
    if (rc != CURLE_OK)
        log_warnx("tls", "no session made with provider %s at start (%s): "
                  "a worker's first call makes the handshake", cp->name,
                  why[0] != '\0' ? why : curl_easy_strerror(rc));
    else if (tls.peers[i].primed == NULL)
        log_info("tls", "provider %s gave no session to resume: each "
                 "worker makes its own handshake", cp->name);
    else
        log_info("tls", "session made with provider %s at start: the "
                 "workers' first calls resume it", cp->name);
}

void
tls_prime(const struct conf *c)
{
    if (!tls.ready)
        return;
    tls.priming = 1;
    for (size_t i = 0; i < c->nproviders; i++) {
        if (!tls.peers[i].https)
            continue;
        prime(&c->providers[i], i);
        /* Each worker starts with no connection of its own, and so with
         * no handshake: the bound on full handshakes applies to it. */
        tls.peers[i].warm = 0;
    }
    tls.priming = 0;
    tls.handshakes_here = 0;
}

void
tls_cleanup(void)
{
    for (size_t i = 0; i < NPEERS; i++) {
        X509_STORE_free(tls.peers[i].store);
        SSL_SESSION_free(tls.peers[i].primed);
    }
    if (tls.shared != NULL)
        munmap(tls.shared, CONF_PROVIDERS_MAX * sizeof(struct shared_peer));
    memset(&tls, 0, sizeof(tls));
}

void
tls_use(CURL *e, struct tls_handshake *h)
{
    h->done = 0;
    if (!tls.ready || tls.peers[h->peer].store == NULL)
        return;
    /* curl loads no CA file of its own, and caches no store across
     * handles: the peer's store is set by on_ssl_ctx. */
    curl_easy_setopt(e, CURLOPT_CAINFO, NULL);
    curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    curl_easy_setopt(e, CURLOPT_CA_CACHE_TIMEOUT, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, on_ssl_ctx);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_DATA, h);
}

int
tls_admit(size_t i)
{
    struct peer *p = &tls.peers[i];

    if (!tls.ready || p->shared == NULL || !p->https || p->warm ||
        p->held || __atomic_load_n(&p->shared->len, __ATOMIC_ACQUIRE) > 0)
        return 1;
    return take_slot(p);
}

void
tls_release(size_t i)
{
    if (tls.ready && tls.peers[i].shared != NULL)
        give_back(&tls.peers[i]);
}

unsigned long
tls_handshakes_here(void)
{
    return tls.handshakes_here;
}

void
tls_counts(size_t i, struct tls_counts *out)
{
    const struct shared_peer *s = tls.ready ? tls.peers[i].shared : NULL;

    out->full = s ? __atomic_load_n(&s->full, __ATOMIC_RELAXED) : 0;
    out->resumed = s ? __atomic_load_n(&s->resumed, __ATOMIC_RELAXED) : 0;
}
