"""Resource figures of the running container, crunchstat-style.

A `Sampler` thread looks at the container's first process (`pid_of()`: the Docker
container's `State.Pid`, or the bwrap process) every `SAMPLE_SECONDS`:

- if that process sits in a cgroup of its own (Docker), the cgroup's files are read, which
  also count processes that have already exited: v1 `memory.usage_in_bytes`,
  `memory.max_usage_in_bytes`, `cpuacct.stat` (USER_HZ ticks); v2 `memory.current`,
  `memory.peak`, `cpu.stat` (microseconds);
- otherwise (bwrap shares the wrapper's cgroup) psutil sums the process tree: RSS of the
  live processes, user/system CPU of each plus what it has reaped from its children.

Every `interval` seconds (never when it is 0) it appends crunchstat's lines to the log
(``<time> mem <bytes> rss``, ``<time> cpu <user> user <sys> sys <n> cpus``); `stop()` returns
the figures for result.json: peak and last memory, CPU seconds, sample count, and the
source used (`cgroup` or `procfs`). The figures are best effort: a container that lives
less than a sample may show zeros.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

import psutil

SAMPLE_SECONDS = 0.25
CGROUP_ROOT = "/sys/fs/cgroup"
USER_HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    mem_rss_bytes: int = 0
    mem_peak_bytes: int = 0
    samples: int = 0
    source: str = "none"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _cgroups(pid: int | str) -> dict[str, str] | None:
    """`{controller: path}` from /proc/<pid>/cgroup ("" is the v2 unified hierarchy)."""
    text = _read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    paths = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def cgroup_sample(pid: int, root: str = CGROUP_ROOT) -> tuple[float, float, int, int] | None:
    """`(user s, system s, memory bytes, peak bytes)` from pid's own cgroup, or None when
    pid shares a cgroup with this process (the figures would be ours, or the host's)."""
    paths, own = _cgroups(pid), _cgroups("self") or {}
    if paths is None:
        return None
    if any(paths.get(c) == own.get(c) for c in ("memory", "cpuacct") if c in paths) or (
        "memory" not in paths and paths.get("") == own.get("")
    ):
        return None
    if "memory" in paths and "cpuacct" in paths:
        cpu = _read(f"{root}/cpuacct{paths['cpuacct']}/cpuacct.stat")
        mem = _read(f"{root}/memory{paths['memory']}/memory.usage_in_bytes")
        peak = _read(f"{root}/memory{paths['memory']}/memory.max_usage_in_bytes")
        if cpu is None or mem is None:
            return None
        ticks = _keyed(cpu)
        return (ticks.get("user", 0) / USER_HZ, ticks.get("system", 0) / USER_HZ, int(mem), int(peak or mem))
    if "" in paths:
        base = f"{root}{paths['']}"
        cpu, mem, peak = (
            _read(f"{base}/cpu.stat"),
            _read(f"{base}/memory.current"),
            _read(f"{base}/memory.peak"),
        )
        if cpu is None or mem is None:
            return None
        usec = _keyed(cpu)
        return (usec.get("user_usec", 0) / 1e6, usec.get("system_usec", 0) / 1e6, int(mem), int(peak or mem))
    return None


def tree_sample(pid: int) -> tuple[float, float, int, int] | None:
    """The same figures summed over pid and its descendants (peak = current RSS)."""
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return None
    user = system = 0.0
    rss = 0
    for p in procs:
        try:
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
            rss += p.memory_info().rss
        except psutil.Error:
            continue
    return user, system, rss, rss


class Sampler:
    def __init__(self, pid_of: Callable[[], int | None], log_path: str, interval: float) -> None:
        self.pid_of = pid_of
        self.log_path = log_path
        self.interval = interval
        self.figures = Figures()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="crunchstat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, object]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return asdict(self.figures)

    def _run(self) -> None:
        pid = None
        next_line = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8") as log:
            while not self._stop.is_set():
                pid = pid or self.pid_of()
                if pid:
                    self._sample(pid)
                    if self.interval > 0 and time.monotonic() >= next_line and self.figures.samples:
                        self._write(log)
                        next_line = time.monotonic() + self.interval
                self._stop.wait(SAMPLE_SECONDS)
            if self.interval > 0 and self.figures.samples:
                self._write(log)

    def _sample(self, pid: int) -> None:
        sample = cgroup_sample(pid)
        source = "cgroup"
        if sample is None:
            sample, source = tree_sample(pid), "procfs"
        if sample is None:
            return
        user, system, mem, peak = sample
        f = self.figures
        f.cpu_user_seconds = max(f.cpu_user_seconds, user)
        f.cpu_system_seconds = max(f.cpu_system_seconds, system)
        f.mem_rss_bytes = mem or f.mem_rss_bytes
        f.mem_peak_bytes = max(f.mem_peak_bytes, peak, mem)
        f.samples += 1
        f.source = source

    def _write(self, log: TextIO) -> None:
        f = self.figures
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.write(f"{now} mem {f.mem_rss_bytes} rss {f.mem_peak_bytes} peak\n")
        log.write(
            f"{now} cpu {f.cpu_user_seconds:.4f} user {f.cpu_system_seconds:.4f} sys {os.cpu_count()} cpus\n"
        )
        log.flush()
