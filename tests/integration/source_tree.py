"""Helpers for the tests of make install and make deb: a copy of the source
tree to build in (the checkout's build/ and bin/ are left alone), make run
with a clean environment, and systemd-analyze verify on units whose binary
is staged elsewhere than where they name it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


def clean_env():
    """The caller's environment without what would steer make or chatfcgi:
    a parent make's flags, install variables, CHATFCGI_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATFCGI_") and k not in (
               "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "GNUMAKEFLAGS",
               "MAKEFILES", "DESTDIR", "PREFIX", "SYSCONFDIR", "VARIANT")}
    env["LC_ALL"] = "C.UTF-8"
    return env


def run(args, **kw):
    return subprocess.run([str(a) for a in args], env=clean_env(),
                          capture_output=True, text=True, timeout=600, **kw)


def make(tree, *args):
    r = run(["make", "--no-print-directory", "-C", tree, *args])
    assert r.returncode == 0, (
        f"make {' '.join(args)} failed ({r.returncode}):\n"
        f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def _ignore(root):
    top = {".git", "build", "bin", ".run"}

    def ignore(directory, names):
        d = Path(directory)
        skip = {n for n in names if n in ("__pycache__", ".pytest_cache")}
        if d == root:
            skip |= top & set(names)
        if d == root / "tests":
            skip |= {"out"} & set(names)
        return skip
    return ignore


def copy_source(dest):
    """The checkout's sources, without build products, copied to dest."""
    shutil.copytree(REPO, dest, symlinks=True, ignore=_ignore(REPO))
    return dest


def verify_units(units, binary, staged_binary, scratch):
    """systemd-analyze verify on the unit files `units` (paths), with
    `binary` in their text replaced by `staged_binary`, which must exist.
    Returns verify's output, empty when it found nothing. The units'
    Documentation= man page is installed with them, not on this machine:
    verify does not look it up."""
    if not os.access(SYSTEMD_ANALYZE, os.X_OK):
        pytest.skip("no systemd-analyze")
    scratch.mkdir(exist_ok=True)
    staged = []
    for unit in units:
        copy = scratch / unit.name
        copy.write_text(unit.read_text().replace(binary, str(staged_binary)))
        staged.append(str(copy))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *staged],
                       env=dict(clean_env(), SYSTEMD_LOG_LEVEL="notice"),
                       capture_output=True, text=True, timeout=60)
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 or output, "verify failed without a word"
    return output
