"""Benchmark: ``ls -l`` of a project of many collections, against paging it with a bare client.

Starts an emulated federation, creates one project of `--collections` empty collections
through the real SDK, then measures, on the same machine in the same run:

- the ceiling: paging the project's collections as fedmount asks for them (keyset by uuid,
  ``count=none``, 1,000 a page, the same ``select``) with a bare ``http.client``;
- fedmount: ``ls -l`` (readdir, then ``lstat`` of every entry) of ``home/<project>`` on a
  fresh mount (cold), then again (warm: the kernel and the daemon hold the listing), the
  contents requests it made and the collection records it fetched (none: a listing
  fetches no manifest), and the daemon's RSS growth per listed entry.

The last line is JSON: ``{"collections", "ceiling_s", "cold_s", "warm_s", "ratio",
"contents_requests", "collection_gets", "rss_bytes_per_entry"}``.

    .venv/bin/python bench/bench_projects.py [--collections 10000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmount.api.listing import COLLECTION_FIELDS  # noqa: E402
from integration.harness import Federation  # noqa: E402
from integration.mounting import Mount  # noqa: E402


def bare_paging(fed: Federation, project: str) -> int:
    """Page the project's collections with a bare client; the number of items."""
    host, port = fed.api_host().rsplit(":", 1)
    context = ssl.create_default_context(cafile=fed.ca_cert)
    conn = http.client.HTTPSConnection(host, int(port), context=context)
    after: list[list[str]] = []
    count = 0
    while True:
        query = urlencode({
            "filters": json.dumps([["uuid", "is_a", "arvados#collection"], *after]),
            "order": json.dumps(["uuid asc"]), "count": "none", "limit": 1000,
            "select": json.dumps(COLLECTION_FIELDS),
        })  # fmt: skip
        conn.request("GET", f"/arvados/v1/groups/{project}/contents?{query}",
                     headers={"Authorization": f"Bearer {fed.token()}"})  # fmt: skip
        items = json.loads(conn.getresponse().read())["items"]
        count += len(items)
        if len(items) < 1000:
            return count
        after = [["uuid", ">", items[-1]["uuid"]]]


def ls_l(path: Path) -> tuple[int, float]:
    started = time.monotonic()
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        os.lstat(entry.path)
    return len(entries), time.monotonic() - started


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", type=int, default=10_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-projects-"))
    fed = Federation.start(base / "federation")
    try:
        import arvados

        os.environ["SSL_CERT_FILE"] = fed.ca_cert
        api = arvados.api("v1", host=fed.api_host(), token=fed.token(), num_retries=2)
        project = api.groups().create(body={"group": {"name": "many", "group_class": "project"}}).execute()
        for i in range(args.collections):
            body = {"collection": {"name": f"c{i:06d}", "owner_uuid": project["uuid"], "manifest_text": ""}}
            api.collections().create(body=body).execute()
        started = time.monotonic()
        assert bare_paging(fed, project["uuid"]) == args.collections
        ceiling = time.monotonic() - started
        mount = Mount(fed, base / "mount")
        try:
            before, since = rss(mount.proc.pid), fed.mark()
            count, cold = ls_l(mount / "home/many")
            requests = fed.requests(since=since, service="controller")
            _, warm = ls_l(mount / "home/many")
            grown = rss(mount.proc.pid) - before
        finally:
            mount.stop()
        result = {
            "collections": count, "ceiling_s": round(ceiling, 3), "cold_s": round(cold, 3),
            "warm_s": round(warm, 3), "ratio": round(cold / ceiling, 2),
            "contents_requests": sum("contents" in r["path"] for r in requests),
            "collection_gets": sum("/collections/" in r["path"] for r in requests),
            "rss_bytes_per_entry": round(grown / max(count, 1)),
        }  # fmt: skip
        print(json.dumps(result))
    finally:
        fed.stop()


if __name__ == "__main__":
    main()
