"""The kernel's table of mounts, ``/proc/self/mountinfo``, and the lazy unmount.

One parser for every part of fedmount that needs to know what is mounted where (the
daemon's start-up and ``--unmount``, and ``fedmount-run``, which follows its mount), and one
fallback for detaching a mount that an orderly unmount could not remove.

A line of mountinfo (proc(5))::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw
    ID parent major:minor root mount-point options [optional fields...] - fstype source ...

The mount point is escaped: space, tab, newline and backslash are written ``\\ooo`` (octal).
A `MountEntry` is identified by its mount ID, which the kernel never reuses while the
mount exists: a mount made again at the same path is a different entry, and a mount
whose parent directory was renamed is still found by `by_id`. Paths are compared exactly
as the kernel writes them (absolute, symlinks resolved); callers decide how to resolve
theirs (``--unmount`` must not resolve a hung mount's path, which would stat it).

`lazy_unmount` is ``fusermount3 -u -z`` (or ``fusermount``), then, as root, ``umount -l``:
a busy mount point is detached at once and goes away when its last user leaves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
TOOL_SECONDS = 10  # how long fusermount or umount may take before it is given up on

_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    path: str
    major: int
    minor: int
    fstype: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def unescape(field: str) -> str:
    """A mountinfo field with its ``\\ooo`` escapes decoded."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[MountEntry]:
    """Every mount in a mountinfo text, in its order (a later mount on a path hides the earlier)."""
    entries = []
    for line in text.split("\n"):  # not splitlines(): a path may hold U+2028 and the like, unescaped
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        major, minor = (int(n) for n in fields[2].split(":"))
        fstype = fields[fields.index("-", 6) + 1]
        entries.append(MountEntry(int(fields[0]), unescape(fields[4]), major, minor, fstype))
    return entries


def read(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def mounted_at(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The topmost mount at exactly `path`, or None."""
    found = [m for m in (read() if entries is None else entries) if m.path == path]
    return found[-1] if found else None


def by_id(mount_id: int) -> MountEntry | None:
    """The mount with this ID wherever it is now, or None once it is gone."""
    return next((m for m in read() if m.mount_id == mount_id), None)


def lazy_unmount(path: str) -> str:
    """Detach the mount at `path` lazily: "" once a tool succeeded, else what the tools said."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    commands = [[tool, "-u", "-z", path]] if tool else []
    if os.geteuid() == 0:
        commands.append(["umount", "-l", path])
    said = ""
    for argv in commands:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as exc:
            said = str(exc)
            continue
        if done.returncode == 0:
            return ""
        said = done.stderr.strip() or said
    return said
