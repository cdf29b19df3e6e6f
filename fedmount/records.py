"""Small persistent records (run reuse, cluster copies): a `diskcache.Cache` private to its user.

diskcache is a SQLite key-value store with a size bound and LRU eviction; the values kept
here are short strings (a results directory, a locator), which it stores inside the
database. Its files are created under the process umask, and a record can sit in a
shared directory's tree (``<cache>/cluster-copies``), so `private_record` first makes the
record's directory ``0700`` (refusing a symlink or a directory another user owns) and opens
the cache with umask ``077``: the database is created ``0600``, and SQLite gives its WAL and
shared-memory files the database file's mode.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import diskcache


class RecordDirError(OSError):
    """The record's directory is a symlink or belongs to another user."""


def private_record(directory: str, **settings: Any) -> diskcache.Cache:
    """A diskcache.Cache in `directory` (created 0700 if missing) whose files only this user can read."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RecordDirError(f"{directory}: not a directory of this user; remove it or choose another")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    old = os.umask(0o077)
    try:
        record = diskcache.Cache(directory, **settings)
    finally:
        os.umask(old)
    for name in os.listdir(directory):  # files an earlier version created under the umask
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o600)
    return record
