"""make deb: the Debian package, built with debhelper in a copy of the
source tree and checked as a file: lintian, its contents and conffiles, the
packaged configuration and units. Installing it for real, on a brand-new
Debian 12, is `make test-deb` (tests/deb/fresh-install.sh)."""

import difflib
import re
import subprocess

import pytest
from source_tree import REPO, copy_source, make, run, verify_units

LINTIAN = "/usr/bin/lintian"
UNITS = ("chatfcgi.service", "chatfcgi.socket", "chatfcgi-status.socket")
CONFFILES = {"/etc/chatfcgi/chatfcgi.conf", "/etc/logrotate.d/chatfcgi",
             "/etc/nginx/sites-available/chatfcgi"}
# Debian's defaults, the only lines in which the packaged configuration
# differs from conf/chatfcgi.conf (see deploy/debian/rules).
DEBIAN_DEFAULTS = {("user =", "user = chatfcgi"),
                   ("listen_group =", "listen_group = www-data")}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The built package, and its files extracted under root/."""
    base = tmp_path_factory.mktemp("deb")
    tree = copy_source(base / "src")
    make(tree, "deb")
    debs = sorted((tree / "build" / "deb").glob("chatfcgi_*.deb"))
    assert len(debs) == 1, debs
    root = base / "root"
    assert run(["dpkg-deb", "-x", debs[0], root]).returncode == 0
    control = base / "control"
    assert run(["dpkg-deb", "-e", debs[0], control]).returncode == 0
    return {"deb": debs[0], "root": root, "control": control, "tree": tree}


def deb_field(deb, name):
    return run(["dpkg-deb", "-f", deb, name]).stdout.strip()


def test_lintian_finds_no_error_or_warning(package):
    if not subprocess.os.access(LINTIAN, subprocess.os.X_OK):
        pytest.skip("no lintian")
    changes = next(package["deb"].parent.glob("chatfcgi_*.changes"))
    r = run([LINTIAN, "--fail-on", "error,warning", changes])
    findings = [line for line in r.stdout.splitlines()
                if re.match(r"[EW]: ", line)]
    assert r.returncode == 0 and findings == [], r.stdout + r.stderr


def test_version_is_the_binarys(package):
    binary = package["root"] / "usr/sbin/chatfcgi"
    said = run([binary, "-v"]).stdout.split()
    assert said[0] == "chatfcgi"
    assert deb_field(package["deb"], "Version").split("-")[0] == said[1]


def test_package_holds_what_a_service_needs(package):
    root = package["root"]
    for path in ("usr/sbin/chatfcgi", "usr/share/man/man8/chatfcgi.8.gz",
                 "usr/share/doc/chatfcgi/copyright",
                 "usr/share/chatfcgi/www/index.html",
                 *(f"lib/systemd/system/{u}" for u in UNITS)):
        assert (root / path).is_file(), path
    conffiles = (package["control"] / "conffiles").read_text().split()
    assert set(conffiles) == CONFFILES
    assert (root / "etc/logrotate.d/chatfcgi").read_bytes() == \
        (REPO / "deploy/logrotate/chatfcgi").read_bytes()
    assert (root / "etc/nginx/sites-available/chatfcgi").read_bytes() == \
        (REPO / "deploy/nginx/chatfcgi.conf").read_bytes()
    depends = deb_field(package["deb"], "Depends")
    for lib in ("libfcgi0ldbl", "libhiredis0.14", "libcurl4", "libyajl2",
                "adduser"):
        assert lib in depends, depends
    for script in ("postinst", "postrm"):
        r = run(["sh", "-n", package["control"] / script])
        assert r.returncode == 0, r.stderr


def test_packaged_config_is_the_default_with_debian_defaults(package):
    packaged = (package["root"] / "etc/chatfcgi/chatfcgi.conf").read_text()
    default = (REPO / "conf/chatfcgi.conf").read_text()
    diff = difflib.ndiff(default.splitlines(), packaged.splitlines())
    removed = {d[2:] for d in diff if d.startswith("- ")}
    diff = difflib.ndiff(default.splitlines(), packaged.splitlines())
    added = {d[2:] for d in diff if d.startswith("+ ")}
    assert {(r, a) for r in removed for a in added
            if a.startswith(r.split(" =")[0] + " =")} == DEBIAN_DEFAULTS
    assert len(removed) == len(added) == len(DEBIAN_DEFAULTS)
    binary = package["root"] / "usr/sbin/chatfcgi"
    assert "(default /etc/chatfcgi/chatfcgi.conf)" in run([binary, "-h"]).stdout


def test_packaged_units_verify(package, tmp_path):
    units = package["root"] / "lib/systemd/system"
    service = (units / "chatfcgi.service").read_text()
    assert "ExecStart=/usr/sbin/chatfcgi -c /etc/chatfcgi/chatfcgi.conf" \
        in service
    pages = re.findall(r"^Documentation=man:(\S+)\((\d)\)$", service, re.M)
    assert pages
    for name, section in pages:
        assert (package["root"] / f"usr/share/man/man{section}"
                / f"{name}.{section}.gz").is_file(), name
    output = verify_units([units / u for u in UNITS], "/usr/sbin/chatfcgi",
                          package["root"] / "usr/sbin/chatfcgi",
                          tmp_path / "staged")
    assert output == "", output


def test_maintainer_scripts_enable_the_sockets_not_the_service(package):
    postinst = (package["control"] / "postinst").read_text()
    assert "adduser --system" in postinst
    enabled = set(re.findall(r"deb-systemd-helper enable '([^']+)'",
                             postinst))
    assert enabled == {"chatfcgi.socket", "chatfcgi-status.socket",
                       "chatfcgi.service"}
    # The service's enable line runs only when it was enabled before (an
    # upgrade keeps an administrator's choice); the sockets' on install.
    service_block = postinst.split("debian-installed 'chatfcgi.service'")[1]
    assert "was-enabled 'chatfcgi.service'" in service_block.split("fi")[0]
