/*
 * Unit tests of route: every route and method of the contract, 405 with
 * its Allow list, 404, and the session tail (validated later by the
 * handler, so "" and "a/b" come through as they are).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "route.h"

#define NELEM(a) (sizeof(a) / sizeof(*(a)))

struct route_case {
    const char *method;
    const char *path;
    enum route_id id;
    const char *allow; /* NULL: not checked (the id is not 405) */
    const char *tail;  /* NULL: not checked */
};

static const struct route_case cases[] = {
    /* POST /api/chat */
    {"POST", "/api/chat", ROUTE_CHAT_POST, NULL, NULL},
    {"GET", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    {"PUT", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    {"DELETE", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    {"HEAD", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    {"OPTIONS", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    /* methods are case-sensitive (RFC 9110 9.1) */
    {"post", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},
    {"", "/api/chat", ROUTE_METHOD_NOT_ALLOWED, "POST", NULL},

    /* GET and DELETE /api/chat/{id} */
    {"GET", "/api/chat/abc", ROUTE_SESSION_GET, NULL, "abc"},
    {"DELETE", "/api/chat/abc", ROUTE_SESSION_DELETE, NULL, "abc"},
    {"GET", "/api/chat/A-b_9", ROUTE_SESSION_GET, NULL, "A-b_9"},
    {"POST", "/api/chat/abc", ROUTE_METHOD_NOT_ALLOWED, "GET, DELETE",
     "abc"},
    {"PUT", "/api/chat/abc", ROUTE_METHOD_NOT_ALLOWED, "GET, DELETE", "abc"},
    {"PATCH", "/api/chat/abc", ROUTE_METHOD_NOT_ALLOWED, "GET, DELETE",
     "abc"},
    {"get", "/api/chat/abc", ROUTE_METHOD_NOT_ALLOWED, "GET, DELETE", "abc"},
    /* the tail is not validated here */
    {"GET", "/api/chat/", ROUTE_SESSION_GET, NULL, ""},
    {"DELETE", "/api/chat/", ROUTE_SESSION_DELETE, NULL, ""},
    {"GET", "/api/chat/a/b", ROUTE_SESSION_GET, NULL, "a/b"},
    {"DELETE", "/api/chat/a/b", ROUTE_SESSION_DELETE, NULL, "a/b"},
    {"GET", "/api/chat/../x", ROUTE_SESSION_GET, NULL, "../x"},
    {"GET", "/api/chat//", ROUTE_SESSION_GET, NULL, "/"},
    {"GET", "/api/chat/a b", ROUTE_SESSION_GET, NULL, "a b"},

    /* GET /api/healthz */
    {"GET", "/api/healthz", ROUTE_HEALTHZ, NULL, NULL},
    {"POST", "/api/healthz", ROUTE_METHOD_NOT_ALLOWED, "GET", NULL},
    {"DELETE", "/api/healthz", ROUTE_METHOD_NOT_ALLOWED, "GET", NULL},
    {"HEAD", "/api/healthz", ROUTE_METHOD_NOT_ALLOWED, "GET", NULL},

    /* unknown paths: 404 whatever the method */
    {"GET", "/", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api/", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "/api/chatx", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api/chatx/abc", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "/api/cha", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "/API/CHAT", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "api/chat", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "//api/chat", ROUTE_NOT_FOUND, NULL, NULL},
    {"POST", "/v1/chat", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api/healthz/", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api/healthzz", ROUTE_NOT_FOUND, NULL, NULL},
    {"GET", "/api/health", ROUTE_NOT_FOUND, NULL, NULL},
    {"DELETE", "/nope", ROUTE_NOT_FOUND, NULL, NULL},
    {"BREW", "/coffee", ROUTE_NOT_FOUND, NULL, NULL},
};

static const char *const route_names[] = {
    [ROUTE_NOT_FOUND] = "NOT_FOUND",
    [ROUTE_METHOD_NOT_ALLOWED] = "METHOD_NOT_ALLOWED",
    [ROUTE_CHAT_POST] = "CHAT_POST",
    [ROUTE_SESSION_GET] = "SESSION_GET",
    [ROUTE_SESSION_DELETE] = "SESSION_DELETE",
    [ROUTE_HEALTHZ] = "HEALTHZ",
};

static void
test_route_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < NELEM(cases); i++) {
        const struct route_case *c = &cases[i];
        struct route_match m;

        route_resolve(c->method, c->path, &m);
        if (m.id != c->id)
            fail_msg("%s %s: got %s, want %s", c->method, c->path,
                     route_names[m.id], route_names[c->id]);
        if (c->id == ROUTE_METHOD_NOT_ALLOWED) {
            if (m.allow == NULL || strcmp(m.allow, c->allow) != 0)
                fail_msg("%s %s: Allow \"%s\", want \"%s\"", c->method,
                         c->path, m.allow ? m.allow : "(null)", c->allow);
        }
        if (c->tail != NULL) {
            if (m.tail == NULL || strcmp(m.tail, c->tail) != 0)
                fail_msg("%s %s: tail \"%s\", want \"%s\"", c->method,
                         c->path, m.tail ? m.tail : "(null)", c->tail);
        }
    }
}

/* The tail points into the path given, not into a copy. */
static void
test_tail_points_into_path(void **state)
{
    char path[] = "/api/chat/session-1";
    struct route_match m;

    (void)state;
    route_resolve("GET", path, &m);
    assert_int_equal(m.id, ROUTE_SESSION_GET);
    assert_ptr_equal(m.tail, path + strlen("/api/chat/"));
}

/* A match left over from an earlier call does not leak into the next. */
static void
test_match_reset(void **state)
{
    struct route_match m;

    (void)state;
    route_resolve("POST", "/api/chat/x", &m);
    assert_int_equal(m.id, ROUTE_METHOD_NOT_ALLOWED);
    route_resolve("GET", "/nowhere", &m);
    assert_int_equal(m.id, ROUTE_NOT_FOUND);
    assert_null(m.allow);
    assert_null(m.tail);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_table),
        cmocka_unit_test(test_tail_points_into_path),
        cmocka_unit_test(test_match_reset),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
