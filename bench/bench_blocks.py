"""Block data path benchmark: KeepClient fetches and warm cache reads against raw ceilings.

Prints one JSON line. Every figure is the median of ``--runs`` runs, measured in the same
process against the same server and the same 64 MiB blocks:

- ``raw_socket``: a blocking socket sends the GET and ``recv_into``s the body into one
  preallocated buffer, no HTTP parsing, no md5: the transfer ceiling.
- ``urllib3``: a pooled urllib3 connection, ``readinto`` one preallocated buffer, no md5.
- ``urllib3_md5``: the same, then md5 of the body: the least work a verifying client does.
- ``keep_get``: `KeepClient.get` under trio (worker thread, md5 hashed while receiving,
  verification, stats), the figure the ratios are about.
- ``cache_warm``: a fresh `BlockCache` + `BlockReader` (empty memory tier, as after a
  remount) reading a file made of the blocks through `FileReader` in 128 KiB sequential
  requests, all served by the disk tier: the per-read cost fedmount adds above FUSE.
  Against ``pread`` of the same block files in 128 KiB requests (``cache_pread``); the
  FUSE ceiling (a null pyfuse3 filesystem, ~1.1-1.3 GB/s at 128 KiB) is measured by the
  end-to-end benchmarks.

The server is a tiny threaded HTTP/1.1 server that answers every GET with ``sendfile`` of
the block file named in the path (a stand-in for a keepstore until the emulated
federation's harness is usable from here). Usage: ``python -m bench.bench_blocks [--runs N]
[--blocks N] [--block-mib N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import trio
import urllib3

from fedmount.blocks.cache import BlockCache
from fedmount.blocks.keep import KeepClient, KeepRoute, KeepService
from fedmount.blocks.prefetch import BlockReader
from fedmount.federation.ids import Locator
from fedmount.federation.manifest import parse_manifest
from fedmount.stats import Stats

READ = 128 << 10


class SendfileServer:
    """GET /<name> answers 200 with the file <dir>/<name> sent by sendfile; keep-alive."""

    def __init__(self, directory: str):
        self.directory = directory
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                name = head.split(b" ", 2)[1].decode().lstrip("/").split("+")[0]
                path = os.path.join(self.directory, name)
                size = os.path.getsize(path)
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
                if head.startswith(b"GET"):
                    with open(path, "rb") as f:
                        conn.sendfile(f)


def raw_socket_get(port: int, name: str, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET /{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = bytearray(size + 4096)
        view = memoryview(buf)
        got, body_start = 0, -1
        while body_start < 0 or got - body_start < size:
            n = s.recv_into(view[got : got + (4 << 20)])
            if not n:
                raise RuntimeError("server closed early")
            got += n
            if body_start < 0 and (end := buf.find(b"\r\n\r\n", 0, got)) >= 0:
                body_start = end + 4


def urllib3_get(pool: urllib3.PoolManager, url: str, size: int) -> bytearray:
    resp = pool.request("GET", url, preload_content=False)
    body = bytearray(size)
    view = memoryview(body)
    got = 0
    while got < size:
        got += resp.readinto(view[got : got + (2 << 20)])
    resp.release_conn()
    return body


def timed(fn: Callable[[], object], nbytes: int, runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(nbytes / (time.perf_counter() - start))
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-mib", type=int, default=64)
    args = parser.parse_args()
    size = args.block_mib << 20
    total = size * args.blocks
    with tempfile.TemporaryDirectory(prefix="bench-blocks-") as work:
        served = os.path.join(work, "served")
        os.mkdir(served)
        locators = []
        for _ in range(args.blocks):
            data = os.urandom(size)
            digest = hashlib.md5(data).hexdigest()
            with open(os.path.join(served, digest), "wb") as f:
                f.write(data)
            locators.append(Locator(digest, size, ("A" + "0" * 40 + "@7fffffff",)))
        del data
        server = SendfileServer(served)
        root = f"http://127.0.0.1:{server.port}/"
        pool = urllib3.PoolManager(maxsize=4)
        out: dict[str, object] = {
            "bench": "blocks",
            "block_bytes": size,
            "blocks": args.blocks,
            "runs": args.runs,
        }

        out["raw_socket"] = timed(
            lambda: [raw_socket_get(server.port, str(x), size) for x in locators], total, args.runs
        )
        out["urllib3"] = timed(
            lambda: [urllib3_get(pool, root + str(x), size) for x in locators], total, args.runs
        )
        out["urllib3_md5"] = timed(
            lambda: [hashlib.md5(urllib3_get(pool, root + str(x), size)).hexdigest() for x in locators],
            total,
            args.runs,
        )

        stats = Stats()
        keep = KeepClient(stats=stats)
        route = KeepRoute(
            "zzzzz",
            "v2/zzzzz-gj3su-000000000000000/benchsecret",
            (KeepService("zzzzz-bi6l4-000000000000000", root),),
        )

        async def fetch_all() -> None:
            for x in locators:
                await keep.get(x, route)

        out["keep_get"] = timed(lambda: trio.run(fetch_all), total, args.runs)

        cache_dir = os.path.join(work, "cache")

        async def fill() -> None:
            cache = BlockCache(cache_dir, disk_limit=total * 2, ram_limit=256 << 20)
            for x in locators:
                await cache.put(x.key, await keep.get(x, route))

        trio.run(fill)

        manifest = parse_manifest(". " + " ".join(str(x) for x in locators) + f" 0:{total}:file\n")
        ((_, file),) = manifest.walk()

        async def warm_read() -> None:
            cache = BlockCache(cache_dir, disk_limit=total * 2, ram_limit=256 << 20)
            handle = BlockReader(keep, cache).open(file, route)
            for offset in range(0, total, READ):
                await handle.read(offset, READ)
            assert stats.get("cache_misses") == 0

        def pread_all() -> None:
            for x in locators:
                fd = os.open(os.path.join(cache_dir, "blocks", x.hash[:2], x.key), os.O_RDONLY)
                for offset in range(0, size, READ):
                    os.pread(fd, READ, offset)
                os.close(fd)

        out["cache_pread"] = timed(pread_all, total, args.runs)
        out["cache_warm"] = timed(lambda: trio.run(warm_read), total, args.runs)
        med = {k: v["median"] for k, v in out.items() if isinstance(v, dict)}
        out["ratio_keep_vs_raw_socket"] = med["keep_get"] / med["raw_socket"]
        out["ratio_keep_vs_urllib3"] = med["keep_get"] / med["urllib3"]
        out["ratio_keep_vs_urllib3_md5"] = med["keep_get"] / med["urllib3_md5"]
        out["ratio_cache_warm_vs_pread"] = med["cache_warm"] / med["cache_pread"]
        out["unit"] = "B/s"
        print(json.dumps(out))


if __name__ == "__main__":
    main()
