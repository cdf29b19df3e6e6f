"""What a container record needs from the machine it runs on, and whether a machine has it.

`Requirements.of(spec)` reads ``runtime_constraints`` the way the Arvados dispatcher sizes
a node (``lib/dispatchcloud`` ``ChooseInstanceType``): memory is ``ram`` plus
``keep_cache_ram`` (the mount's cache lives beside the container), scratch is the sum of
the ``tmp`` mounts' ``capacity`` plus ``keep_cache_disk``, cores are ``vcpus`` rounded up,
and a GPU is asked by ``gpu`` (``stack``, ``device_count``, ``driver_version``, ``vram``)
or by the older ``cuda`` (``device_count``, ``driver_version``).

`Capacity` is what a machine offers: this host (`host_capacity`: memory, usable CPUs, free
space of the temporary directory, NVIDIA GPUs that ``nvidia-smi`` lists) or an instance
type of a cluster's exported config (`instance_capacity`). `compare` says, one line per
requirement, whether a capacity meets it; `shortfalls` keeps the unmet ones (none: it fits).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from fedmount.api.cluster_config import InstanceType
from fedmount.runner.spec import ContainerSpec, SpecError, TmpMount


@dataclass(frozen=True)
class Requirements:
    ram: int = 0  # bytes
    vcpus: int = 0
    scratch: int = 0  # bytes
    gpus: int = 0
    gpu_stack: str = ""
    gpu_driver: str = ""  # minimum driver version
    gpu_vram: int = 0  # bytes per device

    @classmethod
    def of(cls, spec: ContainerSpec) -> Requirements:
        rc = spec.constraints
        raw = spec.raw.get("runtime_constraints") or {}
        gpu = raw.get("gpu") or {}
        cuda = raw.get("cuda") or {}
        if not isinstance(gpu, dict) or not isinstance(cuda, dict):
            raise SpecError("runtime_constraints.gpu", "must be an object")
        count, where = (gpu.get("device_count", 0), "gpu") if gpu.get("device_count") else (
            cuda.get("device_count", 0), "cuda")  # fmt: skip
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise SpecError(f"runtime_constraints.{where}.device_count", "must be a non-negative integer")
        chosen = gpu if where == "gpu" else cuda
        vram = chosen.get("vram", 0) if where == "gpu" else 0
        if not isinstance(vram, int) or isinstance(vram, bool) or vram < 0:
            raise SpecError("runtime_constraints.gpu.vram", "must be a non-negative integer (bytes)")
        tmp = sum(m.capacity for m in spec.mounts.values() if isinstance(m, TmpMount))
        return cls(
            ram=rc.ram + rc.keep_cache_ram,
            vcpus=math.ceil(rc.vcpus),
            scratch=tmp + rc.keep_cache_disk,
            gpus=count,
            gpu_stack=str(chosen.get("stack") or "cuda") if count else "",
            gpu_driver=str(chosen.get("driver_version") or "") if count else "",
            gpu_vram=vram if count else 0,
        )


@dataclass(frozen=True)
class Capacity:
    ram: int
    vcpus: int
    scratch: int
    gpus: int = 0
    gpu_stack: str = ""
    gpu_driver: str = ""
    gpu_vram: int = 0


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def compare(need: Requirements, have: Capacity) -> dict[str, tuple[bool, str]]:
    """Each requirement (ram, vcpus, scratch, and gpu when one is asked) -> (met, one line)."""
    out = {
        "ram": (need.ram <= have.ram, f"needs {_gib(need.ram)} of memory, has {_gib(have.ram)}"),
        "vcpus": (need.vcpus <= have.vcpus, f"needs {need.vcpus} CPUs, has {have.vcpus}"),
        "scratch": (need.scratch <= have.scratch,
                    f"needs {_gib(need.scratch)} of scratch space, has {_gib(have.scratch)}"),
    }  # fmt: skip
    if need.gpus:
        wanted = f"{need.gpus} {need.gpu_stack} GPU(s)"
        if have.gpus < need.gpus or have.gpu_stack != need.gpu_stack:
            got = f"{have.gpus} {have.gpu_stack} GPU(s)" if have.gpus else "none"
            out["gpu"] = (False, f"needs {wanted}, has {got}")
        elif need.gpu_driver and _version(have.gpu_driver) < _version(need.gpu_driver):
            driver = have.gpu_driver or "unknown"
            out["gpu"] = (False, f"needs GPU driver {need.gpu_driver} or later, has {driver}")
        elif need.gpu_vram > have.gpu_vram:
            out["gpu"] = (False, f"needs {_gib(need.gpu_vram)} of GPU memory, has {_gib(have.gpu_vram)}")
        else:
            out["gpu"] = (True, f"needs {wanted}, has {have.gpus} (driver {have.gpu_driver or 'unknown'})")
    return out


def shortfalls(need: Requirements, have: Capacity) -> dict[str, str]:
    """Every requirement `have` does not meet -> one line; empty when the record fits."""
    return {name: line for name, (met, line) in compare(need, have).items() if not met}


def instance_capacity(t: InstanceType) -> Capacity:
    g = t.gpu
    if g is None:
        return Capacity(t.ram, t.vcpus, t.scratch)
    return Capacity(t.ram, t.vcpus, t.scratch, g.device_count, g.stack, g.driver_version, g.vram)


def host_capacity(tmpdir: str | None = None) -> Capacity:
    """This host: total memory, the CPUs this process may use, the free space where the run's
    temporary directory goes, and the NVIDIA GPUs ``nvidia-smi`` lists (none without it)."""
    free = shutil.disk_usage(tmpdir or os.environ.get("TMPDIR") or "/tmp").free
    gpus, driver, vram = _nvidia()
    return Capacity(psutil.virtual_memory().total, len(os.sched_getaffinity(0)), free,
                    gpus, "cuda" if gpus else "", driver, vram)  # fmt: skip


def _nvidia() -> tuple[int, str, int]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, "", 0
    query = [smi, "--query-gpu=memory.total,driver_version", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0, "", 0
    lines = done.stdout.splitlines() if done.returncode == 0 else []
    rows = [line.split(",") for line in lines if line.strip()]
    try:
        vram = min(int(r[0]) for r in rows) << 20 if rows else 0  # MiB
    except ValueError:
        return 0, "", 0
    return len(rows), rows[0][1].strip() if rows else "", vram
