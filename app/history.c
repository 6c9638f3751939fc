#include "history.h"

#include <stdlib.h>
#include <string.h>

#include "json.h"

#define HISTORY_ITEM_DEPTH 4

void
history_init(struct history *h, size_t max_text)
{
    h->msgs = NULL;
    h->count = 0;
    h->cap = 0;
    h->skipped = 0;
    buf_init(&h->text, max_text);
}

void
history_reset(struct history *h)
{
    h->count = 0;
    h->skipped = 0;
    buf_reset(&h->text);
}

void
history_cleanup(struct history *h)
{
    free(h->msgs);
    buf_cleanup(&h->text);
    h->msgs = NULL;
    h->count = h->cap = 0;
}

int
history_add(struct history *h, enum history_role role, const char *content,
            size_t len)
{
    struct history_msg *m;

    if (h->count == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 32;

        m = realloc(h->msgs, cap * sizeof(*m));
        if (m == NULL)
            return -1;
        h->msgs = m;
        h->cap = cap;
    }
    m = &h->msgs[h->count];
    m->role = role;
    m->off = h->text.len;
    m->len = len;
    /* NUL after each content, so that it can be read as a C string too. */
    if (buf_append(&h->text, content, len) == -1 ||
        buf_append(&h->text, "", 1) == -1) {
        h->text.len = m->off;
        return -1;
    }
    h->count++;
    return 0;
}

const char *
history_content(const struct history *h, size_t i)
{
    return h->text.data + h->msgs[i].off;
}

void
history_drop_last(struct history *h)
{
    if (h->count == 0)
        return;
    h->count--;
    h->text.len = h->msgs[h->count].off;
}

void
history_reverse(struct history *h)
{
    for (size_t i = 0, j = h->count; i + 1 < j; i++, j--) {
        struct history_msg m = h->msgs[i];

        h->msgs[i] = h->msgs[j - 1];
        h->msgs[j - 1] = m;
    }
}

const char *
history_role_name(enum history_role role)
{
    static const char *const names[] = {"user", "assistant", "system"};

    return names[role];
}

int
history_add_json(struct history *h, const char *json, size_t len)
{
    struct json_field f[] = {
        {.path = "role", .accept = JSON_STRING},
        {.path = "content", .accept = JSON_STRING},
    };
    char err[JSON_ERR_LEN];
    struct buf arena;
    enum history_role role;
    const char *name;
    int rc = -1;

    buf_init(&arena, len + 2);
    if (json_pick(json, len, f, 2, &arena, HISTORY_ITEM_DEPTH, 0, err) == -1 ||
        f[0].type == 0 || f[1].type == 0)
        goto out;
    name = json_field_text(&f[0], &arena);
    if (f[0].len == 4 && memcmp(name, "user", 4) == 0)
        role = HISTORY_USER;
    else if (f[0].len == 9 && memcmp(name, "assistant", 9) == 0)
        role = HISTORY_ASSISTANT;
    else
        goto out;
    rc = history_add(h, role, json_field_text(&f[1], &arena), f[1].len);
out:
    buf_cleanup(&arena);
    return rc;
}

size_t
history_trim_start(const struct history *h, size_t max_messages,
                   size_t max_bytes)
{
    size_t bytes = 0, drop = 0;

    for (size_t i = 0; i < h->count; i++)
        bytes += h->msgs[i].len;
    while (h->count - drop > 2 &&
           (h->count - drop > max_messages || bytes > max_bytes)) {
        bytes -= h->msgs[drop].len + h->msgs[drop + 1].len;
        drop += 2;
    }
    return h->skipped + drop;
}
