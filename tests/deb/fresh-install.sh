#!/bin/sh
# The Debian package installed as a user installs it, on a brand-new Debian
# 12: `make deb`, `apt install ./chatfcgi_*.deb` (which brings nginx and
# Redis, recommended), then the pool and nginx started with the packaged
# configuration and site, a chat answered through them, and a purge.
#
# Run as root by `make test-deb`, inside the chroot that
# ../shared/tools/fresh-debian.sh makes. A chroot has no systemd, so the
# pool starts as an init script would start it: as root, from the packaged
# configuration, whose Debian defaults (user chatfcgi, listen_group
# www-data) put the workers under the package's user and give nginx the
# sockets. The serving part runs in a network namespace of its own, so the
# packaged ports (80, 6379) never meet the host's.
set -eu
self=$(readlink -f "$0")
cd "$(dirname "$self")/../.."
failed=0

# Findings go to a file too: the serving part runs in another process, and
# fresh-debian.sh shows only the tail of the output.
findings=/root/fresh-install.findings
check() {
    what=$1; shift
    if "$@"; then result="ok - $what"; else result="FAIL - $what"; failed=1; fi
    echo "$result" | tee -a "$findings"
}

install_package() {
    make deb
    # Nothing may start by itself inside a chroot (nginx, redis-server).
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    arch=$(dpkg --print-architecture)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        "./build/deb/chatfcgi_$(dpkg-parsechangelog -l deploy/debian/changelog -S Version)_$arch.deb"
    # This test's own tools: the bundled model, a client, the loopback.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends python3 curl iproute2
}

# $1 is a path; the rest its expected "owner:group mode".
has_owner_mode() {
    [ "$(stat -c '%U:%G %a' "$1")" = "$2" ]
}

installed_as_packaged() {
    check "nginx and redis-server came as recommended" \
        dpkg-query -W nginx redis-server
    check "system user chatfcgi" \
        sh -c '[ "$(id -u chatfcgi)" -lt 1000 ] && id -gn chatfcgi | grep -qx chatfcgi'
    check "configuration readable by chatfcgi only" \
        has_owner_mode /etc/chatfcgi/chatfcgi.conf "root:chatfcgi 640"
    check "packaged configuration is valid" \
        chatfcgi -t -c /etc/chatfcgi/chatfcgi.conf
    check "man page" test -f /usr/share/man/man8/chatfcgi.8.gz
    check "units" test -f /lib/systemd/system/chatfcgi.service
}

pids=""
stop_all() {
    [ -s /run/nginx.pid ] && kill -QUIT "$(cat /run/nginx.pid)"
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    wait
}

start_stack() {
    ip link set lo up
    runuser -u redis -- redis-server /etc/redis/redis.conf \
        --daemonize no --supervised no --pidfile '' --logfile '' &
    pids="$pids $!"
    runuser -u nobody -- python3 app/localmodel.py --port 8081 &
    pids="$pids $!"
    mkdir -p /run/chatfcgi
    CHATFCGI_UPSTREAM_URL=http://127.0.0.1:8081/v1 CHATFCGI_MODEL=local-eliza \
        chatfcgi -c /etc/chatfcgi/chatfcgi.conf &
    master=$!
    pids="$pids $master"
    ln -s /etc/nginx/sites-available/chatfcgi /etc/nginx/sites-enabled/chatfcgi
    rm -f /etc/nginx/sites-enabled/default
    check "packaged nginx site is valid" nginx -t -q
    nginx
}

healthy() {
    for _ in $(seq 100); do
        curl -sf http://127.0.0.1/api/healthz >/dev/null && return 0
        sleep 0.1
    done
    return 1
}

workers_are_chatfcgi() {
    children=$(cat /proc/"$master"/task/"$master"/children)
    [ -n "$children" ] || return 1
    for c in $children; do
        [ "$(stat -c %U /proc/"$c")" = chatfcgi ] || return 1
    done
}

# POST a turn, then GET its session: the user's message and the answer.
chat_turn_is_stored() {
    sid=$(curl -sf http://127.0.0.1/api/chat -H 'Content-Type: application/json' \
        -d '{"message":"Hello, I feel tired today."}' |
        python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["reply"]; print(d["session_id"])') &&
    curl -sf "http://127.0.0.1/api/chat/$sid" |
        python3 -c 'import json,sys; m=json.load(sys.stdin)["messages"]; assert [x["role"] for x in m]==["user","assistant"], m'
}

page_is_served() {
    curl -sfi http://127.0.0.1/ >/tmp/page &&
    grep -qi '^content-security-policy:' /tmp/page && grep -qi '<html' /tmp/page
}

serve() {
    trap stop_all EXIT
    start_stack
    check "pool and nginx answer /api/healthz" healthy
    check "unix socket for nginx's group" \
        has_owner_mode /run/chatfcgi/chatfcgi.sock "chatfcgi:www-data 660"
    check "workers run as chatfcgi" workers_are_chatfcgi
    check "chat page served by the packaged site" page_is_served
    check "a chat turn answered and stored" chat_turn_is_stored
    exit $failed
}

purged() {
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q chatfcgi
    check "purge removes the binary and the configuration" \
        sh -c '! [ -e /usr/sbin/chatfcgi ] && ! [ -e /etc/chatfcgi ]'
}

if [ "${1:-}" = serve ]; then
    serve
fi
: >"$findings"
install_package
installed_as_packaged
unshare --net "$self" serve || failed=1
purged
cat "$findings"
[ "$failed" = 0 ] && echo "fresh install: all checks passed"
exit $failed
