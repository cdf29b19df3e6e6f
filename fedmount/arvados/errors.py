"""Every failure of the outside world that fedmount reports, in one tree.

::

    ApiError                   an API call to one cluster failed (.cluster, one-line .message)
    ├── ClusterUnreachable     no HTTP answer: connect, reset, timeout, TLS
    ├── ApiRefused             the cluster answered an HTTP error status (.status)
    │   ├── AccessDenied       401 or 403: the token was rejected, or may not read this
    │   └── NotFound           404: no such object (for a collection lookup across the
    │                          federation, also "every cluster said no", see api/federation.py)
    ├── UnknownCluster         a cluster the home cluster does not know: never asked
    ├── TokenNotSaltable       the token cannot be salted for a remote cluster
    ├── AnswerTooBig           an answer bigger than --max-manifest-size allows
    └── BadAnswer              an answer that cannot be right: not JSON, missing fields, a
                               manifest that does not hash to its PDH, a cluster lying about its id
    BlockError                 a block could not be read (.locator, one-line message)
    └── BlockNotFound          every keep service of the route said it does not have the block
    KeepWriteError             a block could not be stored with the copies and storage classes
                               asked for (.key, one-line message starting "Keep write error")

The API clients (`fedmount.api`) raise the first family, the Keep client (`fedmount.blocks`)
the second. What a failure means to a caller is its type: `fedmount.fs.errors` maps the tree
to errno, in one place, and the commands phrase it for a person from the same types. An HTTP
status survives only where the server really sent one (`ApiRefused.status`).

Messages never carry a token: `ApiError` redacts its message, and block messages name a
block by ``hash+size`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tokens import redact

if TYPE_CHECKING:
    from .ids import Locator


class ApiError(Exception):
    """An API call to `cluster` failed; `message` is one line."""

    def __init__(self, cluster: str, message: str):
        self.cluster = cluster
        self.message = redact(" ".join(message.split()))
        super().__init__(f"{cluster}: {self.message}")


class ClusterUnreachable(ApiError):
    """The cluster gave no HTTP answer (connect, reset, timeout, TLS)."""


class ApiRefused(ApiError):
    """The cluster answered with HTTP error `status`."""

    def __init__(self, cluster: str, message: str, status: int):
        super().__init__(cluster, message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth asking again later: the server was busy or failing, not refusing."""
        return self.status in (408, 429) or self.status >= 500


class AccessDenied(ApiRefused):
    """401 or 403: the token was rejected, or it may not read this object."""


class NotFound(ApiRefused):
    """404: no such object (or, for a federation-wide lookup, no cluster has it)."""


class UnknownCluster(ApiError):
    """A cluster the home cluster does not know (not in its ``remoteHosts``); never asked."""


class TokenNotSaltable(ApiError):
    """The token cannot be salted for a remote cluster (a v1 token, or one salted already)."""


class AnswerTooBig(ApiError):
    """The answer is bigger than the limit the caller set (``--max-manifest-size``)."""


class BadAnswer(ApiError):
    """An answer that cannot be right: malformed, incomplete, or contradicting itself."""


def refusal(cluster: str, message: str, status: int) -> ApiRefused:
    """The `ApiRefused` subclass for HTTP error `status`."""
    if status in (401, 403):
        return AccessDenied(cluster, message, status)
    if status == 404:
        return NotFound(cluster, message, status)
    return ApiRefused(cluster, message, status)


def transient(error: ApiError) -> bool:
    """A failure another try may not meet: unreachable, or a busy or failing server."""
    return isinstance(error, ClusterUnreachable) or (isinstance(error, ApiRefused) and error.transient)


class BlockError(Exception):
    """A block could not be read; the message is one line naming the block and services tried."""

    def __init__(self, locator: Locator, message: str):
        super().__init__(message)
        self.locator = locator


class BlockNotFound(BlockError):
    """Every service of the route answered that it does not have the block."""


class KeepWriteError(Exception):
    """A block could not be stored as asked; the message is one line, "Keep write error: ..."
    (the phrase crunch-run turns into a runtime warning), naming the block by ``hash+size``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"Keep write error: {message}")
        self.key = key
