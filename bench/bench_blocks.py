"""Block data path benchmark: KeepClient fetches and warm cache reads against raw ceilings.

Prints one JSON line. Every figure is the median of ``--runs`` runs, measured in the same
process against the same server and the same 64 MiB blocks:

- ``raw_socket``: a blocking socket sends the GET and ``recv_into``s the body into one
  preallocated buffer, no HTTP parsing, no md5: the transfer ceiling.
- ``urllib3``: a pooled urllib3 connection, ``readinto`` one preallocated buffer, no md5.
- ``urllib3_md5``: the same, then md5 of the body: the least work a verifying client does.
- ``keep_get``: `KeepClient.get` under trio (worker thread, md5 hashed while receiving,
  verification, stats), the figure the ratios are about.
- ``cache_warm``: a fresh `TieredCache` + `BlockReader` (empty memory tier, as after a
  remount) reading a file made of the blocks through `FileReader` in 128 KiB sequential
  requests, all served by the disk tier: the per-read cost fedmount adds above FUSE.
  Against ``pread`` of the same block files in 128 KiB requests (``cache_pread``); the
  FUSE ceiling (a null pyfuse3 filesystem, ~1.1-1.3 GB/s at 128 KiB) is measured by the
  end-to-end benchmarks.

By default the blocks are a collection written to the home cluster of the emulated
federation (`integration.harness`), read with their signed locators and the home token
from the keepstore each block's rendezvous order picks first; ceilings GET the same URL.
``--local`` serves random blocks from a tiny in-process ``sendfile`` HTTP server instead.
Usage: ``python -m bench.bench_blocks [--runs N] [--blocks N] [--block-mib N] [--local]``.
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

from fedmount.arvados.ids import Locator
from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.blocks.keep import KeepClient, probe_order
from fedmount.stats import Stats
from integration.harness import Federation

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


def raw_socket_get(url: str, size: int, token: str) -> None:
    """GET over a plain blocking socket, body received into one buffer and dropped."""
    parsed = urllib3.util.parse_url(url)
    with socket.create_connection((parsed.host, parsed.port)) as s:
        s.sendall(
            f"GET {parsed.request_uri} HTTP/1.1\r\nHost: {parsed.netloc}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: application/octet-stream\r\n\r\n".encode()
        )
        buf = bytearray(size + 4096)
        view = memoryview(buf)
        got, body_start = 0, -1
        while body_start < 0 or got - body_start < size:
            n = s.recv_into(view[got : got + (4 << 20)])
            if not n:
                raise RuntimeError("server closed early")
            got += n
            if body_start < 0 and (end := buf.find(b"\r\n\r\n", 0, got)) >= 0:
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(bytes(buf[:end]).decode(errors="replace"))
                body_start = end + 4


def urllib3_get(pool: urllib3.PoolManager, url: str, size: int, token: str) -> bytearray:
    resp = pool.request("GET", url, preload_content=False, headers={"Authorization": f"Bearer {token}"})
    if resp.status != 200:
        raise RuntimeError(f"GET {url}: HTTP {resp.status}")
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


def local_blocks(work: str, count: int, size: int) -> tuple[KeepRoute, list[Locator]]:
    """Random blocks served by a `SendfileServer`."""
    served = os.path.join(work, "served")
    os.mkdir(served)
    locators = []
    for _ in range(count):
        data = os.urandom(size)
        digest = hashlib.md5(data).hexdigest()
        with open(os.path.join(served, digest), "wb") as f:
            f.write(data)
        locators.append(Locator(digest, size, ("A" + "0" * 40 + "@7fffffff",)))
    server = SendfileServer(served)
    service = KeepService("zzzzz-bi6l4-000000000000000", f"http://127.0.0.1:{server.port}/")
    return KeepRoute("zzzzz", "v2/zzzzz-gj3su-000000000000000/benchsecret", (service,)), locators


def federation_blocks(fed: Federation, count: int, size: int) -> tuple[KeepRoute, list[Locator]]:
    """A collection of `count` blocks on the home cluster's keepstores; its signed locators."""
    entry = fed.add_collection(fed.home, "bench-blocks", {"blocks.bin": (count * size, "bench-blocks")})
    reply = fed.request(fed.home, f"/arvados/v1/collections/{entry['uuid']}", token=fed.token())
    locators = parse_manifest(reply.json()["manifest_text"]).blocks()
    items = fed.request(fed.home, "/arvados/v1/keep_services/accessible", token=fed.token()).json()["items"]
    services = tuple(
        KeepService(
            i["uuid"],
            f"http{'s' if i['service_ssl_flag'] else ''}://{i['service_host']}:{i['service_port']}/",
        )
        for i in items
    )
    return KeepRoute(fed.home, fed.token(), services), locators


def measure(work: str, route: KeepRoute, locators: list[Locator], runs: int) -> dict[str, object]:
    size = locators[0].size
    total = sum(x.size for x in locators)
    urls = [probe_order(x.hash, route.services)[0].root_url + str(x) for x in locators]
    pool = urllib3.PoolManager(maxsize=4)
    out: dict[str, object] = {"block_bytes": size, "blocks": len(locators), "runs": runs}
    out["raw_socket"] = timed(lambda: [raw_socket_get(u, size, route.token) for u in urls], total, runs)
    out["urllib3"] = timed(lambda: [urllib3_get(pool, u, size, route.token) for u in urls], total, runs)
    out["urllib3_md5"] = timed(
        lambda: [hashlib.md5(urllib3_get(pool, u, size, route.token)).hexdigest() for u in urls], total, runs
    )
    stats = Stats()
    keep = KeepClient(stats=stats)

    async def fetch_all() -> None:
        for x in locators:
            await keep.get(x, route)

    out["keep_get"] = timed(lambda: trio.run(fetch_all), total, runs)

    cache_dir = os.path.join(work, "cache")

    async def fill() -> None:
        cache = TieredCache(cache_dir, disk_limit=total * 2, ram_limit=256 << 20)
        for x in locators:
            await cache.put(x.key, await keep.get(x, route))

    trio.run(fill)

    manifest = parse_manifest(". " + " ".join(str(x) for x in locators) + f" 0:{total}:file\n")
    ((_, file),) = manifest.walk()

    async def warm_read() -> None:
        cache = TieredCache(cache_dir, disk_limit=total * 2, ram_limit=256 << 20)
        handle = BlockReader(keep, cache).open(file, route)
        for offset in range(0, total, READ):
            await handle.read(offset, READ)
        assert stats.get("cache_misses") == 0, "the warm read missed the cache"

    def pread_all() -> None:
        for x in locators:
            fd = os.open(os.path.join(cache_dir, "blocks", x.hash[:2], x.key), os.O_RDONLY)
            for offset in range(0, size, READ):
                os.pread(fd, READ, offset)
            os.close(fd)

    out["cache_pread"] = timed(pread_all, total, runs)
    out["cache_warm"] = timed(lambda: trio.run(warm_read), total, runs)
    med = {k: v["median"] for k, v in out.items() if isinstance(v, dict)}
    out["ratio_keep_vs_raw_socket"] = med["keep_get"] / med["raw_socket"]
    out["ratio_keep_vs_urllib3"] = med["keep_get"] / med["urllib3"]
    out["ratio_keep_vs_urllib3_md5"] = med["keep_get"] / med["urllib3_md5"]
    out["ratio_cache_warm_vs_pread"] = med["cache_warm"] / med["cache_pread"]
    out["unit"] = "B/s"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-mib", type=int, default=64)
    parser.add_argument(
        "--local", action="store_true", help="serve blocks from an in-process sendfile server"
    )
    args = parser.parse_args()
    size = args.block_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-blocks-") as work:
        if args.local:
            route, locators = local_blocks(work, args.blocks, size)
            out = {"bench": "blocks", "server": "local sendfile", **measure(work, route, locators, args.runs)}
        else:
            with Federation.start(os.path.join(work, "federation"), seed="none") as fed:
                route, locators = federation_blocks(fed, args.blocks, size)
                out = {
                    "bench": "blocks",
                    "server": "emulated keepstore",
                    **measure(work, route, locators, args.runs),
                }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
