#!/bin/sh
# Inside the container that boot-units.sh boots: the packaged units driven
# as an administrator drives them, each finding one line (ok/FAIL) on
# stdout. The model is the bundled local one, configured through the
# packaged secrets file /etc/chatfcgi/env; nginx uses the packaged site.
set -u
failed=0

check() {
    what=$1; shift
    if "$@" >/dev/null 2>&1; then echo "ok - $what"
    else echo "FAIL - $what"; failed=1; fi
}

until_true() {
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

service_prop() {
    systemctl show -p "$1" --value chatfcgi.service
}

setup() {
    python3 /root/localmodel.py --port 8081 >/root/model.log 2>&1 &
    printf 'CHATFCGI_UPSTREAM_URL=http://127.0.0.1:8081/v1\nCHATFCGI_MODEL=local-eliza\n' \
        >/etc/chatfcgi/env
    chmod 0600 /etc/chatfcgi/env
    ln -sf /etc/nginx/sites-available/chatfcgi /etc/nginx/sites-enabled/chatfcgi
    rm -f /etc/nginx/sites-enabled/default
    systemctl restart nginx
    until_true curl -sf http://127.0.0.1:8081/v1/models
}

# The process's /proc/PID/status field $2 is $3.
proc_status_is() {
    [ "$(awk -v k="$2:" '$1 == k {print $2}' /proc/"$1"/status)" = "$3" ]
}

root_is_read_only() {
    awk '$5 == "/" {print $6}' /proc/"$1"/mountinfo | grep -q '^ro'
}

chat_turn_is_stored() {
    sid=$(curl -sf http://127.0.0.1/api/chat -H 'Content-Type: application/json' \
        -d '{"message":"Hello, I feel tired today."}' |
        python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["reply"]; print(d["session_id"])') &&
    curl -sf "http://127.0.0.1/api/chat/$sid" |
        python3 -c 'import json,sys; m=json.load(sys.stdin)["messages"]; assert [x["role"] for x in m]==["user","assistant"], m'
}

exposure_at_most() {
    level=$(systemd-analyze security chatfcgi.service 2>/dev/null |
        sed -n 's/.*Overall exposure level for \S*: \([0-9.]*\).*/\1/p')
    echo "exposure level: $level"
    [ -n "$level" ] && awk -v l="$level" -v max="$1" 'BEGIN {exit !(l <= max)}'
}

setup
check "sockets enabled and listening" \
    systemctl is-active chatfcgi.socket chatfcgi-status.socket
check "service waits for its first connection" \
    sh -c '! systemctl is-active chatfcgi.service'
check "health through nginx starts the service" \
    until_true curl -sf http://127.0.0.1/api/healthz
check "service active" systemctl is-active chatfcgi.service
main=$(service_prop MainPID)
worker=$(cut -d' ' -f1 /proc/"$main"/task/"$main"/children)
check "master and workers run as the system user chatfcgi" \
    sh -c "[ \"\$(stat -c %U /proc/$main)\" = chatfcgi ] && [ \"\$(stat -c %U /proc/$worker)\" = chatfcgi ]"
check "no new privileges" proc_status_is "$worker" NoNewPrivs 1
check "no capabilities" proc_status_is "$worker" CapEff 0000000000000000
check "seccomp filter in force" proc_status_is "$worker" Seccomp 2
check "root file system read-only for the service" root_is_read_only "$worker"
check "chat page served" curl -sf http://127.0.0.1/
check "a chat turn answered and stored" chat_turn_is_stored
systemd-analyze security chatfcgi.service | tail -1
check "systemd-analyze security: exposure 2.0 or less" exposure_at_most 2.0
check "reload keeps serving" sh -c \
    'systemctl reload chatfcgi.service && curl -sf http://127.0.0.1/api/healthz'
check "stop" sh -c 'systemctl stop chatfcgi.service && ! systemctl is-active chatfcgi.service'
check "the sockets outlive the service and start it again" \
    until_true curl -sf http://127.0.0.1/api/healthz
if [ "$failed" = 0 ]; then
    echo "all checks passed"
else
    curl -si http://127.0.0.1/api/healthz
    tail -5 /var/log/nginx/chatfcgi.error.log
    systemctl status --no-pager chatfcgi.socket chatfcgi.service
    journalctl --no-pager -u chatfcgi.service | tail -20
fi
