"""Benchmark results: figures from several runs, ratios to ceilings, targets, the table and the JSON.

A `Figure` is the list of samples of one quantity (one per run) with its unit; what the
report calls "the figure" is their median, and min and max are kept beside it. A `Result`
is one workload: its figure, the ceiling figure it is divided by (measured in the same
run), the `Target` and an optional error. The ratio is median(figure) / median(ceiling),
and a target is judged on medians only:

- ``ratio_at_least x``  — figure / ceiling ≥ x (throughputs);
- ``ratio_at_most x``   — figure / ceiling ≤ x (memory against manifest size);
- ``at_most x``         — figure ≤ x in its own unit, no ceiling needed (a time limit);
- ``ceiling_plus x``    — figure ≤ ceiling + x (time to first byte against one block GET);
- ``report``            — no target, the figure is only reported.

A result can also carry its peer's figure (`PeerResult`: the real arv-mount measured in
the same run with the same readers, interleaved with the filesystem under test), and then
the peer ratio median(figure) / median(peer) in the figure's unit: above 1 is better for
rates, below 1 for seconds and bytes. Where the peer cannot do a workload the result says
so and why (``na``), which is not a failure; a peer that failed to run is (``error``).

`document()` builds the JSON document (schema ``fedmount-bench/1``) and `validate()`
checks one read back from disk; ``--check-json`` uses it, and it never looks at a timing.
`table()` renders the same document as a plain-text table, so what is printed and what is
stored cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "fedmount-bench/2"
TARGET_KINDS = ("ratio_at_least", "ratio_at_most", "at_most", "ceiling_plus", "report")
UNITS = ("B/s", "s", "B", "ops/s", "files/s")


@dataclass
class Figure:
    unit: str
    samples: list[float]

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}")
        if not self.samples:
            raise ValueError("a figure needs at least one sample")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "samples": list(self.samples),
        }


@dataclass(frozen=True)
class Target:
    kind: str
    value: float = 0.0
    text: str = "reported"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}")

    def met(self, figure: float, ceiling: float | None) -> bool | None:
        """Whether `figure` (a median) meets the target against `ceiling`; None if not judged."""
        if self.kind == "report":
            return None
        if self.kind == "at_most":
            return figure <= self.value
        if ceiling is None or ceiling <= 0:
            return None
        if self.kind == "ratio_at_least":
            return figure / ceiling >= self.value
        if self.kind == "ratio_at_most":
            return figure / ceiling <= self.value
        return figure <= ceiling + self.value  # ceiling_plus


@dataclass
class PeerResult:
    """The peer's figure for a workload, or why there is none: `na` (it cannot do this
    workload) or `error` (it failed)."""

    name: str
    figure: Figure | None = None
    na: str | None = None
    error: str | None = None


@dataclass
class Result:
    name: str
    description: str
    target: Target
    figure: Figure | None = None
    ceiling: Figure | None = None
    ceiling_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    peer: PeerResult | None = None

    @property
    def ratio(self) -> float | None:
        return _ratio(self.figure, self.ceiling)

    @property
    def peer_ratio(self) -> float | None:
        return _ratio(self.figure, self.peer.figure if self.peer else None)

    @property
    def passed(self) -> bool | None:
        if self.figure is None:
            return None
        return self.target.met(self.figure.median, self.ceiling.median if self.ceiling else None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "figure": self.figure.to_json() if self.figure else None,
            "ceiling": (
                {"name": self.ceiling_name, **self.ceiling.to_json()} if self.ceiling is not None else None
            ),
            "ratio": self.ratio,
            "target": {"kind": self.target.kind, "value": self.target.value, "text": self.target.text},
            "passed": self.passed,
            "extra": self.extra,
            "error": self.error,
            "peer": self._peer_json(),
        }

    def _peer_json(self) -> dict[str, Any] | None:
        if self.peer is None:
            return None
        p = self.peer
        return {
            "name": p.name,
            "figure": p.figure.to_json() if p.figure else None,
            "ratio": self.peer_ratio,
            "na": p.na,
            "error": p.error,
        }


def _ratio(figure: Figure | None, by: Figure | None) -> float | None:
    if figure is None or by is None or by.median <= 0:
        return None
    return figure.median / by.median


def lower_ceiling(ceilings: dict[str, Figure]) -> tuple[str, Figure]:
    """The ceiling with the lowest median, for targets against min(A, B)."""
    name = min(ceilings, key=lambda n: ceilings[n].median)
    return name, ceilings[name]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import psutil
    import pyfuse3
    import trio

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "trio": trio.__version__,
        "libfuse": _command_version(["fusermount3", "--version"]),
        "git_commit": _command_version(["git", "-C", os.path.dirname(__file__), "rev-parse", "HEAD"]),
    }


def _command_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[-1] if text else None


def document(
    *,
    mode: str,
    target_fs: str,
    settings: dict[str, Any],
    ceilings: dict[str, tuple[Figure, dict[str, Any]]],
    results: list[Result],
    machine_info: dict[str, Any],
    started_at: float,
    duration_s: float,
    notes: list[str],
    peer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results document; `peer` (``name``, ``version``, ``how``) names the filesystem whose
    figures the results carry beside their own, None if none was measured."""
    return {
        "schema": SCHEMA,
        "mode": mode,
        "target_fs": target_fs,
        "started_at": started_at,
        "duration_s": duration_s,
        "machine": machine_info,
        "settings": settings,
        "notes": notes,
        "peer": peer,
        "ceilings": {name: {**fig.to_json(), "details": info} for name, (fig, info) in ceilings.items()},
        "workloads": [r.to_json() for r in results],
    }


def validate(doc: Any) -> list[str]:
    """Problems with a results document's shape (empty if fine). Never judges a timing."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["document is not a JSON object"]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc.get("mode") not in ("quick", "full"):
        problems.append("mode must be 'quick' or 'full'")
    for key in ("cpu_model", "cores", "memory_bytes", "kernel", "python", "pyfuse3"):
        if not (doc.get("machine") or {}).get(key):
            problems.append(f"machine.{key} is missing")
    for name, ceiling in (doc.get("ceilings") or {}).items():
        problems += _figure_problems(f"ceilings.{name}", ceiling)
    peer = doc.get("peer")
    if peer is not None and not (isinstance(peer, dict) and peer.get("name")):
        problems.append("peer is not an object with a name")
        peer = None
    workloads = doc.get("workloads")
    if not isinstance(workloads, list) or not workloads:
        return problems + ["workloads is missing or empty"]
    for w in workloads:
        where = f"workload {w.get('name')!r}"
        if w.get("error"):
            problems.append(f"{where} failed: {w['error']}")
            continue
        problems += _figure_problems(f"{where} figure", w.get("figure"))
        if w.get("ceiling") is not None:
            problems += _figure_problems(f"{where} ceiling", w["ceiling"])
        if (w.get("target") or {}).get("kind") not in TARGET_KINDS:
            problems.append(f"{where} has no valid target")
        if w.get("passed") not in (True, False, None):
            problems.append(f"{where} passed is not a boolean or null")
        problems += _peer_problems(where, w, peer["name"] if peer else None)
    return problems


def _peer_problems(where: str, w: dict[str, Any], expected: str | None) -> list[str]:
    """A workload's peer entry: present exactly when the document names a peer, with exactly
    one of a figure (in the workload's unit, with the ratio to it), an n/a reason or an error."""
    p = w.get("peer")
    if expected is None:
        return [] if p is None else [f"{where} has a peer entry but the document names no peer"]
    if not isinstance(p, dict):
        return [f"{where} has no {expected} entry"]
    if p.get("name") != expected:
        return [f"{where} peer is {p.get('name')!r}, expected {expected!r}"]
    given = [k for k in ("figure", "na", "error") if p.get(k)]
    if len(given) != 1:
        return [f"{where} {expected} entry needs exactly one of figure, na, error (has {given or 'none'})"]
    if p.get("error"):
        return [f"{where}: {expected} failed: {p['error']}"]
    if p.get("na"):
        return [] if isinstance(p["na"], str) else [f"{where} {expected} n/a reason is not text"]
    problems = _figure_problems(f"{where} {expected} figure", p["figure"])
    if problems:
        return problems
    fig, own = p["figure"], w.get("figure") or {}
    if fig["unit"] != own.get("unit"):
        return [f"{where} {expected} figure is in {fig['unit']!r}, the workload's in {own.get('unit')!r}"]
    want = own["median"] / fig["median"] if fig["median"] > 0 else None
    if want is None:
        return [] if p.get("ratio") is None else [f"{where} {expected} ratio given for a zero median"]
    if not isinstance(p.get("ratio"), int | float) or not math.isclose(p["ratio"], want, rel_tol=1e-9):
        return [f"{where} {expected} ratio {p.get('ratio')!r} is not median / {expected} median ({want:.6g})"]
    return []


def _figure_problems(where: str, fig: Any) -> list[str]:
    if not isinstance(fig, dict):
        return [f"{where} is missing"]
    if fig.get("unit") not in UNITS:
        return [f"{where} has unknown unit {fig.get('unit')!r}"]
    values = [fig.get(k) for k in ("min", "median", "max")]
    if not all(isinstance(v, int | float) for v in values):
        return [f"{where} lacks min/median/max numbers"]
    if not values[0] <= values[1] <= values[2]:
        return [f"{where} does not satisfy min <= median <= max"]
    if not isinstance(fig.get("samples"), list) or not fig["samples"]:
        return [f"{where} has no samples"]
    return []


def write(doc: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def format_value(value: float, unit: str) -> str:
    if unit == "B/s":
        return f"{value / 1e9:.2f} GB/s" if value >= 1e9 else f"{value / 1e6:.0f} MB/s"
    if unit == "B":
        return f"{value / (1 << 20):.1f} MiB" if value >= 1 << 20 else f"{value:,.0f} B"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    return f"{value:,.0f} {unit}"


def _verdict(passed: bool | None, error: str | None) -> str:
    if error:
        return "ERROR"
    return {True: "pass", False: "FAIL", None: "-"}[passed]


def _peer_cells(peer: dict[str, Any] | None) -> tuple[str, str]:
    """The peer's figure and the peer ratio as table cells."""
    if not peer:
        return "-", "-"
    if peer.get("na"):
        return "n/a", "n/a"
    if peer.get("error"):
        return "ERROR", "-"
    fig = peer.get("figure")
    ratio = peer.get("ratio")
    return (
        format_value(fig["median"], fig["unit"]) if fig else "-",
        f"{ratio:.2f}" if ratio is not None else "-",
    )


def table(doc: dict[str, Any]) -> str:
    """The results document as a fixed-width text table (with the peer's figure and the peer
    ratio beside the ceiling's when the document has a peer), then the machine and notes."""
    peer = (doc.get("peer") or {}).get("name")
    header = ["workload", "figure (median)", "min .. max", "ceiling (median)", "ratio"]
    if peer:
        header += [f"{peer} (median)", f"{doc['target_fs']}/{peer}"]
    rows = [(*header, "target", "result")]
    for w in doc["workloads"]:
        fig, ceil = w.get("figure"), w.get("ceiling")
        spread = "-"
        if fig:
            spread = f"{format_value(fig['min'], fig['unit'])} .. {format_value(fig['max'], fig['unit'])}"
        rows.append(
            (
                w["name"],
                format_value(fig["median"], fig["unit"]) if fig else "-",
                spread,
                f"{ceil['name']}: {format_value(ceil['median'], ceil['unit'])}" if ceil else "-",
                f"{w['ratio']:.2f}" if w.get("ratio") is not None else "-",
                *(_peer_cells(w.get("peer")) if peer else ()),
                w["target"]["text"],
                _verdict(w.get("passed"), w.get("error")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for w in doc["workloads"]:
        if w.get("error"):
            lines.append(f"error in {w['name']}: {w['error']}")
        p = w.get("peer") or {}
        if p.get("na"):
            lines.append(f"{peer} n/a in {w['name']}: {p['na']}")
        if p.get("error"):
            lines.append(f"{peer} error in {w['name']}: {p['error']}")
    if peer:
        info = doc["peer"]
        lines.append(
            f"{doc['target_fs']}/{peer}: median over median in the figure's unit "
            "(above 1 is better for rates, below 1 for s and B)"
        )
        lines.append(f"{peer} {info.get('version', '')}: {info.get('how', '')}")
    lines.append("")
    for name, c in doc.get("ceilings", {}).items():
        lines.append(
            f"ceiling {name}: {format_value(c['median'], c['unit'])} "
            f"({format_value(c['min'], c['unit'])} .. {format_value(c['max'], c['unit'])}, "
            f"{len(c['samples'])} runs) {c.get('details', {}).get('how', '')}".rstrip()
        )
    m = doc["machine"]
    lines.append(
        f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_bytes'] / (1 << 30):.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, pyfuse3 {m['pyfuse3']}, trio {m.get('trio')}"
    )
    lines.append(f"mode: {doc['mode']}, filesystem under test: {doc['target_fs']}")
    lines.extend(f"note: {n}" for n in doc.get("notes", []))
    return "\n".join(lines)
