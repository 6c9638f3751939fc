/* main: chatfcgi's command line and configuration, then the master. */
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "master.h"
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
    if (single || conf.pm == CONF_POOL_SINGLE)
        rc = master_run_single(&conf);
    else
        rc = master_run(&conf, path, argv);
    curl_global_cleanup();
    conf_free(&conf);
    return rc;
}
