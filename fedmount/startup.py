"""The daemon's start-up steps that touch the host: the mount point, limits, the fork.

Each either succeeds or raises `StartupError` with one line, before anything is mounted
(`prepare_mountpoint`, `daemonize`), or logs a warning and goes on when only root could do
it (`set_read_ahead`, `raise_fuse_requests`) or the system says no (`raise_open_file_limit`).

- `prepare_mountpoint`: a FUSE mount already at the mount point is refused, or with
  ``--replace`` unmounted first (which also clears a dead one); then it must be an empty
  directory, unless ``--nonempty`` (libfuse 2 and arv-mount refuse to hide files; libfuse 3
  does not check, so fedmount does).
- `daemonize`: without ``--foreground``/``--exec``, fork: the parent waits on a pipe and
  exits 0 once the child writes "ready", or prints the child's one-line reason and exits 1.
  Once ready, the child drops its stderr log handler and its terminal output.
- `raise_open_file_limit`: the soft limit of open files up to the hard limit, as arv-mount
  raises it (a daemon serving many readers, blocks and connections must not hit EMFILE
  first).
- `set_read_ahead`, `raise_fuse_requests`: the mount's kernel read-ahead and the number of
  read requests the kernel may send at once (as root).
"""

from __future__ import annotations

import logging
import os
import resource
import stat
import sys
from collections.abc import Callable

from fedmount import mountinfo
from fedmount.mount_options import MountOptions
from fedmount.unmount import FUSECTL, UnmountError, unmount

log = logging.getLogger("fedmount")

FUSE_REQUESTS = 1024  # read requests the kernel may send at once (its default, 12, starves readers)


class StartupError(Exception):
    """Why the mount could not be made, in one line."""


def prepare_mountpoint(opts: MountOptions) -> None:
    path = opts.mountpoint
    entry = mountinfo.mounted_at(path)
    if entry is not None and entry.is_fuse:
        if not opts.replace:
            raise StartupError(f"{path} is already a FUSE mount ({entry.fstype}); use --replace, "
                               f"or fedmount --unmount {path}")
        try:
            unmount(path, opts.unmount_timeout)
        except UnmountError as e:
            raise StartupError(f"--replace: {e}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartupError(f"cannot mount on {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"cannot mount on {path}: not a directory")
    if not opts.nonempty:
        try:
            hidden = os.listdir(path)
        except OSError as e:
            raise StartupError(f"cannot mount on {path}: {e.strerror}") from None
        if hidden:
            entries = f"{len(hidden)} entr{'y' if len(hidden) == 1 else 'ies'}"
            raise StartupError(f"{path} is not empty ({entries}, which the mount would hide); "
                               "use an empty directory, or --nonempty to mount over it")


def set_read_ahead(path: str, kb: int) -> None:
    entry = mountinfo.mounted_at(path)
    if kb <= 0 or entry is None or os.geteuid() != 0:
        return
    knob = f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.warning("cannot set %s to %d: %s", knob, kb, e.strerror)


def raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (to fs.nr_open if the hard one is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = int(f.read())
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, e)
        return
    log.debug("open-file limit raised from %d to %d", soft, wanted)


def raise_fuse_requests(path: str) -> int:
    """Let the kernel send the mount up to FUSE_REQUESTS read requests at once (needs root: a reader
    waiting for room in the block cache holds one, admission.py); the limit in effect."""
    entry = mountinfo.mounted_at(path)
    knob = f"{FUSECTL}/{entry.minor}" if entry is not None else None
    if knob is None or os.geteuid() != 0:
        return 12
    try:
        limits = {"max_background": FUSE_REQUESTS, "congestion_threshold": FUSE_REQUESTS * 3 // 4}
        for name, value in limits.items():
            with open(f"{knob}/{name}", "w") as f:
                f.write(str(value))
        with open(f"{knob}/max_background") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        log.warning("cannot raise %s/max_background: %s", knob, e)
        return 12


def daemonize() -> Callable[[str | None], None] | int:
    """Fork. In the parent: wait for the child's word and return the exit status.
    In the child: return the function that reports readiness (None) or a failure line."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        word = b"".join(chunks).decode(errors="replace").strip()
        if word == "ready":
            return 0
        print(word or f"fedmount: the daemon (pid {pid}) exited before the mount was ready; "
                      "run with --foreground to see why", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory (perhaps on another mount) busy
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    def report(failure: str | None) -> None:
        os.write(write_end, b"ready\n" if failure is None else f"fedmount: {failure}\n".encode())
        os.close(write_end)
        if failure is None:  # detach from the terminal's output from now on: log to the file only
            root = logging.getLogger()
            root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)

    return report
