"""Re-checks of the mounted UUID collections of one cluster, many in one request.

Alone, every mounted UUID collection touched after ``refresh_time`` asks for its own
summary (`CollectionLoader.recheck`): ``ls -l`` over a thousand of them is a thousand
requests. With `Rechecks`, the first due re-check of one of a cluster's collections asks,
in one list request per page of them (`SummariesLike.collection_summaries`: a ``uuid in``
filter alone, the list the controller forwards across the federation), for the portable
data hash and modification time of every mounted UUID collection of that cluster that has
no answer younger than half ``refresh_time`` and is not in a request under way.

Each answer is used once, by the next re-check of its collection, if it is younger than
half ``refresh_time`` (so a change shows at most half a ``refresh_time`` later than it
would alone): found unchanged, that re-check asks nothing more. A collection that changed
or that the answer lacks (deleted, trashed, no longer readable) is re-checked on its own,
which fetches what changed and reports deletions with the errno they deserve. A re-check
of a collection in a request under way waits for that request (within the caller's
``--api-wait``, `fedmount.fs.calls`). If the request fails for want of an answer (the
cluster is down, failing or timing out), that failure is the answer of each of its
collections' re-checks (each keeps serving what it has and tries again later), rather than
as many more requests to a cluster that is down; if it is refused, each goes its own way.
Requests are per owning cluster, so a stalled cluster holds only its own collections'
re-checks.

Collections are held weakly: one the tree let go of is no longer asked about.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from fedmount.arvados.errors import ApiError, ApiRefused, ClusterUnreachable
from fedmount.arvados.ids import CollectionId


class SummariesLike(Protocol):
    """What `Rechecks` asks of the API layer (`fedmount.api.listing.ProjectSource`)."""

    async def collection_summaries(
        self, cluster: str, uuids: Sequence[str]
    ) -> dict[str, tuple[str, float | None]]: ...


class KnownLike(Protocol):
    """What a mounted collection's kept record says (`fedmount.fs.loader.KeptRecord`)."""

    portable_data_hash: str
    modified_at: float | None


class TrackedLike(Protocol):
    cid: CollectionId


class Rechecks:
    """Batched re-checks (see the module docstring)."""

    def __init__(self, source: SummariesLike, clock: Callable[[], float], refresh_time: float):
        self.source = source
        self.clock = clock
        self.max_age = refresh_time / 2
        self._tracked: dict[str, weakref.WeakSet[TrackedLike]] = {}  # by owning cluster
        # uuid -> (when asked, (pdh, modified_at), None if the answer lacked it, or the failure)
        self._answers: dict[str, tuple[float, tuple[str, float | None] | ApiError | None]] = {}
        self._under_way: dict[str, trio.Event] = {}  # uuid -> set when the request asking for it is over

    def track(self, coll: TrackedLike) -> None:
        """Re-check `coll` (a UUID collection) with the others of its cluster from now on."""
        cluster = coll.cid.cluster
        if cluster is not None and not coll.cid.is_pdh:
            self._tracked.setdefault(cluster, weakref.WeakSet()).add(coll)

    async def unchanged(self, cid: CollectionId, known: KnownLike) -> bool:
        """Whether collection `cid` is still `known` (False: re-check it on its own);
        the request's `ApiError` if it failed for want of an answer."""
        uuid, cluster = cid.text, cid.cluster
        if cluster is None or cluster not in self._tracked:
            return False
        under_way = self._under_way.get(uuid)
        if under_way is not None:
            await under_way.wait()
        elif not self._fresh(uuid):
            await self._ask(cluster, uuid)
        asked = self._answers.pop(uuid, None)
        if asked is None or asked[1] is None or self.clock() - asked[0] >= self.max_age:
            return False
        if isinstance(asked[1], ApiError):
            raise asked[1]
        return asked[1] == (known.portable_data_hash, known.modified_at)

    def _fresh(self, uuid: str) -> bool:
        asked = self._answers.get(uuid)
        return asked is not None and self.clock() - asked[0] < self.max_age

    async def _ask(self, cluster: str, uuid: str) -> None:
        """One request for `uuid` and every tracked collection of `cluster` that needs one."""
        wanted = dict.fromkeys(
            [uuid, *sorted(c.cid.text for c in self._tracked[cluster])]
        )  # sorted: the same collections make the same request
        uuids = [u for u in wanted if u not in self._under_way and (u == uuid or not self._fresh(u))]
        done = trio.Event()
        for u in uuids:
            self._under_way[u] = done
        try:
            found = await self.source.collection_summaries(cluster, uuids)
        except ApiError as e:
            if _transient(e):  # down or failing: the answer of each of these re-checks
                self._answers.update((u, (self.clock(), e)) for u in uuids)
            # refused (not for want of an answer): each goes its own way
        else:
            answered_at = self.clock()  # a slow answer (retries) is as old as its arrival
            self._answers.update((u, (answered_at, found.get(u))) for u in uuids)
        finally:
            for u in uuids:
                self._under_way.pop(u, None)
            done.set()


def _transient(e: ApiError) -> bool:
    return isinstance(e, ClusterUnreachable) or (isinstance(e, ApiRefused) and e.transient)
