"""Process ancestry from Linux's /proc: who started whom, which Ray's own APIs do not say for
several raylets on one host (`federation.client.job_node_id`, `LocalCluster.kill_node`)."""

from __future__ import annotations

from pathlib import Path


def parent_pid(pid: int) -> int | None:
    """The parent of `pid`, or None when it is gone or there is no /proc."""
    try:  # the field after the state, past the "(name)", which may hold spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def argv(pid: int) -> list[str]:
    """The command line of `pid` ([] when it is gone or there is no /proc)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """Every living process below `root` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        ppid = parent_pid(int(entry.name))
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found
