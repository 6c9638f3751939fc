/* messages: an in-memory list of chat messages. */
#include "messages.h"

#include <stdlib.h>

#include "json.h"

void
messages_init(struct messages *h, size_t max_text)
{
    h->msgs = NULL;
    h->count = 0;
    h->cap = 0;
    buf_init(&h->text, max_text);
    buf_init(&h->json, max_text);
}

void
messages_reset(struct messages *h)
{
    h->count = 0;
    buf_reset(&h->text);
    buf_reset(&h->json);
}

void
messages_cleanup(struct messages *h)
{
    free(h->msgs);
    buf_cleanup(&h->text);
    buf_cleanup(&h->json);
    h->msgs = NULL;
    h->count = h->cap = 0;
}

int
messages_add(struct messages *h, enum message_role role, const char *content,
            size_t len)
{
    return messages_add_extra(h, role, content, len, MESSAGE_PLAIN, "", 0);
}

int
messages_add_extra(struct messages *h, enum message_role role,
                   const char *content, size_t len,
                   enum message_extra kind, const char *extra,
                   size_t extra_len)
{
    struct message *m;

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
    /* No extra: the content's NUL doubles as an empty one. */
    m->extra_off = extra_len ? m->off + len + 1 : m->off + len;
    m->extra_len = extra_len;
    m->extra_kind = extra_len ? kind : MESSAGE_PLAIN;
    m->json_off = h->json.len;
    m->json_len = 0;
    /* NUL after each string, so that it can be read as a C string too. */
    if (buf_append(&h->text, content, len) == -1 ||
        buf_append(&h->text, "", 1) == -1 ||
        (extra_len > 0 && (buf_append(&h->text, extra, extra_len) == -1 ||
                           buf_append(&h->text, "", 1) == -1))) {
        h->text.len = m->off;
        return -1;
    }
    h->count++;
    return 0;
}

int
messages_attach_json(struct messages *h, const char *json, size_t len)
{
    struct message *m = &h->msgs[h->count - 1];

    if (buf_append(&h->json, json, len) == -1)
        return -1;
    m->json_len = len;
    return 0;
}

const char *
messages_content(const struct messages *h, size_t i)
{
    return h->text.data + h->msgs[i].off;
}

const char *
messages_extra(const struct messages *h, size_t i)
{
    return h->text.data + h->msgs[i].extra_off;
}

void
messages_drop_last(struct messages *h)
{
    if (h->count == 0)
        return;
    h->count--;
    h->text.len = h->msgs[h->count].off;
    h->json.len = h->msgs[h->count].json_off;
}

void
messages_truncate(struct messages *h, size_t count)
{
    while (h->count > count)
        messages_drop_last(h);
}

void
messages_reverse(struct messages *h)
{
    for (size_t i = 0, j = h->count; i + 1 < j; i++, j--) {
        struct message m = h->msgs[i];

        h->msgs[i] = h->msgs[j - 1];
        h->msgs[j - 1] = m;
    }
}

const char *
messages_role_name(enum message_role role)
{
    static const char *const names[] = {"user", "assistant", "system",
                                          "tool"};

    return names[role];
}

int
messages_gen(yajl_gen g, const struct messages *h, size_t i)
{
    const struct message *m = &h->msgs[i];
    const char *extra = messages_extra(h, i);
    int calls = m->extra_kind == MESSAGE_CALLS;

    if (m->json_len > 0)
        return json_gen_raw(g, h->json.data + m->json_off, m->json_len);
    if (m->extra_kind == MESSAGE_EXCHANGE && json_gen_text(g, extra, 1))
        return -1;
    if (yajl_gen_map_open(g) ||
        json_gen_key_cstr(g, "role", messages_role_name(m->role)) ||
        json_gen_cstr(g, "content") ||
        (calls && m->len == 0
             ? yajl_gen_null(g) != yajl_gen_status_ok
             : json_gen_str(g, messages_content(h, i), m->len) != 0))
        return -1;
    if (calls && (json_gen_cstr(g, "tool_calls") ||
                  json_gen_text(g, extra, 0)))
        return -1;
    if (m->extra_kind == MESSAGE_CALL_ID &&
        json_gen_key_str(g, "tool_call_id", extra, m->extra_len))
        return -1;
    return yajl_gen_map_close(g) ? -1 : 0;
}
