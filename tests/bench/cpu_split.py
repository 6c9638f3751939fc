#!/usr/bin/python3
"""Where a request's CPU goes: run one wrk load and charge the CPU time
every process on the host used meanwhile to its group.

    cpu_split.py [--label SUBSTRING=NAME ...] -- wrk ARGS...

A process belongs to the first label whose SUBSTRING is in its own or its
parent's command line (so an nginx worker goes with its master's -c path);
otherwise to its command name. wrk's own time comes from wait4(). Prints,
per group, CPU microseconds per request (user + system) and its share.
The request count is read from wrk's @@RESULT line (post.lua prints it).

Used by profile.sh; run by hand, not by make bench or make test.
"""

import os
import re
import subprocess
import sys

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmdline(pid):
    return read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(
        "utf-8", "replace")


def snapshot():
    """pid -> (comm, cpu ticks, own + parent command line)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = read(f"/proc/{pid}/stat").decode("utf-8", "replace")
        if not stat:
            continue
        # comm may hold spaces: the fields after it start past the last ')'.
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, ticks = fields[1], int(fields[11]) + int(fields[12])
        procs[pid] = (comm, ticks, cmdline(pid) + " " + cmdline(ppid))
    return procs


def group_of(comm, cmd, labels):
    for needle, name in labels:
        if needle in cmd:
            return name
    return comm


def main(argv):
    labels = []
    while argv and argv[0] == "--label":
        needle, _, name = argv[1].partition("=")
        labels.append((needle, name))
        argv = argv[2:]
    if not argv or argv[0] != "--":
        print(__doc__.strip(), file=sys.stderr)
        return 2
    before = snapshot()
    wrk = subprocess.Popen(argv[1:], stdout=subprocess.PIPE, text=True)
    out = wrk.stdout.read()
    _, status, usage = os.wait4(wrk.pid, 0)
    after = snapshot()
    sys.stdout.write(out)
    m = re.search(r"@@RESULT requests=(\d+)", out)
    if status != 0 or m is None or int(m.group(1)) == 0:
        print("cpu_split: wrk failed or served nothing", file=sys.stderr)
        return 1
    requests = int(m.group(1))
    spent = {"wrk": (usage.ru_utime + usage.ru_stime) * 1e6}
    for pid, (comm, ticks, cmd) in after.items():
        was = before.get(pid)
        used = ticks - (was[1] if was and was[0] == comm else 0)
        if used > 0:
            name = group_of(comm, cmd, labels)
            spent[name] = spent.get(name, 0.0) + used * TICK_US
    total = sum(spent.values())
    print(f"CPU per request over {requests} requests (us, user+system):")
    for name, us in sorted(spent.items(), key=lambda kv: -kv[1]):
        if us / requests >= 0.5:
            print(f"  {name:<20} {us / requests:8.1f}  {100 * us / total:5.1f}%")
    print(f"  {'total':<20} {total / requests:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
