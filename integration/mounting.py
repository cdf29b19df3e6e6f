"""Helpers shared by the integration tests that run fedmount on a real FUSE mount.

- `requires_fuse`: a ``pytestmark`` that skips a module (with the reason) when /dev/fuse,
  fusermount3 or the privileges are missing;
- `Mount`: ``fedmount --foreground`` on the emulated federation, its log beside the mount
  point and its own empty block cache, ready once ``by_id/README`` exists; `Mount.stop`
  unmounts with ``fedmount --unmount`` and reaps the process;
- `run`, `fedmount_cmd`, `is_mounted`, `md5sums`: plain-tool helpers;
- `timed_read`: read a file in a child process (``md5sum``) under a deadline, so a hung
  mount fails a test instead of hanging it; `wait_for`: poll a condition;
- `Recorder`: appends what a reliability scenario measured (recovery time, bytes served
  wrong) as JSON lines, for the README's Reliability table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.harness import Federation

REPO = Path(__file__).resolve().parent.parent


def fuse_unusable() -> str | None:
    """Why real mounts cannot be made here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 is not installed (package fuse3)"
    return None


requires_fuse = pytest.mark.skipif(fuse_unusable() is not None, reason=str(fuse_unusable()))


def run(*cmd: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, errors="surrogateescape", check=check, timeout=timeout, **kwargs
    )


def fedmount_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmount", *args]


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def wait_for(predicate: Callable[[], object], timeout: float, what: str = "condition") -> float:
    """Poll `predicate` until it is true; the seconds it took. Fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what}: not true after {timeout:g}s"
        time.sleep(0.05)
    return time.monotonic() - started


class Mount:
    """A fedmount in the foreground, its log beside the mount point; `stop` unmounts.

    Options given in `args` come after the defaults, so a test may give its own
    ``--disk-cache-dir``."""

    def __init__(
        self,
        fed: Federation,
        base: Path,
        *args: str,
        ready: str = "by_id/README",
        env: dict[str, str] | None = None,
    ):
        self.fed = fed
        self.path = base / "mnt"
        self.path.mkdir(parents=True, exist_ok=True)
        self.log = base / "fedmount.log"
        self.cache = base / "cache"
        self.args = ["--foreground", "--disk-cache-dir", str(self.cache), *args, str(self.path)]
        self.env = env or fed.env()
        self.proc = subprocess.Popen(
            fedmount_cmd(*self.args),
            env=self.env,
            cwd=REPO,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not (self.path / ready).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"fedmount exited with {self.proc.returncode}: {self.log.read_text()}")
            assert time.monotonic() < deadline, f"not ready after 30s: {self.log.read_text()}"
            time.sleep(0.05)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def stats(self) -> dict:
        return json.loads((self.path / ".fedmount/stats.json").read_text())

    def reads(self) -> float:
        return self.stats().get("fuse_ops", {}).get("op=read", 0)

    def stop(self) -> None:
        if is_mounted(self.path):
            run(*fedmount_cmd("--unmount", "--unmount-timeout", "8", str(self.path)), check=False, cwd=REPO)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def md5sums(root: Path, paths: list[str]) -> dict[str, str]:
    """``md5sum`` over many files at once (run from `root`, so names stay relative)."""
    out: dict[str, str] = {}
    for i in range(0, len(paths), 500):
        done = run("md5sum", "--", *paths[i : i + 500], cwd=root)
        for line in done.stdout.splitlines():
            digest, name = line.split("  ", 1)
            if digest.startswith("\\"):  # md5sum escapes names holding a backslash or newline
                digest, name = digest[1:], name.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
            out[name] = digest
    return out


@dataclass
class ReadResult:
    ok: bool
    md5: str  # the digest, or "" on failure
    error: str  # what md5sum said on failure
    seconds: float


def timed_read(path: Path, timeout: float = 60) -> ReadResult:
    """``md5sum PATH`` in a child process; fails the test if it takes longer than `timeout`."""
    started = time.monotonic()
    try:
        done = run("md5sum", str(path), check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"reading {path} hung for more than {timeout:g}s") from None
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return ReadResult(True, done.stdout.split()[0], "", seconds)
    return ReadResult(False, "", done.stderr.strip(), seconds)


class Recorder:
    """Appends one JSON object per measured scenario to `path` (JSON lines) and prints it."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, scenario: str, **figures: object) -> None:
        line = json.dumps({"scenario": scenario, **figures}, sort_keys=True)
        print(f"reliability: {line}")
        with open(self.path, "a") as f:
            f.write(line + "\n")
