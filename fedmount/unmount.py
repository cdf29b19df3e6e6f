"""``fedmount --unmount``: unmount a fedmount, even one whose daemon is dead or hung.

It needs no API client, so it works when the API is unreachable, and it clears a dead
mount ("Transport endpoint is not connected") as arv-mount does: write 1 to the
connection's ``/sys/fs/fuse/connections/<minor>/abort`` (mounting fusectl there first if
needed and allowed), detach it (`mountinfo.lazy_unmount`), and repeat until that mount is
gone from /proc/self/mountinfo, within ``--unmount-timeout``. It never ``stat``\\s the mount
point, which would hang on a hung daemon. A path that is not mounted is an error (exit 1),
as for ``fusermount3 -u``. ``--replace`` unmounts the same way before mounting.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from fedmount import mountinfo

log = logging.getLogger("fedmount")

FUSECTL = "/sys/fs/fuse/connections"


class UnmountError(Exception):
    """The mount could not be removed, in one line."""


def _abort_connection(minor: int) -> None:
    abort = f"{FUSECTL}/{minor}/abort"
    if not os.path.exists(abort) and os.geteuid() == 0 and not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(abort, "w") as f:
            f.write("1")
    except OSError as e:
        log.debug("cannot abort FUSE connection %d: %s", minor, e.strerror)


def unmount(path: str, timeout: float) -> bool:
    """Unmount the FUSE mount at `path` (absolute, not resolved); False if none was there.

    Raises UnmountError (one line) if it is still mounted after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    entry = mountinfo.mounted_at(path)
    if entry is None:
        return False
    if not entry.is_fuse:
        raise UnmountError(f"{path} is a {entry.fstype} mount, not a FUSE mount; not touching it")
    said = ""
    while True:
        _abort_connection(entry.minor)
        said = mountinfo.lazy_unmount(path)
        retry_at = min(time.monotonic() + 1.0, deadline)
        while time.monotonic() < retry_at:
            if mountinfo.mounted_at(path) != entry:
                # arv-mount waits a moment here: a lazy unmount still in progress could
                # otherwise detach a new mount made at once on the same path (--replace).
                time.sleep(0.2)
                return True
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            detail = f" ({said})" if said else ""
            raise UnmountError(f"{path} is still mounted after {timeout:g}s{detail}; is a process using it?")


def unmount_command(path: str, timeout: float) -> int:
    try:
        if not unmount(path, timeout):
            print(f"fedmount: {path} is not mounted", file=sys.stderr)
            return 1
    except UnmountError as e:
        print(f"fedmount: {e}", file=sys.stderr)
        return 1
    return 0
