"""Benchmark: ``fedmount stage --to-cluster`` against raw cross-cluster GETs, and the second
host's read of the staged collection against a read from local Keep.

Starts an emulated federation, puts one file of `--size` bytes (64 MiB blocks) on zbbbb,
shapes zbbbb as the main benchmark does (+20 ms, 100 MB/s per connection) and measures,
on the same machine in the same run:

- the ceiling of the copy: GETting every block from zbbbb's keepstores with the token
  salted for zbbbb, `--threads` at a time, as a client on the far side of the link would;
- ``fedmount stage --to-cluster zzzzz --save-as NAME``: the home keepstores fetch the blocks
  from zbbbb themselves (``X-Keep-Signature: local``); this host sends HEADs only;
- "the second host": a fresh mount with its own empty cache reading the saved collection
  (``dd``, page cache dropped), against GETting the same blocks from the home keepstores
  (local Keep) with the same number of threads.

The last line is JSON: ``{"bytes", "copy_ceiling_Bps", "stage_Bps", "stage_ratio",
"local_ceiling_Bps", "second_host_Bps", "second_host_ratio", "cross_cluster_gets"}``;
``cross_cluster_gets`` counts the second host's GETs that reached zbbbb (0 expected).

    .venv/bin/python bench/bench_stage_cluster.py [--size 1073741824] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ceilings import ClusterAccess, KeepCeiling  # noqa: E402
from bench.workloads import drop_page_cache  # noqa: E402
from fedmount.arvados.tokens import parse_token, salt_for  # noqa: E402
from integration.harness import Federation  # noqa: E402
from integration.mounting import Mount  # noqa: E402

MiB = 1 << 20
REMOTE = "zbbbb"


def cold_read(path: Path) -> float:
    """Seconds to read `path` once, with the page cache dropped first."""
    drop_page_cache()
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-stage-cluster-"))
    fed = Federation.start(base / "federation")
    try:
        entry = fed.add_collection(REMOTE, "staged", {"data.bin": (args.size, "stage")}, block_size=64 * MiB)
        fed.set_fault(REMOTE, "*", latency_ms=20, bandwidth=100_000_000)
        salted = salt_for(parse_token(fed.token()), REMOTE).text
        remote = ClusterAccess(fed.api_host(REMOTE), salted, fed.ca_cert)
        copy_ceiling = KeepCeiling(remote, entry["uuid"], "data.bin", args.threads).parallel_read()

        cmd = [sys.executable, "-m", "fedmount", "stage", "--to-cluster", fed.home,
               "--save-as", "staged here", "--json", "--quiet", "--concurrency", str(args.threads),
               "--disk-cache-dir", str(base / "cache"), entry["uuid"]]  # fmt: skip
        started = time.perf_counter()
        repo = Path(__file__).resolve().parent.parent
        done = subprocess.run(cmd, env=fed.env(), cwd=repo, capture_output=True, text=True, timeout=3600)
        stage_s = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"stage failed ({done.returncode}): {done.stderr.strip()}")
        saved = json.loads(done.stdout)["saved"]

        home = ClusterAccess(fed.api_host(), fed.token(), fed.ca_cert)
        local_ceiling = KeepCeiling(home, saved["uuid"], "data.bin", args.threads).parallel_read()
        mount = Mount(fed, base / "second-host")
        try:
            since = fed.mark()
            read_s = cold_read(mount / "by_id" / saved["uuid"] / "data.bin")
            crossing = [r for r in fed.requests(since=since, cluster=REMOTE)
                        if r["service"].startswith("keep")]  # fmt: skip
        finally:
            mount.stop()
        stage_rate = args.size / stage_s
        result = {
            "bytes": args.size, "copy_ceiling_Bps": round(copy_ceiling),
            "stage_Bps": round(stage_rate), "stage_ratio": round(stage_rate / copy_ceiling, 2),
            "local_ceiling_Bps": round(local_ceiling), "second_host_Bps": round(args.size / read_s),
            "second_host_ratio": round(args.size / read_s / local_ceiling, 2),
            "cross_cluster_gets": len(crossing),
        }  # fmt: skip
        print(f"stage --to-cluster: {result['stage_Bps'] / 1e6:.0f} MB/s against raw cross-cluster GETs "
              f"{copy_ceiling / 1e6:.0f} MB/s ({result['stage_ratio']})")
        print(f"second host, cold read of the staged collection: {result['second_host_Bps'] / 1e6:.0f} MB/s "
              f"against local Keep GETs {local_ceiling / 1e6:.0f} MB/s ({result['second_host_ratio']}); "
              f"{len(crossing)} requests reached {REMOTE}")  # fmt: skip
        print(json.dumps(result))
    finally:
        fed.stop()


if __name__ == "__main__":
    main()
