#!/usr/bin/env python3
"""Checks that a program's system calls, as strace saw them, pass a unit's filter.

    check_syscalls.py UNIT STRACE_LOG [--exclude-exec PATH ...]

UNIT's SystemCallFilter= lines are expanded with `systemd-analyze syscall-filter`
the way systemd applies them (an allow list, then `~` lines taking groups out of
it). STRACE_LOG is `strace -f -qq -o FILE` output. Processes that exec another
program (a child such as the qrexec double) are left out: the filter under test
is the unit's main program's. Exits 1, naming the calls, if any call seen would
have been refused; SystemCallErrorNumber=EPERM would turn those into silent
failures in production, which is what this check is for.
"""

import argparse
import re
import subprocess
import sys


def expand(name, cache={}):
    """The system calls in a set such as @system-service, recursively."""
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", name],
            check=True, capture_output=True, text=True,
        ).stdout
        members = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            members |= expand(item)
        cache[name] = members
    return cache[name]


def unit_filter(path):
    """The set of calls UNIT allows, or None when it sets no filter."""
    allowed = None
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1].strip()
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item.split(":")[0])
        if deny:
            allowed = (allowed if allowed is not None else set()) - names
        else:
            allowed = names if allowed is None else allowed | names
    return allowed


CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")
EXEC = re.compile(r'^(\d+)\s+execve\("([^"]+)"')


def seen_calls(log, exclude_exec):
    """Every call in LOG, except those a process makes after it execs one of
    EXCLUDE_EXEC (its calls before the exec are the traced program's own)."""
    calls = set()
    excluded = set()
    for line in open(log, encoding="utf-8", errors="replace"):
        m = EXEC.match(line)
        if m and m.group(2) in exclude_exec:
            excluded.add(m.group(1))
            continue
        m = CALL.match(line)
        if m and m.group(1) not in excluded and m.group(2) not in ("exited", "killed"):
            calls.add(m.group(2))
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unit")
    parser.add_argument("strace_log")
    parser.add_argument("--exclude-exec", action="append", default=[],
                        help="leave out processes that exec this program")
    args = parser.parse_args()

    allowed = unit_filter(args.unit)
    if allowed is None:
        print(f"{args.unit}: no SystemCallFilter=, nothing to check")
        return 0
    calls = seen_calls(args.strace_log, set(args.exclude_exec))
    refused = sorted(calls - allowed)
    if refused:
        print(f"{args.unit}: the filter would refuse: {' '.join(refused)}")
        return 1
    print(f"{args.unit}: all {len(calls)} system calls seen pass the filter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
