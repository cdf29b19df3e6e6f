"""Who may share a cache directory: only its user, so that nobody else can plant blocks.

The xxh3 trailer of a block file (format.py) detects damage, not malice: it is not keyed,
so whoever can write the directory can plant a block file with wrong bytes and a right
trailer. So a directory is used only if it, its ``blocks/`` fan-out, its index and every
parent belong to this user (parents may belong to root) and nobody else can write them (a
sticky parent such as /tmp is fine: others cannot rename entries they do not own);
otherwise `check_ownership` raises `UntrustedDirectory` and the cache logs one line and
runs memory-only. A block file that belongs to someone else, or that others may write, is
discarded when opened (disk.py). Directories are made 0700 and files 0600 (`tighten`; the
index too, before SQLite opens it: SQLite gives its -wal and -shm the mode of the
database). One directory therefore serves one user; the guarantee (every byte served is
the block's) holds for that user's processes, and root's processes need a directory of
their own.
"""

from __future__ import annotations

import os
import stat

from .index import INDEX_FILES


class UntrustedDirectory(Exception):
    """Someone other than this user could change what the cache directory holds."""


def writers(st: os.stat_result) -> str | None:
    """Who besides the owner may write to a file or directory with this status, or None."""
    if st.st_mode & stat.S_IWOTH:
        return "anyone"
    if st.st_mode & stat.S_IWGRP:
        return f"group {st.st_gid}"
    return None


def check_ownership(directory: str) -> None:
    """Raise `UntrustedDirectory` unless only this user (and root) can change the cache directory.

    The directory, its ``blocks/`` fan-out and its index must belong to this user and be
    writable by nobody else; every parent directory must belong to this user or to root and
    be writable by nobody else unless it is sticky (like ``/tmp``), or someone could swap the
    directory for one of theirs."""
    me = os.geteuid()
    real = os.path.realpath(directory)
    st = os.lstat(real)
    if st.st_uid != me:
        raise UntrustedDirectory(f"it belongs to uid {st.st_uid}, not to this user (uid {me})")
    if who := writers(st):
        raise UntrustedDirectory(f"{who} can write to it (mode {stat.S_IMODE(st.st_mode):o})")
    parent = real
    while parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        pst = os.stat(parent)
        if pst.st_uid not in (0, me):
            raise UntrustedDirectory(f"its parent {parent} belongs to uid {pst.st_uid}, who can replace it")
        if (who := writers(pst)) and not pst.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(pst.st_mode)
            raise UntrustedDirectory(f"{who} can replace it (its parent {parent} is mode {mode:o})")
    blocks = os.path.join(real, "blocks")
    inside = [os.path.join(real, name) for name in INDEX_FILES]
    if os.path.isdir(blocks):
        inside += [blocks, *(entry.path for entry in os.scandir(blocks))]
    for path in inside:
        try:
            est = os.lstat(path)
        except FileNotFoundError:
            continue
        rel = os.path.relpath(path, real)
        if est.st_uid != me:
            raise UntrustedDirectory(f"{rel} in it belongs to uid {est.st_uid}")
        if who := writers(est):
            raise UntrustedDirectory(f"{who} can write to {rel} in it")
        if stat.S_ISLNK(est.st_mode):
            raise UntrustedDirectory(f"{rel} in it is a symbolic link")


def tighten(directory: str) -> None:
    """Make the cache's directories 0700 and its index 0600 (all this user's: `check_ownership`)."""
    blocks = os.path.join(directory, "blocks")
    for path in [directory, blocks, *(e.path for e in os.scandir(blocks) if e.is_dir(follow_symlinks=False))]:
        os.chmod(path, 0o700)
    for name in INDEX_FILES:
        try:
            os.chmod(os.path.join(directory, name), 0o600)
        except FileNotFoundError:
            pass
