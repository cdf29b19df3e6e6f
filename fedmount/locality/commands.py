"""``fedmount locate``, ``fedmount stage`` and ``fedmount unpin``: argument parsing and exit status.

`fedmount.cli` dispatches ``fedmount NAME ARGS...`` to ``locate_main`` / ``stage_main`` /
``unpin_main`` with the remaining arguments; each returns the exit status:

- locate: 0 every question answered (and, with ``--cluster X``, X holds every block);
  1 with ``--cluster X``: answered, and X lacks at least one block; 2 something could not
  be answered (bad ID, unknown collection, unreachable cluster or keepstore) or bad usage.
- stage: 0 every block of every collection is in the cache; 2 otherwise; 130 interrupted
  (what was fetched stays cached: run the same command again to fetch the rest).
- unpin: 0 every ID released; 2 otherwise.

Settings come from the environment as for the mount (ARVADOS_API_HOST, ...); the cache
options name the same cache a mount uses, so a staged block is a mount's cache hit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import trio

from fedmount.arvados.settings import Settings, SettingsError
from fedmount.blocks.cache import CacheConfig, TieredCache
from fedmount.blocks.throughput import ThroughputBook
from fedmount.cli import SUBCOMMAND_HELP, parse_size, setup_logging

from .federation_view import FederationView, keep_client_for
from .locate import locate_collections
from .stage import DEFAULT_STAGE_CONCURRENCY, stage_with, unpin_collections
from .view import LookupFailure


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-cache-dir", metavar="DIR",
                   help="The block cache directory, as given to the mount (default: the mount's default).")
    p.add_argument("--debug", action="store_true", help="Log debugging detail.")


def _add_route(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route", choices=("home", "direct"), default="home",
                   help="Read the way a mount with this --route reads (default home).")
    p.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help="Requests in flight at once (default: 16 for locate, 4 for stage).")


def build_locate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmount locate", description=SUBCOMMAND_HELP["locate"][1])
    p.add_argument("ids", nargs="+", metavar="ID", help="Collection UUID or portable data hash.")
    p.add_argument("--json", action="store_true", help="Print the fedmount-locate/1 JSON document.")
    p.add_argument("--cluster", metavar="X",
                   help="Only ask cluster X; the exit status answers whether X holds every block.")
    _add_route(p)
    _add_common(p)
    return p


def build_stage_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmount stage", description=SUBCOMMAND_HELP["stage"][1])
    p.add_argument("ids", nargs="+", metavar="ID", help="Collection UUID or portable data hash.")
    p.add_argument("--pin", action="store_true", help="Keep the blocks from eviction until `fedmount unpin`.")
    p.add_argument("--json", action="store_true", help="Print the fedmount-stage/1 JSON document on stdout.")
    p.add_argument("--quiet", action="store_true", help="No progress display.")
    p.add_argument("--disk-cache-size", metavar="BYTES", type=parse_size, default=0,
                   help="Evict least recently used unpinned blocks beyond this size while staging "
                   "(default: the bound a mount of this cache directory uses).")
    _add_route(p)
    _add_common(p)
    return p


def build_unpin_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmount unpin", description=SUBCOMMAND_HELP["unpin"][1])
    p.add_argument("ids", nargs="+", metavar="ID", help="Collection UUID or portable data hash.")
    _add_common(p)
    return p


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


def locate_main(argv: Sequence[str]) -> int:
    args = build_locate_parser().parse_args(argv)
    setup_logging(args.debug, None)
    settings = _settings()
    if settings is None:
        return 2
    cache = _cache(args)

    async def run() -> int:
        book = ThroughputBook.in_cache_dir(cache.directory)
        try:
            async with FederationView.open(settings, mode=args.route, retries=1) as view:
                report = await locate_collections(
                    args.ids, view, keep_client_for(settings, retries=1), cache, book,
                    cluster=args.cluster, concurrency=args.concurrency or 16,
                )
        except LookupFailure as exc:
            if args.json:
                print(json.dumps({"schema": "fedmount-locate/1", "complete": False, "error": str(exc),
                                  "collections": []}, indent=1))
            else:
                print(f"fedmount locate: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(report.to_json(), indent=1))
        else:
            sys.stdout.write(report.render())
        return report.exit_status()

    status = 130
    try:
        status = trio.run(run)
    except* KeyboardInterrupt:
        print("\nfedmount locate: interrupted", file=sys.stderr)
    return status


def stage_main(argv: Sequence[str]) -> int:
    args = build_stage_parser().parse_args(argv)
    setup_logging(args.debug, None)
    settings = _settings()
    if settings is None:
        return 2
    cache = _cache(args)

    async def run() -> int:
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

    status = 2
    try:
        status = trio.run(run)
    except* LookupFailure as group:
        print(f"fedmount stage: {group.exceptions[0]}", file=sys.stderr)
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        print("\nfedmount stage: interrupted; blocks fetched so far stay cached: run the same command "
              "again to fetch the rest", file=sys.stderr)
        status = 130
    return status


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
