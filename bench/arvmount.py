"""The real arv-mount (arvados-fuse, ``make arv-mount``) as fedmount's peer in the benchmark.

Every workload that arv-mount can do runs against it in the same run as against fedmount,
interleaved with it, with the same readers, so the report can give fedmount/arv-mount.
It is mounted with `integration.arvmount.ArvMount` (the same start-up and unmount as the
conformance tests) with ``--mount-by-id by_id --mount-home home``, which gives the layout
fedmount has (``MOUNT/by_id/UUID/PATH``, ``by_id/PDH/PATH``, the user's projects under
``home/``), and otherwise its defaults: disk cache,
its default cache size (which holds every benchmark collection on this machine's disk),
128 KiB FUSE reads and the kernel's default read-ahead, as users run it.

Caches: arv-mount keeps Keep blocks in ``--disk-cache-dir`` (default
``$XDG_CACHE_HOME/arvados/keep``) and the API discovery document under
``$XDG_CACHE_HOME/arvados/discovery``; its directory and block caches in memory go with the
process. A cold mount gets a fresh directory for both (`CacheDirs`, which drops the page
cache first), a warm mount the directory the earlier warm mounts filled.

`NO_DIRECT_ROUTE` and `NO_STAGE` say which workloads arv-mount cannot do and why; the
report shows "n/a" with that reason instead of a figure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from integration.arvmount import ARV_MOUNT, ArvMount
from integration.harness import Federation

from .workloads import CacheDirs, process_rss

NAME = "arv-mount"
NO_DIRECT_ROUTE = (
    "arv-mount has no direct route: it reads a remote cluster's blocks only through the home"
    " keepstore (+R locators)"
)
NO_STAGE = "arv-mount has nothing like stage --to-cluster: it never places blocks in a cluster's Keep"


@dataclass(frozen=True)
class ArvMounted:
    """A running arv-mount: its mountpoint and daemon (`bench.workloads.Mounted`)."""

    mountpoint: str
    pid: int

    def rss(self) -> int:
        return process_rss(self.pid)


class ArvMountSubject:
    """arv-mount on the federation's home cluster with its user, as fedmount runs."""

    name = NAME

    def __init__(self, fed: Federation, workdir: str) -> None:
        self.fed = fed
        self.workdir = workdir
        self.caches = CacheDirs(workdir)
        os.makedirs(workdir, exist_ok=True)

    @contextmanager
    def mount(self, *, cold: bool) -> Iterator[ArvMounted]:
        with self.caches.for_mount(cold=cold) as cache:
            keep = os.path.join(cache, "keep")
            os.makedirs(keep, exist_ok=True)  # arv-mount sizes its cache from the directory's disk
            mount = ArvMount(
                self.fed,
                Path(self.workdir),
                "--mount-by-id",
                "by_id",
                "--mount-home",
                "home",
                "--disk-cache-dir",
                keep,
                ready="by_id/README",
                env={"XDG_CACHE_HOME": os.path.join(cache, "xdg")},
            )
            try:
                yield ArvMounted(str(mount.path), mount.proc.pid)
            finally:
                mount.stop()


def describe() -> dict[str, str]:
    """The peer as the results document names it (`bench.report.document`)."""
    return {
        "name": NAME,
        "version": version(),
        "how": "arv-mount --foreground --disable-event-listening --mount-by-id by_id --mount-home home,"
        " a fresh"
        " --disk-cache-dir and XDG_CACHE_HOME per cold mount, its defaults otherwise (disk cache,"
        " 128 KiB FUSE reads, the kernel's read-ahead)",
    }


def version() -> str:
    """The installed arv-mount's version (``arv-mount --version``: "PATH 3.2.1")."""
    out = subprocess.run([str(ARV_MOUNT), "--version"], capture_output=True, text=True, timeout=60)
    words = (out.stdout or out.stderr).split() if out.returncode == 0 else []
    return words[-1] if words else "unknown"
