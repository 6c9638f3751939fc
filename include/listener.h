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

struct listeners {
    int chat_fd;       /* requests; -1 when none */
    int status_fd;     /* healthz, status, metrics; -1 when none */
    int unlink_chat;   /* we created the socket file: remove it at exit */
    int unlink_status;
    int from_reload;    /* handed over by our own previous master */
    int owned;          /* opened from our configuration (maybe before a
                           reload): ours to shut down at a stop, unlike
                           systemd's or a spawner's */
    const char *origin; /* how the chat socket was obtained, for the log */
};

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

/* The environment entry that hands the sockets and the scoreboard to the
 * exec of a reload: "_CHATFCGI_REEXEC=chat,status,scoreboard,gen,owned". */
void listener_reexec_env(const struct listeners *ls, int scoreboard_fd,
                         unsigned generation, char *out, size_t size);

void listener_close(const struct listeners *ls, const char *chat_path,
                    const char *status_path);

/* sd_notify(3)'s protocol, without libsystemd: "READY=1", "RELOADING=1",
 * "STOPPING=1". Does nothing outside systemd. */
void listener_notify(const char *state);

#endif
