"""Keep client: fetch md5-verified blocks from a route's keep services (work in progress).

This first version carries only the types other modules import; the client follows.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    token: str
    services: tuple[KeepService, ...]
