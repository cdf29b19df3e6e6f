"""Benchmark: parse a generated 1,000,000-file manifest; report time and tree memory.

The manifest looks like a signed one from a controller: `--streams` directories of
equally many files with sizes from 1 byte to ~200 kB packed into 64 MiB blocks, every
locator carrying a ``+A`` signature. Parse time (wall and CPU: the machine may be
shared) is measured without tracing; the tree's memory is what tracemalloc still holds
after a second parse (the text was allocated before tracing started, so it is not
counted), and the transient peak is reported too. The process's RSS growth over the
first parse (after a collection, pymalloc pools that stay pinned included) is reported
as ``rss_growth_bytes``.
The last line is JSON: ``{"files", "manifest_bytes", "parse_seconds", "tree_bytes",
"ratio", ...}`` with ``ratio = tree_bytes / manifest_bytes``.

    .venv/bin/python bench/bench_manifest.py [--files 1000000] [--streams 1000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedmount.arvados.manifest import parse_manifest  # noqa: E402

BLOCK = 1 << 26


def generate(files: int, streams: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    per_stream = files // streams
    lines = []
    for s in range(streams):
        sizes = [rng.randint(1, 200_000) for _ in range(per_stream)]
        total = sum(sizes)
        blocks = []
        left = total
        while left > 0:
            size = min(BLOCK, left)
            digest = hashlib.md5(f"{s}/{len(blocks)}".encode()).hexdigest()
            sig = hashlib.sha1(digest.encode()).hexdigest()
            blocks.append(f"{digest}+{size}+A{sig}@{0x7FFFFFFF:08x}")
            left -= size
        tokens = []
        pos = 0
        for i, size in enumerate(sizes):
            tokens.append(f"{pos}:{size}:sample_{s:04d}_{i:06d}.fastq.gz")
            pos += size
        lines.append(" ".join([f"./run_{s:04d}", *blocks, *tokens]) + "\n")
    return "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--streams", type=int, default=1000)
    args = ap.parse_args()

    text = generate(args.files, args.streams)
    manifest_bytes = len(text.encode())
    mb = manifest_bytes / 1e6
    print(f"generated {args.files} files in {args.streams} streams: {mb:.1f} MB", file=sys.stderr)

    gc.collect()
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = parse_manifest(text)
    parse_seconds = time.perf_counter() - t0
    parse_cpu_seconds = time.process_time() - c0
    gc.collect()
    rss_growth = process.memory_info().rss - rss_before
    print(f"parse: {parse_seconds:.2f} s ({parse_cpu_seconds:.2f} s CPU)", file=sys.stderr)
    count = sum(1 for _ in manifest.walk())
    assert count == args.files, count
    del manifest
    gc.collect()

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    manifest = parse_manifest(text)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tree_bytes = current - base

    t0 = time.perf_counter()
    lookups = 0
    for s in range(0, args.streams, max(1, args.streams // 100)):
        directory = manifest.root.get(f"run_{s:04d}")
        for i in range(0, args.files // args.streams, 97):
            entry = directory.get(f"sample_{s:04d}_{i:06d}.fastq.gz")
            entry.segments()
            lookups += 1
    lookup_us = (time.perf_counter() - t0) / lookups * 1e6

    result = {
        "files": args.files,
        "streams": args.streams,
        "manifest_bytes": manifest_bytes,
        "parse_seconds": round(parse_seconds, 3),
        "parse_cpu_seconds": round(parse_cpu_seconds, 3),
        "tree_bytes": tree_bytes,
        "ratio": round(tree_bytes / manifest_bytes, 3),
        "peak_parse_bytes": peak - base,
        "rss_growth_bytes": rss_growth,
        "lookup_and_segments_us": round(lookup_us, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
