"""Multi-buffer md5 micro-benchmark: ``python bench/bench_md5.py [--runs N] [--quick]``.

Every figure is measured in this one run (best of ``--runs``: the least disturbed by other
work on a shared machine), on distinct buffers (one 64 MiB buffer per stream, so lanes do
not share cache lines), and every ratio is against hashlib measured here:

1. ``hashlib``: one core, one 64 MiB block at a time (OpenSSL): the reference.
2. one core: `md5_many` with each kernel forced in turn (``auto`` too) on 1, 2, 4, 8, 16
   streams of 64 MiB, then of mixed sizes (uniform 1-64 MiB, fixed seed): aggregate GB/s.
3. two threads (both cores): the same streams split between two threads each calling
   `md5_many` (and two threads of hashlib), 2 to 32 streams.
4. streaming, the Keep read path's shape: k receiver threads each queue a 64 MiB block in
   2 MiB chunks, paced so that all together arrive at ``--arrival`` GB/s (default 1.2, the
   loopback transfer ceiling of this machine), into one `MultiHasher` (``threads`` 1, then
   2), against one `Md5Pipe` per block (hashlib on a thread per block, what the read path did
   before the MultiHasher). Reported: the process CPU seconds per GB hashed
   and each block's final digest latency (last chunk queued -> digest returned), median and
   max; then the same unpaced (chunks as fast as the threads can queue them).

The load average is printed before each part: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as ``python bench/bench_md5.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedmount.blocks.md5 import MultiHasher, available_kernels, md5_many  # noqa: E402
from fedmount.blocks.transport import CHUNK  # noqa: E402

MiB = 1 << 20
BLOCK = 64 * MiB
STREAMS = (1, 2, 4, 8, 16)
TWO_THREAD_STREAMS = (2, 4, 8, 16, 32)


class Md5Pipe:
    """The baseline: one hashlib md5 per block, fed on a thread of its own while chunks arrive."""

    def __init__(self, size: int):
        self._md5 = hashlib.md5()
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="md5", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._md5.update(chunk)

    def __call__(self, chunk: memoryview) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._md5.hexdigest()


def make_buffers(count: int) -> list[memoryview]:
    """`count` distinct 64 MiB buffers (random content, copied, then told apart by byte 0)."""
    base = random.Random(0).randbytes(BLOCK)
    buffers = []
    for i in range(count):
        buf = bytearray(base)
        buf[0] = i & 0xFF
        buffers.append(memoryview(buf))
    return buffers


def mixed(buffers: Sequence[memoryview], count: int) -> list[memoryview]:
    rng = random.Random(count)
    return [buffers[i][: rng.randint(MiB, BLOCK)] for i in range(count)]


def timed(fn: Callable[[], object], runs: int) -> float:
    """Seconds of the fastest of `runs` calls."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def hash_one_core(kernel: str, streams: Sequence[memoryview]) -> None:
    if kernel == "hashlib":
        for buf in streams:
            hashlib.md5(buf).digest()
    else:
        md5_many(streams, kernel)


def hash_two_threads(kernel: str, streams: Sequence[memoryview]) -> None:
    halves = [streams[0::2], streams[1::2]]
    threads = [threading.Thread(target=hash_one_core, args=(kernel, half)) for half in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def throughput(
    runner: Callable[[str, Sequence[memoryview]], None], kernel: str, streams: Sequence[memoryview], runs: int
) -> float:
    total = sum(len(s) for s in streams)
    return total / timed(lambda: runner(kernel, streams), runs) / 1e9


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def streaming(
    buffers: Sequence[memoryview], expected: Sequence[str], k: int, arrival: float | None, threads: int
) -> dict:
    """k receivers feed one block each in CHUNK pieces into a MultiHasher of `threads` (0: one
    Md5Pipe per block); returns the CPU seconds per GB and the digest latencies."""
    per_stream = arrival * 1e9 / k if arrival else None
    latencies: list[float] = [0.0] * k
    hasher = MultiHasher(threads=threads) if threads else None
    start = threading.Barrier(k + 1)

    def receive(i: int) -> None:
        block = buffers[i]
        sink = hasher.stream() if hasher else Md5Pipe(len(block))
        start.wait()
        began = time.perf_counter()
        for at in range(0, len(block), CHUNK):
            if per_stream:  # the chunk "arrives" when the network would have delivered it
                delay = began + (at + CHUNK) / per_stream - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sink(block[at : at + CHUNK])
        last = time.perf_counter()
        digest = sink.hexdigest()
        latencies[i] = time.perf_counter() - last
        assert digest == expected[i], "wrong md5"

    threads = [threading.Thread(target=receive, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    cpu = cpu_seconds()
    start.wait()
    wall = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    cpu = cpu_seconds() - cpu
    if hasher:
        hasher.close()
    gb = k * BLOCK / 1e9
    return {
        "streams": k,
        "gb_per_s": round(gb / wall, 3),
        "cpu_s_per_gb": round(cpu / gb, 3),
        "digest_ms_median": round(statistics.median(latencies) * 1e3, 2),
        "digest_ms_max": round(max(latencies) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure, best reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="one run per figure, skip the streaming part")
    parser.add_argument("--arrival", type=float, default=1.2, help="streaming: GB/s all blocks arrive at")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    load_before = os.getloadavg()
    buffers = make_buffers(max(TWO_THREAD_STREAMS))
    kernels = available_kernels()
    result: dict = {"load_before": [round(x, 2) for x in load_before], "cpu": cpu_name(), "runs": runs}

    ref = throughput(hash_one_core, "hashlib", buffers[:1], runs)
    result["hashlib_one_core_gb_per_s"] = round(ref, 3)
    print(f"load average before: {load()}   cpu: {result['cpu']}")
    print(f"hashlib, one core, 64 MiB blocks: {ref:.2f} GB/s (= 1.00x)")

    for label, runner, counts in (
        ("one core", hash_one_core, STREAMS),
        ("two threads", hash_two_threads, TWO_THREAD_STREAMS),
    ):
        for sizes in ("64 MiB", "mixed 1-64 MiB"):
            table: dict[str, dict[int, float]] = {}
            print(f"\n{label}, {sizes} streams: aggregate GB/s (x hashlib one core), load {load()}")
            print(f"{'kernel':>8} " + " ".join(f"{n:>13}" for n in counts))
            for kernel in kernels:
                row = {}
                for n in counts:
                    streams = buffers[:n] if sizes == "64 MiB" else mixed(buffers, n)
                    row[n] = throughput(runner, kernel, streams, runs)
                table[kernel] = {n: round(v, 3) for n, v in row.items()}
                print(f"{kernel:>8} " + " ".join(f"{v:6.2f} ({v / ref:4.1f}x)" for v in row.values()))
            result[f"{label} {sizes}"] = table

    if not args.quick:
        expected = [hashlib.md5(b).hexdigest() for b in buffers[: max(STREAMS)]]
        for arrival in (args.arrival, None):
            rows = []
            how = f"paced at {arrival:g} GB/s in all" if arrival else "unpaced"
            print(f"\nstreaming, 64 MiB blocks in {CHUNK // MiB} MiB chunks, {how}, load {load()}:")
            print(f"{'':>14} {'streams':>7} {'GB/s':>6} {'CPU s/GB':>8} {'digest ms median/max':>21}")
            for k in (1, 2, 4, 8, 16):
                for name, threads in (("MultiHasher", 1), ("MultiHasher x2", 2), ("Md5Pipe", 0)):
                    row = streaming(buffers, expected, k, arrival, threads) | {"shape": name}
                    rows.append(row)
                    print(
                        f"{name:>14} {k:>7} {row['gb_per_s']:6.2f} {row['cpu_s_per_gb']:8.2f} "
                        f"{row['digest_ms_median']:10.1f} / {row['digest_ms_max']:.1f}"
                    )
            result[f"streaming {how}"] = rows

    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average after: {load()}")
    print(json.dumps(result))
    return 0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
