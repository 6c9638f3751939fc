/*
 * listener: where the listening sockets come from. In order: inherited
 * across the master's own exec (reload), systemd socket activation
 * (LISTEN_FDS), a socket on fd 0 (spawn-fcgi, Apache mod_fcgid, lighttpd
 * bin-path), or opened from the configuration. Also sd_notify, the other
 * half of living under systemd.
 */
#ifndef CHATFCGI_LISTENER_H
#define CHATFCGI_LISTENER_H

#include <stddef.h>
#include <sys/types.h>

struct conf;

/* The keys sockets are made from, which a reload cannot apply: it keeps
 * the sockets so that no request is refused. */
enum listener_key {
    LISTENER_LISTEN,
    LISTENER_STATUS_LISTEN,
    LISTENER_OWNER,
    LISTENER_GROUP,
    LISTENER_MODE,
    LISTENER_BACKLOG,
    LISTENER_NKEYS
};

#define LISTENER_RESTART_KEYS                                               \
    "listen, status_listen, listen_owner, listen_group, listen_mode, "     \
    "listen_backlog"
#define LISTENER_VALUE_MAX 320 /* above what any socket can be made from */

/* Their values as the configuration spells them (mode in octal). */
struct listener_keys {
    char value[LISTENER_NKEYS][LISTENER_VALUE_MAX];
};

/* The environment entries a reload's exec is given: the descriptors, then
 * one entry per key, as a path may hold any byte but NUL. */
#define LISTENER_HANDOVER_N (1 + LISTENER_NKEYS)
struct listener_handover {
    char entry[LISTENER_HANDOVER_N][LISTENER_VALUE_MAX + 64];
};

struct listeners {
    int chat_fd;       /* requests; -1 when none */
    int status_fd;     /* healthz, status, metrics; -1 when none */
    int unlink_chat;   /* we created the socket file: remove it at exit */
    int unlink_status;
    int from_reload;    /* handed over by our own previous master */
    int owned;          /* opened from our configuration (maybe before a
                           reload): ours to shut down at a stop, unlike
                           systemd's or a spawner's */
    int status_owned;   /* the status socket likewise */
    int made_from_known; /* made_from came with a reload's hand-over */
    struct listener_keys made_from; /* the running socket keys: of the
                                       configuration the first master
                                       started with, kept across reloads */
    const char *origin; /* how the chat socket was obtained, for the log */
};

/* The backlog when listen_backlog is 0 (sized to the pool) is the most
 * chat workers at once, but never below this, the usual default. */
#define LISTENER_BACKLOG_MIN 511
#define LISTENER_NOTE_LEN 512

/* The listen backlog for listen_backlog = configured (0: sized to the
 * pool, workers at most, but at least LISTENER_BACKLOG_MIN), capped by
 * somaxconn as the kernel caps it (somaxconn <= 0: unknown, no cap).
 * *wanted gets the value before the cap. */
int listener_backlog(long long configured, long long workers, long somaxconn,
                     int *wanted);

/* net.core.somaxconn of this network namespace, or -1 when unreadable. */
long listener_somaxconn(void);

/* The backlog a configuration's sockets are made with. When somaxconn
 * caps it, note says so and what to do (else it is empty). */
int listener_backlog_of(const struct conf *c, char note[LISTENER_NOTE_LEN]);

/* Who owns a unix socket we create, and its mode. */
struct listener_owner {
    uid_t uid; /* (uid_t)-1: leave as is */
    gid_t gid;
    mode_t mode;
    int backlog;
};

/* Take sockets handed to this process: the reload variable, LISTEN_FDS
 * (the fd named "status" by FileDescriptorName= is the status socket), or
 * a listening socket on fd 0. Returns 1 when it found the chat socket,
 * 0 when nothing was handed over, -1 on a malformed hand-over. */
int listener_inherit(struct listeners *ls, int *scoreboard_fd,
                     unsigned *generation);

/* Open a socket from a spec (a path with a '/', or host:port). Returns the
 * fd, or -1 after logging why. */
int listener_open(const char *spec, const struct listener_owner *owner);

/* The socket keys of a configuration, as made_from records them. */
void listener_keys_of(struct listener_keys *k, const struct conf *c);

/* Log, at warn level, each socket key that fresh changes from the
 * running value: it takes effect after a restart, or never when the
 * socket is handed over by systemd or a spawner. */
void listener_report_unapplied(const struct listeners *ls,
                              const struct conf *fresh);

/* The environment entries that hand the sockets, the scoreboard and
 * made_from to the exec of a reload:
 * "_CHATFCGI_REEXEC=chat,status,scoreboard,gen,owned,status_owned", then
 * "_CHATFCGI_REEXEC_<key>=value" for each key. */
void listener_reexec_env(const struct listeners *ls, int scoreboard_fd,
                         unsigned generation, struct listener_handover *out);

void listener_close(const struct listeners *ls, const char *chat_path,
                    const char *status_path);

/* sd_notify(3)'s protocol, without libsystemd: "READY=1", "RELOADING=1",
 * "STOPPING=1". Does nothing outside systemd. */
void listener_notify(const char *state);

#endif
