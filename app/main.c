/* main: chatfcgi's command line and configuration, then the master. */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "listener.h"
#include "log.h"
#include "master.h"
#include "tls.h"
#include "worker.h"

#ifndef CHATFCGI_CONF_PATH
#define CHATFCGI_CONF_PATH "/etc/chatfcgi/chatfcgi.conf"
#endif
#define CHATFCGI_VERSION "0.1.0"

extern char **environ;

static void
usage(FILE *out)
{
    fprintf(out,
            "usage: chatfcgi [-t] [-S] [-c FILE]\n"
            "  -c FILE  configuration file (default " CHATFCGI_CONF_PATH ")\n"
            "  -t       check the configuration and exit\n"
            "  -S       serve in this one process (pm = single), for hosts\n"
            "           that spawn and route to processes themselves\n"
            "  -v       print the version and exit\n"
            "Every key can also be set as CHATFCGI_<SECTION>_<KEY> in the\n"
            "environment; see chatfcgi.conf.\n");
}

/* The pid in a pid file, or 0. */
static long
read_pid(const char *pid_file)
{
    char line[32], *end;
    FILE *f = fopen(pid_file, "r");
    long pid = 0;

    if (f == NULL)
        return 0;
    if (fgets(line, sizeof(line), f) != NULL) {
        pid = strtol(line, &end, 10);
        if (end == line || (*end != '\n' && *end != '\0') || pid <= 0)
            pid = 0;
    }
    fclose(f);
    return pid;
}

/* Whether a process runs a chatfcgi binary (chatfcgi, or a build of it
 * such as chatfcgi-asan): a stale pid file may name any process by now. */
static int
is_chatfcgi(long pid)
{
    char path[64], argv0[1024];
    const char *base;
    size_t n;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%ld/cmdline", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return 0;
    n = fread(argv0, 1, sizeof(argv0) - 1, f);
    fclose(f);
    argv0[n] = '\0';
    base = strrchr(argv0, '/');
    base = base ? base + 1 : argv0;
    return strcmp(base, "chatfcgi") == 0 || strncmp(base, "chatfcgi-", 9) == 0;
}

/* -t with a master running: its sockets stay as they are across a reload.
 * What they were made from is in that master's memory only (a socket's
 * backlog cannot even be read back), so this names the keys; the reload
 * itself logs each one that differs. */
static void
note_running_master(const struct conf *c)
{
    long pid;

    if (c->pid_file[0] == '\0')
        return;
    pid = read_pid(c->pid_file);
    if (pid == 0 || !is_chatfcgi(pid))
        return;
    printf("chatfcgi: note: a master is running (pid %ld); a reload "
           "keeps its sockets, so a change to " LISTENER_RESTART_KEYS
           " takes effect after a restart (the reload logs each one that "
           "changed)\n", pid);
}

/* -t: what the master would warn about its socket's backlog. Only for a
 * socket it would make: systemd's and a spawner's are theirs to size. */
static void
note_backlog(const struct conf *c)
{
    char note[LISTENER_NOTE_LEN];

    listener_backlog_of(c, note);
    if (note[0] != '\0')
        fprintf(stderr, "chatfcgi: warning: %s\n", note);
}

int
main(int argc, char **argv)
{
    const char *path = CHATFCGI_CONF_PATH;
    char err[CONF_ERR_LEN];
    struct conf conf;
    int opt, test_only = 0, single = 0, rc;

    while ((opt = getopt(argc, argv, "c:tShv")) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 't':
            test_only = 1;
            break;
        case 'S':
            single = 1;
            break;
        case 'v':
            printf("chatfcgi " CHATFCGI_VERSION "\n");
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (conf_load(&conf, path, environ, err) == -1 ||
        worker_check_conf(&conf, err, sizeof(err)) == -1) {
        fprintf(stderr, "chatfcgi: %s\n", err);
        return 1;
    }
    if (test_only) {
        printf("chatfcgi: configuration %s is valid\n", path);
        note_backlog(&conf);
        note_running_master(&conf);
        conf_free(&conf);
        return 0;
    }
    if (log_open(conf.error_log, conf.access_log,
                 (enum log_level)conf.log_level, err) == -1) {
        fprintf(stderr, "chatfcgi: %s\n", err);
        return 1;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "chatfcgi: cannot initialise libcurl\n");
        return 1;
    }
    if (tls_init(&conf, err) == -1) {
        log_error("tls", "%s", err);
        return 1;
    }
    if (single || conf.pm == CONF_POOL_SINGLE)
        rc = master_run_single(&conf);
    else
        rc = master_run(&conf, path, argv);
    tls_cleanup();
    curl_global_cleanup();
    conf_free(&conf);
    return rc;
}
