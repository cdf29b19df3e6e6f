"""crunch-run's use of arv-mount, replayed step by step against a mount (lib/crunchrun).

`CrunchRun` does what ``crunchrun.go`` does with the ``arv-mount`` it finds on its PATH,
in the same order and with the same command lines:

1. ``arv-mount --version`` (``Run``: logged as "Using FUSE mount: ...");
2. ``SetupMounts``/``ArvMountCmd``: ``arv-mount --foreground --read-write --storage-classes
   CLASSES --crunchstat-interval=N --allow-other`` (the Docker executor), the cache flags
   (``--disk-cache --disk-cache-dir <tmp>/keepcache --file-cache N`` or ``--ram-cache
   --file-cache N``), one ``--mount-tmp tmpN`` per writable collection mount, then
   ``--mount-by-pdh by_id --disable-event-listening`` when every collection mount is by
   PDH, else ``--mount-by-id by_id``, then ``--mount-by-id by_uuid`` and the mount point, a
   temporary directory named ``keep...``; the environment is crunch-run's with
   ``ARVADOS_API_TOKEN`` set to the container's token. stdout and stderr go, each line
   prefixed with an RFC 3339 nano timestamp as crunch-run's ``timestamper`` writes them, to
   ``arv-mount.txt``, and stderr is scanned for crunch-run's three phrases;
3. ``os.Stat(<mnt>/by_id/README)`` every 100 ms until it exists, racing the process's exit;
4. ``os.Stat`` of every collection mount's source ("while checking that input files exist");
5. the container (`run_container`): ``docker run`` with the sources bind-mounted (inputs
   read-only, ``tmpN`` writable), as the Docker executor binds them;
6. ``CaptureOutput``: read ``tmpN/.arvados#collection`` and decode its JSON;
7. ``CleanupDirs``: ``arv-mount --unmount-timeout=8 --unmount <mnt>``, wait at most 9 s for
   both processes (killing them past that, as crunch-run does, and saying so in
   ``killed``), then ``os.Remove(<mnt>)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATTERNS = ("Keep write error", "Block not found error", "Unhandled exception during FUSE operation")
UNMOUNT_DELAY = 8


def install_arv_mount(bin_dir: Path) -> Path:
    """An ``arv-mount`` in `bin_dir` that is fedmount (``fedmount-arv-mount`` under that name,
    as ``make arv-mount-link`` makes it); returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "arv-mount"
    path.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" -c '
        "'import sys; sys.argv[0] = \"arv-mount\"; from fedmount.arvmount_cli import main; sys.exit(main())' "
        '"$@"\n'
    )
    path.chmod(0o755)
    return path


def _timestamp() -> str:
    now = time.time_ns()
    stamp = datetime.fromtimestamp(now // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{now % 10**9:09d}Z"


@dataclass
class Mount:
    """One collection mount of the container record."""

    target: str  # path in the container
    pdh: str = ""  # portable data hash, optionally with /path
    uuid: str = ""
    writable: bool = False


@dataclass
class CrunchRun:
    arv_mount: Path  # the arv-mount crunch-run finds on its PATH
    env: dict[str, str]  # crunch-run's environment (ARVADOS_API_HOST, ...)
    token: str  # the container's token
    work: Path  # crunch-run's parentTemp
    mounts: list[Mount]
    storage_classes: list[str] = field(default_factory=lambda: ["default"])
    cache: str = "disk"  # disk (KeepCacheDisk > 0) or ram (KeepCacheRAM > 0)
    cache_bytes: int = 256 << 20
    stat_interval: float = 10.0
    version: str = ""
    argv: list[str] = field(default_factory=list)
    mountpoint: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)  # container path -> host path
    warnings: list[str] = field(default_factory=list)  # stderr lines with crunch-run's phrases
    killed: list[str] = field(default_factory=list)
    _proc: subprocess.Popen | None = None
    _log: object = None
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.work / "arv-mount.txt"

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if k != "ARVADOS_API_TOKEN"}
        env["ARVADOS_API_TOKEN"] = self.token
        return env

    def start(self, ready_timeout: float = 30.0) -> float:
        """Steps 1-4; the seconds from launch to by_id/README."""
        self.version = subprocess.run([str(self.arv_mount), "--version"], capture_output=True, text=True,
                                      env=self._environment(), timeout=30).stdout.strip()
        self.mountpoint = Path(tempfile.mkdtemp(prefix="keep", dir=self.work))
        argv = [str(self.arv_mount), "--foreground", "--read-write", "--storage-classes",
                ",".join(self.storage_classes), f"--crunchstat-interval={self.stat_interval:g}",
                "--allow-other"]
        if self.cache == "disk":
            cache_dir = tempfile.mkdtemp(prefix="keepcache", dir=self.work)
            argv += ["--disk-cache", "--disk-cache-dir", cache_dir, "--file-cache", str(self.cache_bytes)]
        else:
            argv += ["--ram-cache", "--file-cache", str(self.cache_bytes)]
        pdh_only, tmpcount = True, 0
        for m in self.mounts:
            if m.uuid:
                pdh_only = False
                self.sources[m.target] = f"{self.mountpoint}/by_id/{m.uuid}"
            elif m.pdh:
                pdh, _, sub = m.pdh.partition("/")
                self.sources[m.target] = f"{self.mountpoint}/by_id/{pdh}" + (f"/{sub}" if sub else "")
            else:
                self.sources[m.target] = f"{self.mountpoint}/tmp{tmpcount}"
                argv += ["--mount-tmp", f"tmp{tmpcount}"]
                tmpcount += 1
        if pdh_only:
            argv += ["--mount-by-pdh", "by_id", "--disable-event-listening"]
        else:
            argv += ["--mount-by-id", "by_id"]
        argv += ["--mount-by-id", "by_uuid", str(self.mountpoint)]
        self.argv = argv
        self._log = open(self.log_path, "a", buffering=1)
        started = time.monotonic()
        self._proc = subprocess.Popen(argv, env=self._environment(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, errors="replace")
        for stream, scan in ((self._proc.stdout, False), (self._proc.stderr, True)):
            t = threading.Thread(target=self._copy, args=(stream, scan), daemon=True)
            t.start()
            self._threads.append(t)
        readme = self.mountpoint / "by_id" / "README"
        while True:
            time.sleep(0.1)
            if readme.exists():
                break
            if self._proc.poll() is not None:
                raise AssertionError(f"arv-mount exited with {self._proc.returncode}: {self.log_text()}")
            if time.monotonic() - started > ready_timeout:
                raise AssertionError(f"by_id/README not there after {ready_timeout:g}s: {self.log_text()}")
        ready = time.monotonic() - started
        for src in self.sources.values():
            os.stat(src)  # "while checking that input files exist"
        return ready

    def _copy(self, stream, scan: bool) -> None:
        for line in stream:
            if scan and any(p in line for p in PATTERNS):
                self.warnings.append(line.rstrip("\n"))
            self._log.write(f"{_timestamp()} {line}")

    def log_text(self) -> str:
        for t in self._threads:
            if self._proc is not None and self._proc.poll() is not None:
                t.join(5)
        return self.log_path.read_text() if self.log_path.exists() else ""

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def output_record(self, target: str) -> bytes:
        """Step 6: the bytes of the output mount's ``.arvados#collection``."""
        return (Path(self.sources[target]) / ".arvados#collection").read_bytes()

    def cleanup(self) -> float:
        """Step 7; the seconds it took. Kills what is still running after 9 s, as crunch-run does."""
        assert self._proc is not None and self.mountpoint is not None
        started = time.monotonic()
        umount = subprocess.Popen([str(self.arv_mount), f"--unmount-timeout={UNMOUNT_DELAY}", "--unmount",
                                   str(self.mountpoint)], env=self._environment(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = started + UNMOUNT_DELAY + 1
        while self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._proc.poll() is not None:  # crunch-run stops waiting here; the test waits for both
            while umount.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for name, proc in (("arv-mount --unmount", umount), ("arv-mount", self._proc)):
            if proc.poll() is None:
                self.killed.append(name)
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        took = time.monotonic() - started
        for t in self._threads:
            t.join(5)
        self._log.close()
        os.rmdir(self.mountpoint)  # crunch-run's os.Remove: fails if still mounted or not empty
        return took


def run_container(image: str, binds: dict[str, tuple[str, bool]], script: str, user: str | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess:
    """Step 5: ``docker run`` of `script` with `binds` ({container path: (host path, read-only)}),
    as `user` (``uid:gid``) if given, else the image's user."""
    cmd = ["docker", "run", "--rm", "--label", "fedmount-crunchrun-replay"]
    if user:
        cmd += ["--user", user]
    for target, (src, read_only) in binds.items():
        cmd += ["--mount", f"type=bind,source={src},target={target}" + (",readonly" if read_only else "")]
    cmd += [image, "sh", "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
