#!/bin/sh
# The packaged units under a real systemd: a minimal Debian 12 tree with
# systemd, the package (with nginx and Redis, recommended) installed into it,
# booted with `systemd-nspawn -b` on a private network. Inside, a check unit
# (in-container-checks.sh) drives the service the way an administrator does
# and writes its findings, then powers the container off.
#
# Run as root on the host by `make test-deb`, after `make deb`. Needs
# systemd-nspawn (Debian's systemd-container) and the Debian mirror; the
# tree starts from fresh-debian.sh's cached minbase when there is one.
set -eu
self=$(readlink -f "$0")
src=$(dirname "$(dirname "$(dirname "$self")")")
base=${FRESH_BASE:-/var/tmp/chatfcgi-fresh-base.tar}
work=$(mktemp -d /var/tmp/chatfcgi-boot.XXXXXX)
root=$work/root
# KEEP=1 keeps the tree and its journal for a look afterwards.
[ -n "${KEEP:-}" ] || trap 'rm -rf --one-file-system "$work"' EXIT
deb=$(ls "$src"/build/deb/chatfcgi_*.deb)

# No machined here: the container is not registered, and stays in our unit.
nspawn() {
    systemd-nspawn -q --register=no --keep-unit -D "$root" "$@"
}

make_tree() {
    mkdir "$root"
    if [ -f "$base" ]; then
        tar -C "$root" -xf "$base"
    else
        debootstrap --variant=minbase bookworm "$root" >"$work/debootstrap.log"
    fi
    # The cached tree's top is mktemp's 0700: only root could walk it.
    chmod 0755 "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp "$deb" "$root/root/"
    cp "$src/app/localmodel.py" "$(dirname "$self")/in-container-checks.sh" \
        "$root/root/"
    nspawn --pipe sh -c "apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-sysv \
            python3 curl /root/$(basename "$deb") >/root/apt.log 2>&1"
    # D-Bus cannot start in this nested container and nothing here needs it
    # (nor logind, which waits for it).
    nspawn --pipe systemctl mask dbus.service dbus.socket systemd-logind.service
    cat >"$root/etc/systemd/system/in-container-checks.service" <<'UNIT'
[Unit]
Description=checks of the packaged chatfcgi units
After=basic.target
[Service]
Type=oneshot
StandardOutput=append:/root/checks.out
StandardError=inherit
ExecStart=/bin/sh /root/in-container-checks.sh
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
UNIT
    nspawn --pipe systemctl enable in-container-checks.service
}

make_tree
timeout 300 systemd-nspawn -q --register=no --keep-unit -D "$root" -b \
    --private-network >"$work/boot.log" 2>&1 || true
if ! [ -s "$root/root/checks.out" ]; then
    tail -30 "$work/boot.log"
    echo "boot test: the checks did not run"
    exit 1
fi
cat "$root/root/checks.out"
! grep -q '^FAIL' "$root/root/checks.out" && grep -q '^all checks passed' "$root/root/checks.out"
