"""Where a collection's blocks are read from: a cluster's keep services and the token to send.

The API side builds these (from ``keep_services/accessible``, or ``ARVADOS_KEEP_SERVICES``);
the Keep side reads blocks along them. Neither side imports the other: both import this.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeepService:
    """One keepstore or keepproxy of a cluster, as `keep_services/accessible` lists it."""

    uuid: str
    root_url: str
    service_type: str = "disk"
    read_only: bool = False


@dataclass(frozen=True)
class KeepRoute:
    """Where a collection's blocks are read from: one cluster's services and the token to send.

    `token` is the exact token text for the Authorization header (home token in home mode,
    the token salted for `cluster` in direct mode)."""

    cluster: str
    token: str = field(repr=False)
    services: tuple[KeepService, ...]
