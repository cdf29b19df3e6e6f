"""Observed Keep throughput per cluster, persisted in the block cache's directory.

`fedmount locate` answers "how long would it take to pull this from cluster X?" with
``bytes / throughput(X)``. The throughput is what this host actually observed, not a
guess, so it lives next to the block cache in ``<cache dir>/locality-throughput.json``
(it sits with the blocks layer because every process that reads Keep through that cache
records into it: mounts, `fedmount stage`, `fedmount-run`)::

    {"version": 1,
     "clusters": {"zbbbb": {"bytes_per_second": 8.4e7, "samples": 3, "updated_at": 1760000000.0}}}

Where the numbers come from:

- `fedmount stage` measures every cluster it fetches from with a `TransferMeter`: the
  bytes received divided by the wall-clock time during which at least one fetch from
  that cluster was in flight. Parallel fetches therefore count as one aggregate rate (the
  rate a reader reading ahead sees), not as the sum or the mean of per-request rates.
- A mount, when it unmounts, folds in its KeepClient's meter (`KeepClient.meter`: the
  bytes received and the seconds its requests took per cluster, added up request by
  request, so a per-request rate: lower than a parallel stage's aggregate rate, which is
  the conservative side for estimates) and saves the book.

A new sample moves the stored rate by an exponential moving average (weight
`EWMA_WEIGHT`), so one slow run does not erase history but a changed network shows up
within a few runs. Samples too small to measure a rate (latency dominates) are dropped.
A cluster never measured gets `DEFAULT_BYTES_PER_SECOND`, and every estimate says
whether it came from an observation or from that default.

Writes are atomic (temporary file + rename) and merge with what is on disk at save time,
so two stages running at once lose at most each other's latest sample, never the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmount import defaults

log = logging.getLogger("fedmount.throughput")

FILE_NAME = "locality-throughput.json"
DEFAULT_BYTES_PER_SECOND = defaults.BYTES_PER_SECOND  # said to be a default wherever shown
EWMA_WEIGHT = 0.3
MIN_SAMPLE_BYTES = 256 * 1024
MIN_SAMPLE_SECONDS = 0.01


@dataclass(frozen=True)
class Throughput:
    bytes_per_second: float
    observed: bool  # False: the stated default, this host never measured that cluster
    samples: int = 0
    updated_at: float | None = None

    @property
    def source(self) -> str:
        return "observed" if self.observed else "default"

    def seconds_for(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_second


class ThroughputBook:
    """Per-cluster observed throughput, loaded from and saved to one JSON file (or memory only)."""

    def __init__(self, path: str | Path | None, *, default: float = DEFAULT_BYTES_PER_SECOND):
        self.path = Path(path) if path is not None else None
        self.default = default
        self._entries: dict[str, dict] = self._load()
        self._changed: set[str] = set()

    @classmethod
    def in_cache_dir(cls, cache_dir: str | Path | None) -> ThroughputBook:
        return cls(Path(cache_dir) / FILE_NAME if cache_dir else None)

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            clusters = data.get("clusters", {}) if isinstance(data, dict) else {}
            return {
                c: e
                for c, e in clusters.items()
                if isinstance(e, dict) and isinstance(e.get("bytes_per_second"), int | float)
                and e["bytes_per_second"] > 0
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable throughput file %s (%s); estimates use defaults", self.path, exc)
            return {}

    def get(self, cluster: str) -> Throughput:
        entry = self._entries.get(cluster)
        if entry is None:
            return Throughput(self.default, observed=False)
        return Throughput(
            float(entry["bytes_per_second"]), True, int(entry.get("samples", 1)), entry.get("updated_at")
        )

    def record(self, cluster: str, nbytes: float, seconds: float) -> bool:
        """Fold in one measurement; False when it is too small to mean anything."""
        if nbytes < MIN_SAMPLE_BYTES or seconds < MIN_SAMPLE_SECONDS:
            return False
        rate = nbytes / seconds
        old = self._entries.get(cluster)
        if old is not None:
            rate = (1 - EWMA_WEIGHT) * float(old["bytes_per_second"]) + EWMA_WEIGHT * rate
        samples = int(old.get("samples", 1)) + 1 if old else 1
        self._entries[cluster] = {"bytes_per_second": rate, "samples": samples, "updated_at": time.time()}
        self._changed.add(cluster)
        return True

    def save(self) -> None:
        """Write the clusters this process measured over the file's current contents, atomically."""
        if self.path is None or not self._changed:
            return
        merged = self._load()
        merged.update({c: self._entries[c] for c in self._changed})
        text = json.dumps({"version": 1, "clusters": merged}, indent=1, sort_keys=True) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".throughput-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not save observed throughput to %s (%s)", self.path, exc)
            return
        self._entries = merged
        self._changed.clear()


class TransferMeter:
    """Bytes and seconds per cluster, folded into a `ThroughputBook` as bytes / seconds.

    Two ways to count the seconds: `start`/`finish` around concurrent fetches count the
    wall-clock time during which at least one fetch from the cluster was in flight (the
    aggregate rate of all its parallel fetches: a stage), `add` counts the seconds given
    (each request's own duration: the KeepClient)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self.busy: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def start(self, cluster: str) -> None:
        if self._inflight.get(cluster, 0) == 0:
            self._since[cluster] = self._clock()
        self._inflight[cluster] = self._inflight.get(cluster, 0) + 1

    def finish(self, cluster: str, nbytes: int) -> None:
        """A fetch ended; `nbytes` is what it delivered (0 if it failed)."""
        self._inflight[cluster] -= 1
        self.bytes[cluster] = self.bytes.get(cluster, 0) + nbytes
        if self._inflight[cluster] == 0:
            self.busy[cluster] = self.busy.get(cluster, 0.0) + self._clock() - self._since.pop(cluster)

    def add(self, cluster: str, nbytes: int = 0, seconds: float = 0.0) -> None:
        """Count `nbytes` received from `cluster` and `seconds` spent on it."""
        self.bytes[cluster] = self.bytes.get(cluster, 0) + nbytes
        self.busy[cluster] = self.busy.get(cluster, 0.0) + seconds

    def record_into(self, book: ThroughputBook) -> None:
        for cluster, nbytes in self.bytes.items():
            book.record(cluster, nbytes, self.busy.get(cluster, 0.0))
