"""Ceilings: the best this machine can do for each workload without fedmount's own work.

Each is measured in the same run as the fedmount figures it divides, with the same reader:

- **FUSE** — `bench.nullfs` (a pyfuse3-on-trio filesystem serving bytes from memory)
  mounted with the same read-ahead, each run on a fresh mount, read with the same
  ``dd bs=READ_SIZE`` (and the same random-read loop for the random workloads). What
  fedmount cannot beat however good its cache is.
- **Keep** — raw parallel HTTP GETs of the file's blocks from the keepstores fedmount
  reads (the home cluster's services, with the signed locators the home controller
  returns, ``+R`` ones included, exactly as fedmount's home mode sends them), one urllib3
  connection per thread, ``threads`` GETs in flight, bodies counted and dropped: no md5,
  no cache, no FUSE. The single-GET time of one block is the ceiling for time to first
  byte. The locators and services are obtained like a client does: ``GET
  /arvados/v1/collections/UUID`` and ``GET /arvados/v1/keep_services/accessible`` on the
  home controller with the token and CA from the federation state.
- **md5** (informative) — one core hashing 64 MiB blocks: every cold byte is verified
  before it is served, so a single cold reader cannot beat this on a small machine.
- **page cache** — ``dd`` of a local file of the same size that was just read once, so
  every page is cached: what a second read of a file could cost at best.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import urllib3

from fedmount.arvados.ids import Locator
from fedmount.arvados.manifest import File, parse_manifest
from fedmount.arvados.routes import KeepService
from fedmount.blocks.keep import probe_order

from .workloads import BenchCollection, BenchError, Mount, dd_read, drop_page_cache, python_path_env

BODY_CHUNK = 1 << 20


# --- FUSE ----------------------------------------------------------------------------------


class NullfsSubject:
    """The null filesystem laid out like the mount: ``by_id/UUID/PATH`` and ``by_id/PDH/PATH``."""

    name = "nullfs"

    def __init__(
        self,
        collections: Sequence[BenchCollection],
        workdir: str,
        read_ahead_kb: int,
        python: str,
        keep_cache: bool = False,
    ) -> None:
        self.workdir = workdir
        self.keep_cache = keep_cache
        self.read_ahead_kb = read_ahead_kb
        self.python = python
        os.makedirs(workdir, exist_ok=True)
        files = {"by_id/README": 64}
        for c in collections:
            for cid in filter(None, (c.uuid, c.portable_data_hash)):
                files.update({f"by_id/{cid}/{path}": size for path, size in c.files.items()})
        self.spec = os.path.join(workdir, "nullfs-spec.json")
        with open(self.spec, "w", encoding="utf-8") as f:
            json.dump({"files": files}, f)

    def mount(self, *, cold: bool) -> Mount:
        """A fresh mount (a new inode for every file, so nothing is in the page cache)."""
        if cold:
            drop_page_cache()
        mountpoint = os.path.join(self.workdir, "mnt")
        argv = [
            self.python,
            "-m",
            "bench.nullfs",
            "--spec",
            self.spec,
            "--read-ahead-kb",
            str(self.read_ahead_kb),
            *(["--keep-cache"] if self.keep_cache else []),
            mountpoint,
        ]
        return Mount(
            argv,
            mountpoint,
            os.path.join(self.workdir, "nullfs.log"),
            ready="by_id/README",
            env=python_path_env(),
        )


# --- page cache ------------------------------------------------------------------------------


class PageCacheFile:
    """A local file of `size` bytes, read once so every page is cached; a context manager that
    deletes it. `samples(n)` is bytes per second of ``dd`` of it, n times."""

    def __init__(self, workdir: str, size: int, read_size: int) -> None:
        self.path = os.path.join(workdir, "page-cache-ceiling.bin")
        self.size = size
        self.read_size = read_size

    def __enter__(self) -> PageCacheFile:
        chunk = os.urandom(1 << 20)
        with open(self.path, "wb") as f:
            for done in range(0, self.size, len(chunk)):
                f.write(chunk[: self.size - done])
        return self

    def __exit__(self, *exc: object) -> None:
        os.unlink(self.path)

    def samples(self, runs: int) -> list[float]:
        dd_read(self.path, self.read_size, self.size)  # every page cached, even after a drop
        return [self.size / dd_read(self.path, self.read_size, self.size) for _ in range(runs)]


# --- md5 ----------------------------------------------------------------------------------


def md5_rate(size: int, runs: int) -> list[float]:
    """Bytes per second one core hashes with MD5 (64 MiB blocks): what verifying a cold read costs."""
    block = os.urandom(64 << 20)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(max(1, size // len(block))):
            hashlib.md5(block).digest()
        samples.append(max(1, size // len(block)) * len(block) / (time.perf_counter() - start))
    return samples


# --- Keep ------------------------------------------------------------------------------------


@dataclass
class ClusterAccess:
    """How a client reaches one cluster's controller."""

    api_host: str
    token: str
    ca_cert: str


class Api:
    """The two controller calls a Keep client needs, as plain HTTPS GETs."""

    def __init__(self, access: ClusterAccess) -> None:
        self.access = access
        self.http = urllib3.PoolManager(
            ca_certs=access.ca_cert, retries=False, timeout=urllib3.Timeout(connect=10, read=300)
        )

    def _get(self, path: str) -> dict[str, Any]:
        resp = self.http.request(
            "GET",
            f"https://{self.access.api_host}{path}",
            headers={"Authorization": f"Bearer {self.access.token}"},
        )
        if resp.status != 200:
            raise BenchError(f"GET {path} on {self.access.api_host} answered {resp.status}")
        return json.loads(resp.data)

    def collection(self, uuid: str) -> dict[str, Any]:
        return self._get(f"/arvados/v1/collections/{quote(uuid, safe='')}")

    def keep_services(self) -> list[KeepService]:
        return [
            KeepService(
                uuid=s["uuid"],
                service_type=s.get("service_type", "disk"),
                root_url=f"{'https' if s['service_ssl_flag'] else 'http'}://{s['service_host']}:"
                f"{s['service_port']}",
            )
            for s in self._get("/arvados/v1/keep_services/accessible")["items"]
        ]


class KeepCeiling:
    """Raw GETs of one file's blocks from the keepstores a home-mode client would use."""

    def __init__(self, access: ClusterAccess, collection_uuid: str, path: str, threads: int) -> None:
        self.token = access.token
        self.threads = threads
        self.http = urllib3.PoolManager(
            maxsize=threads,
            ca_certs=access.ca_cert,
            retries=False,
            timeout=urllib3.Timeout(connect=10, read=120),
        )
        api = Api(access)
        file = parse_manifest(api.collection(collection_uuid)["manifest_text"]).find(path)
        if not isinstance(file, File):
            raise BenchError(f"{path} is not a file of collection {collection_uuid}")
        seen: dict[str, Locator] = {}
        for seg in file.segments():
            seen.setdefault(seg.locator.key, seg.locator)
        self.blocks = list(seen.values())
        self.services = api.keep_services()
        if not self.services:
            raise BenchError(f"{access.api_host} lists no keep services")

    def get(self, locator: Locator) -> int:
        """GET one block (trying services in rendezvous order); the number of body bytes."""
        outcomes = []
        for service in probe_order(locator.hash, self.services):
            resp = self.http.request(
                "GET",
                f"{service.root_url}/{locator}",
                preload_content=False,
                headers={"Authorization": f"Bearer {self.token}"},
            )
            try:
                if resp.status != 200:
                    outcomes.append(f"{service.root_url}: {resp.status}")
                    continue
                received = sum(len(chunk) for chunk in resp.stream(BODY_CHUNK))
            finally:
                resp.release_conn()
            if received != locator.size:
                raise BenchError(f"{service.root_url} sent {received} bytes of {locator.key}")
            return received
        raise BenchError(f"no keep service returned {locator.key}: {'; '.join(outcomes)}")

    def parallel_read(self) -> float:
        """Bytes per second of GETting every block, `threads` at a time."""
        start = time.perf_counter()
        with ThreadPoolExecutor(self.threads) as pool:
            total = sum(pool.map(self.get, self.blocks))
        return total / (time.perf_counter() - start)

    def samples(self, runs: int) -> list[float]:
        return [self.parallel_read() for _ in range(runs)]

    def first_block_samples(self, runs: int) -> list[float]:
        """Seconds to GET the file's first block, alone, once per run."""
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            self.get(self.blocks[0])
            samples.append(time.perf_counter() - start)
        return samples
