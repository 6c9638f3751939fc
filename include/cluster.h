/*
 * cluster: Redis Cluster's addressing, with no connection of its own: the
 * key slot (CRC16 with hash tags), the map of slots to masters parsed
 * from CLUSTER SLOTS, and the MOVED and ASK redirections. store owns the
 * connections and decides when to ask for the map again.
 */
#ifndef CHATFCGI_CLUSTER_H
#define CHATFCGI_CLUSTER_H

#include <stddef.h>

struct redisReply;

#define CLUSTER_SLOTS 16384
#define CLUSTER_NODES_MAX 64 /* masters; a slot's owner fits a byte */
#define CLUSTER_NO_NODE 0xff
#define CLUSTER_HOST_MAX 256
#define CLUSTER_ERR_LEN 160

struct cluster_node {
    char host[CLUSTER_HOST_MAX];
    int port;
};

/* Which master serves each slot (CLUSTER_NO_NODE: none known). */
struct cluster_map {
    struct cluster_node nodes[CLUSTER_NODES_MAX];
    int nnodes;
    unsigned char owner[CLUSTER_SLOTS];
};

/* A MOVED or ASK error reply: the slot and where it is served now. An
 * empty host means the host of the connection that answered (Redis
 * writes ":port" when it does not know its own address). */
struct cluster_redirect {
    int ask; /* 1: ASK (this command only), 0: MOVED (from now on) */
    int slot;
    struct cluster_node node;
};

/* CRC16-XMODEM of n bytes, as the Redis Cluster specification defines it
 * (crc16("123456789") is 0x31c3). */
unsigned cluster_crc16(const char *s, size_t n);

/* The slot of a key: the CRC16 of its hash tag (what is between the first
 * '{' and the next '}', when not empty), else of the whole key, mod
 * 16384. */
int cluster_key_slot(const char *key, size_t n);

/* The slot a command goes to: EVAL and EVALSHA by their first key, other
 * commands by argv[1]; -1 for a command with no key (PING, an EVAL with
 * no key), which any master may run. */
int cluster_command_slot(int argc, const char **argv, const size_t *lens);

/* An empty map: no slot owned. */
void cluster_map_clear(struct cluster_map *m);

/* The index of the node at host:port in m, or -1. */
int cluster_map_find(const struct cluster_map *m, const char *host, int port);

/* The index of the node at host:port in m, added if new. Returns it, or
 * -1 when m already holds CLUSTER_NODES_MAX nodes. */
int cluster_map_node(struct cluster_map *m, const char *host, int port);

/* Fill m from a CLUSTER SLOTS reply; asked is the host that gave it (for
 * an entry with an empty address). Every field is checked: a reply that
 * is not an array of [start, end, [host, port, ...], ...] with slots in
 * range is refused. Returns 0, or -1 with the reason in err (m is then
 * undefined). */
int cluster_map_parse(struct cluster_map *m, const struct redisReply *r,
                      const char *asked, char err[CLUSTER_ERR_LEN]);

/* Parse an error reply of len bytes as "MOVED <slot> <host>:<port>" or
 * "ASK <slot> <host>:<port>". Returns 0, or -1 when it is neither (or
 * malformed: a slot or port out of range, a host too long). */
int cluster_redirect_parse(const char *error, size_t len,
                           struct cluster_redirect *out);

/* Decimal digits s[0..n) (at most 6) into *out within [min, max], as
 * in a redirection or a URL's port. Returns 0 or -1. */
int cluster_decimal(const char *s, size_t n, int min, int max, int *out);

#endif
