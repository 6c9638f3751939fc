/*
 * fuzz_item: a stored history item as chatdb reads it back from Redis
 * (chatdb_add_item): a fast reader of the form chatdb_gen_item writes,
 * with json_pick behind it for any other form. The input is the item.
 * Whatever took it, json_pick alone must read the same role, content and
 * tool exchange from it, and the text kept to go to the model as it is
 * must be the item itself.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"
#include "chatdb.h"
#include "fuzz.h"
#include "json.h"
#include "messages.h"

#define TEXT_MAX 4096

static int
same(const struct json_field *f, const struct buf *arena, const char *s,
     size_t len)
{
    return f->len == len &&
           memcmp(json_field_text(f, arena), s, len) == 0;
}

/* What json_pick reads from the item agrees with message 0 of h. */
static void
check_parsed_alike(const char *item, size_t size, const struct messages *h)
{
    struct json_field f[] = {
        {.path = "role", .accept = JSON_STRING},
        {.path = "content", .accept = JSON_STRING},
        {.path = "tools", .accept = JSON_STRING},
    };
    const struct message *m = &h->msgs[0];
    const char *role = messages_role_name(m->role);
    char err[JSON_ERR_LEN];
    struct buf arena;

    buf_init(&arena, size + 2);
    check(json_pick(item, size, f, 3, &arena, 4, 0, err) == 0);
    check(same(&f[0], &arena, role, strlen(role)));
    check(same(&f[1], &arena, messages_content(h, 0), m->len));
    check(f[2].type == 0 ? m->extra_len == 0
                         : same(&f[2], &arena, messages_extra(h, 0),
                                m->extra_len));
    buf_cleanup(&arena);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *item = (const char *)data;
    struct messages h;

    messages_init(&h, TEXT_MAX);
    if (chatdb_add_item(&h, item, size) == 0) {
        const struct message *m = &h.msgs[0];

        check(h.count == 1);
        check(m->role == MESSAGE_USER || m->role == MESSAGE_ASSISTANT);
        check_parsed_alike(item, size, &h);
        check(m->json_len == 0 ||
              (m->json_len == size && m->extra_len == 0 &&
               memcmp(h.json.data + m->json_off, item, size) == 0));
    } else {
        check(h.count == 0);
    }
    messages_cleanup(&h);
    return 0;
}
