"""Re-checks of many mounted UUID collections on a real mount: one list per cluster per tick.

fedmount mounts N UUID collections of every cluster under ``by_id/``, reads one file of
each (a whole record each), waits past ``--refresh-time`` and stats them all again: the
request log must show, for each owning cluster, one ``collections`` list with the ``uuid
in`` filter alone naming all N (forwarded by the home in home mode, asked of the owner in
direct mode) and no get of any of them. A changed one is then fetched on its own.
Tests need /dev/fuse (and fusermount3 or root) and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from integration.mounting import requires_fuse, wait_for

pytestmark = requires_fuse

N = 6  # mounted UUID collections per cluster
REFRESH = 3.0


def collection_requests(fed, since: int, uuids: set[str]) -> list[tuple[dict, list[str]]]:
    """(log line, uuids named) of every controller request about `uuids` since `since`."""
    out = []
    for r in fed.requests(since, service="controller", method="GET"):
        url = urlsplit(r["path"])
        named = [u for u in uuids if url.path.endswith(f"/collections/{u}")]
        if url.path.endswith("/collections"):
            filters = json.loads(parse_qs(url.query).get("filters", ["[]"])[0])
            named = [u for f in filters if f[:2] == ["uuid", "in"] for u in f[2] if u in uuids]
        if named:
            out.append((r, named))
    return out


@pytest.mark.parametrize("route", ["home", "direct"])
def test_many_mounted_uuid_collections_of_a_cluster_are_rechecked_in_one_list_per_tick(fed, mount, route):
    stamp = time.monotonic_ns()
    by_cluster = {
        cluster: [fed.add_collection(cluster, f"batched-{stamp}-{cluster}-{i}", {"a.txt": f"{i}\n"})
                  for i in range(N)]
        for cluster in fed.clusters
    }  # fmt: skip
    uuids = {c["uuid"] for colls in by_cluster.values() for c in colls}
    m = mount("--refresh-time", str(REFRESH), "--route", route)
    for colls in by_cluster.values():
        for i, c in enumerate(colls):
            assert (m / f"by_id/{c['uuid']}/a.txt").read_text() == f"{i}\n"
    time.sleep(REFRESH + 0.5)  # every one is due
    mark = fed.mark()
    for colls in by_cluster.values():
        for c in colls:
            os.stat(m / f"by_id/{c['uuid']}/a.txt")  # within half a refresh: one tick
    expected = len(fed.clusters) + (len(fed.clusters) - 1 if route == "home" else 0)  # + forwarded ones

    def logged() -> list:
        found = collection_requests(fed, mark, uuids)
        return found if len(found) >= expected else []

    wait_for(logged, 15, "the re-checks in the request log")
    time.sleep(0.5)  # nothing more is coming
    found = collection_requests(fed, mark, uuids)
    assert all(urlsplit(r["path"]).path.endswith("/collections") for r, _ in found), "no get of any of them"
    for cluster, colls in by_cluster.items():
        lists = [(r, named) for r, named in found if set(named) & {c["uuid"] for c in colls}]
        asked_at = {r["cluster"] for r, _ in lists}
        assert asked_at == ({fed.home, cluster} if route == "home" else {cluster}), lists
        for at in asked_at:  # one list per cluster asked, naming all N of that cluster and no other
            [(r, named)] = [(r, named) for r, named in lists if r["cluster"] == at]
            assert sorted(named) == sorted(c["uuid"] for c in colls) and r["status"] == 200
            assert r["bytes"] < 400 * N, r["bytes"]  # the freshness fields, no manifest
    assert len(found) == expected
