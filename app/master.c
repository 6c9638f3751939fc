#include "master.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "conf.h"
#include "http.h"
#include "log.h"
#include "worker.h"

#define CRASH_WINDOW_MS 1000.0 /* a death sooner than this after start */
#define CRASH_BACKOFF_MS 1000.0
#define GRACEFUL_TIMEOUT_MS 120000.0
#define FAST_TIMEOUT_MS 5000.0
#define IDLE_WAIT_MS 1000.0

enum stop_mode { RUNNING, STOP_GRACEFUL, STOP_FAST };

struct slot {
    pid_t pid;           /* 0 when not running */
    double started_ms;
    double respawn_at_ms; /* when pid is 0: the time to fork again */
};

/* The identity workers run as and the socket's owner. */
struct identity {
    int switch_user;
    uid_t uid;
    gid_t gid;
    char user[64];
};

struct master {
    const struct conf *conf;
    int listen_fd;
    struct identity worker_id;
    struct slot *slots;
    size_t nslots;
    enum stop_mode stop;
    double stop_deadline_ms;
};

static int
lookup_identity(const char *user, const char *group, struct identity *id)
{
    struct passwd *pw;
    struct group *gr;

    memset(id, 0, sizeof(*id));
    if (user[0] == '\0')
        return 0;
    pw = getpwnam(user);
    if (pw == NULL) {
        log_error("master", "no such user '%s'", user);
        return -1;
    }
    id->switch_user = 1;
    id->uid = pw->pw_uid;
    id->gid = pw->pw_gid;
    snprintf(id->user, sizeof(id->user), "%s", user);
    if (group[0] == '\0')
        return 0;
    gr = getgrnam(group);
    if (gr == NULL) {
        log_error("master", "no such group '%s'", group);
        return -1;
    }
    id->gid = gr->gr_gid;
    return 0;
}

/* Owner and group of the unix socket: listen_owner/listen_group, else the
 * workers' identity; -1 leaves a part unchanged. */
static int
socket_owner(const struct master *m, uid_t *uid, gid_t *gid)
{
    const struct conf *c = m->conf;
    struct identity owner;

    *uid = m->worker_id.switch_user ? m->worker_id.uid : (uid_t)-1;
    *gid = m->worker_id.switch_user ? m->worker_id.gid : (gid_t)-1;
    if (c->listen_owner[0] == '\0' && c->listen_group[0] == '\0')
        return 0;
    if (lookup_identity(c->listen_owner[0] ? c->listen_owner : "root",
                        c->listen_group, &owner) == -1)
        return -1;
    if (c->listen_owner[0] != '\0')
        *uid = owner.uid;
    if (c->listen_group[0] != '\0')
        *gid = owner.gid;
    return 0;
}

/* A socket file left by a crashed run is removed; a live one is not. */
static int
clear_stale_socket(const struct sockaddr_un *sa)
{
    struct stat st;
    int fd, live;

    if (lstat(sa->sun_path, &st) == -1)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISSOCK(st.st_mode)) {
        errno = EEXIST;
        return -1;
    }
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd == -1)
        return -1;
    live = connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0;
    close(fd);
    if (live) {
        errno = EADDRINUSE;
        return -1;
    }
    return unlink(sa->sun_path);
}

static int
listen_unix(struct master *m, const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    uid_t uid;
    gid_t gid;
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        log_error("master", "socket path too long: %s", path);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (socket_owner(m, &uid, &gid) == -1)
        return -1;
    if (clear_stale_socket(&sa) == -1) {
        log_warn("master", "cannot use %s", path);
        return -1;
    }
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd == -1 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1 ||
        chmod(path, (mode_t)m->conf->listen_mode) == -1 ||
        ((uid != (uid_t)-1 || gid != (gid_t)-1) &&
         chown(path, uid, gid) == -1) ||
        listen(fd, (int)m->conf->listen_backlog) == -1) {
        log_warn("master", "cannot listen on %s", path);
        if (fd != -1)
            close(fd);
        return -1;
    }
    return fd;
}

static int
bind_tcp(const struct addrinfo *ai, int backlog)
{
    int one = 1;
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);

    if (fd == -1)
        return -1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) == -1 ||
        listen(fd, backlog) == -1) {
        close(fd);
        return -1;
    }
    return fd;
}

static int
listen_tcp(struct master *m, const char *spec)
{
    const char *colon = strrchr(spec, ':');
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE};
    struct addrinfo *res, *ai;
    char host[256];
    int fd = -1, rc;

    if (colon == NULL || (size_t)(colon - spec) >= sizeof(host)) {
        log_error("master", "listen must be a socket path or host:port, "
                  "not '%s'", spec);
        return -1;
    }
    /* "[::1]:9000" → "::1" */
    snprintf(host, sizeof(host), "%.*s", (int)(colon - spec), spec);
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = '\0';
    }
    rc = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (rc != 0) {
        log_error("master", "cannot resolve %s: %s", spec, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai != NULL && fd == -1; ai = ai->ai_next)
        fd = bind_tcp(ai, (int)m->conf->listen_backlog);
    freeaddrinfo(res);
    if (fd == -1)
        log_warn("master", "cannot listen on %s", spec);
    return fd;
}

static int
open_listener(struct master *m)
{
    const char *spec = m->conf->listen;

    return strchr(spec, '/') ? listen_unix(m, spec) : listen_tcp(m, spec);
}

static void
remove_listener(const struct master *m)
{
    if (strchr(m->conf->listen, '/') != NULL)
        unlink(m->conf->listen);
    close(m->listen_fd);
}

static int
write_pid_file(const char *path)
{
    char line[32];
    int fd, n;

    if (path[0] == '\0')
        return 0;
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd == -1) {
        log_warn("master", "cannot write pid file %s", path);
        return -1;
    }
    n = snprintf(line, sizeof(line), "%ld\n", (long)getpid());
    if (write(fd, line, (size_t)n) != n) {
        log_warn("master", "cannot write pid file %s", path);
        close(fd);
        return -1;
    }
    return close(fd);
}

static void
drop_privileges(const struct identity *id)
{
    if (!id->switch_user)
        return;
    if (setgroups(0, NULL) == -1 || initgroups(id->user, id->gid) == -1 ||
        setgid(id->gid) == -1 || setuid(id->uid) == -1)
        fatal("worker", "cannot switch to user %s: %s", id->user,
              strerror(errno));
    if (setuid(0) == 0)
        fatal("worker", "still able to regain root after switching user");
}

static void
spawn(struct master *m, size_t i)
{
    pid_t pid = fork();

    if (pid == -1) {
        log_warn("master", "cannot fork worker %zu", i);
        m->slots[i].respawn_at_ms = http_now_ms() + CRASH_BACKOFF_MS;
        return;
    }
    if (pid == 0) {
        drop_privileges(&m->worker_id);
        worker_main(m->conf, m->listen_fd, (int)i);
    }
    m->slots[i].pid = pid;
    m->slots[i].started_ms = http_now_ms();
    log_debug("master", "worker %zu started as pid %ld", i, (long)pid);
}

static struct slot *
slot_of(struct master *m, pid_t pid)
{
    for (size_t i = 0; i < m->nslots; i++)
        if (m->slots[i].pid == pid)
            return &m->slots[i];
    return NULL;
}

static void
log_exit(size_t i, pid_t pid, int status)
{
    if (WIFSIGNALED(status))
        log_error("master", "worker %zu (pid %ld) killed by signal %d", i,
                  (long)pid, WTERMSIG(status));
    else if (WEXITSTATUS(status) != 0)
        log_error("master", "worker %zu (pid %ld) exited with status %d", i,
                  (long)pid, WEXITSTATUS(status));
    else
        log_debug("master", "worker %zu (pid %ld) exited", i, (long)pid);
}

/* Reap every exited worker; schedule replacements while the pool runs. A
 * worker that fails right after starting waits before its replacement, so
 * a broken setup logs once a second instead of spinning. */
static void
reap(struct master *m)
{
    double now = http_now_ms();
    int status;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        struct slot *s = slot_of(m, pid);
        int failed = WIFSIGNALED(status) || WEXITSTATUS(status) != 0;

        if (s == NULL)
            continue;
        log_exit((size_t)(s - m->slots), pid, status);
        s->pid = 0;
        s->respawn_at_ms = now;
        if (failed && now - s->started_ms < CRASH_WINDOW_MS) {
            s->respawn_at_ms = now + CRASH_BACKOFF_MS;
            log_error("master", "worker %zu died %.0f ms after it started; "
                      "waiting %.0f ms before the next one",
                      (size_t)(s - m->slots), now - s->started_ms,
                      CRASH_BACKOFF_MS);
        }
    }
}

static void
spawn_due(struct master *m)
{
    double now = http_now_ms();

    for (size_t i = 0; i < m->nslots; i++)
        if (m->slots[i].pid == 0 && m->slots[i].respawn_at_ms <= now)
            spawn(m, i);
}

static size_t
live_workers(const struct master *m)
{
    size_t n = 0;

    for (size_t i = 0; i < m->nslots; i++)
        n += m->slots[i].pid != 0;
    return n;
}

static void
signal_workers(const struct master *m, int sig)
{
    for (size_t i = 0; i < m->nslots; i++)
        if (m->slots[i].pid != 0)
            kill(m->slots[i].pid, sig);
}

static void
begin_stop(struct master *m, enum stop_mode mode)
{
    if (m->stop >= mode)
        return;
    m->stop = mode;
    m->stop_deadline_ms = http_now_ms() + (mode == STOP_GRACEFUL
                                               ? GRACEFUL_TIMEOUT_MS
                                               : FAST_TIMEOUT_MS);
    log_info("master", "%s stop: %zu workers to end",
             mode == STOP_GRACEFUL ? "graceful" : "fast", live_workers(m));
    signal_workers(m, mode == STOP_GRACEFUL ? SIGTERM : SIGINT);
}

/* How long to wait for the next signal: until the next respawn or the
 * stop deadline, at most a second. */
static struct timespec
next_wait(const struct master *m)
{
    double now = http_now_ms(), wait = IDLE_WAIT_MS;
    struct timespec ts;

    for (size_t i = 0; i < m->nslots && m->stop == RUNNING; i++)
        if (m->slots[i].pid == 0 && m->slots[i].respawn_at_ms - now < wait)
            wait = m->slots[i].respawn_at_ms - now;
    if (m->stop != RUNNING && m->stop_deadline_ms - now < wait)
        wait = m->stop_deadline_ms - now;
    if (wait < 1)
        wait = 1;
    ts.tv_sec = (time_t)(wait / 1000);
    ts.tv_nsec = (long)((wait - (double)ts.tv_sec * 1000) * 1e6);
    return ts;
}

static void
handle_signal(struct master *m, int sig)
{
    switch (sig) {
    case SIGCHLD:
        reap(m);
        break;
    case SIGTERM:
    case SIGQUIT:
        begin_stop(m, STOP_GRACEFUL);
        break;
    case SIGINT:
        begin_stop(m, STOP_FAST);
        break;
    case SIGUSR1:
        log_info("master", "reopening log files");
        log_reopen();
        signal_workers(m, SIGUSR1);
        break;
    case SIGHUP:
        log_warnx("master", "SIGHUP: reload is not supported yet; ignored");
        break;
    }
}

/* Signals are taken synchronously with sigtimedwait: no handler code runs
 * in the master, and timers for respawns need no extra machinery. */
static void
supervise(struct master *m, const sigset_t *set)
{
    while (m->stop == RUNNING || live_workers(m) > 0) {
        struct timespec ts = next_wait(m);
        int sig = sigtimedwait(set, NULL, &ts);

        if (sig > 0)
            handle_signal(m, sig);
        reap(m);
        if (m->stop == RUNNING)
            spawn_due(m);
        else if (http_now_ms() >= m->stop_deadline_ms && live_workers(m)) {
            log_error("master", "%zu workers still busy at the stop "
                      "deadline; killing them", live_workers(m));
            signal_workers(m, SIGKILL);
            m->stop_deadline_ms = http_now_ms() + FAST_TIMEOUT_MS;
        }
    }
}

static int
refuse_root(const struct master *m)
{
    if (geteuid() != 0 || m->worker_id.switch_user)
        return 0;
    log_error("master", "refusing to serve requests as root: set 'user' "
              "(for example www-data) so that workers drop privileges");
    return -1;
}

int
master_run(const struct conf *c)
{
    struct master m = {.conf = c, .nslots = (size_t)c->workers};
    sigset_t set;

    if (lookup_identity(c->user, c->group, &m.worker_id) == -1 ||
        refuse_root(&m) == -1)
        return 1;
    if (m.worker_id.switch_user &&
        log_chown(m.worker_id.uid, m.worker_id.gid) == -1)
        log_warn("master", "cannot give the log files to %s",
                 m.worker_id.user);
    sigemptyset(&set);
    for (int sig = 1; sig < 32; sig++)
        if (sig == SIGCHLD || sig == SIGTERM || sig == SIGQUIT ||
            sig == SIGINT || sig == SIGHUP || sig == SIGUSR1)
            sigaddset(&set, sig);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    m.listen_fd = open_listener(&m);
    m.slots = calloc(m.nslots, sizeof(*m.slots));
    if (m.listen_fd == -1 || m.slots == NULL ||
        write_pid_file(c->pid_file) == -1)
        return 1;
    log_info("master", "listening on %s with %zu workers", c->listen,
             m.nslots);
    spawn_due(&m);
    supervise(&m, &set);
    remove_listener(&m);
    if (c->pid_file[0] != '\0')
        unlink(c->pid_file);
    free(m.slots);
    log_info("master", "stopped");
    return 0;
}
