"""`fedmount-run --stage`: pull every collection the run reads into its fedmount's disk cache first.

Algorithm of `stage_for_run`, called before the mount starts (so a refusal leaves nothing
mounted) and therefore before the container starts:

1. The collections: every collection mount (stdin included) and the image collection,
   each with the record field that names it, in record order, each ID once.
2. The cache: the directory the run's fedmount will be given (`mounts.fedmount_args` with
   ``staged=True`` always uses a disk cache there), bounded as that fedmount bounds it:
   ``keep_cache_disk``, else the default for the directory (`CacheConfig.for_directory`). A stage and the
   mount that follows therefore agree on what may be evicted.
3. `fedmount.locality.stage.stage_collections` along the route of the run's fedmount
   (`MOUNT_ROUTE`: `mounts.fedmount_args` gives no ``--route``, so the mount's default,
   auto: a remote cluster's blocks straight from its Keep while it answers, else through
   the home keepstore), so the blocks are read the way the mount reads them; its progress
   lines (one plain line every few seconds: bytes, rate, ETA) and its final report appended
   to the run's ``fedmount.log``. Every block is md5-verified before it is cached; blocks
   already cached are not fetched again.
4. SIGINT/SIGTERM: trio receives them while staging, cancels the stage, and the caller's
   `interrupted` callback turns the signal into the runner's usual interruption.
5. Outcome: a collection that could not be staged completely (bad or unknown ID, an
   unreadable block, blocks evicted again because the cache is too small) refuses the run
   with a `SpecError` naming its field (exit status 2); client settings that cannot be
   read, an unusable home cluster or a cache without a disk tier fail it (`RunError`).
   Otherwise the figures for result.json: collections, blocks, bytes, bytes staged (fetched
   now), bytes already cached, seconds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

import trio

from fedmount.api.federation import Mode
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.blocks.cache import CacheConfig, TieredCache
from fedmount.locality.stage import stage_collections
from fedmount.locality.stage_report import Outcome, StageReport
from fedmount.locality.view import LookupFailure
from fedmount.runner.runtimes import RunError
from fedmount.runner.spec import ContainerSpec, SpecError

STAGE_RAM_CACHE = 64 << 20  # the stage's own memory tier; the blocks it keeps are on disk
MOUNT_ROUTE: Mode = "auto"  # the run's fedmount's route: `fedmount_args` gives none, the default is auto


def staged_fields(spec: ContainerSpec) -> dict[str, str]:
    """Collection ID text -> the record field that names it (the first, if several do)."""
    fields: dict[str, str] = {}
    for m in spec.collection_mounts():
        key = "portable_data_hash" if m.collection.is_pdh else "uuid"
        fields.setdefault(m.collection.text, f'mounts["{m.target}"].{key}')
    if spec.image_collection is not None:
        fields.setdefault(spec.image_collection.text, "container_image")
    return fields


def stage_disk_limit(spec: ContainerSpec, cache_dir: str) -> int:
    """The bound the run's fedmount will give its disk cache in `cache_dir`."""
    return _config(spec, cache_dir).disk_limit


def _config(spec: ContainerSpec, cache_dir: str) -> CacheConfig:
    return CacheConfig.for_directory(cache_dir, spec.constraints.keep_cache_disk, STAGE_RAM_CACHE)


def stage_for_run(
    spec: ContainerSpec,
    cache_dir: str,
    log_path: str,
    env: dict[str, str],
    *,
    interrupted: Callable[[int], NoReturn],
) -> dict[str, Any]:
    """Stage the run's collections into `cache_dir` (see the module docstring); the figures."""
    fields = staged_fields(spec)
    try:
        settings = Settings.from_environment(env)
    except SettingsError as exc:
        raise RunError(f"--stage: {exc}") from None
    cache = TieredCache.configured(_config(spec, cache_dir))
    signals: list[int] = []
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"fedmount-run: --stage: staging {len(fields)} collections into {cache_dir}\n")
        log.flush()
        try:
            report = trio.run(_stage, list(fields), settings, cache, log, signals)
        except* LookupFailure as group:
            raise RunError(f"--stage: {group.exceptions[0]}") from None
        seconds = time.monotonic() - t0
        if signals:
            log.write(f"fedmount-run: --stage: interrupted after {seconds:.1f} s\n")
            interrupted(signals[0])
        assert report is not None  # only a signal cancels the stage
        log.write(report.render())
        log.write(f"fedmount-run: --stage: done in {seconds:.1f} s\n")
    _refuse_incomplete(report, fields)
    return _figures(report, seconds)


async def _stage(
    ids: list[str], settings: Settings, cache: TieredCache, log: TextIO, signals: list[int]
) -> StageReport | None:
    report: StageReport | None = None
    async with trio.open_nursery() as nursery:

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                task_status.started()
                async for signum in received:
                    signals.append(signum)
                    nursery.cancel_scope.cancel()

        await nursery.start(watch)
        report = await stage_collections(ids, settings, cache, mode=MOUNT_ROUTE, progress_stream=log)
        nursery.cancel_scope.cancel()
    return report


def _refuse_incomplete(report: StageReport, fields: dict[str, str]) -> None:
    if report.error is not None:
        raise RunError(f"--stage: {report.error}")
    for c in report.summaries():
        field = fields[c.id]
        if c.error is not None:
            raise SpecError(field, f"cannot stage: {c.error}")
        if c.failed:
            more = f" (and {len(c.failed) - 1} more blocks)" if len(c.failed) > 1 else ""
            raise SpecError(field, f"cannot stage: {c.failed[0]}{more}")
        evicted = c.count(Outcome.EVICTED).blocks
        if evicted:
            raise SpecError(
                field,
                f"cannot stage: {evicted} blocks were evicted again: the collections do not "
                "fit in the cache; raise runtime_constraints.keep_cache_disk",
            )


def _figures(report: StageReport, seconds: float) -> dict[str, Any]:
    every = report.distinct()
    return {
        "collections": len(report.collections),
        "blocks": every.blocks,
        "bytes": every.bytes,
        "bytes_staged": report.tally(Outcome.FETCHED).bytes,
        "bytes_already_cached": report.tally(Outcome.CACHED).bytes,
        "seconds": round(seconds, 3),
    }
