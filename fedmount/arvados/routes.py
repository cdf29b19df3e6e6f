"""Where a collection's blocks are read from: a cluster's keep services and the token to send.

The API side builds these (from ``keep_services/accessible``, or ``ARVADOS_KEEP_SERVICES``);
the Keep side reads blocks along them. Neither side imports the other: both import this.

A home route may carry `RemoteRoutes` (``--route auto``): the API side's answer, per
remote cluster, to "read this cluster's ``+R`` blocks from its own keep services, or
through the home keepstore?". The Keep side asks it for each ``+R`` block, sends the
block's `direct_locator` along the route it gives, and tells it when that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .ids import Locator


@dataclass(frozen=True)
class KeepService:
    """One keepstore or keepproxy of a cluster, as `keep_services/accessible` lists it."""

    uuid: str
    root_url: str
    service_type: str = "disk"
    read_only: bool = False


class RemoteRoutes(Protocol):
    """Per remote cluster: its own keep route (salted token), or None for "through the home"."""

    async def direct(self, cluster: str) -> KeepRoute | None:
        """The route to `cluster`'s keep services, if its blocks are read directly now."""
        ...

    def failed(self, cluster: str, reason: str) -> None:
        """A block read along `cluster`'s direct route failed (`reason`, one line)."""


@dataclass(frozen=True)
class KeepRoute:
    """Where a collection's blocks are read from: one cluster's services and the token to send.

    `token` is the exact token text for the Authorization header (home token in home mode,
    the token salted for `cluster` in direct mode). `remotes`, on a home route in auto
    mode, chooses per remote cluster where its ``+R`` blocks are read."""

    cluster: str
    token: str = field(repr=False)
    services: tuple[KeepService, ...]
    remotes: RemoteRoutes | None = field(default=None, repr=False, compare=False)


def direct_locator(locator: Locator) -> Locator:
    """The form of a ``+R<cluster>-<sig>`` locator that the remote cluster's own keepstores
    accept with the token salted for it: the ``+R`` hint turned back into ``+A<sig>`` and the
    home's ``+A`` dropped, as the home keepstore does when it proxies (blockReadRemote)."""
    hints = tuple("A" + h[7:] if h.startswith("R") and len(h) > 7 and h[6] == "-" else h
                  for h in locator.hints if not h.startswith("A"))  # fmt: skip
    return locator.with_hints(hints)
