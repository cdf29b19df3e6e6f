"""A cluster's exported configuration (``GET /arvados/v1/config``): the instance types it runs.

The exported config is ``lib/config/export.go``'s whitelist of the cluster config; this
module reads the part placement needs, ``InstanceTypes``
(``sdk/go/arvados/config.go`` ``InstanceType``)::

    "InstanceTypes": {"g1.large": {"ProviderType": "g1.large", "VCPUs": 8, "RAM": 68719476736,
        "IncludedScratch": 128000000000, "AddedScratch": 0, "Price": 1.5, "Preemptible": false,
        "GPU": {"Stack": "cuda", "DriverVersion": "12.4", "HardwareTarget": "8.6",
                "DeviceCount": 1, "VRAM": 25769803776}}}

Older clusters describe GPUs as ``"CUDA": {"DriverVersion", "HardwareCapability",
"DeviceCount"}``: read as a ``cuda`` GPU without a VRAM figure. A malformed entry raises
`ConfigError` with one line naming the cluster and the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """The exported config could not be read, in one line."""


@dataclass(frozen=True)
class Gpu:
    stack: str  # "cuda", "rocm", ...
    device_count: int
    driver_version: str
    hardware_target: str
    vram: int  # bytes per device; 0 when the cluster does not say


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    ram: int
    scratch: int  # IncludedScratch + AddedScratch, bytes
    price: float
    preemptible: bool
    gpu: Gpu | None


def _number(cluster: str, name: str, spec: dict, key: str, kind: type = int) -> Any:
    value = spec.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"cluster {cluster}: InstanceTypes.{name}.{key} is not a non-negative number")
    return kind(value)


def _gpu(cluster: str, name: str, spec: dict) -> Gpu | None:
    gpu, cuda = spec.get("GPU"), spec.get("CUDA")
    if isinstance(gpu, dict) and _number(cluster, name, gpu, "DeviceCount"):
        return Gpu(str(gpu.get("Stack") or "cuda"), _number(cluster, name, gpu, "DeviceCount"),
                   str(gpu.get("DriverVersion") or ""), str(gpu.get("HardwareTarget") or ""),
                   _number(cluster, name, gpu, "VRAM"))  # fmt: skip
    if isinstance(cuda, dict) and _number(cluster, name, cuda, "DeviceCount"):
        return Gpu("cuda", _number(cluster, name, cuda, "DeviceCount"), str(cuda.get("DriverVersion") or ""),
                   str(cuda.get("HardwareCapability") or ""), 0)  # fmt: skip
    return None


def instance_types(cluster: str, config: dict[str, Any]) -> list[InstanceType]:
    """The instance types of an exported config, cheapest first (then by name)."""
    types = config.get("InstanceTypes") or {}
    if not isinstance(types, dict):
        raise ConfigError(f"cluster {cluster}: InstanceTypes is not an object")
    out = []
    for name, spec in types.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"cluster {cluster}: InstanceTypes.{name} is not an object")
        def num(key: str, kind: type = int, spec: dict = spec, name: str = name) -> Any:
            return _number(cluster, name, spec, key, kind)

        out.append(InstanceType(
            name, num("VCPUs"), num("RAM"), num("IncludedScratch") + num("AddedScratch"), num("Price", float),
            bool(spec.get("Preemptible")), _gpu(cluster, name, spec),
        ))  # fmt: skip
    return sorted(out, key=lambda t: (t.price, t.name))


def remote_clusters(config: dict[str, Any]) -> set[str]:
    """The clusters this one forwards requests to (``RemoteClusters`` with ``Proxy``)."""
    remotes = config.get("RemoteClusters") or {}
    if not isinstance(remotes, dict):
        return set()
    return {cid for cid, r in remotes.items() if cid != "*" and isinstance(r, dict) and r.get("Proxy")}
