"""The filesystem's failures: `FsError`, and the one place a failure becomes an errno.

Below the filesystem, failures are the typed tree of `fedmount.arvados.errors`. This
module turns them into what a process sees, as mountpoint-s3's ``fs/error.rs`` does:

- `NotFound`, `UnknownCluster` -> ENOENT: no such collection for this token, or an id of a
  cluster the federation does not have; the answer may be cached as a negative entry;
- `AccessDenied` -> EACCES: the token was rejected, or may not read the collection;
- every other `ApiError` (unreachable, refused otherwise, a bad or too big answer, a token
  that cannot be salted) and every `BlockError` -> EIO: the data may exist but cannot be
  served now, and the log line says why.

`fs/fuse.py` turns `FsError` into the reply; any other exception there is a bug, answered
EIO with one log line.
"""

from __future__ import annotations

import errno
import logging

from fedmount.arvados.errors import (
    AccessDenied,
    ApiError,
    BlockError,
    BlockNotFound,
    NotFound,
    UnknownCluster,
)
from fedmount.stats import Stats

log = logging.getLogger("fedmount.fs")


class FsError(Exception):
    """A filesystem answer other than success: an errno, and how long it may be cached."""

    def __init__(self, code: int, message: str = "", cache_for: float = 0.0):
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code
        self.cache_for = cache_for


def api_errno(error: ApiError) -> int:
    """The errno of a failed collection lookup (see the module docstring)."""
    if isinstance(error, (NotFound, UnknownCluster)):
        return errno.ENOENT
    if isinstance(error, AccessDenied):
        return errno.EACCES
    return errno.EIO


def api_failure(error: ApiError, subject: str, stats: Stats, *, quiet: bool = False) -> FsError:
    """`error` of a request about `subject` (a collection, a project) as `FsError`: counted in
    ``api_errors`` unless the thing is missing, and logged in one line naming `subject` and
    the cluster (at info level if missing) unless `quiet`."""
    code = api_errno(error)
    message = f"{subject} (cluster {error.cluster or '?'}): {error.message}"
    if code != errno.ENOENT:
        stats.add("api_errors", cluster=error.cluster)
    if not quiet:
        log.log(logging.INFO if code == errno.ENOENT else logging.ERROR, "%s", message)
    return FsError(code, message)


def block_failure(error: BlockError, where: str) -> FsError:
    """EIO for a block that could not be read at `where` (collection and path), phrased as
    crunch-run expects: it turns "Block not found error" into a runtime warning."""
    what = "Block not found error" if isinstance(error, BlockNotFound) else "Block read error"
    return FsError(errno.EIO, f"{what}: {where}: {error}")
