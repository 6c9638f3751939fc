#!/bin/sh
# Start the chatfcgi pool on a unix socket made by spawn-fcgi, for hosts
# without systemd (a runit/daemontools/s6 "run" script, an init script) or
# with a web server that cannot open the socket itself.
#
# spawn-fcgi creates the socket (owner root, group www-data, mode 0660, so
# the web server's workers connect), then execs chatfcgi with it on fd 0
# (-n: in the foreground, same pid: a supervisor can signal it). chatfcgi
# keeps running as root in its master only, to reopen logs, and its
# workers switch to the configuration's `user` (required as root, e.g.
# www-data). Signals to this pid: TERM graceful stop, HUP reload, USR1
# reopen logs.
#
# Settings (environment, all optional):
#   SPAWN_BIN     chatfcgi binary        (/usr/sbin/chatfcgi)
#   SPAWN_CONF    its configuration      (/etc/chatfcgi/chatfcgi.conf)
#   SPAWN_SOCKET  the socket to create   (/run/chatfcgi/chatfcgi.sock)
#   SPAWN_GROUP   group of the socket    (www-data)
# Secrets (CHATFCGI_API_KEY, ...) pass through the environment; any other
# CHATFCGI_<KEY> variable overrides a key of the configuration.
#
# The status socket (status_listen) is not made by spawn-fcgi: chatfcgi
# opens it from its configuration (default /run/chatfcgi/status.sock, owned
# by the workers' user, listen_mode 0660), or set status_listen = off.
set -eu

bin=${SPAWN_BIN:-/usr/sbin/chatfcgi}
conf=${SPAWN_CONF:-/etc/chatfcgi/chatfcgi.conf}
socket=${SPAWN_SOCKET:-/run/chatfcgi/chatfcgi.sock}
group=${SPAWN_GROUP:-www-data}

# Check the configuration first: a mistake is reported here, in one line,
# not as a pool that refuses to start.
"$bin" -t -c "$conf" >/dev/null

mkdir -p "$(dirname "$socket")"
exec spawn-fcgi -n -s "$socket" -M 0660 -G "$group" \
    -- "$bin" -c "$conf"
