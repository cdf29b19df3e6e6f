"""Faults and network shaping per (cluster, service), set through the control endpoint.

A `Fault` says how one service misbehaves; every service consults the table on each
connection (`down`) and each request (the rest):

- ``down``: "reset" accepts the connection and resets it at once (a crashed server);
  "refuse" closes the listening socket, so connecting fails with ECONNREFUSED, and the
  service listens again on the same port when the fault is cleared.
- ``status``: answer every request with this HTTP status (JSON ``errors`` body on the
  controller, a text line on keepstores, as the real services do).
- ``corrupt``: flip bytes in the response body (one per 4 KiB, the first included), so the
  content no longer matches its md5.
- ``stall``: send the status line and headers, then nothing until the fault is cleared.
- ``latency_ms``: wait this long before answering.
- ``bandwidth``: cap each connection at this many bytes per second.
- ``uuid_prefix`` (controller): the discovery document declares this ``uuidPrefix``, and
  ``keep_service_uuid`` (controller): ``keep_services/accessible`` gives every service this
  uuid; a lying (or broken) cluster, for the client's checks of what clusters say.
- ``count``: apply the fault to this many requests, then forget it (absent: until cleared).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields


@dataclass
class Fault:
    down: str | None = None
    status: int | None = None
    corrupt: bool = False
    stall: bool = False
    latency_ms: int = 0
    bandwidth: int | None = None
    uuid_prefix: str | None = None
    keep_service_uuid: str | None = None
    count: int | None = None

    @classmethod
    def from_json(cls, spec: dict) -> Fault:
        names = {f.name for f in fields(cls)}
        unknown = set(spec) - names
        if unknown:
            raise ValueError(f"unknown fault field(s) {sorted(unknown)}; known: {sorted(names)}")
        fault = cls(**spec)
        if fault.down is True:
            fault.down = "reset"
        if fault.down not in (None, False, "reset", "refuse"):
            raise ValueError("down must be true, 'reset' or 'refuse'")
        fault.down = fault.down or None
        return fault

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, False, 0)}


class FaultTable:
    """Thread-safe faults by (cluster, service); `epoch` changes when a key is set or cleared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[tuple[str, str], Fault] = {}
        self._epochs: dict[tuple[str, str], int] = {}
        self._changed = threading.Condition(self._lock)

    def set(self, cluster: str, service: str, fault: Fault) -> None:
        with self._lock:
            self._faults[(cluster, service)] = fault
            self._bump((cluster, service))

    def clear(self, cluster: str | None = None, service: str | None = None) -> None:
        with self._lock:
            for key in list(self._faults):
                if cluster in (None, key[0]) and service in (None, key[1]):
                    del self._faults[key]
                    self._bump(key)

    def _bump(self, key: tuple[str, str]) -> None:
        self._epochs[key] = self._epochs.get(key, 0) + 1
        self._changed.notify_all()

    def peek(self, cluster: str, service: str) -> Fault | None:
        with self._lock:
            return self._faults.get((cluster, service))

    def take(self, cluster: str, service: str) -> tuple[Fault | None, int]:
        """The fault for one request (counted against `count`) and the key's epoch."""
        key = (cluster, service)
        with self._lock:
            fault = self._faults.get(key)
            if fault is not None and fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    del self._faults[key]
            return fault, self._epochs.get(key, 0)

    def wait_changed(self, cluster: str, service: str, epoch: int, stop: threading.Event) -> None:
        """Block until the key is set or cleared again after `epoch`, or the emulator stops."""
        key = (cluster, service)
        with self._lock:
            while not stop.is_set() and self._epochs.get(key, 0) == epoch:
                self._changed.wait(0.5)

    def snapshot(self) -> dict:
        with self._lock:
            return {f"{c}/{s}": f.to_json() for (c, s), f in self._faults.items()}
