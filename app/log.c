/* log: the error log and the access log, reopened for logrotate. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 2048
#define LOG_PATH_MAX 1024

/* One log destination: a file we may reopen, stderr, or nothing. */
struct log_sink {
    int fd;
    char path[LOG_PATH_MAX]; /* empty for stderr and off */
};

static struct {
    struct log_sink error;
    struct log_sink access;
    enum log_level level;
    char role[16];
    char request_id[72];
} logger = {
    .error = {.fd = STDERR_FILENO},
    .access = {.fd = STDERR_FILENO},
    .level = LOG_INFO,
    .role = "M",
};

/* As the config spells them, in the order of enum log_level. */
static const char *const level_names[] = {"debug", "info", "warn", "error"};

static int
sink_open(struct log_sink *s, const char *spec, char err[LOG_ERR_LEN])
{
    int fd;

    if (strcmp(spec, "off") == 0) {
        s->fd = -1;
        s->path[0] = '\0';
        return 0;
    }
    if (strcmp(spec, "stderr") == 0 || spec[0] == '\0') {
        s->fd = STDERR_FILENO;
        s->path[0] = '\0';
        return 0;
    }
    if (strlen(spec) >= sizeof(s->path)) {
        snprintf(err, LOG_ERR_LEN, "log path too long: %s", spec);
        return -1;
    }
    fd = open(spec, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd == -1) {
        snprintf(err, LOG_ERR_LEN, "cannot open log %s: %s", spec,
                 strerror(errno));
        return -1;
    }
    s->fd = fd;
    snprintf(s->path, sizeof(s->path), "%s", spec);
    return 0;
}

int
log_open(const char *error_log, const char *access_log, enum log_level level,
         char err[LOG_ERR_LEN])
{
    if (strcmp(error_log, "off") == 0) {
        snprintf(err, LOG_ERR_LEN, "the error log cannot be off");
        return -1;
    }
    if (sink_open(&logger.error, error_log, err) == -1)
        return -1;
    if (sink_open(&logger.access, access_log, err) == -1)
        return -1;
    logger.level = level;
    return 0;
}

static void
sink_reopen(struct log_sink *s)
{
    int fd;

    if (s->path[0] == '\0')
        return;
    fd = open(s->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd == -1) {
        log_warn("log", "cannot reopen %s, keeping the old file", s->path);
        return;
    }
    close(s->fd);
    s->fd = fd;
}

void
log_reopen(void)
{
    sink_reopen(&logger.error);
    sink_reopen(&logger.access);
}

int
log_chown(unsigned uid, unsigned gid)
{
    const struct log_sink *sinks[] = {&logger.error, &logger.access};

    for (size_t i = 0; i < 2; i++)
        if (sinks[i]->path[0] != '\0' && fchown(sinks[i]->fd, uid, gid) == -1)
            return -1;
    return 0;
}

void
log_set_role(const char *role)
{
    snprintf(logger.role, sizeof(logger.role), "%s", role);
}

void
log_set_request_id(const char *id)
{
    snprintf(logger.request_id, sizeof(logger.request_id), "%s",
             id ? id : "");
}

int
log_enabled(enum log_level level)
{
    return level >= logger.level;
}

/* "2025-01-31T12:00:00.123Z 4242 W3" */
static int
format_prefix(char *line, size_t size)
{
    struct timeval tv;
    struct tm tm;
    char stamp[32];

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    return snprintf(line, size, "%s.%03ldZ %ld %s", stamp,
                    (long)(tv.tv_usec / 1000), (long)getpid(), logger.role);
}

/* One write() per line, so that lines of concurrent processes never mix.
 * Control bytes (from paths or upstream messages) become '?' so that no
 * input can forge a log line. */
static void
sink_write(const struct log_sink *s, char *line, int len)
{
    if (s->fd == -1)
        return;
    if (len < 0 || len >= LOG_LINE_MAX - 1)
        len = LOG_LINE_MAX - 2;
    for (int i = 0; i < len; i++)
        if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
            line[i] = '?';
    line[len++] = '\n';
    if (write(s->fd, line, (size_t)len) == -1)
        return; /* nowhere left to report it */
}

static void
log_vmsg(enum log_level level, const char *module, int saved_errno,
         const char *fmt, va_list ap)
{
    char line[LOG_LINE_MAX];
    int n;

    n = format_prefix(line, sizeof(line));
    n += snprintf(line + n, sizeof(line) - (size_t)n, " %s %s: ",
                  level_names[level], module);
    if (n < LOG_LINE_MAX)
        n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    if (saved_errno && n < LOG_LINE_MAX)
        n += snprintf(line + n, sizeof(line) - (size_t)n, ": %s",
                      strerror(saved_errno));
    if (logger.request_id[0] && n < LOG_LINE_MAX)
        n += snprintf(line + n, sizeof(line) - (size_t)n, " req=%s",
                      logger.request_id);
    sink_write(&logger.error, line, n);
}

void
log_msg(enum log_level level, const char *module, int with_errno,
        const char *fmt, ...)
{
    int saved_errno = with_errno ? errno : 0;
    va_list ap;

    va_start(ap, fmt);
    log_vmsg(level, module, saved_errno, fmt, ap);
    va_end(ap);
    errno = saved_errno ? saved_errno : errno;
}

void
log_access_line(const struct log_access *a)
{
    char line[LOG_LINE_MAX];
    int n;

    if (logger.access.fd == -1)
        return;
    n = format_prefix(line, sizeof(line));
    n += snprintf(line + n, sizeof(line) - (size_t)n,
                  " access req=%s %s %s %d %zu total=%.1fms redis=%.1fms "
                  "upstream=%.1fms",
                  logger.request_id[0] ? logger.request_id : "-", a->method,
                  a->path, a->status, a->bytes, a->total_ms, a->redis_ms,
                  a->upstream_ms);
    sink_write(&logger.access, line, n);
}

void
fatal(const char *module, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    log_vmsg(LOG_ERROR, module, 0, fmt, ap);
    va_end(ap);
    exit(1);
}
