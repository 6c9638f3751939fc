/*
 * Unit tests of tools_run on loopback, with no tool server: every way a
 * call ends without an answer gives the model an error result of its own
 * (an unknown tool, arguments that are no object, a refused connection, a
 * tool that never answers), the calls of a round run at once, and a client
 * that went away cancels them all.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cmocka.h>

#include "clock.h"
#include "tools.h"

#define SILENT_TIMEOUT_MS 150

struct fixture {
    struct conf conf;
    CURLM *multi;
    struct tools tools;
    struct answer answer;
    int silent_fd; /* listens, never accepts: a tool that never answers */
};

static int
listen_silently(int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fd, 16), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    char err[CONF_ERR_LEN], text[512];
    int port;

    f->silent_fd = listen_silently(&port);
    /* Port 1 on loopback: nothing listens there, the connection is
     * refused at once. */
    snprintf(text, sizeof(text),
             "[tool refused]\nurl = http://127.0.0.1:1/\n"
             "[tool silent]\nurl = http://127.0.0.1:%d/\ntimeout_ms = %d\n",
             port, SILENT_TIMEOUT_MS);
    assert_int_equal(conf_defaults(&f->conf, err), 0);
    assert_int_equal(conf_parse(&f->conf, text, "test", err), 0);
    f->multi = curl_multi_init();
    assert_non_null(f->multi);
    tools_init(&f->tools, &f->conf, f->multi);
    answer_init(&f->answer, 4096);
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;

    tools_cleanup(&f->tools);
    curl_multi_cleanup(f->multi);
    answer_cleanup(&f->answer);
    conf_free(&f->conf);
    close(f->silent_fd);
    free(f);
    return 0;
}

static void
add_call(struct fixture *f, const char *name, const char *arguments)
{
    char id[32];
    struct answer_piece p = {
        .index = (long long)f->answer.ncalls,
        .id = id,
        .name = name,
        .arguments = arguments,
        .arguments_len = strlen(arguments),
    };

    snprintf(id, sizeof(id), "call_%zu", f->answer.ncalls);
    assert_int_equal(answer_add_piece(&f->answer, &p), 0);
}

static int
client_left(int fd)
{
    (void)fd;
    return 1;
}

/* Runs the round; watch_fd -1: no client to watch. */
static int
run(struct fixture *f, int watch_fd)
{
    struct llm_call call = {
        .request_id = "test",
        .deadline_ms = clock_ms() + 10000,
        .watch_fd = watch_fd,
        .client_gone = client_left,
    };

    return tools_run(&f->tools, &f->answer, &call);
}

static void
expect_error(const struct tool_run *r, enum tool_outcome outcome,
             const char *words)
{
    char result[1024];

    assert_int_equal(r->outcome, outcome);
    snprintf(result, sizeof(result), "%.*s", (int)r->result.len,
             r->result.data);
    assert_true(strncmp(result, "{\"error\":\"", 10) == 0);
    if (strstr(result, words) == NULL)
        fail_msg("'%s' does not say '%s'", result, words);
}

static void
test_unknown_tool_is_refused(void **state)
{
    struct fixture *f = *state;

    add_call(f, "nosuch", "{}");
    assert_int_equal(run(f, -1), 0);
    expect_error(&f->tools.runs[0], TOOL_REFUSED,
                 "there is no tool named 'nosuch'");
}

static void
test_arguments_that_are_no_object_are_refused(void **state)
{
    struct fixture *f = *state;

    add_call(f, "refused", "[1, 2");
    add_call(f, "refused", "[1, 2]");
    assert_int_equal(run(f, -1), 0);
    for (size_t i = 0; i < 2; i++)
        expect_error(&f->tools.runs[i], TOOL_REFUSED,
                     "the arguments are not a JSON object");
}

static void
test_refused_connection_fails(void **state)
{
    struct fixture *f = *state;

    add_call(f, "refused", "");
    assert_int_equal(run(f, -1), 0);
    expect_error(&f->tools.runs[0], TOOL_FAILED, "the tool failed");
}

/* Three silent tools of 150 ms each end together, after about 150 ms,
 * not 450 ms one after the other. */
static void
test_silent_tools_time_out_together(void **state)
{
    struct fixture *f = *state;
    double start = clock_ms(), took;

    add_call(f, "silent", "{\"n\":1}");
    add_call(f, "silent", "{\"n\":2}");
    add_call(f, "silent", "{\"n\":3}");
    add_call(f, "nosuch", "{}");
    assert_int_equal(run(f, -1), 0);
    took = clock_ms() - start;
    for (size_t i = 0; i < 3; i++) {
        expect_error(&f->tools.runs[i], TOOL_TIMEOUT,
                     "did not answer within 150 ms");
        assert_true(f->tools.runs[i].ms >= SILENT_TIMEOUT_MS - 1);
    }
    expect_error(&f->tools.runs[3], TOOL_REFUSED, "nosuch");
    assert_true(took >= SILENT_TIMEOUT_MS - 1);
    assert_true(took < 3 * SILENT_TIMEOUT_MS);
}

/* The client's connection became readable and client_gone says it left:
 * the round ends at once, its calls cancelled. */
static void
test_a_client_gone_cancels_the_round(void **state)
{
    struct fixture *f = *state;
    int pair[2];
    double start = clock_ms();

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, pair), 0);
    close(pair[1]); /* the web server hangs up */
    add_call(f, "silent", "{}");
    assert_int_equal(run(f, pair[0]), -1);
    assert_true(clock_ms() - start < SILENT_TIMEOUT_MS);
    expect_error(&f->tools.runs[0], TOOL_FAILED,
                 "cancelled: the client went away");
    close(pair[0]);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_unknown_tool_is_refused, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(
            test_arguments_that_are_no_object_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_connection_fails, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_silent_tools_time_out_together,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_client_gone_cancels_the_round,
                                        setup, teardown),
    };
    int failed;

    curl_global_init(CURL_GLOBAL_DEFAULT);
    failed = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return failed;
}
