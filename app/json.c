/* json: picking fields with yajl, strict checks, UTF-8, and writing. */
#include "json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_parse.h>
#include <yajl/yajl_tree.h>

#include "buf.h"

#define JSON_DEPTH_LIMIT 64
#define JSON_KEYS_MAX (16u << 20)

/* An open object or array on the way to the current value. */
struct frame {
    int is_array;
    long index;            /* arrays: index of the current element */
    size_t key_off, key_len; /* objects: the current key, in pick.keys */
    size_t seen_len, text_len; /* pick.seen, seen_text when it opened */
};

/* A key of an open object, for strict mode's duplicate check. */
struct key_ref {
    size_t off, len; /* in pick.seen_text */
};

struct pick {
    struct json_field *fields;
    size_t nfields;
    struct buf *arena;
    struct frame frames[JSON_DEPTH_LIMIT];
    unsigned depth, max_depth;
    int strict;
    struct buf keys; /* current path's keys, a stack */
    struct buf seen; /* key_refs of the open objects' keys, a stack */
    struct buf seen_text; /* their text */
    char *err;
};

static int
fail(struct pick *p, const char *msg)
{
    snprintf(p->err, JSON_ERR_LEN, "%s", msg);
    return 0; /* yajl: cancel the parse */
}

/* Does a path segment (n bytes) name array index idx? As "%ld" would
 * print it: digits, no sign, no leading zero. (Called for every value of
 * every document parsed: no snprintf here.) */
static int
index_matches(const char *seg, size_t n, long idx)
{
    long v = 0;

    if (n == 0 || n > 18 || (n > 1 && seg[0] == '0'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (seg[i] < '0' || seg[i] > '9')
            return 0;
        v = v * 10 + (seg[i] - '0');
    }
    return v == idx;
}

/* Does the current position match a dot-separated path? */
static int
path_matches(const struct pick *p, const char *path)
{
    const char *s = path;

    if (p->depth == 0 || *path == '\0')
        return p->depth == 0 && *path == '\0';
    for (unsigned d = 0; d < p->depth; d++) {
        const struct frame *f = &p->frames[d];
        size_t seg = strcspn(s, ".");

        if (f->is_array) {
            if (!index_matches(s, seg, f->index))
                return 0;
        } else if (seg != f->key_len ||
                   memcmp(p->keys.data + f->key_off, s, seg) != 0) {
            return 0;
        }
        s += seg;
        if (*s == '.')
            s++;
        else if (d + 1 < p->depth)
            return 0;
    }
    return *s == '\0' && s[-1] != '.'; /* s > path: a segment was read */
}

static int
store_text(struct pick *p, struct json_field *f, const void *s, size_t n)
{
    f->off = p->arena->len;
    f->len = n;
    if (buf_append(p->arena, s, n) == -1 || buf_append(p->arena, "", 1) == -1)
        return fail(p, "JSON value too large");
    return 1;
}

/* Called at the start of every value: advance array indexes, then record
 * the value in every field whose path it is on. */
static int
on_value(struct pick *p, enum json_type type, const void *text, size_t n,
         int boolean)
{
    if (p->depth > 0 && p->frames[p->depth - 1].is_array)
        p->frames[p->depth - 1].index++;
    if (p->depth == 0 && p->strict && type != JSON_OBJECT)
        return fail(p, "the body must be a JSON object");
    for (size_t i = 0; i < p->nfields; i++) {
        struct json_field *f = &p->fields[i];

        if (!path_matches(p, f->path))
            continue;
        if (!(f->accept & type)) {
            snprintf(p->err, JSON_ERR_LEN, "'%s' has the wrong type",
                     f->path);
            return 0;
        }
        f->type = type;
        f->boolean = boolean;
        if ((type == JSON_STRING || type == JSON_NUMBER) &&
            !store_text(p, f, text, n))
            return 0;
    }
    return 1;
}

static int
push_frame(struct pick *p, int is_array)
{
    struct frame *f;

    if (p->depth >= p->max_depth)
        return fail(p, "JSON nested too deeply");
    f = &p->frames[p->depth++];
    f->is_array = is_array;
    f->index = -1;
    f->key_off = p->keys.len;
    f->key_len = 0;
    f->seen_len = p->seen.len;
    f->text_len = p->seen_text.len;
    return 1;
}

static int
pop_frame(struct pick *p)
{
    const struct frame *f = &p->frames[--p->depth];

    p->keys.len = f->key_off;
    p->seen.len = f->seen_len;
    p->seen_text.len = f->text_len;
    return 1;
}

/* Remember key (n bytes) in the current object. Returns 0, or -1 when the
 * keys outgrow JSON_KEYS_MAX or memory. */
static int
seen_add(struct pick *p, const unsigned char *key, size_t n)
{
    struct key_ref k = {p->seen_text.len, n};

    if (buf_append(&p->seen_text, key, n) == -1)
        return -1;
    return buf_append(&p->seen, &k, sizeof(k));
}

/* Any total order will do: by length, then by bytes. */
static int
key_cmp(const void *a, const void *b, void *text)
{
    const struct key_ref *x = a, *y = b;

    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->len ? memcmp((const char *)text + x->off,
                           (const char *)text + y->off, x->len)
                  : 0;
}

/* Strict mode, as an object closes: 1 when no key of it is there twice.
 * Sorting costs n log n whatever the keys are (glibc's qsort is a merge
 * sort) and needs no secret, where keys chosen to collide in a hash table
 * make its probing quadratic in the body's size. */
static int
keys_unique(struct pick *p, const struct frame *f)
{
    size_t n = (p->seen.len - f->seen_len) / sizeof(struct key_ref);
    struct key_ref *k;
    char *text = p->seen_text.data;

    if (n < 2)
        return 1; /* nothing to compare, and seen.data may be NULL */
    k = (struct key_ref *)(p->seen.data + f->seen_len);
    qsort_r(k, n, sizeof(*k), key_cmp, text);
    for (size_t i = 1; i < n; i++) {
        if (key_cmp(&k[i - 1], &k[i], text) == 0) {
            snprintf(p->err, JSON_ERR_LEN, "duplicate key \"%.*s\"",
                     k[i].len > 40 ? 40 : (int)k[i].len, text + k[i].off);
            return 0;
        }
    }
    return 1;
}

static int
cb_null(void *ctx)
{
    return on_value(ctx, JSON_NULL, NULL, 0, 0);
}

static int
cb_boolean(void *ctx, int value)
{
    return on_value(ctx, JSON_BOOL, NULL, 0, value);
}

static int
cb_number(void *ctx, const char *s, size_t n)
{
    return on_value(ctx, JSON_NUMBER, s, n, 0);
}

static int
cb_string(void *ctx, const unsigned char *s, size_t n)
{
    return on_value(ctx, JSON_STRING, s, n, 0);
}

static int
cb_start_map(void *ctx)
{
    return on_value(ctx, JSON_OBJECT, NULL, 0, 0) && push_frame(ctx, 0);
}

static int
cb_map_key(void *ctx, const unsigned char *key, size_t n)
{
    struct pick *p = ctx;
    struct frame *f = &p->frames[p->depth - 1];

    if (p->strict && seen_add(p, key, n) == -1)
        return fail(p, "too many keys");
    p->keys.len = f->key_off;
    if (buf_append(&p->keys, key, n) == -1)
        return fail(p, "JSON key too long");
    f->key_len = n;
    return 1;
}

static int
cb_end_map(void *ctx)
{
    struct pick *p = ctx;

    if (p->strict && !keys_unique(p, &p->frames[p->depth - 1]))
        return 0;
    return pop_frame(p);
}

static int
cb_start_array(void *ctx)
{
    return on_value(ctx, JSON_ARRAY, NULL, 0, 0) && push_frame(ctx, 1);
}

static int
cb_end_array(void *ctx)
{
    return pop_frame(ctx);
}

static const yajl_callbacks pick_callbacks = {
    .yajl_null = cb_null,
    .yajl_boolean = cb_boolean,
    .yajl_number = cb_number,
    .yajl_string = cb_string,
    .yajl_start_map = cb_start_map,
    .yajl_map_key = cb_map_key,
    .yajl_end_map = cb_end_map,
    .yajl_start_array = cb_start_array,
    .yajl_end_array = cb_end_array,
};

int
json_hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int
hex4(const char *s, unsigned *out)
{
    unsigned v = 0;

    for (int i = 0; i < 4; i++) {
        int d = json_hex_digit(s[i]);

        if (d < 0)
            return -1;
        v = (v << 4) | (unsigned)d;
    }
    *out = v;
    return 0;
}

/* yajl turns a lone \ud800 into '?' silently; refuse it instead. Returns
 * the offset just after a valid \u escape at s[i] (s[i] == 'u'), with its
 * code point in *cp (a pair joined), or 0. */
static size_t
unicode_escape_end(const char *s, size_t n, size_t i, unsigned *cp)
{
    unsigned hi, lo;

    if (n - i < 5 || hex4(s + i + 1, &hi) == -1)
        return 0;
    if (hi >= 0xDC00 && hi <= 0xDFFF)
        return 0;
    *cp = hi;
    if (hi < 0xD800 || hi > 0xDBFF)
        return i + 5;
    if (n - i < 11 || s[i + 5] != '\\' || s[i + 6] != 'u' ||
        hex4(s + i + 7, &lo) == -1 || lo < 0xDC00 || lo > 0xDFFF)
        return 0;
    *cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
    return i + 11;
}

/* 1 when every \u escape in the strings of doc is a whole code point. */
static int
escapes_valid(const char *s, size_t n)
{
    int in_string = 0;

    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"') {
            in_string = !in_string;
        } else if (in_string && s[i] == '\\' && i + 1 < n) {
            i++;
            if (s[i] == 'u') {
                unsigned cp;
                size_t end = unicode_escape_end(s, n, i, &cp);

                if (end == 0)
                    return 0;
                i = end - 1;
            }
        }
    }
    return 1;
}

/* Append code point cp as UTF-8 (cp is a valid scalar value). */
static int
append_utf8(struct buf *out, unsigned cp)
{
    char u[4];
    size_t n;

    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12);
        u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18);
        u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return buf_append(out, u, n);
}

/* The escape at s[i] (just past its backslash) into out. Returns the
 * offset after it, or 0 when it is unknown, cut short or a lone
 * surrogate. */
static size_t
decode_escape(const char *s, size_t n, size_t i, struct buf *out)
{
    static const char simple[] = "\"\"\\\\//b\bf\fn\nr\rt\t";
    size_t end;
    unsigned cp;

    if (i >= n)
        return 0;
    if (s[i] != 'u') {
        for (size_t k = 0; k < sizeof(simple) - 1; k += 2)
            if (s[i] == simple[k])
                return buf_append(out, &simple[k + 1], 1) == 0 ? i + 1 : 0;
        return 0;
    }
    end = unicode_escape_end(s, n, i, &cp);
    return end != 0 && append_utf8(out, cp) == 0 ? end : 0;
}

size_t
json_string_decode(const char *s, size_t n, struct buf *out)
{
    size_t i = 0;

    for (;;) {
        size_t run = i;

        while (i < n && s[i] != '"' && s[i] != '\\' &&
               (unsigned char)s[i] >= 0x20)
            i++;
        /* Escapes are ASCII, so no UTF-8 sequence spans two runs. */
        if (!json_utf8_valid(s + run, i - run) ||
            buf_append(out, s + run, i - run) == -1 || i == n)
            return 0;
        if (s[i] == '"')
            return i + 1;
        if (s[i] != '\\' || (i = decode_escape(s, n, i + 1, out)) == 0)
            return 0; /* a raw control character, or a bad escape */
    }
}

/* yajl's message, first line only: "parse error: ...". */
static void
yajl_reason(yajl_handle h, const char *doc, size_t len, char *err)
{
    unsigned char *msg = yajl_get_error(h, 0, (const unsigned char *)doc,
                                        len);

    snprintf(err, JSON_ERR_LEN, "malformed JSON (%.*s)",
             (int)strcspn((const char *)msg, "\n"), (const char *)msg);
    yajl_free_error(h, msg);
}

static int
run_parser(struct pick *p, const char *doc, size_t len)
{
    yajl_handle h = yajl_alloc(&pick_callbacks, NULL, p);
    yajl_status st;

    if (h == NULL) {
        fail(p, "out of memory");
        return -1;
    }
    st = yajl_parse(h, (const unsigned char *)doc, len);
    if (st == yajl_status_ok)
        st = yajl_complete_parse(h);
    if (st == yajl_status_error)
        yajl_reason(h, doc, len, p->err);
    yajl_free(h);
    return st == yajl_status_ok ? 0 : -1;
}

int
json_pick(const char *doc, size_t len, struct json_field *fields,
          size_t nfields, struct buf *arena, unsigned max_depth,
          unsigned flags, char err[JSON_ERR_LEN])
{
    struct pick p = {
        .fields = fields,
        .nfields = nfields,
        .arena = arena,
        .max_depth = max_depth < JSON_DEPTH_LIMIT ? max_depth
                                                  : JSON_DEPTH_LIMIT,
        .strict = (flags & JSON_STRICT) != 0,
        .err = err,
    };
    int rc;

    for (size_t i = 0; i < nfields; i++)
        fields[i].type = 0;
    if (p.strict && !json_utf8_valid(doc, len)) {
        snprintf(err, JSON_ERR_LEN, "the body is not valid UTF-8");
        return -1;
    }
    if (p.strict && !escapes_valid(doc, len)) {
        snprintf(err, JSON_ERR_LEN, "a \\u escape is not a valid code point");
        return -1;
    }
    buf_init(&p.keys, len);
    buf_init(&p.seen, JSON_KEYS_MAX);
    buf_init(&p.seen_text, JSON_KEYS_MAX);
    rc = run_parser(&p, doc, len);
    buf_cleanup(&p.keys);
    buf_cleanup(&p.seen);
    buf_cleanup(&p.seen_text);
    return rc;
}

const char *
json_field_text(const struct json_field *f, const struct buf *arena)
{
    /* An arena nothing was picked into has no memory yet. */
    return arena->data != NULL ? arena->data + f->off : "";
}

int
json_field_int(const struct json_field *f, const struct buf *arena,
               long long min, long long max, long long *out)
{
    const char *s = json_field_text(f, arena);
    char *end;
    long long v;

    if (f->type != JSON_NUMBER)
        return -1;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int
json_utf8_valid(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;

    while (i < n) {
        unsigned c = s[i], need, cp, min;

        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0)
            need = 1, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0)
            need = 2, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0)
            need = 3, cp = c & 0x07, min = 0x10000;
        else
            return 0;
        if (n - i - 1 < need)
            return 0;
        for (unsigned k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += need + 1;
    }
    return 1;
}

size_t
json_utf8_complete_len(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;

    /* Look back at most 3 bytes for the lead byte of the last sequence. */
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        unsigned c = s[n - back];
        size_t need;

        if ((c & 0xC0) == 0x80)
            continue; /* a continuation byte: keep looking */
        need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
             : (c & 0xF8) == 0xF0 ? 4 : 1;
        return need > back ? n - back : n;
    }
    return n;
}

int
json_utf8_copy(char *out, size_t size, const char *src, size_t n)
{
    size_t keep = n < size ? n : size - 1;

    out[0] = '\0';
    if (!json_utf8_valid(src, n))
        return -1;
    keep = json_utf8_complete_len(src, keep);
    memcpy(out, src, keep);
    out[keep] = '\0';
    return 0;
}

yajl_gen
json_gen_new(void)
{
    yajl_gen g = yajl_gen_alloc(NULL);

    if (g != NULL)
        yajl_gen_config(g, yajl_gen_validate_utf8, 1);
    return g;
}

void
json_gen_restart(yajl_gen g)
{
    yajl_gen_clear(g);
    yajl_gen_reset(g, NULL);
}

int
json_gen_shrink(yajl_gen *g)
{
    const unsigned char *doc;
    size_t len = 0;
    yajl_gen fresh;

    yajl_gen_get_buf(*g, &doc, &len);
    if (len <= BUF_KEEP_BYTES || (fresh = json_gen_new()) == NULL)
        return 0;
    yajl_gen_free(*g);
    *g = fresh;
    return 1;
}

int
json_gen_str(yajl_gen g, const char *s, size_t n)
{
    /* yajl's own check lets overlongs and surrogates through. */
    if (!json_utf8_valid(s, n))
        return -1;
    return yajl_gen_string(g, (const unsigned char *)s, n) ==
                   yajl_gen_status_ok
               ? 0
               : -1;
}

int
json_gen_raw(yajl_gen g, const char *json, size_t len)
{
    /* yajl_gen_number writes its text unchanged, with the separator the
     * position needs: the one way into yajl for a prepared value. */
    return yajl_gen_number(g, json, len) == yajl_gen_status_ok ? 0 : -1;
}

int
json_gen_cstr(yajl_gen g, const char *s)
{
    return json_gen_str(g, s, strlen(s));
}

int
json_gen_int(yajl_gen g, long long v)
{
    return yajl_gen_integer(g, v) == yajl_gen_status_ok ? 0 : -1;
}

int
json_gen_key_str(yajl_gen g, const char *key, const char *s, size_t n)
{
    return json_gen_cstr(g, key) == 0 ? json_gen_str(g, s, n) : -1;
}

int
json_gen_key_cstr(yajl_gen g, const char *key, const char *s)
{
    return json_gen_key_str(g, key, s, strlen(s));
}

int
json_gen_key_int(yajl_gen g, const char *key, long long v)
{
    return json_gen_cstr(g, key) == 0 ? json_gen_int(g, v) : -1;
}

static int
gen_container(yajl_gen g, yajl_val v, unsigned depth)
{
    if (YAJL_IS_ARRAY(v)) {
        if (yajl_gen_array_open(g) != yajl_gen_status_ok)
            return -1;
        for (size_t i = 0; i < v->u.array.len; i++)
            if (json_gen_value(g, v->u.array.values[i], depth - 1))
                return -1;
        return yajl_gen_array_close(g) == yajl_gen_status_ok ? 0 : -1;
    }
    if (yajl_gen_map_open(g) != yajl_gen_status_ok)
        return -1;
    for (size_t i = 0; i < v->u.object.len; i++)
        if (json_gen_cstr(g, v->u.object.keys[i]) ||
            json_gen_value(g, v->u.object.values[i], depth - 1))
            return -1;
    return yajl_gen_map_close(g) == yajl_gen_status_ok ? 0 : -1;
}

int
json_gen_value(yajl_gen g, yajl_val v, unsigned depth)
{
    if (v == NULL || depth == 0)
        return -1;
    switch (v->type) {
    case yajl_t_string:
        return json_gen_cstr(g, v->u.string);
    case yajl_t_number:
        /* The number's own text, so that nothing is lost to a double. */
        return yajl_gen_number(g, v->u.number.r, strlen(v->u.number.r)) ==
                       yajl_gen_status_ok ? 0 : -1;
    case yajl_t_true:
    case yajl_t_false:
        return yajl_gen_bool(g, v->type == yajl_t_true) ==
                       yajl_gen_status_ok ? 0 : -1;
    case yajl_t_null:
        return yajl_gen_null(g) == yajl_gen_status_ok ? 0 : -1;
    case yajl_t_object:
    case yajl_t_array:
        return gen_container(g, v, depth);
    case yajl_t_any:
        break;
    }
    return -1;
}

#define TEXT_DEPTH 64

int
json_gen_text(yajl_gen g, const char *json, int inner)
{
    yajl_val doc = yajl_tree_parse(json, NULL, 0);
    int rc = -1;

    if (doc != NULL && !inner)
        rc = json_gen_value(g, doc, TEXT_DEPTH);
    else if (YAJL_IS_OBJECT(doc))
        for (size_t i = rc = 0; rc == 0 && i < doc->u.object.len; i++)
            rc = json_gen_cstr(g, doc->u.object.keys[i]) ||
                 json_gen_value(g, doc->u.object.values[i], TEXT_DEPTH);
    else if (YAJL_IS_ARRAY(doc))
        for (size_t i = rc = 0; rc == 0 && i < doc->u.array.len; i++)
            rc = json_gen_value(g, doc->u.array.values[i], TEXT_DEPTH);
    yajl_tree_free(doc);
    return rc;
}
