"""``fedmount-run --check RECORD``: could this container run on this host, now, with this data?

Nothing is started or mounted. Every check runs, so that a NO comes with every reason:

- ``runtime``: the runtime ``--runtime`` names (default: Docker when its daemon answers,
  else bubblewrap) is usable (`cli.choose_runtime`);
- ``image``: an image collection resolves, is readable (below) and holds one
  ``<image id>.tar`` at its root, as arv-keepdocker stores it; a local image name is an
  image the Docker daemon has (nothing is pulled); for the local runtime, a root directory;
- ``ram``, ``vcpus``, ``scratch`` and, when asked, ``gpu``: the record's `Requirements`
  against this host's `Capacity` (memory, usable CPUs, free space where ``--tmpdir`` puts
  the run, NVIDIA GPUs);
- ``input``: every collection the record reads (mounts, stdin, the image) resolves with
  this token, and every block is readable: in this host's cache (``--cache-dir``, if
  given; a run without one starts from an empty private cache) or held by the cluster
  that would serve it (`locate`'s HEADs, along the route of the run's fedmount,
  `staging.MOUNT_ROUTE`: auto, so a remote cluster's blocks count as read from its own Keep
  or through the home as the mount will read them). Per input: bytes per cluster, bytes cached, and
  the estimated transfer time at the throughput fedmount observed (`locate`'s estimates).

JSON (``--json``), shaped like an execution broker's answer to an offer (the IVOA
ExecutionBroker's: a result, the reasons, the estimates); ``schema`` changes only when a
field changes meaning or goes away::

    {"schema": "fedmount-check/1", "result": "YES" | "NO", "host": "<hostname>",
     "runtime": "docker" | "local" | null,
     "reasons": [{"check": "runtime"|"image"|"ram"|"vcpus"|"scratch"|"gpu"|"input",
                  "ok": true, "field": "<record field>" | null, "detail": "one line"}],
     "inputs": [{"field": ..., "id": ..., "portable_data_hash": ... | null, "readable": true,
                 "bytes": .., "bytes_cached": .., "bytes_by_cluster": {"zbbbb": ..},
                 "estimate": {"bytes": .., "seconds": .., "cluster": .., "bytes_per_second": ..,
                              "throughput": "observed" | "default"} | null}],
     "estimate": {"bytes_to_transfer": .., "seconds": ..}}

Exit status: 0 YES, 1 NO; 2 when the record itself is refused (before any check).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from fedmount.arvados.manifest import File, ManifestError, parse_manifest
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.throughput import ThroughputBook
from fedmount.locality.federation_view import FederationView, keep_client_for
from fedmount.locality.locate import locate_collections
from fedmount.locality.locate_report import CollectionReport, Estimate, summarize
from fedmount.locality.view import LookupFailure
from fedmount.runner.requirements import Requirements, compare, host_capacity
from fedmount.runner.runtimes import RunError, Runtime
from fedmount.runner.runtimes.choice import choose_runtime
from fedmount.runner.runtimes.docker import DockerRuntime
from fedmount.runner.spec import ContainerSpec
from fedmount.runner.staging import MOUNT_ROUTE, staged_fields

SCHEMA = "fedmount-check/1"


@dataclass(frozen=True)
class Reason:
    check: str
    ok: bool
    detail: str
    field: str | None = None

    def to_json(self) -> dict:
        return {"check": self.check, "ok": self.ok, "field": self.field, "detail": self.detail}


@dataclass(frozen=True)
class InputAnswer:
    field: str
    id: str
    portable_data_hash: str | None
    readable: bool
    bytes: int = 0
    bytes_cached: int = 0
    bytes_by_cluster: dict[str, int] = field(default_factory=dict)
    estimate: Estimate | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["estimate"] = self.estimate.to_json() if self.estimate else None
        return out


@dataclass
class CheckReport:
    host: str
    runtime: str | None = None
    reasons: list[Reason] = field(default_factory=list)
    inputs: list[InputAnswer] = field(default_factory=list)

    @property
    def yes(self) -> bool:
        return all(r.ok for r in self.reasons)

    def exit_status(self) -> int:
        return 0 if self.yes else 1

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "result": "YES" if self.yes else "NO",
            "host": self.host,
            "runtime": self.runtime,
            "reasons": [r.to_json() for r in self.reasons],
            "inputs": [i.to_json() for i in self.inputs],
            "estimate": {
                "bytes_to_transfer": sum(i.estimate.bytes for i in self.inputs if i.estimate),
                "seconds": round(sum(i.estimate.seconds for i in self.inputs if i.estimate), 3),
            },
        }

    def render(self) -> str:
        lines = [f"{'YES' if self.yes else 'NO'}: this container {'can' if self.yes else 'cannot'} run on "
                 f"{self.host} now"]  # fmt: skip
        for r in self.reasons:
            where = f" {r.field}" if r.field else ""
            lines.append(f"  {'ok ' if r.ok else 'NO '} {r.check}{where}: {r.detail}")
        doc = self.to_json()["estimate"]
        if self.inputs:
            lines.append(f"  to transfer: {doc['bytes_to_transfer']} bytes, about {doc['seconds']:g} s")
        return "\n".join(lines) + "\n"


def check_record(
    spec: ContainerSpec, *, runtime: str | None, cache_dir: str | None, tmpdir: str | None,
    env: dict[str, str] | None = None,
) -> CheckReport:
    """Every check of the module docstring, for this host."""
    report = CheckReport(socket.gethostname())
    chosen = _runtime(report, runtime)
    report.reasons += [Reason(name, met, line) for name, (met, line) in
                       compare(Requirements.of(spec), host_capacity(tmpdir)).items()]  # fmt: skip
    located = _locate(report, spec, cache_dir, env)
    _image(report, spec, chosen, located)
    return report


def _runtime(report: CheckReport, name: str | None) -> Runtime | None:
    try:
        chosen = choose_runtime(name)
    except RunError as exc:
        report.reasons.append(Reason("runtime", False, str(exc)))
        return None
    report.runtime = chosen.name
    report.reasons.append(Reason("runtime", True, f"{chosen.name} is usable"))
    return chosen


def _locate(
    report: CheckReport, spec: ContainerSpec, cache_dir: str | None, env: dict[str, str] | None
) -> dict[str, CollectionReport]:
    fields = staged_fields(spec)
    if not fields:
        return {}
    try:
        settings = Settings.from_environment(env)
    except SettingsError as exc:
        report.reasons.append(Reason("input", False, f"cannot read the inputs: {exc}"))
        return {}
    probe: Any = _Empty()
    if cache_dir and os.path.isdir(cache_dir):
        probe = TieredCache(cache_dir, sys.maxsize, 0)  # the disk tier alone, as a mount sees it
    book = ThroughputBook.in_cache_dir(cache_dir)

    async def run() -> dict[str, CollectionReport]:
        async with FederationView.open(settings, mode=MOUNT_ROUTE, retries=1) as view:
            keep = keep_client_for(settings, retries=1)
            located = await locate_collections(list(fields), view, keep, probe, book)
        if located.error is not None:
            raise LookupFailure(located.error)
        return {c.id: c for c in located.collections}

    try:
        collections = trio.run(run)
    except LookupFailure as exc:
        report.reasons.append(Reason("input", False, f"cannot read the inputs: {exc}"))
        return {}
    for cid, where in fields.items():
        report.inputs.append(_input(collections[cid], where, book))
        answer = report.inputs[-1]
        c = collections[cid]
        detail = c.error or (f"{answer.bytes} bytes readable, {answer.bytes_cached} cached" if answer.readable
                             else _unreadable(c))  # fmt: skip
        report.reasons.append(Reason("input", answer.readable, detail, where))
    return collections


class _Empty:
    """The cache of a run without --cache-dir: a new private one, empty."""

    def cached_bytes(self, key: str) -> int:
        return 0


def _readable(c: CollectionReport, key: str) -> bool:
    cluster = c.serving[key][0]
    holding = c.holdings.get(cluster)
    return c.is_cached(key) or (holding is not None and key in holding.held)


def _unreadable(c: CollectionReport) -> str:
    bad = [k for k in c.sizes if not _readable(c, k)]
    errors = [h.error for h in c.holdings.values() if h.error]
    why = f" ({errors[0]})" if errors else ""
    return f"{len(bad)} of {len(c.sizes)} blocks cannot be read from the cluster that would serve them{why}"


def _input(c: CollectionReport, where: str, book: ThroughputBook) -> InputAnswer:
    if c.record is None:
        return InputAnswer(where, c.id, None, False)
    s = summarize(c, book)
    return InputAnswer(
        where, c.id, c.record.portable_data_hash, all(_readable(c, k) for k in c.sizes),
        s.total.bytes, s.cached.bytes, {name: h.held.bytes for name, h in s.clusters.items()}, s.estimate,
    )  # fmt: skip


def _image(
    report: CheckReport, spec: ContainerSpec, runtime: Runtime | None, located: dict[str, CollectionReport]
) -> None:
    cid = spec.image_collection
    if cid is not None:
        c = located.get(cid.text)
        if c is None or c.record is None:
            report.reasons.append(Reason("image", False, f"image collection {cid.text} could not be read",
                                         "container_image"))  # fmt: skip
            return
        try:
            root = parse_manifest(c.record.manifest_text).root
        except ManifestError as exc:
            report.reasons.append(Reason("image", False, str(exc), "container_image"))
            return
        tars = sorted(name for name, e in root.entries() if isinstance(e, File) and name.endswith(".tar"))
        ok = len(tars) == 1
        detail = f"{cid.text} holds {tars[0]}" if ok else (
            f"{cid.text} holds {len(tars)} image tarballs (arv-keepdocker stores exactly one)")  # fmt: skip
        report.reasons.append(Reason("image", ok, detail, "container_image"))
        return
    image, no = spec.container_image, "not "
    if runtime is None:
        ok, detail = False, "no usable runtime to look the image up in"
    elif isinstance(runtime, DockerRuntime):
        ok = runtime.has_image(image)
        detail = f"{image} is {'' if ok else no}a local Docker image (nothing is pulled)"
    else:
        ok = os.path.isabs(image) and os.path.isdir(image)
        detail = f"{image} is {'' if ok else no}a root directory for the local runtime"
    report.reasons.append(Reason("image", ok, detail, "container_image"))
