"""``python -m bench.bench_scratch [--mib N] [--runs R]``: a --mount-tmp output, written and saved.

What a container's output costs through fedmount standing in for arv-mount, against
what the same bytes cost without it, all measured in one run on one emulated federation
(seed "none", loopback):

- *local write*: N MiB written in 1 MiB ``write`` calls to a file in the directory that
  backs the scratch files (the system's temporary directory), no fsync: the page cache;
- *tmp0 write*: the same writes into ``MOUNTPOINT/tmp0/out.bin`` of a fedmount with
  ``--mount-tmp tmp0``;
- *save*: reading ``tmp0/.arvados#collection`` (the blocks packed to 64 MiB, md5, PUT to
  both home keepstores: the emulator's ``defaultCollectionReplication`` is 2);
- *raw PUTs*: the same 64 MiB blocks PUT by urllib3 to both keepstores, 3 blocks in
  flight (the uploader's parallelism), bodies already in memory and hashed: the ceiling.

Every 64 MiB block differs (its first bytes hold its number), so nothing is deduplicated.
It prints one JSON object: each figure (median of R runs) and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib3

from integration.harness import Federation
from integration.mounting import Mount

MiB = 1 << 20
BLOCK = 64 * MiB


def chunks(mib: int, seed: int):
    """N MiB in 1 MiB pieces, every 64 MiB block of them different."""
    base = bytearray(os.urandom(MiB))
    for i in range(mib):
        if i % 64 == 0:
            base[:16] = (seed * 100_000 + i // 64).to_bytes(16, "big")
        yield base


def timed_write(path: Path, mib: int, seed: int) -> float:
    started = time.monotonic()
    with open(path, "wb") as f:
        for piece in chunks(mib, seed):
            f.write(piece)
    return time.monotonic() - started


def raw_puts(fed: Federation, mib: int, seed: int) -> float:
    blocks = []
    data = bytearray()
    for piece in chunks(mib, seed + 50):
        data += piece
        if len(data) == BLOCK:
            blocks.append(bytes(data))
            data = bytearray()
    if data:
        blocks.append(bytes(data))
    hashes = [hashlib.md5(b).hexdigest() for b in blocks]
    pool = urllib3.PoolManager(maxsize=3)
    headers = {"Authorization": f"Bearer {fed.token()}"}

    def put(i: int) -> None:
        for root in fed.keep_services():
            resp = pool.request("PUT", root.rstrip("/") + "/" + hashes[i], body=blocks[i], headers=headers)
            assert resp.status == 200, resp.status

    started = time.monotonic()
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(put, range(len(blocks))))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    names = ("local_write_s", "tmp0_write_s", "save_s", "raw_puts_s")
    figures: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-scratch-") as tmp:
        fed = Federation.start(Path(tmp) / "federation", seed="none")
        try:
            for run in range(args.runs):
                local = Path(tempfile.gettempdir()) / f"bench-scratch-local-{os.getpid()}"
                figures["local_write_s"].append(timed_write(local, args.mib, run))
                local.unlink()
                m = Mount(fed, Path(tmp) / f"m{run}", "--mount-tmp", "tmp0", "--mount-by-id", "by_id")
                try:
                    figures["tmp0_write_s"].append(timed_write(m / "tmp0/out.bin", args.mib, run + 10))
                    started = time.monotonic()
                    record = json.loads((m / "tmp0/.arvados#collection").read_bytes())
                    figures["save_s"].append(time.monotonic() - started)
                    assert record["manifest_text"].count("+A") == -(-args.mib // 64)
                finally:
                    m.stop()
                figures["raw_puts_s"].append(raw_puts(fed, args.mib, run + 20))
        finally:
            fed.stop()
    med = {k: statistics.median(v) for k, v in figures.items()}
    out = {
        "mib": args.mib, "runs": args.runs, **{k: round(v, 3) for k, v in med.items()},
        "local_write_MBps": round(args.mib * MiB / med["local_write_s"] / 1e6, 1),
        "tmp0_write_MBps": round(args.mib * MiB / med["tmp0_write_s"] / 1e6, 1),
        "tmp0_write_vs_local": round(med["local_write_s"] / med["tmp0_write_s"], 3),
        "save_vs_raw_puts": round(med["raw_puts_s"] / med["save_s"], 3),
        "all_runs": figures,
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
