"""``--route auto`` for `locate` and `stage`: which way a mount reads each remote cluster's blocks.

In auto mode a collection comes from the home controller, and its route carries the mount's
`AutoRoutes` (`Federation` builds it: `FederationView` in mode "auto" is that same
construction). A ``+R<cluster>`` block is read from that cluster's own keep services with the
token salted for it while `AutoRoutes` says *direct*, else through the home keepstore.

- `stage` fetches through `KeepClient.get`, which follows that choice by itself; `decide`
  settles the choice for every remote cluster of the blocks to fetch first (as a mount does
  when it loads a collection), so `reading_cluster` can tell which cluster's keep services
  deliver each block, for the throughput book.
- `locate` (`confirm_ways`), per remote cluster a collection's blocks name: the choice as the
  mount makes it (its trial: the remote's ``keep_services/accessible`` with the salted
  token), then one HEAD of that cluster's first block along the way chosen: at its own
  keep services (`direct_locator`, salted token) for *direct*, at the home keepstore
  (home token) otherwise. A direct HEAD that fails (or finds nothing) is a failed read to
  the mount: `AutoRoutes.failed` sends the cluster home, as the mount would, and the block
  is asked through the home. The answer is a `RemoteWay`: the way, why, and whether the
  HEAD along it failed.

With a token that cannot be salted `Federation` builds no `AutoRoutes`: every remote
cluster is read through the home, and the report says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from fedmount.api.route_choice import AutoRoutes
from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import Locator
from fedmount.arvados.routes import KeepRoute, direct_locator

DIRECT, HOME = "direct", "home"
NO_CHOICE = "the token cannot be salted for another cluster, so auto reads every block through the home"


class BlockProbe(Protocol):
    async def head(self, locator: Locator, route: KeepRoute) -> bool: ...


@dataclass(frozen=True)
class RemoteWay:
    """How a mount reads one remote cluster's blocks: `way` DIRECT or HOME, `reason` one line;
    `error`: the HEAD along that way failed (one line)."""

    cluster: str
    way: str
    reason: str
    error: str | None = None

    def to_json(self) -> dict:
        return {"way": self.way, "reason": self.reason, "error": self.error}


def route_choice(route: KeepRoute) -> AutoRoutes | None:
    """The mount's per-cluster choice a home route carries in auto mode, if any."""
    return route.remotes if isinstance(route.remotes, AutoRoutes) else None


def remote_blocks(blocks: Iterable[Locator], route: KeepRoute) -> dict[str, Locator]:
    """The first ``+R`` block of each remote cluster, in manifest order."""
    first: dict[str, Locator] = {}
    for loc in blocks:
        remote = loc.remote
        if remote is not None and remote[0] != route.cluster and not loc.is_empty:
            first.setdefault(remote[0], loc)
    return first


async def decide(plan: Iterable[tuple[Locator, KeepRoute]]) -> None:
    """Settle the route choice for every remote cluster of `plan`'s blocks, concurrently."""
    asked: set[tuple[AutoRoutes, str]] = set()
    for loc, route in plan:
        choice, remote = route_choice(route), loc.remote
        if choice is not None and remote is not None:
            asked.add((choice, remote[0]))
    async with trio.open_nursery() as nursery:
        for choice, cluster in asked:
            nursery.start_soon(choice.direct, cluster)


def reading_cluster(loc: Locator, route: KeepRoute) -> str:
    """The cluster whose keep services deliver `loc` now: a ``+R`` block's own cluster while the
    route's choice reads it directly, else the route's cluster."""
    choice, remote = route_choice(route), loc.remote
    if choice is not None and remote is not None and choice.state(remote[0]) == DIRECT:
        return remote[0]
    return route.cluster


async def confirm_ways(
    blocks: Sequence[Locator], route: KeepRoute, mode: str, keep: BlockProbe, limiter: trio.CapacityLimiter
) -> dict[str, RemoteWay]:
    """In auto mode: the way of every remote cluster `blocks` name, confirmed by one HEAD each."""
    if mode != "auto":
        return {}
    ways: dict[str, RemoteWay] = {}

    async def one(cluster: str, loc: Locator) -> None:
        ways[cluster] = await _confirm(cluster, loc, route, keep, limiter)

    async with trio.open_nursery() as nursery:
        for cluster, loc in remote_blocks(blocks, route).items():
            nursery.start_soon(one, cluster, loc)
    return ways


async def _confirm(
    cluster: str, loc: Locator, route: KeepRoute, keep: BlockProbe, limiter: trio.CapacityLimiter
) -> RemoteWay:
    choice = route_choice(route)
    reason = NO_CHOICE
    if choice is not None:
        direct = await choice.direct(cluster)
        if direct is not None:
            problem = await _head(direct_locator(loc), direct, keep, limiter)
            if problem is None:
                return RemoteWay(cluster, DIRECT, "its keep services answered with the token salted for it")
            choice.failed(cluster, problem)
        reason = choice.reason(cluster)
    return RemoteWay(cluster, HOME, reason, await _head(loc, route, keep, limiter))


async def _head(
    loc: Locator, route: KeepRoute, keep: BlockProbe, limiter: trio.CapacityLimiter
) -> str | None:
    """None if a service of `route` has the block, else what went wrong (one line)."""
    async with limiter:
        try:
            found = await keep.head(loc, route)
        except BlockError as exc:
            return str(exc)
    return None if found else f"block {loc.key} not found through cluster {route.cluster}'s keep services"
