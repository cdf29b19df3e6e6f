"""What a run leaves in `--output-dir`, and result.json.

Layout of the results directory:

- `output/`: the host side of the `output_path` tmp mount (what the container wrote);
- `stdout.txt`, `stderr.txt`: the container's streams (a `stdout`/`stderr` file mount writes
  into `output/` instead and `stdout.txt` is a hard link to it);
- `fedmount.log`: fedmount's output (token-redacted), `crunchstat.txt`: resource samples;
- `result.json`: `state` (`Complete` when the container ran to its end, whatever its exit
  code; `Cancelled` otherwise), `exit_code`, `error` (one line, or null), timings, the
  mount's figures and the container's resource figures.

The mount's figures come from fedmount's stats file, `<mnt>/.fedmount/stats.json` (a
`Stats.snapshot()`, see fedmount/fs/tree.py), read just before unmounting:
`keep_bytes` per `cluster` label is the bytes read from each cluster's Keep, `cache_hits` /
`cache_misses` / `cache_hit_bytes` the block cache's. A mount without that file gives zeros
and an empty per-cluster table. result.json passes through `redact` before it is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fedmount.arvados.tokens import redact

STATS_FILE = os.path.join(".fedmount", "stats.json")


def read_mount_stats(mountpoint: str) -> dict[str, Any]:
    """fedmount's stats snapshot, or {} when the mount has none."""
    try:
        with open(os.path.join(mountpoint, STATS_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def by_label(value: Any, label: str) -> dict[str, float]:
    """Sum a snapshot series (a number, or {"k=v,k2=v2": n}) per value of `label`."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, n in value.items():
            labels = dict(part.split("=", 1) for part in key.split(",") if "=" in part)
            name = labels.get(label, "")
            out[name] = out.get(name, 0) + n
    return out


def total(value: Any) -> float:
    if isinstance(value, dict):
        return sum(value.values())
    return value if isinstance(value, int | float) else 0


def mount_figures(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {
        "bytes_read_by_cluster": {
            k: int(v) for k, v in by_label(snapshot.get("keep_bytes"), "cluster").items()
        },
        "keep_requests_by_cluster": {
            k: int(v) for k, v in by_label(snapshot.get("keep_requests"), "cluster").items()
        },
        "cache_hits": int(total(snapshot.get("cache_hits"))),
        "cache_misses": int(total(snapshot.get("cache_misses"))),
        "cache_hit_bytes": int(total(snapshot.get("cache_hit_bytes"))),
    }


def write_result(path: str, result: dict[str, Any]) -> None:
    text = redact(json.dumps(result, indent=2, sort_keys=True)) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
