"""What differs between the emulated clusters' configurations (``lib/config/config.default.yml``).

Real federations are not uniform, and clients must read each cluster's exported config
rather than assume the defaults. Each cluster gets the profile of its position in
``--clusters`` (the home cluster is 0; positions past the last profile wrap around):

- ``Collections.ForwardSlashNameSubstitution``: ``"%2f"``, ``"{slash}"`` (the config's two
  documented examples) and ``""`` (the default: the API server refuses ``/`` in project and
  collection names, ``ensure_filesystem_compatible_name``);
- ``API.MaxItemsPerResponse``: 1000 (the default), 1000, and 500 on the third cluster, so
  a client that assumes 1000 items per page is caught;
- ``InstanceTypes`` in the current schema (``sdk/go/arvados/config.go`` InstanceType, with
  ``GPU`` features): general-purpose types at home, a GPU type on the second cluster,
  only small-memory types on the third;
- storage classes: ``default`` on every volume, ``archive`` on the second keepstore's
  volume only (``Volumes.*.StorageClasses``), so a PUT asking for ``archive`` is refused by
  ``keep0`` (507) and stored by ``keep1``.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
GB = 10**9
NO_GPU = {"Stack": "", "DriverVersion": "", "HardwareTarget": "", "DeviceCount": 0, "VRAM": 0}
STORAGE_CLASSES = {"default": {"Default": True, "Priority": 0}, "archive": {"Default": False, "Priority": 0}}
VOLUME_STORAGE_CLASSES = (("default",), ("archive", "default"))


def _instance(name: str, vcpus: int, ram: int, scratch: int, price: float, gpu: dict | None = None) -> dict:
    return {
        name: {
            "ProviderType": name,
            "VCPUs": vcpus,
            "RAM": ram,
            "IncludedScratch": scratch,
            "AddedScratch": 0,
            "Price": price,
            "Preemptible": False,
            "GPU": dict(gpu or NO_GPU),
        }
    }


@dataclass(frozen=True)
class Profile:
    forward_slash_name_substitution: str
    max_items_per_response: int
    instance_types: dict

    def volume_storage_classes(self, volume: int) -> tuple[str, ...]:
        return VOLUME_STORAGE_CLASSES[volume % len(VOLUME_STORAGE_CLASSES)]


PROFILES = (
    Profile(
        "%2f",
        1000,
        {
            **_instance("m1.small", 2, 8 * GiB, 32 * GB, 0.1),
            **_instance("m1.xlarge", 16, 64 * GiB, 256 * GB, 0.8),
        },
    ),
    Profile(
        "{slash}",
        1000,
        {
            **_instance("c1.medium", 4, 16 * GiB, 64 * GB, 0.2),
            **_instance(
                "g1.large",
                8,
                64 * GiB,
                128 * GB,
                1.5,
                {
                    "Stack": "cuda",
                    "DriverVersion": "12.4",
                    "HardwareTarget": "8.6",
                    "DeviceCount": 1,
                    "VRAM": 24 * GiB,
                },
            ),
        },
    ),
    Profile(
        "",
        500,
        {
            **_instance("t1.micro", 1, 1 * GiB, 8 * GB, 0.01),
            **_instance("t1.small", 2, 2 * GiB, 16 * GB, 0.02),
        },
    ),
)


def profile_for(position: int) -> Profile:
    return PROFILES[position % len(PROFILES)]
