"""The real arv-mount (arvados-fuse 3.2.1) on the emulated federation, and the trees it shows.

``make arv-mount`` installs it into ``.venv-arv-mount/`` (its own virtualenv: it needs
llfuse built against libfuse 2, which the project's venv does not want). Conformance tests
mount it to prove the emulator serves what the real client expects; later tests and
benchmarks compare fedmount with it on the same federation.

- `requires_arv_mount`: a ``pytestmark`` that skips (with the reason) when FUSE is unusable
  or the virtualenv is missing;
- `ArvMount`: ``arv-mount --foreground --disable-event-listening`` (websockets off with
  ``ARVADOS_DISABLE_WEBSOCKETS``: the emulator has no event bus) on one cluster with that
  cluster's user (or `token`) and `env` added to its environment (the benchmark's cache
  directories), ready once the root's ``README`` (or `ready`) exists; `ArvMount.stop` runs
  ``arv-mount --unmount`` as crunch-run does and reaps the process;
- `tree_of`: every path under a directory with its kind and size, the record a fedmount
  test compares with what arv-mount showed.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from integration.harness import Federation
from integration.mounting import fuse_unusable, is_mounted, run

REPO = Path(__file__).resolve().parent.parent
ARV_MOUNT = REPO / ".venv-arv-mount" / "bin" / "arv-mount"
MAX_DEPTH = 16


def arv_mount_unusable() -> str | None:
    if (reason := fuse_unusable()) is not None:
        return reason
    if not ARV_MOUNT.exists():
        return f"{ARV_MOUNT} is missing: run `make arv-mount`"
    return None


requires_arv_mount = pytest.mark.skipif(arv_mount_unusable() is not None, reason=str(arv_mount_unusable()))


class ArvMount:
    """The real arv-mount in the foreground on `cluster`; `args` default to ``--all``."""

    def __init__(
        self,
        fed: Federation,
        base: Path,
        *args: str,
        cluster: str | None = None,
        token: str | None = None,
        ready: str = "README",
        env: Mapping[str, str] | None = None,
    ):
        self.path = base / "arv-mnt"
        self.path.mkdir(parents=True, exist_ok=True)
        self.log = base / "arv-mount.log"
        self.env = fed.env(cluster)
        if token:
            self.env["ARVADOS_API_TOKEN"] = token
        self.env["ARVADOS_DISABLE_WEBSOCKETS"] = "1"
        self.env.update(env or {})
        cmd = [
            str(ARV_MOUNT),
            "--foreground",
            "--disable-event-listening",
            *(args or ("--all",)),
            str(self.path),
        ]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (is_mounted(self.path) and (self.path / ready).exists()):
            if self.proc.poll() is not None:
                raise AssertionError(f"arv-mount exited with {self.proc.returncode}: {self.log.read_text()}")
            assert time.monotonic() < deadline, f"arv-mount not ready after 60s: {self.log.read_text()}"
            time.sleep(0.05)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def stop(self) -> None:
        if is_mounted(self.path):
            run(
                str(ARV_MOUNT),
                "--unmount",
                "--unmount-timeout",
                "8",
                str(self.path),
                check=False,
                env=self.env,
            )
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.path):
            run("fusermount", "-u", "-z", str(self.path), check=False)


def tree_of(root: Path, skip: tuple[str, ...] = ("by_id",)) -> dict[str, tuple[str, int | None]]:
    """``{relative path: ("dir", None) | ("file", size)}`` for everything under `root`.

    Top-level names in `skip` are left out (``by_id/`` lists only what was looked up).
    Symlinks are not followed; the walk stops at `MAX_DEPTH` levels, so a directory that
    contains itself cannot make it loop.
    """
    out: dict[str, tuple[str, int | None]] = {}

    def walk(directory: Path, prefix: str, depth: int) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                if not prefix and entry.name in skip:
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    out[rel] = ("dir", None)
                    if depth < MAX_DEPTH:
                        walk(Path(entry.path), rel + "/", depth + 1)
                else:
                    out[rel] = ("file", st.st_size)

    walk(root, "", 0)
    return out
