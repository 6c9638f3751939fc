/* listener: where the listening sockets come from, and sd_notify. */
#include "listener.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"

#define REEXEC_VAR "_CHATFCGI_REEXEC"
#define REEXEC_KEY_VAR REEXEC_VAR "_" /* then the key's name */
#define SD_LISTEN_FDS_START 3

/* A socket that is listening: what we may accept() on. */
static int
is_listening_socket(int fd)
{
    int on = 0;
    socklen_t len = sizeof(on);

    return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0 && on;
}

static const char *const key_names[LISTENER_NKEYS] = {
    [LISTENER_LISTEN] = "listen",
    [LISTENER_STATUS_LISTEN] = "status_listen",
    [LISTENER_OWNER] = "listen_owner",
    [LISTENER_GROUP] = "listen_group",
    [LISTENER_MODE] = "listen_mode",
    [LISTENER_BACKLOG] = "listen_backlog",
};

/* Up to n numbers; returns how many, or -1 when malformed. */
static int
parse_fd_list(const char *s, int *out, int n)
{
    int i;

    for (i = 0; i < n && *s != '\0'; i++) {
        char *end;
        long v = strtol(s, &end, 10);

        if (end == s || v < -1 || v > 65535 || (*end != ',' && *end != '\0'))
            return -1;
        out[i] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return *s == '\0' ? i : -1;
}

/* made_from as the previous master handed it over. A master from before
 * the keys were handed over passes none: the new one then knows no
 * better than its own configuration (acquire_listeners). */
static void
inherit_made_from(struct listeners *ls)
{
    char name[64];
    int found = 0;

    for (int k = 0; k < LISTENER_NKEYS; k++) {
        const char *v;

        snprintf(name, sizeof(name), REEXEC_KEY_VAR "%s", key_names[k]);
        v = getenv(name);
        found += v != NULL;
        snprintf(ls->made_from.value[k], LISTENER_VALUE_MAX, "%s",
                 v ? v : "");
    }
    ls->made_from_known = found == LISTENER_NKEYS;
}

/* Not for our children, nor for a later exec of ours (which passes its
 * own). */
static void
clear_reexec_env(void)
{
    char name[64];

    unsetenv(REEXEC_VAR);
    for (int k = 0; k < LISTENER_NKEYS; k++) {
        snprintf(name, sizeof(name), REEXEC_KEY_VAR "%s", key_names[k]);
        unsetenv(name);
    }
}

static int
inherit_reexec(const char *spec, struct listeners *ls, int *scoreboard_fd,
               unsigned *generation)
{
    int v[6], n = parse_fd_list(spec, v, 6);

    if (n < 5 || v[0] < 0 || v[3] < 0) {
        log_error("listener", "malformed %s=%s", REEXEC_VAR, spec);
        return -1;
    }
    ls->chat_fd = v[0];
    ls->status_fd = v[1];
    *scoreboard_fd = v[2];
    *generation = (unsigned)v[3];
    ls->owned = v[4] == 1;
    /* An older master does not say: most often both came the same way. */
    ls->status_owned = n == 6 ? v[5] == 1 : ls->owned && v[1] >= 0;
    inherit_made_from(ls);
    ls->origin = "the previous master (reload)";
    ls->from_reload = 1;
    return 1;
}

/* The n-th name of LISTEN_FDNAMES (colon-separated), or "". */
static void
fd_name(const char *names, int n, char *out, size_t size)
{
    const char *p = names ? names : "";

    while (n-- > 0 && p != NULL) {
        p = strchr(p, ':');
        if (p != NULL)
            p++;
    }
    snprintf(out, size, "%.*s", p ? (int)strcspn(p, ":") : 0, p ? p : "");
}

static int
inherit_systemd(struct listeners *ls)
{
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    const char *names = getenv("LISTEN_FDNAMES");
    long n = fds ? strtol(fds, NULL, 10) : 0;
    char name[64];

    if (pid == NULL || strtol(pid, NULL, 10) != (long)getpid() || n <= 0 ||
        n > 64)
        return 0;
    for (int i = 0; i < (int)n; i++) {
        int fd = SD_LISTEN_FDS_START + i;

        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fd_name(names, i, name, sizeof(name));
        if (strcmp(name, "status") == 0)
            ls->status_fd = fd;
        else if (ls->chat_fd == -1)
            ls->chat_fd = fd;
    }
    /* Not for our children, nor for a later exec of ours. */
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    ls->origin = "systemd socket activation";
    return ls->chat_fd == -1 ? -1 : 1;
}

int
listener_inherit(struct listeners *ls, int *scoreboard_fd,
                 unsigned *generation)
{
    const char *reexec = getenv(REEXEC_VAR);
    int rc;

    ls->chat_fd = ls->status_fd = -1;
    ls->unlink_chat = ls->unlink_status = ls->from_reload = ls->owned = 0;
    ls->status_owned = ls->made_from_known = 0;
    *scoreboard_fd = -1;
    *generation = 0;
    if (reexec != NULL)
        rc = inherit_reexec(reexec, ls, scoreboard_fd, generation);
    /* Stale entries too: a reload's getenv would find them first. */
    clear_reexec_env();
    if (reexec != NULL)
        return rc;
    rc = inherit_systemd(ls);
    if (rc != 0)
        return rc;
    if (is_listening_socket(STDIN_FILENO)) {
        ls->chat_fd = STDIN_FILENO;
        ls->origin = "fd 0 (spawned by a web server or spawn-fcgi)";
        return 1;
    }
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
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
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

/* Someone swapped the socket file for something else as soon as it was
 * made: touch nothing, listen nowhere. */
static int
replaced(const char *path)
{
    log_error("listener", "%s was replaced right after the bind", path);
    errno = EEXIST;
    return -1;
}

/* bind() gives the socket file 0777 & ~umask: with the umask set around
 * it, the file has its mode from the first moment, and no chmod() is left
 * to follow a symlink put in its place after the bind. made: what the
 * bind created, to be told apart from anything swapped in later. */
static int
bind_unix(int fd, const struct sockaddr_un *sa, mode_t mode,
          struct stat *made)
{
    mode_t saved = umask(~mode & 0777);
    int rc = bind(fd, (const struct sockaddr *)sa, sizeof(*sa));

    umask(saved);
    if (rc == -1 || lstat(sa->sun_path, made) == -1)
        return -1;
    return S_ISSOCK(made->st_mode) ? 0 : replaced(sa->sun_path);
}

static int
is_socket_made(int fd, const struct stat *made)
{
    struct stat now;

    return fstat(fd, &now) == 0 && S_ISSOCK(now.st_mode) &&
           now.st_dev == made->st_dev && now.st_ino == made->st_ino;
}

/* Change the owner of the socket file bind() made and of nothing else: the
 * path is opened without following a symlink, must still be that socket,
 * and the owner changes through the descriptor checked, so nothing can be
 * swapped in between the check and the change (the master is root here,
 * and the directory may be writable by others). */
static int
chown_socket(const char *path, const struct stat *made, uid_t uid, gid_t gid)
{
    int fd, rc;

    if (uid == (uid_t)-1 && gid == (gid_t)-1)
        return 0;
    fd = open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd == -1)
        return -1;
    rc = is_socket_made(fd, made) ? fchownat(fd, "", uid, gid, AT_EMPTY_PATH)
                                  : replaced(path);
    close(fd);
    return rc;
}

static int
open_unix(const char *path, const struct listener_owner *o)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat made;
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        log_error("listener", "socket path too long: %s", path);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (clear_stale_socket(&sa) == -1) {
        log_warn("listener", "cannot use %s", path);
        return -1;
    }
    /* Close-on-exec: a reload hands it over explicitly. */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd == -1 || bind_unix(fd, &sa, o->mode, &made) == -1 ||
        chown_socket(path, &made, o->uid, o->gid) == -1 ||
        listen(fd, o->backlog) == -1) {
        log_warn("listener", "cannot listen on %s", path);
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
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);

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
open_tcp(const char *spec, int backlog)
{
    const char *colon = strrchr(spec, ':');
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE};
    struct addrinfo *res, *ai;
    char host[256];
    int fd = -1, rc;

    if (colon == NULL || (size_t)(colon - spec) >= sizeof(host)) {
        log_error("listener", "'%s' is neither a socket path nor host:port",
                  spec);
        return -1;
    }
    snprintf(host, sizeof(host), "%.*s", (int)(colon - spec), spec);
    if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [::1]:9000 */
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = '\0';
    }
    rc = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (rc != 0) {
        log_error("listener", "cannot resolve %s: %s", spec,
                  gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai != NULL && fd == -1; ai = ai->ai_next)
        fd = bind_tcp(ai, backlog);
    freeaddrinfo(res);
    if (fd == -1)
        log_warn("listener", "cannot listen on %s", spec);
    return fd;
}

int
listener_open(const char *spec, const struct listener_owner *owner)
{
    return strchr(spec, '/') ? open_unix(spec, owner)
                             : open_tcp(spec, owner->backlog);
}

int
listener_backlog(long long configured, long long workers, long somaxconn,
                 int *wanted)
{
    long long want = configured;

    if (want <= 0)
        want = workers > LISTENER_BACKLOG_MIN ? workers
                                              : LISTENER_BACKLOG_MIN;
    if (want > INT_MAX)
        want = INT_MAX;
    *wanted = (int)want;
    return somaxconn > 0 && somaxconn < want ? (int)somaxconn : (int)want;
}

long
listener_somaxconn(void)
{
    FILE *f = fopen("/proc/sys/net/core/somaxconn", "re");
    long v = -1;

    if (f == NULL)
        return -1;
    if (fscanf(f, "%ld", &v) != 1)
        v = -1;
    fclose(f);
    return v;
}

int
listener_backlog_of(const struct conf *c, char note[LISTENER_NOTE_LEN])
{
    long somaxconn = listener_somaxconn();
    int wanted, backlog = listener_backlog(c->listen_backlog, c->workers,
                                           somaxconn, &wanted);
    char why[96];

    note[0] = '\0';
    if (backlog == wanted)
        return backlog;
    if (c->listen_backlog > 0)
        snprintf(why, sizeof(why), "listen_backlog = %lld",
                 c->listen_backlog);
    else
        snprintf(why, sizeof(why), "listen_backlog = 0: sized to the pool, "
                 "workers = %lld", c->workers);
    snprintf(note, LISTENER_NOTE_LEN, "the listen backlog should be %d (%s) "
             "but net.core.somaxconn is %ld, and the kernel caps it there: "
             "a burst of more connections than %ld waiting for a worker is "
             "refused (the web server answers 502); raise it with "
             "`sysctl -w net.core.somaxconn=%d` (and a file in "
             "/etc/sysctl.d/ to keep it), then restart", wanted, why,
             somaxconn, somaxconn, wanted);
    return backlog;
}

void
listener_keys_of(struct listener_keys *k, const struct conf *c)
{
    int backlog;
    const char *strings[] = {
        [LISTENER_LISTEN] = c->listen,
        [LISTENER_STATUS_LISTEN] = c->status_listen,
        [LISTENER_OWNER] = c->listen_owner,
        [LISTENER_GROUP] = c->listen_group,
    };

    for (int i = LISTENER_LISTEN; i <= LISTENER_GROUP; i++)
        snprintf(k->value[i], LISTENER_VALUE_MAX, "%s", strings[i]);
    snprintf(k->value[LISTENER_MODE], LISTENER_VALUE_MAX, "%04llo",
             c->listen_mode);
    /* The backlog asked for, not the key: 0 sizes it to the pool. */
    listener_backlog(c->listen_backlog, c->workers, -1, &backlog);
    snprintf(k->value[LISTENER_BACKLOG], LISTENER_VALUE_MAX, "%d", backlog);
}

/* Whether a key is ours to apply (at a restart): it shaped a socket we
 * made, or one we would make. The status socket is made from the
 * configuration also when a spawner or systemd hands over the chat socket
 * alone; the others shape whichever of the two we make. */
static int
is_ours(const struct listeners *ls, enum listener_key k)
{
    if (k == LISTENER_LISTEN)
        return ls->owned;
    if (k == LISTENER_STATUS_LISTEN)
        return ls->status_owned || ls->status_fd < 0;
    return ls->owned || ls->status_owned;
}

static const char *
shown(const char *value)
{
    return value[0] != '\0' ? value : "(empty)";
}

void
listener_report_unapplied(const struct listeners *ls,
                          const struct conf *fresh)
{
    struct listener_keys now;

    listener_keys_of(&now, fresh);
    for (int k = 0; k < LISTENER_NKEYS; k++) {
        const char *was = ls->made_from.value[k], *is = now.value[k];
        char name[96];

        if (strcmp(was, is) == 0)
            continue;
        snprintf(name, sizeof(name), "%s", key_names[k]);
        if (k == LISTENER_BACKLOG && fresh->listen_backlog == 0)
            snprintf(name, sizeof(name), "listen_backlog (0: sized to the "
                     "pool, workers = %lld)", fresh->workers);
        if (is_ours(ls, (enum listener_key)k))
            log_warnx("listener", "reload: %s changed from %s to %s; it "
                      "takes effect after a restart (the socket is kept so "
                      "that no request is refused)", name, shown(was),
                      shown(is));
        else
            log_warnx("listener", "reload: %s changed from %s to %s; "
                      "chatfcgi does not apply it, not even after a "
                      "restart: systemd or a spawner hands the socket "
                      "over (change it there)", name, shown(was),
                      shown(is));
    }
}

void
listener_reexec_env(const struct listeners *ls, int scoreboard_fd,
                    unsigned generation, struct listener_handover *out)
{
    snprintf(out->entry[0], sizeof(out->entry[0]),
             REEXEC_VAR "=%d,%d,%d,%u,%d,%d", ls->chat_fd, ls->status_fd,
             scoreboard_fd, generation, ls->owned, ls->status_owned);
    for (int k = 0; k < LISTENER_NKEYS; k++)
        snprintf(out->entry[1 + k], sizeof(out->entry[1 + k]),
                 REEXEC_KEY_VAR "%s=%s", key_names[k],
                 ls->made_from.value[k]);
}

void
listener_close(const struct listeners *ls, const char *chat_path,
               const char *status_path)
{
    if (ls->unlink_chat)
        unlink(chat_path);
    if (ls->unlink_status)
        unlink(status_path);
    if (ls->chat_fd >= 0)
        close(ls->chat_fd);
    if (ls->status_fd >= 0)
        close(ls->status_fd);
}

void
listener_notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    socklen_t len;
    int fd;

    if (path == NULL || path[0] == '\0' ||
        strlen(path) >= sizeof(sa.sun_path))
        return;
    memcpy(sa.sun_path, path, strlen(path));
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0'; /* the abstract namespace */
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return;
    /* Gone (ENOENT): whoever asked, like make start, listened only while
     * the pool started. */
    if (sendto(fd, state, strlen(state), 0, (struct sockaddr *)&sa, len) < 0) {
        int first = (int)strcspn(state, "\n"); /* READY=1\nSTATUS=... */

        if (errno == ENOENT)
            log_debug("listener", "sd_notify(%.*s): %s is gone", first,
                      state, path);
        else
            log_warn("listener", "sd_notify(%.*s) failed", first, state);
    }
    close(fd);
}
