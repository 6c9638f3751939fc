#!/usr/bin/python3
"""Where a request's CPU goes: run one wrk load and charge the CPU time
every process on the host used meanwhile to its group.

    cpu_split.py [--label SUBSTRING=NAME ...] -- wrk ARGS...

A process belongs to the first label whose SUBSTRING is in its own or its
parent's command line (so an nginx worker goes with its master's -c path);
otherwise to its command name. (As a library, a label may also name pids:
those processes and their descendants.) wrk's own time comes from wait4(). Prints,
per group, CPU microseconds per request (user + system) and its share.
The request count is read from wrk's @@RESULT line (session.lua and the harness's post.lua print it).

A process is the same one in both snapshots of /proc when its pid and its
start time (field 22 of /proc/PID/stat) are: its command name may change
meanwhile (a kernel worker's does, kworker/0:2-events <-> kworker/0:2-mm_percpu_wq)
and a pid may be reused. Time of processes that started and ended between
the snapshots is not seen (their parent reaps it, as cutime).

As a library (bench.py's "cpu" phase):

    us, requests, result = cpu_split.split(argv, labels, env=None)

us: {group: CPU microseconds per request}, labelled groups under their
NAME, the others under their command name, wrk under "wrk"; requests: the
count of wrk's @@RESULT line; result: that line's fields (rps, non2xx...).
Raises SplitError when wrk fails or served nothing.

Used by profile.sh and by bench.py; not by make test.
"""

import os
import re
import subprocess
import sys

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
WRK = "wrk"  # the group of the wrk process run here (from wait4)


class SplitError(Exception):
    pass


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
    """(pid, start time) -> (comm, cpu ticks, own + parent command line,
    parent pid)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = read(f"/proc/{pid}/stat").decode("utf-8", "replace")
        if not stat:
            continue
        # comm may hold spaces: the fields after it start past the last ')'.
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        # fields[0] is field 3 (state): utime, stime = 14, 15; starttime = 22
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, ticks = fields[1], int(fields[11]) + int(fields[12])
        procs[(pid, fields[19])] = (comm, ticks,
                                    cmdline(pid) + " " + cmdline(ppid), ppid)
    return procs


def group_of(pid, comm, cmd, labels, parent):
    """The first label that claims the process, else its command name. A
    label's needle is a string (in the process's or its parent's command
    line) or a collection of pids (the process is one of them or descends
    from one)."""
    for needle, name in labels:
        if isinstance(needle, str):
            if needle in cmd:
                return name
            continue
        p, hops = pid, 0
        while p and p != "0" and hops < 32:
            if p in needle:
                return name
            p, hops = parent.get(p), hops + 1
    return comm


def charge(before, after, labels):
    """{group: CPU microseconds} spent between two snapshots."""
    labels = [(n if isinstance(n, str) else {str(p) for p in n}, name)
              for n, name in labels]
    parent = {pid: ppid for (pid, _), (*_, ppid) in before.items()}
    parent.update({pid: ppid for (pid, _), (*_, ppid) in after.items()})
    spent = {}
    for key, (comm, ticks, cmd, _) in after.items():
        was = before.get(key)
        used = ticks - (was[1] if was else 0)
        if used > 0:
            name = group_of(key[0], comm, cmd, labels, parent)
            spent[name] = spent.get(name, 0.0) + used * TICK_US
    return spent


def parse_result(text):
    m = re.search(r"^@@RESULT (.*)$", text, re.M)
    if not m:
        return None
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def split(argv, labels, env=None):
    """Run wrk (argv) and return ({group: us per request}, requests,
    @@RESULT fields). labels: [(needle, group name)], first match wins; a
    needle is a substring of the command line or a collection of pids
    (those processes and their descendants), see group_of().
    wrk's own time is under "wrk"; a process of another wrk (a command
    name "wrk" that no label claims) under "wrk (other)"."""
    labels = list(labels)
    before = snapshot()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    out = p.stdout.read()
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)
    after = snapshot()
    p.returncode = os.waitstatus_to_exitcode(status)
    res = parse_result(out)
    if status != 0 or res is None or int(res.get("requests", 0)) == 0:
        raise SplitError(f"wrk failed or served nothing:\n{out.strip()}")
    requests = int(res["requests"])
    spent = charge(before, after, labels)
    if WRK in spent:
        spent[WRK + " (other)"] = spent.pop(WRK)
    spent[WRK] = (usage.ru_utime + usage.ru_stime) * 1e6
    return ({k: v / requests for k, v in spent.items()}, requests,
            dict(res, output=out))


def main(argv):
    labels = []
    while argv and argv[0] == "--label":
        needle, _, name = argv[1].partition("=")
        labels.append((needle, name))
        argv = argv[2:]
    if not argv or argv[0] != "--":
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        us, requests, res = split(argv[1:], labels)
    except SplitError as e:
        print(f"cpu_split: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(res["output"])
    total = sum(us.values())
    print(f"CPU per request over {requests} requests (us, user+system):")
    for name, v in sorted(us.items(), key=lambda kv: -kv[1]):
        if v >= 0.5:
            print(f"  {name:<20} {v:8.1f}  {100 * v / total:5.1f}%")
    print(f"  {'total':<20} {total:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
