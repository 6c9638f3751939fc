/*
 * json: reading and writing JSON with yajl. json_pick() runs yajl's
 * callback parser once over a document and picks the few fields a caller
 * names by path, refusing what a table of accepted types does not allow;
 * its strict mode adds what yajl lets through (duplicate keys, loose UTF-8,
 * lone surrogate escapes, non-object documents). Picked strings are copied
 * into a caller-owned arena. Writing goes through yajl_gen with UTF-8
 * validation on.
 */
#ifndef CHATFCGI_JSON_H
#define CHATFCGI_JSON_H

#include <stddef.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

struct buf;

#define JSON_ERR_LEN 160

enum json_type {
    JSON_NULL = 1 << 0,
    JSON_BOOL = 1 << 1,
    JSON_NUMBER = 1 << 2,
    JSON_STRING = 1 << 3,
    JSON_OBJECT = 1 << 4,
    JSON_ARRAY = 1 << 5,
};
#define JSON_ANY 0x3fu

/* One field to pick. path is dot-separated; an all-digit segment is an
 * array index ("choices.0.message.content"), "" is the document itself. */
struct json_field {
    const char *path;
    unsigned accept; /* mask of enum json_type; another type is an error */
    /* Set by json_pick(): */
    unsigned type;   /* the type found, 0 when absent */
    size_t off, len; /* strings and numbers: text in the arena, NUL after */
    int boolean;
};

/* Options of json_pick(). */
#define JSON_STRICT 1u /* an object document, no duplicate keys, strict
                          UTF-8, no lone surrogate escapes */

/* Parse doc (len bytes, need not be NUL-terminated) once and fill fields.
 * Returns 0, or -1 with a reason a person understands in err. */
int json_pick(const char *doc, size_t len, struct json_field *fields,
              size_t nfields, struct buf *arena, unsigned max_depth,
              unsigned flags, char err[JSON_ERR_LEN]);

/* The picked text of f, NUL-terminated, in arena. */
const char *json_field_text(const struct json_field *f,
                            const struct buf *arena);

/* A picked JSON_NUMBER as an integer in [min, max]. Returns 0 or -1. */
int json_field_int(const struct json_field *f, const struct buf *arena,
                   long long min, long long max, long long *out);

/* The value of a hexadecimal digit, or -1. */
int json_hex_digit(char c);

/* 1 when s is well-formed UTF-8: no overlong forms, no surrogates, nothing
 * above U+10FFFF (NUL is allowed here). */
int json_utf8_valid(const char *s, size_t n);

/* The length of the longest prefix of s that does not end inside a
 * multi-byte sequence: what can be sent now when more bytes may follow. */
size_t json_utf8_complete_len(const char *s, size_t n);

/* Copy src (n bytes) into out as a C string of at most size - 1 bytes,
 * cut at a character boundary so that a cut never leaves half a UTF-8
 * sequence. Returns 0, or -1 (out is "") when src is not valid UTF-8. */
int json_utf8_copy(char *out, size_t size, const char *src, size_t n);

/* Decode the JSON string that starts at s, just past its opening quote,
 * into out (appended). Returns how many bytes of s it took, the closing
 * quote included, or 0 when there is no well-formed string there: a raw
 * control character, an unknown or cut escape, a lone surrogate, bytes
 * that are not UTF-8, no closing quote, or out over its cap. */
size_t json_string_decode(const char *s, size_t n, struct buf *out);

/* A generator that validates UTF-8 and writes compact JSON; NULL if out of
 * memory. Free with yajl_gen_free(). */
yajl_gen json_gen_new(void);

/* Clear the generator's buffer and state for the next document. */
void json_gen_restart(yajl_gen g);

/* After a document of over BUF_KEEP_BYTES in *g: a new generator there,
 * since yajl never shrinks its buffer and a worker would keep the largest
 * answer it ever wrote. Returns 1 when it did; 0 (*g unchanged) when the
 * document was small or memory runs out. */
int json_gen_shrink(yajl_gen *g);

/* Writers returning 0, or -1 (invalid UTF-8, wrong state). */
int json_gen_str(yajl_gen g, const char *s, size_t n);
int json_gen_cstr(yajl_gen g, const char *s);
int json_gen_int(yajl_gen g, long long v);
int json_gen_key_str(yajl_gen g, const char *key, const char *s, size_t n);
int json_gen_key_cstr(yajl_gen g, const char *key, const char *s);
int json_gen_key_int(yajl_gen g, const char *key, long long v);

/* Write a JSON value of ours (generated or fully checked, so trusted)
 * as it is, without parsing it again. Returns 0 or -1. */
int json_gen_raw(yajl_gen g, const char *json, size_t len);

/* Write a value of yajl's tree as it is, at most depth levels deep (a
 * deeper one is an error, so that no input recurses without bound).
 * Returns 0 or -1. */
int json_gen_value(yajl_gen g, yajl_val v, unsigned depth);

/* Write a JSON text of ours (generated, so trusted) into g: as one value,
 * or with inner set, an object's members or an array's elements into the
 * container open in g. Returns 0 or -1. */
int json_gen_text(yajl_gen g, const char *json, int inner);

#endif
