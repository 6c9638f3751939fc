/* master: the process that owns the listening sockets and the pool. */
#include "master.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "conf.h"
#include "listener.h"
#include "log.h"
#include "pool.h"
#include "scoreboard.h"
#include "tls.h"
#include "worker.h"

#define TICK_MS 1000.0
#define FAST_STOP_MS 5000.0
#define WATCHDOG_GRACE_MS 10000.0 /* after request_timeout_s */
#define CRASH_DEATHS 5            /* this many failures ... */
#define CRASH_WINDOW_MS 10000.0   /* ... within this window: a crash loop */
#define CRASH_BACKOFF_FIRST_MS 1000.0
#define CRASH_BACKOFF_MAX_MS 30000.0
#define POLL_MS 10.0      /* the pool's state while it starts or grows */
#define WATCH_MS 25.0     /* dynamic: the listen queue, the spares */
#define WHOLE_BOUND_MS 20000.0 /* ready at the latest (see check_whole) */
#define WORKER_FILES_MIN 256 /* descriptors a worker may need at once */

extern char **environ;

enum stop_mode { RUNNING, STOP_GRACEFUL, STOP_FAST };

/* The master's own record of a slot. The scoreboard shows the same pid and
 * role, but every worker can write it: the master acts only on this. */
struct child {
    pid_t pid; /* forked by this master (or adopted after a reload); 0: a
                  free slot */
    enum scoreboard_role role;
    unsigned generation;
    int retiring; /* told to stop by the master: not to be replaced */
};

#define MAX_GROUPS 64

struct identity {
    int switch_user;
    uid_t uid;
    gid_t gid;
    char user[64];
    gid_t groups[MAX_GROUPS]; /* supplementary groups, gid included */
    int ngroups;
};

struct master {
    const struct conf *conf;
    const char *conf_path;
    char *const *argv;
    char exe[1024];
    struct listeners ls;
    struct identity worker_id;
    struct scoreboard *pool;
    int scoreboard_fd;
    struct child *children; /* nslots of them, slot by slot */
    uint32_t nslots;
    uint32_t high;          /* no worker in the slots from here on */
    uint32_t free_hint;     /* no free slot below this one */
    unsigned generation;
    unsigned chat_target;   /* chat workers wanted now */
    unsigned spawn_rate;    /* dynamic: forks of the next round of growth */
    unsigned starting;      /* chat workers not accepting yet, last seen */
    unsigned initial;       /* chat workers that make the pool whole */
    int ready;              /* READY=1 sent: whole, or partial at the bound */
    int whole;              /* the initial pool accepted connections */
    int said_empty;
    double born_ms;         /* when this master started */
    double whole_by_ms;     /* ready at the latest then */
    enum stop_mode stop;
    double stop_deadline_ms;
    double deaths[CRASH_DEATHS]; /* times of the latest failures, a ring */
    size_t ndeaths;
    double backoff_ms;      /* current crash-loop delay, 0 when none */
    double spawn_after_ms;  /* no fork before this (crash-loop backoff) */
    double next_tick_ms;
    int at_max_children;
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

/* The supplementary groups, looked up once here rather than by initgroups()
 * in every worker: that would load the NSS modules after the fork, and
 * their relocated pages would be private to each worker (some 40 KiB). */
static int
lookup_groups(struct identity *id)
{
    id->ngroups = MAX_GROUPS;
    if (!id->switch_user ||
        getgrouplist(id->user, id->gid, id->groups, &id->ngroups) != -1)
        return 0;
    log_error("master", "user %s is in more than %d groups", id->user,
              MAX_GROUPS);
    return -1;
}

/* Owner of our unix sockets: listen_owner/listen_group, else the workers'
 * identity, so that a web server running as that user can connect. */
static int
socket_owner(const struct master *m, struct listener_owner *o)
{
    const struct conf *c = m->conf;
    char note[LISTENER_NOTE_LEN];
    struct identity id;

    o->uid = m->worker_id.switch_user ? m->worker_id.uid : (uid_t)-1;
    o->gid = m->worker_id.switch_user ? m->worker_id.gid : (gid_t)-1;
    o->mode = (mode_t)c->listen_mode;
    o->backlog = listener_backlog_of(c, note);
    if (note[0] != '\0')
        log_warnx("listener", "%s", note);
    if (c->listen_owner[0] == '\0' && c->listen_group[0] == '\0')
        return 0;
    if (lookup_identity(c->listen_owner[0] ? c->listen_owner : "root",
                        c->listen_group, &id) == -1)
        return -1;
    if (c->listen_owner[0] != '\0')
        o->uid = id.uid;
    if (c->listen_group[0] != '\0')
        o->gid = id.gid;
    return 0;
}

static int
status_enabled(const struct conf *c)
{
    return strcmp(c->status_listen, "off") != 0 && c->status_listen[0];
}

/* The sockets: handed over, or opened from the configuration. */
/* After a reload the sockets are handed over, but their files are still
 * ours to remove at the end: when the path is the one the socket we hold
 * is bound to. */
static int
is_socket_file_of(int fd, const char *path)
{
    struct sockaddr_un sa;
    socklen_t len = sizeof(sa);

    return fd >= 0 && strchr(path, '/') != NULL &&
           getsockname(fd, (struct sockaddr *)&sa, &len) == 0 &&
           sa.sun_family == AF_UNIX &&
           strncmp(sa.sun_path, path, sizeof(sa.sun_path)) == 0;
}

static int
acquire_listeners(struct master *m, int inherited, int with_status)
{
    struct listener_owner owner;

    if (!m->ls.made_from_known)
        listener_keys_of(&m->ls.made_from, m->conf);
    if (inherited && m->ls.from_reload) {
        m->ls.unlink_chat = is_socket_file_of(m->ls.chat_fd, m->conf->listen);
        m->ls.unlink_status = is_socket_file_of(m->ls.status_fd,
                                                m->conf->status_listen);
        return 0;
    }
    if (socket_owner(m, &owner) == -1)
        return -1;
    if (!inherited) {
        m->ls.origin = m->conf->listen;
        m->ls.chat_fd = listener_open(m->conf->listen, &owner);
        m->ls.unlink_chat = strchr(m->conf->listen, '/') != NULL;
        m->ls.owned = 1;
        if (m->ls.chat_fd == -1)
            return -1;
    }
    /* A spawner (or a socket unit) may hand over the chat socket only:
     * the status socket then still comes from the configuration. */
    if (!with_status || !status_enabled(m->conf) || m->ls.status_fd >= 0)
        return 0;
    m->ls.status_fd = listener_open(m->conf->status_listen, &owner);
    m->ls.status_owned = m->ls.status_fd >= 0;
    m->ls.unlink_status = m->ls.status_fd >= 0 &&
                          strchr(m->conf->status_listen, '/') != NULL;
    if (m->ls.status_fd >= 0)
        return 0;
    if (!inherited)
        return -1;
    /* Whoever handed the chat socket over is running us: serve anyway. */
    log_warnx("master", "serving without a status socket");
    return 0;
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
    if (setgroups((size_t)id->ngroups, id->groups) == -1 ||
        setgid(id->gid) == -1 || setuid(id->uid) == -1)
        fatal("worker", "cannot switch to user %s: %s", id->user,
              strerror(errno));
    if (setuid(0) == 0)
        fatal("worker", "still able to regain root after switching user");
}

/* After the fork a worker keeps only the descriptors it serves on: a chat
 * worker the chat socket, the control worker the status socket too. None
 * keeps the scoreboard's memfd, as its mapping is all it writes through,
 * and whoever holds the fd could shrink the memory under the master. */
static void
close_unused(const struct listeners *ls, int scoreboard_fd,
             enum scoreboard_role role)
{
    if (scoreboard_fd >= 0)
        close(scoreboard_fd);
    if (role != SCOREBOARD_CONTROL && ls->status_fd >= 0)
        close(ls->status_fd);
}

static void
run_child(struct master *m, int slot, enum scoreboard_role role)
{
    struct worker_setup ws = {
        .conf = m->conf,
        .pool = m->pool,
        .slot = slot,
        .role = role,
        .chat_fd = m->ls.chat_fd,
        .status_fd = role == SCOREBOARD_CONTROL ? m->ls.status_fd : -1,
        .master_pid = getppid(),
    };

    close_unused(&m->ls, m->scoreboard_fd, role);
    drop_privileges(&m->worker_id);
    worker_main(&ws);
}

/* The lowest free slot: in use they stay packed at the bottom, so that
 * every walk over the children stops at high. */
static int
free_slot(struct master *m)
{
    for (uint32_t i = m->free_hint; i < m->nslots; i++) {
        if (m->children[i].pid == 0) {
            m->free_hint = i + 1;
            return (int)i;
        }
    }
    m->free_hint = m->nslots;
    return -1;
}

static void
slot_freed(struct master *m, uint32_t slot)
{
    memset(&m->children[slot], 0, sizeof(m->children[slot]));
    if (slot < m->free_hint)
        m->free_hint = slot;
    while (m->high > 0 && m->children[m->high - 1].pid == 0)
        m->high--;
}

static int
spawn(struct master *m, enum scoreboard_role role)
{
    int slot = free_slot(m);
    struct scoreboard_slot *s;
    pid_t pid;

    if (slot == -1)
        return -1;
    s = scoreboard_slot(m->pool, (uint32_t)slot);
    memset(s, 0, sizeof(*s));
    s->role = (int)role;
    s->started_at_ms = clock_wall_ms();
    pid = fork();
    if (pid == -1) {
        log_warn("master", "cannot fork a worker");
        slot_freed(m, (uint32_t)slot);
        return -1;
    }
    if (pid == 0)
        run_child(m, slot, role);
    s->pid = pid;
    m->children[slot] = (struct child){.pid = pid, .role = role,
                                       .generation = m->generation};
    if ((uint32_t)slot >= m->high)
        m->high = (uint32_t)slot + 1;
    log_debug("master", "worker %d started as pid %ld", slot, (long)pid);
    return 0;
}

/* A worker of the current generation with a role, not told to stop. */
static int
is_serving(const struct master *m, uint32_t slot, enum scoreboard_role role)
{
    const struct child *c = &m->children[slot];

    return c->pid != 0 && c->role == role && c->generation == m->generation &&
           !c->retiring;
}

/* The workers of the current generation, by role and state. The state is
 * the worker's word (it leaves "starting" as it enters its accept loop),
 * good enough for sizing the pool and telling when it is whole. */
struct census {
    struct pool_counts chat;
    unsigned chat_up;   /* accepting: idle or busy */
    unsigned control;   /* 0 or 1 */
    unsigned control_up;
};

static void
take_census(const struct master *m, struct census *n)
{
    memset(n, 0, sizeof(*n));
    for (uint32_t i = 0; i < m->high; i++) {
        const struct child *c = &m->children[i];
        int state;

        if (c->pid == 0 || c->generation != m->generation || c->retiring)
            continue;
        state = scoreboard_slot(m->pool, i)->state;
        if (c->role == SCOREBOARD_CONTROL) {
            n->control++;
            n->control_up += state != SCOREBOARD_STARTING;
            continue;
        }
        n->chat.total++;
        n->chat.idle += state == SCOREBOARD_IDLE;
        n->chat.starting += state == SCOREBOARD_STARTING;
    }
    n->chat_up = n->chat.total - n->chat.starting;
}

/* Many failures in a short window: wait longer and longer before forking
 * again, instead of spinning, and say so loudly. */
static void
note_failure(struct master *m, double now)
{
    double oldest;

    m->deaths[m->ndeaths++ % CRASH_DEATHS] = now;
    if (m->ndeaths < CRASH_DEATHS)
        return;
    oldest = m->deaths[m->ndeaths % CRASH_DEATHS];
    if (now - oldest > CRASH_WINDOW_MS)
        return;
    m->backoff_ms = m->backoff_ms == 0 ? CRASH_BACKOFF_FIRST_MS
                                       : m->backoff_ms * 2;
    if (m->backoff_ms > CRASH_BACKOFF_MAX_MS)
        m->backoff_ms = CRASH_BACKOFF_MAX_MS;
    m->spawn_after_ms = now + m->backoff_ms;
    log_error("master", "crash loop: %d workers failed within %.0f s; "
              "waiting %.0f s before forking again (see the errors above)",
              CRASH_DEATHS, (now - oldest) / 1000, m->backoff_ms / 1000);
}

static void
log_exit(int slot, pid_t pid, int status)
{
    if (WIFSIGNALED(status))
        log_error("master", "worker %d (pid %ld) was killed by signal %d",
                  slot, (long)pid, WTERMSIG(status));
    else if (WEXITSTATUS(status) != 0)
        log_error("master", "worker %d (pid %ld) exited with status %d",
                  slot, (long)pid, WEXITSTATUS(status));
    else
        log_debug("master", "worker %d (pid %ld) exited", slot, (long)pid);
}

static int
slot_of(const struct master *m, pid_t pid)
{
    for (uint32_t i = 0; i < m->high; i++)
        if (m->children[i].pid == pid)
            return (int)i;
    return -1;
}

/* Reap every exited worker and free its slot; the next spawn_due() puts a
 * replacement in (unless the master retired it). */
static void
reap(struct master *m)
{
    double now = clock_ms();
    int status, slot;
    struct scoreboard_slot *s;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        slot = slot_of(m, pid);
        if (slot == -1)
            continue;
        log_exit(slot, pid, status);
        if (WIFSIGNALED(status) || WEXITSTATUS(status) != 0) {
            scoreboard_add(&m->pool->worker_deaths, 1);
            if (m->stop == RUNNING)
                note_failure(m, now);
        } else {
            scoreboard_add(&m->pool->worker_recycles, 1);
        }
        s = scoreboard_slot(m->pool, (uint32_t)slot);
        if (scoreboard_in_request(s))
            scoreboard_take_one(&m->pool->active_chat);
        memset(s, 0, sizeof(*s));
        slot_freed(m, (uint32_t)slot);
    }
    if (m->backoff_ms > 0 && m->ndeaths > 0 &&
        now - m->deaths[(m->ndeaths - 1) % CRASH_DEATHS] >
            3 * CRASH_WINDOW_MS) {
        log_info("master", "no failures for a while: crash-loop backoff "
                 "cleared");
        m->backoff_ms = 0;
    }
}

/* Fork what is missing: the control worker, and chat workers up to the
 * target. */
static void
spawn_due(struct master *m)
{
    struct census n;

    if (m->stop != RUNNING || clock_ms() < m->spawn_after_ms)
        return;
    take_census(m, &n);
    if (m->ls.status_fd >= 0 && n.control == 0)
        spawn(m, SCOREBOARD_CONTROL);
    for (unsigned have = n.chat.total; have < m->chat_target; have++)
        if (spawn(m, SCOREBOARD_CHAT) == -1)
            break;
}

static void
retire(struct master *m, int slot)
{
    m->children[slot].retiring = 1;
    kill(m->children[slot].pid, SIGTERM);
}

/* One idle chat worker of the current generation, or -1. */
static int
idle_chat_slot(const struct master *m)
{
    for (uint32_t i = 0; i < m->high; i++)
        if (is_serving(m, i, SCOREBOARD_CHAT) &&
            scoreboard_slot(m->pool, i)->state == SCOREBOARD_IDLE)
            return (int)i;
    return -1;
}

static struct pool_limits
dynamic_limits(const struct conf *c)
{
    return (struct pool_limits){.min_spare = (unsigned)c->min_spare_workers,
                                .max_spare = (unsigned)c->max_spare_workers,
                                .most = (unsigned)c->workers};
}

/* Connections wait in the listen queue (none may, when it is gone). */
static int
connections_waiting(const struct master *m)
{
    struct pollfd queue = {.fd = m->ls.chat_fd, .events = POLLIN};

    return m->ls.chat_fd >= 0 && poll(&queue, 1, 0) == 1 &&
           (queue.revents & POLLIN);
}

/* pm = dynamic: fork while connections wait and no worker is free, in
 * rounds that double (pool_grow), and keep min_spare_workers idle ones;
 * never more than `workers` in all. Looked at every POLL_MS or WATCH_MS,
 * so that a burst is met within milliseconds, not at the next tick. */
static void
grow_dynamic_pool(struct master *m, const struct census *n)
{
    const struct conf *c = m->conf;
    struct pool_limits l = dynamic_limits(c);
    int waiting = connections_waiting(m);
    unsigned want = pool_grow(&n->chat, waiting, &l, &m->spawn_rate);

    m->chat_target = n->chat.total + want;
    if (n->chat.total < l.most || n->chat.idle > 0 || !waiting) {
        m->at_max_children = 0;
        return;
    }
    if (!m->at_max_children) {
        log_warnx("master", "all %lld workers are busy (workers reached): "
                  "raise 'workers'", c->workers);
        scoreboard_add(&m->pool->max_children_reached, 1);
    }
    m->at_max_children = 1;
}

/* pm = dynamic, on the tick: retire the idle workers over
 * max_spare_workers; not before the pool was reported ready. */
static void
shrink_dynamic_pool(struct master *m)
{
    struct pool_limits l = dynamic_limits(m->conf);
    struct census n;
    unsigned retire_n;

    if (!m->ready)
        return;
    take_census(m, &n);
    for (retire_n = pool_shrink(&n.chat, &l); retire_n > 0; retire_n--) {
        int slot = idle_chat_slot(m);

        if (slot == -1)
            break;
        retire(m, slot);
    }
    take_census(m, &n);
    if (m->chat_target > n.chat.total)
        m->chat_target = n.chat.total;
}

/* The master behind each worker's own deadline: a worker still inside one
 * request a grace period after request_timeout_s is stuck; end it. When
 * the request began is the worker's word, but what is killed is the
 * master's own child of that slot, whatever the slot says. */
static void
watchdog(struct master *m)
{
    int64_t now = clock_wall_ms();
    double limit = (double)m->conf->request_timeout_s * 1000.0 +
                   WATCHDOG_GRACE_MS;

    for (uint32_t i = 0; i < m->high; i++) {
        struct scoreboard_slot *s = scoreboard_slot(m->pool, i);
        pid_t pid = m->children[i].pid;
        int64_t began = s->request_at_ms;

        if (pid == 0 || began <= 0 || (double)(now - began) < limit)
            continue;
        /* The request text is cut at its size: the worker may not have
         * ended it. */
        log_error("master", "worker %u (pid %ld) has been in one request for "
                  "%lld ms (%.*s): killing it", i, (long)pid,
                  (long long)(now - began), (int)sizeof(s->request),
                  s->request);
        kill(pid, SIGKILL);
        scoreboard_add(&m->pool->watchdog_kills, 1);
        s->request_at_ms = 0;
    }
}

static void
tick(struct master *m)
{
    double now = clock_ms();

    if (now < m->next_tick_ms)
        return;
    m->next_tick_ms = now + TICK_MS;
    watchdog(m);
    if (m->stop == RUNNING && m->conf->pm == CONF_POOL_DYNAMIC)
        shrink_dynamic_pool(m);
}

static void
signal_workers(const struct master *m, int sig)
{
    for (uint32_t i = 0; i < m->high; i++)
        if (m->children[i].pid != 0)
            kill(m->children[i].pid, sig);
}

static unsigned
live_workers(const struct master *m)
{
    unsigned n = 0;

    for (uint32_t i = 0; i < m->high; i++)
        n += m->children[i].pid != 0;
    return n;
}

/* Stop taking requests at once, while accepted ones go on: the listening
 * socket is shut down for every process that shares it (new connections
 * are refused and the web server answers 503) and closed here; workers
 * close their copies as soon as they are told to stop, so that the
 * connections already waiting are refused too, not left waiting for the
 * longest stream to end. */
static void
stop_listening(struct master *m)
{
    /* Not a socket systemd holds: shut down, it would refuse every
     * connection for good, also after systemd starts us again. */
    if (m->ls.owned && shutdown(m->ls.chat_fd, SHUT_RDWR) == -1)
        log_warn("master", "cannot shut the listening socket down");
    close(m->ls.chat_fd);
    m->ls.chat_fd = -1;
    if (m->ls.unlink_chat)
        unlink(m->conf->listen);
    m->ls.unlink_chat = 0;
}

static void
begin_stop(struct master *m, enum stop_mode mode)
{
    double budget = mode == STOP_GRACEFUL
                        ? (double)m->conf->graceful_timeout_s * 1000.0
                        : FAST_STOP_MS;

    if (m->stop >= mode)
        return;
    m->stop = mode;
    m->stop_deadline_ms = clock_ms() + budget;
    listener_notify("STOPPING=1");
    log_info("master", "%s stop: %u workers to end within %.0f s",
             mode == STOP_GRACEFUL ? "graceful" : "fast", live_workers(m),
             budget / 1000);
    stop_listening(m);
    signal_workers(m, mode == STOP_GRACEFUL ? SIGTERM : SIGINT);
}

static int
set_inheritable(int fd, int on)
{
    return fd < 0 ? 0 : fcntl(fd, F_SETFD, on ? 0 : FD_CLOEXEC);
}

/* A copy of environ with the hand-over entries added. */
static char **
reexec_environ(const struct master *m, struct listener_handover *handover)
{
    size_t n = 0;
    char **env;

    listener_reexec_env(&m->ls, m->scoreboard_fd, m->generation, handover);
    while (environ[n] != NULL)
        n++;
    env = calloc(n + LISTENER_HANDOVER_N + 1, sizeof(*env));
    if (env == NULL)
        return NULL;
    memcpy(env, environ, n * sizeof(*env));
    for (size_t i = 0; i < LISTENER_HANDOVER_N; i++)
        env[n + i] = handover->entry[i];
    return env;
}

/* SIGHUP: check the new configuration, then exec the binary (which may be
 * new too) with the sockets and the scoreboard handed over. The socket
 * never closes, so no request is refused; the new master starts its
 * workers and lets the old ones finish what they hold. */
/* A file the new master must be able to open for writing. */
static int
writable(const char *path)
{
    int fd;

    if (path[0] == '\0' || strcmp(path, "stderr") == 0 ||
        strcmp(path, "off") == 0)
        return 1;
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd == -1)
        return 0;
    close(fd);
    return 1;
}

/* What the new master would fail on after the exec, when there is nothing
 * left to fall back to: checked while the old one still runs. */
static int
usable(const struct conf *c, char err[CONF_ERR_LEN])
{
    struct identity id;
    const char *files[] = {c->pid_file, c->error_log, c->access_log};

    if (worker_check_conf(c, err, CONF_ERR_LEN) == -1)
        return 0;
    if (lookup_identity(c->user, c->group, &id) == -1) {
        snprintf(err, CONF_ERR_LEN, "user '%s' or group '%s' does not exist",
                 c->user, c->group);
        return 0;
    }
    for (size_t i = 0; i < sizeof(files) / sizeof(*files); i++) {
        if (!writable(files[i])) {
            snprintf(err, CONF_ERR_LEN, "cannot write %s: %s", files[i],
                     strerror(errno));
            return 0;
        }
    }
    return 1;
}

static void
reload(struct master *m)
{
    char err[CONF_ERR_LEN];
    struct listener_handover handover;
    struct conf fresh;
    char **env;
    int ok;

    if (conf_load(&fresh, m->conf_path, environ, err) == -1) {
        log_error("master", "reload refused, keeping the running "
                  "configuration: %s", err);
        return;
    }
    ok = usable(&fresh, err);
    if (ok)
        listener_report_unapplied(&m->ls, &fresh);
    conf_free(&fresh);
    if (!ok) {
        log_error("master", "reload refused, keeping the running "
                  "configuration: %s", err);
        return;
    }
    env = reexec_environ(m, &handover);
    if (env == NULL)
        return;
    log_info("master", "reloading: exec %s", m->exe);
    listener_notify("RELOADING=1");
    set_inheritable(m->ls.chat_fd, 1);
    set_inheritable(m->ls.status_fd, 1);
    execve(m->exe, m->argv, env);
    log_warn("master", "reload failed: cannot exec %s", m->exe);
    set_inheritable(m->ls.chat_fd, 0);
    set_inheritable(m->ls.status_fd, 0);
    free(env);
    listener_notify("READY=1");
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
        if (m->stop == RUNNING)
            reload(m);
        break;
    }
}

/* How long to wait for the next signal: until the next tick, backoff end
 * or stop deadline; a few milliseconds while the pool starts or grows,
 * and in dynamic mode, where a burst must be met at once. */
static struct timespec
next_wait(const struct master *m)
{
    double now = clock_ms(), wait = m->next_tick_ms - now;
    struct timespec ts;

    if (m->spawn_after_ms > now && m->spawn_after_ms - now < wait)
        wait = m->spawn_after_ms - now;
    if (m->stop != RUNNING && m->stop_deadline_ms - now < wait)
        wait = m->stop_deadline_ms - now;
    if (m->stop == RUNNING && wait > POLL_MS &&
        (!m->ready || m->starting > 0 || m->spawn_rate > 1))
        wait = POLL_MS;
    if (m->stop == RUNNING && wait > WATCH_MS &&
        m->conf->pm == CONF_POOL_DYNAMIC)
        wait = WATCH_MS;
    if (wait < 1)
        wait = 1;
    ts.tv_sec = (time_t)(wait / 1000);
    ts.tv_nsec = (long)((wait - (double)ts.tv_sec * 1000) * 1e6);
    return ts;
}

static void
enforce_stop_deadline(struct master *m)
{
    if (m->stop == RUNNING || clock_ms() < m->stop_deadline_ms ||
        live_workers(m) == 0)
        return;
    log_error("master", "%u workers still busy at the stop deadline; "
              "ending them", live_workers(m));
    signal_workers(m, SIGKILL);
    m->stop_deadline_ms = clock_ms() + FAST_STOP_MS;
}

/* After a reload's exec: the workers of the previous generation, taken
 * over from the scoreboard. They serve on until the new generation is
 * ready (check_whole), then finish what they hold and exit. */
static void
retire_older_generations(struct master *m)
{
    for (uint32_t i = 0; i < m->high; i++)
        if (m->children[i].pid != 0 &&
            m->children[i].generation != m->generation)
            retire(m, (int)i);
}

/* The earlier generations serve until the new one is ready, but only
 * when both fit in the slots: after reloads in quick succession (the one
 * before not ready yet) they may not, and the new pool could never be
 * whole. Then they go now, as they finish what they hold. */
static void
make_room(struct master *m)
{
    unsigned old = live_workers(m);
    unsigned need = m->initial + (m->ls.status_fd >= 0);

    if (old == 0 || m->nslots - old >= need)
        return;
    log_info("master", "%u workers of earlier generations leave no room for "
             "%u new ones in %u slots: retiring them now, not once the new "
             "pool is ready", old, need, m->nslots);
    retire_older_generations(m);
}

static void
report_ready(struct master *m, const struct census *n, const char *how)
{
    char msg[160];

    snprintf(msg, sizeof(msg), "%sSTATUS=%u of %u chat workers accept "
             "connections%s", m->ready ? "" : "READY=1\n", n->chat_up,
             m->initial, how);
    if (!m->ready)
        retire_older_generations(m);
    m->ready = 1;
    listener_notify(msg);
}

/* Ready (sd_notify READY=1; `make start` waits for it too) once every
 * worker of the starting pool accepts connections: the chat workers
 * (static: workers; dynamic: start_workers) and the control worker. At
 * WHOLE_BOUND_MS, well within systemd's TimeoutStartSec, a partial pool
 * is reported ready all the same, with a warning: serving with most of
 * the pool beats a start that systemd fails and kills, and the master
 * keeps forking the rest. A pool where no chat worker accepts is never
 * reported ready (systemd then fails the start), and after a reload the
 * previous generation keeps serving meanwhile. */
static void
check_whole(struct master *m, const struct census *n)
{
    unsigned want = m->initial + (m->ls.status_fd >= 0);
    unsigned up = (n->chat_up < m->initial ? n->chat_up : m->initial) +
                  (n->control_up > 0 && m->ls.status_fd >= 0);
    double now = clock_ms(), took = now - m->born_ms;

    if (m->whole || m->stop != RUNNING)
        return;
    switch (pool_readiness(up, want, n->chat_up, now, m->whole_by_ms)) {
    case POOL_NOT_YET:
        return;
    case POOL_WHOLE:
        m->whole = 1;
        log_info("master", "the pool is whole%s: %u chat workers%s accept "
                 "connections, %.0f ms after the start",
                 m->ready ? " now" : "", n->chat_up,
                 m->ls.status_fd >= 0 ? " and the control worker" : "",
                 took);
        report_ready(m, n, "");
        return;
    case POOL_PARTIAL:
        if (m->ready)
            return;
        log_warnx("master", "the pool is not whole %.0f s after the start: "
                  "%u of %u chat workers accept connections%s; reporting "
                  "ready with those (the rest are forked as they can be: "
                  "see the errors above)", took / 1000, n->chat_up,
                  m->initial, m->ls.status_fd >= 0 && !n->control_up
                                  ? ", the control worker does not" : "");
        report_ready(m, n, " (not whole)");
        return;
    case POOL_EMPTY:
        if (!m->said_empty)
            log_error("master", "no chat worker accepts connections %.0f s "
                      "after the start: not reporting ready%s (see the "
                      "errors above)", took / 1000,
                      m->generation > 1 ? "; the previous workers serve "
                                          "on" : "");
        m->said_empty = 1;
        return;
    }
}

/* The pool as the workers report it: whole yet, and in dynamic mode big
 * enough for what waits. */
static void
look_at_pool(struct master *m)
{
    struct census n;

    if (m->stop != RUNNING)
        return;
    take_census(m, &n);
    m->starting = n.chat.starting + (n.control - n.control_up);
    check_whole(m, &n);
    if (m->conf->pm == CONF_POOL_DYNAMIC && clock_ms() >= m->spawn_after_ms)
        grow_dynamic_pool(m, &n);
}

/* Signals are taken synchronously with sigtimedwait: no handler code runs
 * in the master, and its timers need no extra machinery. */
static void
supervise(struct master *m, const sigset_t *set)
{
    while (m->stop == RUNNING || live_workers(m) > 0) {
        struct timespec ts = next_wait(m);
        int sig = sigtimedwait(set, NULL, &ts);

        if (sig > 0)
            handle_signal(m, sig);
        reap(m);
        tick(m);
        look_at_pool(m);
        spawn_due(m);
        enforce_stop_deadline(m);
    }
}

/* Workers switch user only from root; already being that user is fine. */
static int
settle_identity(struct identity *id)
{
    if (!id->switch_user || geteuid() == 0)
        return 0;
    if (geteuid() == id->uid) {
        id->switch_user = 0;
        return 0;
    }
    log_error("master", "cannot run workers as %s: chatfcgi was not "
              "started as root (leave 'user' empty to run as yourself)",
              id->user);
    return -1;
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

/* Who the workers run as: looked up, checked and settled before any fork. */
static int
worker_identity(struct master *m)
{
    const struct conf *c = m->conf;

    if (lookup_identity(c->user, c->group, &m->worker_id) == -1 ||
        settle_identity(&m->worker_id) == -1 ||
        lookup_groups(&m->worker_id) == -1 || refuse_root(m) == -1)
        return -1;
    return 0;
}

static void
block_signals(sigset_t *set)
{
    static const int sigs[] = {SIGCHLD, SIGTERM, SIGQUIT, SIGINT, SIGHUP,
                               SIGUSR1};

    sigemptyset(set);
    for (size_t i = 0; i < sizeof(sigs) / sizeof(*sigs); i++)
        sigaddset(set, sigs[i]);
    sigprocmask(SIG_BLOCK, set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

static void
name_providers(struct scoreboard *pool, const struct conf *c)
{
    const char *names[CONF_PROVIDERS_MAX];

    for (size_t i = 0; i < c->nproviders; i++)
        names[i] = c->providers[i].name;
    scoreboard_name_providers(pool, names, c->nproviders);
}

/* A pid from the scoreboard is taken over only if it is a child of this
 * process: waitid() refuses any other pid (ECHILD), and WNOWAIT leaves one
 * that has exited for reap(). */
static int
is_own_child(pid_t pid)
{
    siginfo_t info;

    return pid > 0 && waitid(P_PID, (id_t)pid, &info,
                             WEXITED | WNOHANG | WNOWAIT) == 0;
}

/* After a reload's exec the previous generation's workers are still this
 * process's children, known only from the scoreboard it inherited, where
 * any worker may have written anything: a slot is taken over when it holds
 * such a child not seen in an earlier slot, and cleared otherwise. */
static void
take_over_workers(struct master *m)
{
    for (uint32_t i = 0; i < m->nslots; i++) {
        struct scoreboard_slot *s = scoreboard_slot(m->pool, i);
        pid_t pid = s->pid;

        if (!is_own_child(pid) || slot_of(m, pid) != -1) {
            memset(s, 0, sizeof(*s));
            continue;
        }
        m->high = i + 1;
        m->children[i] = (struct child){
            .pid = pid,
            .role = s->role == SCOREBOARD_CONTROL ? SCOREBOARD_CONTROL
                                                  : SCOREBOARD_CHAT,
            .generation = m->generation - 1,
        };
    }
}

/* The scoreboard a reload handed over, or a new one when there is none or
 * it is not one (a worker may have overwritten its magic: serve anyway). */
static struct scoreboard *
map_scoreboard(struct master *m, int inherited_fd)
{
    struct scoreboard *pool = scoreboard_open(inherited_fd,
                                              &m->scoreboard_fd);

    if (pool != NULL || inherited_fd < 0)
        return pool;
    log_warn("master", "the scoreboard handed over is unusable: starting "
             "a new one, without the previous workers");
    close(inherited_fd);
    return scoreboard_open(-1, &m->scoreboard_fd);
}

static int
open_scoreboard(struct master *m, int inherited_fd)
{
    /* Room for a whole old generation beside the new one during reload. */
    uint32_t wanted = 2 * ((uint32_t)m->conf->workers + 1), published;

    m->pool = map_scoreboard(m, inherited_fd);
    if (m->pool == NULL) {
        log_warn("master", "cannot set up the scoreboard");
        return -1;
    }
    /* The previous master's count (0 in a new scoreboard), as far as the
     * old workers may sit beyond what this configuration wants. */
    published = scoreboard_nslots(m->pool);
    m->nslots = wanted > published ? wanted : published;
    if (m->nslots > SCOREBOARD_SLOTS_MAX)
        m->nslots = SCOREBOARD_SLOTS_MAX;
    m->children = calloc(m->nslots, sizeof(*m->children));
    if (m->children == NULL)
        return -1;
    take_over_workers(m);
    m->pool->nslots = m->nslots;
    m->pool->generation = m->generation;
    name_providers(m->pool, m->conf);
    return 0;
}

/* The soft limit raised to the hard one where it is lower (unprivileged
 * processes may); returns the soft limit in force. */
static unsigned long long
raise_soft_limit(int resource, const char *name)
{
    struct rlimit rl;
    rlim_t was;

    if (getrlimit(resource, &rl) == -1)
        return (unsigned long long)RLIM_INFINITY;
    was = rl.rlim_cur;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(resource, &rl) == -1) {
            log_warn("master", "cannot raise %s from %llu to %llu", name,
                     (unsigned long long)was,
                     (unsigned long long)rl.rlim_max);
            return (unsigned long long)was;
        }
    }
    return (unsigned long long)rl.rlim_cur;
}

/* A number from a one-line file ("max": none), or ULLONG_MAX. */
static unsigned long long
number_in(const char *path)
{
    unsigned long long v = ULLONG_MAX;
    FILE *f = fopen(path, "re");

    if (f == NULL)
        return ULLONG_MAX;
    if (fscanf(f, "%llu", &v) != 1)
        v = ULLONG_MAX;
    fclose(f);
    return v;
}

/* pids.max of this process's cgroup (systemd's TasksMax=): the
 * unified hierarchy's ("0::/path"), or the v1 pids controller's. */
static unsigned long long
cgroup_pids_max(void)
{
    char line[512], path[600];
    unsigned long long v = ULLONG_MAX, here;
    FILE *f = fopen("/proc/self/cgroup", "re");

    if (f == NULL)
        return ULLONG_MAX;
    while (fgets(line, sizeof(line), f) != NULL) {
        char *where = strchr(line, ':');

        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "0::", 3) == 0)
            snprintf(path, sizeof(path), "/sys/fs/cgroup%s/pids.max",
                     line + 3);
        else if (where != NULL && strncmp(where, ":pids:", 6) == 0)
            snprintf(path, sizeof(path), "/sys/fs/cgroup/pids%s/pids.max",
                     where + 6);
        else
            continue;
        here = number_in(path);
        v = here < v ? here : v;
    }
    fclose(f);
    return v;
}

static void
limit_short(const char *what, unsigned long long have, unsigned long need,
            const char *fix)
{
    log_warnx("master", "%s allows %llu processes, but the pool may run %lu "
              "(two generations of workers during a reload): forks beyond "
              "it fail; %s", what, have, need, fix);
}

/* 10,000 workers need room: the soft limits go up to the hard ones
 * (descriptors for each worker's connections; processes, when the master
 * is not root), and every limit on the number of processes that is below
 * what the pool may run is named in the log with what raises it. */
static void
raise_limits(const struct master *m)
{
    unsigned long need = pool_processes_needed((unsigned)m->conf->workers);
    unsigned long long files, procs, v;

    files = raise_soft_limit(RLIMIT_NOFILE, "RLIMIT_NOFILE");
    procs = raise_soft_limit(RLIMIT_NPROC, "RLIMIT_NPROC");
    if (files < WORKER_FILES_MIN)
        log_warnx("master", "RLIMIT_NOFILE is %llu: a worker may need %d "
                  "descriptors for its connections to Redis, the model and "
                  "tools; raise it (LimitNOFILE= under systemd, ulimit -n)",
                  files, WORKER_FILES_MIN);
    /* Root forks past RLIMIT_NPROC. */
    if (geteuid() != 0 && procs < need)
        limit_short("RLIMIT_NPROC", procs, need,
                    "raise it (LimitNPROC= under systemd, ulimit -u)");
    if ((v = cgroup_pids_max()) < need)
        limit_short("the cgroup's pids.max", v, need,
                    "raise it (TasksMax= under systemd)");
    if ((v = number_in("/proc/sys/kernel/pid_max")) < need)
        limit_short("kernel.pid_max", v, need,
                    "raise it: sysctl -w kernel.pid_max=4194304");
    if ((v = number_in("/proc/sys/kernel/threads-max")) < need)
        limit_short("kernel.threads-max", v, need,
                    "raise it: sysctl -w kernel.threads-max=N");
}

static int
start(struct master *m)
{
    int scoreboard_fd, inherited;

    if (worker_identity(m) == -1)
        return -1;
    raise_limits(m);
    if (m->worker_id.switch_user &&
        log_chown(m->worker_id.uid, m->worker_id.gid) == -1)
        log_warn("master", "cannot give the log files to %s",
                 m->worker_id.user);
    inherited = listener_inherit(&m->ls, &scoreboard_fd, &m->generation);
    m->generation++;
    if (inherited == -1 || acquire_listeners(m, inherited, 1) == -1 ||
        open_scoreboard(m, scoreboard_fd) == -1 ||
        write_pid_file(m->conf->pid_file) == -1)
        return -1;
    worker_prepare_listener(m->ls.chat_fd, m->conf);
    return 0;
}

int
master_run(const struct conf *c, const char *conf_path, char *const argv[])
{
    struct master m = {.conf = c, .conf_path = conf_path, .argv = argv,
                       .spawn_rate = 1};
    sigset_t set;
    ssize_t n;

    block_signals(&set);
    n = readlink("/proc/self/exe", m.exe, sizeof(m.exe) - 1);
    m.exe[n > 0 ? n : 0] = '\0';
    if (start(&m) == -1)
        return 1;
    m.chat_target = (unsigned)(c->pm == CONF_POOL_DYNAMIC ? c->start_workers
                                                           : c->workers);
    m.initial = m.chat_target;
    m.born_ms = clock_ms();
    m.whole_by_ms = m.born_ms + WHOLE_BOUND_MS;
    log_info("master", "listening on %s%s, pm %s, %u workers",
             m.ls.origin, m.ls.status_fd >= 0 ? " and a status socket" : "",
             c->pm == CONF_POOL_DYNAMIC ? "dynamic" : "static", m.chat_target);
    make_room(&m);
    tls_prime(c);
    spawn_due(&m);
    supervise(&m, &set);
    listener_close(&m.ls, c->listen, c->status_listen);
    if (c->pid_file[0] != '\0')
        unlink(c->pid_file);
    free(m.children);
    log_info("master", "stopped");
    return 0;
}

/* pm = single: no master and no fork, for hosts that spawn and route to
 * processes themselves (Apache mod_fcgid, lighttpd bin-path). */
int
master_run_single(const struct conf *c)
{
    struct master m = {.conf = c};
    struct worker_setup ws = {.conf = c, .status_fd = -1};
    int scoreboard_fd, inherited;

    if (worker_identity(&m) == -1)
        return 1;
    inherited = listener_inherit(&m.ls, &scoreboard_fd, &m.generation);
    if (inherited == -1 || (!inherited && acquire_listeners(&m, 0, 0) == -1))
        return 1;
    worker_prepare_listener(m.ls.chat_fd, c);
    ws.pool = scoreboard_open(-1, &scoreboard_fd);
    if (m.ls.chat_fd == -1 || ws.pool == NULL)
        return 1;
    close_unused(&m.ls, scoreboard_fd, SCOREBOARD_CHAT);
    name_providers(ws.pool, c);
    ws.chat_fd = m.ls.chat_fd;
    ws.pool->nslots = 1;
    ws.pool->slots[0].pid = getpid();
    log_info("master", "pm single: serving on %s in this process",
             m.ls.origin);
    drop_privileges(&m.worker_id);
    worker_main(&ws);
}
