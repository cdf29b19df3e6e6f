"""``fedmount locate``, ``fedmount stage`` and ``fedmount unpin``: running what `arguments` parsed.

`fedmount.cli` dispatches ``fedmount NAME ARGS...`` to `MAINS[NAME]` with the remaining
arguments; each returns the exit status:

- locate: 0 every question answered (and, with ``--cluster X``, X holds every block);
  1 with ``--cluster X``: answered, and X lacks at least one block; 2 something could not
  be answered (bad ID, unknown collection, unreachable cluster or keepstore) or bad usage.
- stage: 0 every block of every collection is in the cache; 2 otherwise; 130 interrupted
  (what was fetched stays cached: run the same command again to fetch the rest).
- unpin: 0 every ID released; 2 otherwise.

locate and stage run the same way (`_run_subcommand`): parse, log, read the settings,
open the cache, then the command's body under `trio.run`, where a home cluster that
cannot be used and Ctrl-C each end in one line.

Settings come from the environment as for the mount (ARVADOS_API_HOST, ...); the cache
options name the same cache a mount uses, so a staged block is a mount's cache hit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from fedmount.api import route_choice
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.blocks.cache import CacheConfig, TieredCache
from fedmount.blocks.throughput import ThroughputBook
from fedmount.logs import setup_logging
from fedmount.runner.spec import SpecError, read_record

from .arguments import (
    DEFAULT_LOCATE_CONCURRENCY,
    DEFAULT_STAGE_CONCURRENCY,
    build_locate_parser,
    build_stage_parser,
    build_unpin_parser,
)
from .cluster_stage import ClusterKeep, CopyRecord, save_staged, stage_to_cluster
from .federation_view import FederationView, keep_client_for
from .locate import locate_collections
from .locate_report import failed_locate_json
from .placement import place
from .stage import stage_with, unpin_collections
from .view import LookupFailure


def _settings() -> Settings | None:
    try:
        return Settings.from_environment()
    except SettingsError as exc:
        print(f"fedmount: {exc}", file=sys.stderr)
        return None


def _config(args: argparse.Namespace) -> CacheConfig:
    """The mount's cache directory, bounded as a mount bounds it (`CacheConfig.for_directory`)."""
    return CacheConfig.for_directory(args.disk_cache_dir, getattr(args, "disk_cache_size", 0), ram=64 << 20)


def disk_limit(args: argparse.Namespace) -> int:
    """The bound this process evicts to: ``--disk-cache-size``, else the mount's default for the
    directory, so a stage and a later mount agree on it."""
    return _config(args).disk_limit


def _cache(args: argparse.Namespace) -> TieredCache:
    return TieredCache.configured(_config(args))


Body = Callable[[argparse.Namespace, Settings, TieredCache], Awaitable[int]]


def _run_subcommand(
    name: str, parser: argparse.ArgumentParser, argv: Sequence[str], body: Body, *, interrupted: str
) -> int:
    """Parse `argv`, log, read the settings, open the cache, run `body` under trio: its status;
    2 when the settings or the home cluster cannot be used, 130 on Ctrl-C (`interrupted` says
    what is left behind)."""
    args = parser.parse_args(argv)
    setup_logging(args.debug, None)
    settings = _settings()
    if settings is None:
        return 2
    cache = _cache(args)
    status = 2
    try:
        status = trio.run(body, args, settings, cache)
    except* LookupFailure as group:
        print(f"fedmount {name}: {group.exceptions[0]}", file=sys.stderr)
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        print(f"\nfedmount {name}: {interrupted}", file=sys.stderr)
        status = 130
    return status


async def _locate(args: argparse.Namespace, settings: Settings, cache: TieredCache) -> int:
    book = ThroughputBook.in_cache_dir(cache.directory)
    if not args.debug:  # the report says each remote cluster's way and why: no log line repeats it
        route_choice.log.setLevel(logging.ERROR)
    if args.record is not None:
        return await _place(args, settings, cache, book)
    try:
        async with FederationView.open(settings, mode=args.route, retries=1) as view:
            report = await locate_collections(
                args.ids, view, keep_client_for(settings, retries=1), cache, book,
                cluster=args.cluster, concurrency=args.concurrency or DEFAULT_LOCATE_CONCURRENCY,
            )
    except LookupFailure as exc:
        if args.json:
            print(json.dumps(failed_locate_json(str(exc)), indent=1))
        else:
            print(f"fedmount locate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stdout.write(report.render())
    return report.exit_status()


async def _place(
    args: argparse.Namespace, settings: Settings, cache: TieredCache, book: ThroughputBook
) -> int:
    try:
        spec = read_record(args.record)
    except SpecError as exc:
        print(f"fedmount locate: {exc}", file=sys.stderr)
        return 2
    async with FederationView.open(settings, mode=args.route, retries=1) as view:
        report = await place(spec, view, keep_client_for(settings, retries=1), cache, book,
                             concurrency=args.concurrency or DEFAULT_LOCATE_CONCURRENCY)  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stdout.write(report.render())
    return report.exit_status()


async def _stage_to_cluster(args: argparse.Namespace, settings: Settings, cache: TieredCache) -> int:
    keep, record, local = ClusterKeep(settings), CopyRecord(cache.directory), {}
    try:
        # auto and home are the same here (this host reads no block): home's +R locators, no trials
        async with FederationView.open(settings, mode="home") as view:
            report = await stage_to_cluster(
                args.ids, view, args.to_cluster, keep, record,
                concurrency=args.concurrency or DEFAULT_STAGE_CONCURRENCY,
                progress_stream=None if args.quiet else sys.stderr, local=local,
            )  # fmt: skip
            if args.save_as and report.complete:
                await save_staged(view, settings, report, local, args.save_as)
    finally:
        record.close()
        await keep.aclose()
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stderr.write(report.render())
    return report.exit_status()


async def _stage(args: argparse.Namespace, settings: Settings, cache: TieredCache) -> int:
    if args.to_cluster is not None:
        return await _stage_to_cluster(args, settings, cache)
    async with FederationView.open(settings, mode=args.route) as view:
        report = await stage_with(
            args.ids, view, keep_client_for(settings), cache, pin=args.pin,
            concurrency=args.concurrency or DEFAULT_STAGE_CONCURRENCY,
            progress_stream=None if args.quiet else sys.stderr,
        )
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stderr.write(report.render())
    return report.exit_status()


def locate_main(argv: Sequence[str]) -> int:
    return _run_subcommand("locate", build_locate_parser(), argv, _locate, interrupted="interrupted")


def stage_main(argv: Sequence[str]) -> int:
    return _run_subcommand(
        "stage", build_stage_parser(), argv, _stage,
        interrupted="interrupted; blocks fetched so far stay cached: run the same command again to fetch "
        "the rest",
    )


def unpin_main(argv: Sequence[str]) -> int:
    args = build_unpin_parser().parse_args(argv)
    setup_logging(args.debug, None)
    cache = _cache(args)

    def open_view():  # type: ignore[no-untyped-def]
        settings = _settings()
        if settings is None:
            raise LookupFailure("cannot resolve IDs without ARVADOS_API_HOST and ARVADOS_API_TOKEN")
        return FederationView.open(settings)

    results = trio.run(unpin_collections, args.ids, cache, open_view)
    for r in results:
        if r.error:
            print(f"{r.id}: error: {r.error}", file=sys.stderr)
        else:
            print(f"{r.id}: unpinned {r.blocks} blocks")
    return 0 if all(r.error is None for r in results) else 2


MAINS: dict[str, Callable[[Sequence[str]], int]] = {
    "locate": locate_main,
    "stage": stage_main,
    "unpin": unpin_main,
}
