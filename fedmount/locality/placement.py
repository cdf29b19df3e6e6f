"""``fedmount locate --for RECORD``: which cluster of the federation could run a container, and
what would cross clusters if it ran there.

For every cluster, in parallel:

1. Its exported configuration (`FederationView.exported_config`, asked of that cluster):
   an instance type fits when it meets the record's `Requirements` (memory with the
   mount's RAM cache, CPUs, scratch for the tmp mounts and the disk cache, GPUs);
   the cheapest that fits is the one named.
2. Its API reaches every input (the record's collection mounts and image): it holds a
   copy of its own (`LocalityView.copy_at`), owns it, or lists the owner among its
   ``RemoteClusters`` with ``Proxy`` (it forwards requests there).
3. Bytes: which blocks of the inputs its own Keep holds (`locate`'s HEADs with the token
   that cluster accepts); the rest would cross clusters if the step ran there.

A cluster *can run* the step when an instance type fits and it reaches every input. The
ranking puts those first, then fewer bytes crossing, then the cheaper instance type. The
first is printed as the CWL hint that pins a step to it, which arvados-cwl-runner reads::

    hints:
      arv:ClusterTarget:
        cluster_id: zbbbb

JSON (``--json``; ``schema`` changes only when a field changes meaning or goes away)::

    {"schema": "fedmount-placement/1", "record": "<uuid or null>", "complete": true,
     "error": null | "one line",
     "requirements": {"ram": .., "vcpus": .., "scratch": .., "gpus": .., "gpu_stack": ..,
                      "gpu_driver": .., "gpu_vram": ..},
     "inputs": [{"field": "mounts[\\"/in\\"].portable_data_hash", "id": .., "bytes": ..}],
     "clusters": [{"cluster": "zbbbb", "rank": 1, "can_run": true,
                   "instance_type": {"name": .., "vcpus": .., "ram": .., "scratch": ..,
                                     "price": .., "gpus": ..} | null,
                   "reaches_inputs": true, "bytes_held": .., "bytes_crossing": ..,
                   "reasons": ["why not, one line each"], "error": null | "one line"}],
     "best": "zbbbb" | null,
     "cwl_hint": {"arv:ClusterTarget": {"cluster_id": "zbbbb"}} | null}

Exit status: 0 some cluster can run it; 1 none can; 2 the record or an input could not be
read (bad record, unknown collection, unreachable home cluster).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import trio

from fedmount.api.cluster_config import ConfigError, InstanceType, instance_types, remote_clusters
from fedmount.blocks.throughput import ThroughputBook
from fedmount.runner.requirements import Requirements, instance_capacity, shortfalls
from fedmount.runner.spec import ContainerSpec
from fedmount.runner.staging import staged_fields

from .locate import BlockProbe, CacheProbe, locate_collections
from .locate_report import LocateReport
from .progress import human_bytes
from .view import LocalityView, LookupFailure

SCHEMA = "fedmount-placement/1"
CWL_NAMESPACE = "http://arvados.org/cwl#"


@dataclass
class ClusterFit:
    cluster: str
    instance_type: InstanceType | None = None
    reaches_inputs: bool = False
    bytes_held: int = 0
    bytes_crossing: int = 0
    reasons: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def can_run(self) -> bool:
        return self.error is None and self.instance_type is not None and self.reaches_inputs

    def to_json(self, rank: int) -> dict:
        t = self.instance_type
        return {
            "cluster": self.cluster,
            "rank": rank,
            "can_run": self.can_run,
            "instance_type": None if t is None else {
                "name": t.name, "vcpus": t.vcpus, "ram": t.ram, "scratch": t.scratch, "price": t.price,
                "gpus": t.gpu.device_count if t.gpu else 0,
            },
            "reaches_inputs": self.reaches_inputs,
            "bytes_held": self.bytes_held,
            "bytes_crossing": self.bytes_crossing,
            "reasons": self.reasons,
            "error": self.error,
        }  # fmt: skip


@dataclass
class PlacementReport:
    record: str | None
    requirements: Requirements
    inputs: dict[str, str]  # collection ID -> the record field naming it
    locate: LocateReport | None = None
    clusters: list[ClusterFit] = field(default_factory=list)  # ranked
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and all(c.error is None for c in self.clusters)

    @property
    def best(self) -> str | None:
        return self.clusters[0].cluster if self.clusters and self.clusters[0].can_run else None

    def exit_status(self) -> int:
        if self.error is not None:
            return 2
        return 0 if self.best is not None else 1

    def input_bytes(self) -> dict[str, int]:
        if self.locate is None:
            return {}
        return {c.id: sum(c.sizes.values()) for c in self.locate.collections}

    def to_json(self) -> dict:
        sizes = self.input_bytes()
        best = self.best
        return {
            "schema": SCHEMA,
            "record": self.record,
            "complete": self.complete,
            "error": self.error,
            "requirements": asdict(self.requirements),
            "inputs": [{"field": f, "id": i, "bytes": sizes.get(i)} for i, f in self.inputs.items()],
            "clusters": [c.to_json(n) for n, c in enumerate(self.clusters, 1)],
            "best": best,
            "cwl_hint": None if best is None else {"arv:ClusterTarget": {"cluster_id": best}},
        }

    def render(self) -> str:
        if self.error is not None:
            return f"error: {self.error}\n"
        rows = [("rank", "cluster", "can run", "instance type", "inputs held", "would cross")]
        for n, c in enumerate(self.clusters, 1):
            t = c.instance_type
            rows.append((str(n), c.cluster, "yes" if c.can_run else "no", t.name if t else "-",
                         human_bytes(c.bytes_held), human_bytes(c.bytes_crossing)))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        for c in self.clusters:
            lines += [f"  {c.cluster}: {why}" for why in c.reasons]
            if c.error:
                lines.append(f"  {c.cluster}: error: {c.error}")
        best = self.best
        if best is None:
            lines.append("no cluster of the federation can run this step")
        else:
            lines += ["", "CWL hint to run the step there:", "", "$namespaces:",
                      f'  arv: "{CWL_NAMESPACE}"', "hints:", "  arv:ClusterTarget:",
                      f"    cluster_id: {best}"]  # fmt: skip
        return "\n".join(lines) + "\n"


def _rank_key(c: ClusterFit) -> tuple:
    price = c.instance_type.price if c.instance_type else float("inf")
    return (not c.can_run, c.bytes_crossing, price, c.cluster)


async def place(
    spec: ContainerSpec,
    view: LocalityView,
    keep: BlockProbe,
    cache: CacheProbe,
    book: ThroughputBook,
    *,
    concurrency: int = 16,
) -> PlacementReport:
    """Answer ``locate --for`` for `spec` (see the module docstring); never raises for a
    cluster that cannot be asked (its row says why)."""
    inputs = staged_fields(spec)
    report = PlacementReport(spec.uuid, Requirements.of(spec), inputs)
    located = await locate_collections(list(inputs), view, keep, cache, book, concurrency=concurrency)
    report.locate = located
    if located.error is not None:
        report.error = located.error
        return report
    failed = [c for c in located.collections if c.error is not None]
    if failed:
        report.error = f"{inputs[failed[0].id]}: {failed[0].error}"
        return report
    try:
        clusters = await view.clusters()
    except LookupFailure as exc:
        report.error = str(exc)
        return report
    fits = [ClusterFit(name) for name in clusters]
    async with trio.open_nursery() as nursery:
        for fit in fits:
            nursery.start_soon(_judge, fit, report, view)
    report.clusters = sorted(fits, key=_rank_key)
    return report


async def _judge(fit: ClusterFit, report: PlacementReport, view: LocalityView) -> None:
    assert report.locate is not None
    try:
        config = await view.exported_config(fit.cluster)
        types = instance_types(fit.cluster, config)
    except (LookupFailure, ConfigError) as exc:
        fit.error = str(exc)
        fit.reasons.append("its configuration could not be read")
        types, config = [], {}
    fitting = [t for t in types if not shortfalls(report.requirements, instance_capacity(t))]
    if fitting:
        fit.instance_type = fitting[0]
    elif types:
        closest = types[-1]  # the biggest (most expensive) type
        why = "; ".join(shortfalls(report.requirements, instance_capacity(closest)).values())
        fit.reasons.append(f"no instance type fits (the largest, {closest.name}, {why})")
    elif fit.error is None:
        fit.reasons.append("it exports no instance types")
    forwards_to = remote_clusters(config)
    fit.reaches_inputs = fit.error is None
    for c in report.locate.collections:
        held = c.holdings.get(fit.cluster)
        keys = held.held if held is not None else set()
        fit.bytes_held += sum(c.sizes[k] for k in keys)
        fit.bytes_crossing += sum(size for k, size in c.sizes.items() if k not in keys)
        owner = c.record.cluster if c.record is not None else None
        has_copy = held is not None and held.has_collection
        if not (has_copy or owner == fit.cluster or owner in forwards_to) and fit.error is None:
            fit.reaches_inputs = False
            fit.reasons.append(f"its API does not reach {report.inputs[c.id]} ({c.id}, on {owner})")
