"""Benchmark: what each listed entry of the project tree keeps in the daemon's heap.

Builds the fs's real project tree (`fedmount.fs.tree.Tree` with the home layout) over a
source that answers like the API (the fields fedmount selects, a page of 1,000 at a time,
each decoded from JSON text as the controller client decodes it, so no string is shared
between records, and handed over before the next is decoded, as `ProjectSource` does),
walks `--projects` projects of `--per-project` collections each (readdir, then the
attributes of every entry, as ``find`` or ``ls -l`` does), and measures the process's RSS
growth per listed entry, then, walking a second tree under tracemalloc, the bytes still
allocated per listed entry after the walk and where they were allocated (the `--top` sites).

`make bench` reports the daemon's own figure (``daemon RSS per listed entry``, through FUSE,
against issue 17's 80 B); this one is the tree's part alone, with the sites to work on.

The last line is JSON: ``{"entries", "bytes_per_entry", "rss_bytes_per_entry", "top":
[[site, bytes_per_entry]]}``.

    .venv/bin/python bench/bench_listed_memory.py [--projects 100] [--per-project 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmount.api.listing import ClusterConfig  # noqa: E402
from fedmount.fs.layout import Layout  # noqa: E402
from fedmount.fs.projects import ProjectDir  # noqa: E402
from fedmount.fs.tree import Tree  # noqa: E402
from fedmount.stats import Stats  # noqa: E402

ME = "zzzzz-tpzed-000000000000001"
STAMP = "2026-01-02T03:04:05.123456789Z"


def project_uuid(i: int) -> str:
    return f"zzzzz-j7d0g-{i:015d}"


class ApiLikeSource:
    """The user's home holds `projects` projects of `per_project` collections each; every
    answer is decoded from JSON text, with the fields the API sends for fedmount's select."""

    home_cluster = "zzzzz"
    clusters = ["zzzzz"]
    user = {"uuid": ME, "first_name": "Bench", "last_name": "User"}

    def __init__(self, projects: int, per_project: int):
        self.projects, self.per_project = projects, per_project

    async def config(self, cluster: str) -> ClusterConfig:
        return ClusterConfig("%2f", 1000)

    async def contents(self, owner: str, take: Any, cluster: str | None = None) -> None:
        if owner == ME:
            rows = [{"kind": "arvados#group", "etag": f"e{i:020d}", "uuid": project_uuid(i),
                     "name": f"project {i}", "owner_uuid": ME, "group_class": "project",
                     "modified_at": STAMP, "created_at": STAMP, "description": None, "properties": {},
                     "writable_by": [ME]}
                    for i in range(self.projects)]  # fmt: skip
            await take(json.loads(json.dumps(rows)))
            return
        for start in range(0, self.per_project, 1000):  # pages of 1,000, as the API answers
            await take(json.loads(self._page(owner, start)))

    def _page(self, owner: str, start: int) -> bytes:
        """The JSON text of a page of collections (fedmount's select), starting at `start`."""
        p = int(owner.rsplit("-", 1)[1])
        return json.dumps([{"kind": "arvados#collection", "etag": f"e{p:08d}{i:012d}",
                            "uuid": f"zzzzz-4zz18-{p:07d}{i:08d}", "name": f"sample {i:06d}.fastq",
                            "modified_at": STAMP, "current_version_uuid": f"zzzzz-4zz18-{p:07d}{i:08d}"}
                           for i in range(start, min(start + 1000, self.per_project))]).encode()  # fmt: skip

    async def get(self, uuid: str) -> dict[str, Any]:
        raise AssertionError("a walk gets nothing")

    async def find(self, owner: str, names: Any, cluster: str | None = None) -> list[dict[str, Any]]:
        raise AssertionError("a walk finds nothing by name")

    async def shared(self, cluster: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [], []

    async def tags(self, cluster: str) -> list[str]:
        return []

    async def tagged(self, cluster: str, tag: str) -> list[str]:
        return []


class NoFederation:
    async def get_collection(self, cid: Any) -> Any:
        raise AssertionError("a walk loads no collection")

    async def get_summary(self, cid: Any, fields: Any) -> Any:
        raise AssertionError("a walk re-checks no collection")


async def walk(tree: Tree) -> int:
    """readdir and getattr of everything under home/; the number of entries listed."""
    count = 0
    home = await tree.lookup(1, "home")
    pending = [home.ino]
    while pending:
        ino = pending.pop()
        for name, node in await tree.node(ino).entries():
            if name.startswith("."):
                continue
            count += 1
            node.attr()
            if isinstance(node, ProjectDir):  # a collection's insides are not the listing's
                pending.append(node.ino)
    return count


def rss() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


async def walked(projects: int, per_project: int) -> tuple[Tree, int, int]:
    """A tree walked once: (tree, entries, RSS growth of the process in bytes)."""
    source = ApiLikeSource(projects, per_project)
    tree = Tree(NoFederation(), None, stats=Stats(), layout=Layout(home=["home"]),  # type: ignore[arg-type]
                projects=source)  # fmt: skip
    async with trio.open_nursery() as nursery:
        tree.calls.nursery = nursery
        gc.collect()
        before = rss()
        entries = await walk(tree)
        gc.collect()
        grown = rss() - before
        nursery.cancel_scope.cancel()
    return tree, entries, grown


async def measure(projects: int, per_project: int, top: int) -> dict[str, Any]:
    tree, entries, grown = await walked(projects, per_project)  # RSS without tracemalloc's own cost
    del tree
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    tree, _, _ = await walked(projects, per_project)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    kept = sum(s.size_diff for s in stats)
    sites = [[f"{s.traceback[0].filename.rsplit('/fedmount/', 1)[-1]}:{s.traceback[0].lineno}",
              round(s.size_diff / entries)] for s in stats[:top]]  # fmt: skip
    return {"entries": entries, "bytes_per_entry": round(kept / entries),
            "rss_bytes_per_entry": round(grown / entries), "top": sites}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=100)
    parser.add_argument("--per-project", type=int, default=1000)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    result = trio.run(measure, args.projects, args.per_project, args.top)
    for site, size in result["top"]:
        print(f"{size:>8} B/entry  {site}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
