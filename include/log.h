/*
 * log: the error log (levels, one line per event) and the access log (one
 * line per request), each to stderr or a file that log_reopen() reopens
 * for logrotate. Lines carry time, pid, role (M or Wn) and the current
 * request id; the process owns this state, set once per role.
 */
#ifndef CHATFCGI_LOG_H
#define CHATFCGI_LOG_H

#include <stddef.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

#define LOG_ERR_LEN 256

/* What one request did, for its access log line. */
struct log_access {
    const char *method;
    const char *path;
    int status;
    size_t bytes;
    double total_ms;
    double redis_ms;
    double upstream_ms;
};

/* Open both logs: a path, "stderr", or "off" (access log only). Returns 0,
 * or -1 with the reason in err. */
int log_open(const char *error_log, const char *access_log,
             enum log_level level, char err[LOG_ERR_LEN]);

/* Reopen the files after logrotate moved them; stderr stays stderr. */
void log_reopen(void);

/* Give the log files to the user that workers run as, so that they can
 * reopen them after dropping privileges. Returns 0 or -1 (errno set). */
int log_chown(unsigned uid, unsigned gid);

void log_set_role(const char *role);

/* The request id that following lines carry; NULL when between requests. */
void log_set_request_id(const char *id);

int log_enabled(enum log_level level);

void log_msg(enum log_level level, const char *module, int with_errno,
             const char *fmt, ...) __attribute__((format(printf, 4, 5)));

void log_access_line(const struct log_access *a);

void fatal(const char *module, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

/* Test the level before any argument is evaluated or formatted. */
#define log_at(lvl, mod, e, ...)                                               \
    do {                                                                       \
        if (log_enabled(lvl))                                                  \
            log_msg(lvl, mod, e, __VA_ARGS__);                                 \
    } while (0)
#define log_debug(mod, ...) log_at(LOG_DEBUG, mod, 0, __VA_ARGS__)
#define log_info(mod, ...) log_at(LOG_INFO, mod, 0, __VA_ARGS__)
/* log_warn appends strerror(errno); log_warnx does not. */
#define log_warn(mod, ...) log_at(LOG_WARN, mod, 1, __VA_ARGS__)
#define log_warnx(mod, ...) log_at(LOG_WARN, mod, 0, __VA_ARGS__)
#define log_error(mod, ...) log_at(LOG_ERROR, mod, 0, __VA_ARGS__)

#endif
