"""Which processes listen where: the loopback checks of the tests (Linux: /proc and `ss`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]"}


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (a local Ray started by this process: its GCS, raylet, workers)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # it ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def listening(pids: set[int]) -> dict[int, set[str]] | None:
    """The local addresses each of `pids` has a listening TCP socket on (None without `ss`)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found: dict[int, set[str]] = {}
    for line in out.splitlines():
        for pid in {int(p) for p in re.findall(r"pid=(\d+),", line)} & pids:
            found.setdefault(pid, set()).add(line.split()[3].rsplit(":", 1)[0])
    return found
