"""Counters and gauges that every layer updates and that are readable from outside.

One `Stats` object lives per daemon. Layers add to named counters with optional labels
(``stats.add("keep_bytes", n, cluster="zbbbb")``) or set gauges
(``stats.set("read_ahead_depth", 4)``). The FUSE layer publishes `snapshot()` as a JSON file
inside the mount; `fedmount.stats_export` serves `prometheus_text()` over HTTP and prints
``--crunchstat-interval``'s lines (`CrunchStat.lines`). Everything runs on the trio thread
or under a lock, so worker threads may update it too.

A per-request path binds its series once (``hits = stats.counter("cache_hits", tier="ram")``,
then ``hits.add()``): the name and labels are resolved at binding, so an update is one lock
and one dict addition instead of sorting and formatting its labels every time. A bound
series appears in the output once it is first added to, as with `Stats.add`.

Label values come from what clusters say (cluster ids, keep service uuids), which the
federation layer checks at the boundary; the Prometheus text escapes them anyway
(``\\``, ``\"`` and ``\n``, as the text exposition format defines), so that no value can
end its label, its line, or add a line of its own.
"""

from __future__ import annotations

import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, object]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _label_value(text: str) -> str:
    """`text` as a Prometheus label value: backslash, double quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter:
    """One counter series of a `Stats`, its labels resolved once (see the module docstring)."""

    __slots__ = ("_stats", "_name", "_key")

    def __init__(self, stats: Stats, name: str, key: Labels):
        self._stats = stats
        self._name = name
        self._key = key

    def add(self, value: float = 1) -> None:
        stats = self._stats
        with stats._lock:
            stats._counters[self._name][self._key] += value


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)

    def add(self, name: str, value: float = 1, **labels: object) -> None:
        with self._lock:
            self._counters[name][_labels(labels)] += value

    def counter(self, name: str, **labels: object) -> Counter:
        """The series `name` with these labels, bound for repeated `Counter.add` calls."""
        return Counter(self, name, _labels(labels))

    def set(self, name: str, value: float, **labels: object) -> None:
        with self._lock:
            self._gauges[name][_labels(labels)] = value

    def get(self, name: str, **labels: object) -> float:
        """One series' value (0 if never touched); the total over labels if none given."""
        with self._lock:
            series = self._counters.get(name) or self._gauges.get(name) or {}
            if labels:
                return series.get(_labels(labels), 0)
            return sum(series.values())

    def snapshot(self) -> dict[str, object]:
        """``{name: value}`` for unlabelled series, ``{name: {"k=v,...": value}}`` otherwise."""
        out: dict[str, object] = {}
        with self._lock:
            for table in (self._counters, self._gauges):
                for name, series in table.items():
                    if set(series) == {()}:
                        out[name] = series[()]
                    else:
                        out[name] = {",".join(f"{k}={v}" for k, v in key): val for key, val in series.items()}
        return out

    def prometheus_text(self) -> str:
        lines = []
        with self._lock:
            for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
                for name, series in sorted(table.items()):
                    metric = f"fedmount_{name}"
                    lines.append(f"# TYPE {metric} {kind}")
                    for key, val in sorted(series.items()):
                        label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in key)
                        lines.append(f"{metric}{{{label_text}}} {val:g}" if key else f"{metric} {val:g}")
        return "\n".join(lines) + "\n"
