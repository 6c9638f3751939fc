/* cluster: key slots, the slot map and redirections of Redis Cluster. */
#include "cluster.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>

unsigned
cluster_crc16(const char *s, size_t n)
{
    unsigned crc = 0;

    for (size_t i = 0; i < n; i++) {
        crc ^= (unsigned)(unsigned char)s[i] << 8;
        for (int bit = 0; bit < 8; bit++)
            crc = crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1;
    }
    return crc & 0xffff;
}

int
cluster_key_slot(const char *key, size_t n)
{
    const char *open = memchr(key, '{', n);

    if (open != NULL) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(open + 1, '}', n - from);

        if (close != NULL && close > open + 1)
            return (int)(cluster_crc16(open + 1, (size_t)(close - open) - 1)
                         % CLUSTER_SLOTS);
    }
    return (int)(cluster_crc16(key, n) % CLUSTER_SLOTS);
}

static int
is_command(const char *name, size_t len, const char *want)
{
    return len == strlen(want) && strncasecmp(name, want, len) == 0;
}

int
cluster_command_slot(int argc, const char **argv, const size_t *lens)
{
    size_t len0 = lens ? lens[0] : strlen(argv[0]);

    if (is_command(argv[0], len0, "EVAL") ||
        is_command(argv[0], len0, "EVALSHA")) {
        size_t len2 = argc > 2 ? (lens ? lens[2] : strlen(argv[2])) : 0;

        if (argc < 4 || (len2 == 1 && argv[2][0] == '0'))
            return -1;
        return cluster_key_slot(argv[3], lens ? lens[3] : strlen(argv[3]));
    }
    if (argc < 2)
        return -1;
    return cluster_key_slot(argv[1], lens ? lens[1] : strlen(argv[1]));
}

void
cluster_map_clear(struct cluster_map *m)
{
    m->nnodes = 0;
    memset(m->owner, CLUSTER_NO_NODE, sizeof(m->owner));
}

int
cluster_map_find(const struct cluster_map *m, const char *host, int port)
{
    for (int i = 0; i < m->nnodes; i++)
        if (m->nodes[i].port == port && strcmp(m->nodes[i].host, host) == 0)
            return i;
    return -1;
}

int
cluster_map_node(struct cluster_map *m, const char *host, int port)
{
    int i = cluster_map_find(m, host, port);

    if (i != -1 || m->nnodes == CLUSTER_NODES_MAX)
        return i;
    snprintf(m->nodes[m->nnodes].host, CLUSTER_HOST_MAX, "%s", host);
    m->nodes[m->nnodes].port = port;
    return m->nnodes++;
}

/* A bounded integer field of a reply. */
static int
reply_int(const redisReply *r, long long min, long long max, int *out)
{
    if (r->type != REDIS_REPLY_INTEGER || r->integer < min ||
        r->integer > max)
        return -1;
    *out = (int)r->integer;
    return 0;
}

/* [host, port, id, ...]: the master of an entry. An empty host is the
 * node that answered; "?" (an endpoint it does not know) is refused. */
static int
entry_master(const redisReply *e, const char *asked, const char **host,
             int *port)
{
    const redisReply *h;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2)
        return -1;
    h = e->element[0];
    if (h->type != REDIS_REPLY_STRING || h->len >= CLUSTER_HOST_MAX ||
        strlen(h->str) != h->len || strcmp(h->str, "?") == 0 ||
        reply_int(e->element[1], 1, 65535, port) == -1)
        return -1;
    *host = h->len > 0 ? h->str : asked;
    return 0;
}

/* One [start, end, master, replicas...] entry into m. */
static int
add_entry(struct cluster_map *m, const redisReply *e, const char *asked,
          char err[CLUSTER_ERR_LEN])
{
    int start, end, port, node;
    const char *host;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
        reply_int(e->element[0], 0, CLUSTER_SLOTS - 1, &start) == -1 ||
        reply_int(e->element[1], start, CLUSTER_SLOTS - 1, &end) == -1 ||
        entry_master(e->element[2], asked, &host, &port) == -1) {
        snprintf(err, CLUSTER_ERR_LEN, "malformed CLUSTER SLOTS reply");
        return -1;
    }
    node = cluster_map_node(m, host, port);
    if (node == -1) {
        snprintf(err, CLUSTER_ERR_LEN, "more than %d Redis Cluster masters",
                 CLUSTER_NODES_MAX);
        return -1;
    }
    memset(m->owner + start, node, (size_t)(end - start + 1));
    return 0;
}

int
cluster_map_parse(struct cluster_map *m, const redisReply *r,
                  const char *asked, char err[CLUSTER_ERR_LEN])
{
    cluster_map_clear(m);
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        snprintf(err, CLUSTER_ERR_LEN, "CLUSTER SLOTS: no slot is served");
        return -1;
    }
    for (size_t i = 0; i < r->elements; i++)
        if (add_entry(m, r->element[i], asked, err) == -1)
            return -1;
    return 0;
}

int
cluster_decimal(const char *s, size_t n, int min, int max, int *out)
{
    int v = 0;

    if (n == 0 || n > 6)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < min || v > max)
        return -1;
    *out = (int)v;
    return 0;
}

int
cluster_redirect_parse(const char *error, size_t len,
                       struct cluster_redirect *out)
{
    const char *end = error + len, *slot, *space, *colon;
    size_t hostlen;

    out->ask = len > 4 && memcmp(error, "ASK ", 4) == 0;
    if (out->ask)
        slot = error + 4;
    else if (len > 6 && memcmp(error, "MOVED ", 6) == 0)
        slot = error + 6;
    else
        return -1;
    space = memchr(slot, ' ', (size_t)(end - slot));
    if (space == NULL ||
        cluster_decimal(slot, (size_t)(space - slot), 0, CLUSTER_SLOTS - 1,
                      &out->slot) == -1)
        return -1;
    /* The last colon: an IPv6 address comes without brackets. */
    colon = memrchr(space + 1, ':', (size_t)(end - space - 1));
    if (colon == NULL)
        return -1;
    hostlen = (size_t)(colon - space - 1);
    if (hostlen >= CLUSTER_HOST_MAX || memchr(space + 1, '\0', hostlen) ||
        cluster_decimal(colon + 1, (size_t)(end - colon - 1), 1, 65535,
                      &out->node.port) == -1)
        return -1;
    memcpy(out->node.host, space + 1, hostlen);
    out->node.host[hostlen] = '\0';
    return 0;
}
