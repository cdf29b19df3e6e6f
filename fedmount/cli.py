"""The ``fedmount`` command line.

``fedmount [options] MOUNTPOINT`` mounts; ``fedmount --unmount MOUNTPOINT`` unmounts
without talking to any API. arv-mount's read-path flags are accepted where they mean the
same thing, so fedmount can stand in for arv-mount under crunch-run; its write flags
(`fedmount.write_flags`) write only into ``--mount-tmp`` scratch directories.

Subcommands (``fedmount NAME ...``: ``locate``, ``stage``, ``unpin``) dispatch on the first
argument before the mount parser sees anything. Each owns its help and its parser
(`fedmount.locality.arguments`, light: ``fedmount --help`` lists them after the options)
and runs in `fedmount.locality.commands`, imported only when one runs. The numbers the
help shows come from `fedmount.defaults`, so that ``--help`` loads neither trio nor
sqlite3, httpx or urllib3; the mount itself (`fedmount.mount`) is imported after parsing.

The help strings below are also the text of ``man/fedmount.1``; a unit test keeps the two
in step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fedmount import __version__, defaults
from fedmount.cliutil import Subcommand, parse_size, seconds, subcommands_text
from fedmount.locality import arguments as locality_arguments
from fedmount.logs import add_detached_log, setup_logging
from fedmount.unmount import unmount_command
from fedmount.write_flags import add_write_options, check_write_options

SUBCOMMANDS: dict[str, Subcommand] = {c.name: c for c in locality_arguments.SUBCOMMANDS}


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    """Run ``fedmount NAME ARGV...``: the subcommand's exit status."""
    from fedmount.locality.commands import MAINS  # loads trio and the cache: only to run one

    return MAINS[name](argv)


DESCRIPTION = """\
Mount Arvados collections of every cluster of a federation, read-only, at MOUNTPOINT.
The mount root holds README, by_id/, by_tag/, home/, shared/ and clusters/: look up any
collection or project UUID or portable data hash under by_id/, or walk your projects by
name under home/, shared/ and clusters/<cluster id>/. Settings come from ARVADOS_API_HOST,
ARVADOS_API_TOKEN, ARVADOS_API_HOST_INSECURE and ~/.config/arvados/settings.conf."""

EPILOG = f"""\
{subcommands_text(SUBCOMMANDS.values())}

Statistics: MOUNTPOINT/.fedmount/stats.json (hidden). Extended attributes: getfattr -d FILE.
See fedmount(1)."""


def _dir_name(text: str) -> str:
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} must be a single directory name such as by_id")
    return text


def _filters(text: str) -> list[list[object]]:
    """--filters: JSON, a file holding it, or - for standard input; a list of 3-element lists."""
    source = text
    try:
        if text == "-":
            source = sys.stdin.read()
        elif not text.lstrip().startswith("[") and os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                source = f.read()
        filters = json.loads(source)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON list of filters, nor a file holding one: {e}") from None
    def one(f: object) -> bool:
        return isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and isinstance(f[1], str)

    if not isinstance(filters, list) or not all(map(one, filters)):
        raise argparse.ArgumentTypeError("filters must be a list of [attribute, operator, operand] lists")
    return filters


def hedge_after(text: str) -> float | None:
    """--keep-hedge-after: None for auto, 0 for off, else seconds."""
    word = text.strip().lower()
    if word == "auto":
        return None
    return 0.0 if word == "off" else seconds(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmount", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="Directory to mount on (or to unmount, with --unmount).")
    p.add_argument("--version", action="version", version=f"fedmount {__version__}")

    g = p.add_argument_group("layout (default: --all)")
    g.add_argument("--collection", metavar="ID",
                   help="Mount the one collection with this UUID or portable data hash at the root.")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--all", dest="mode", action="store_const", const="all",
                      help="README, by_id/, by_tag/, home/ and shared/ as arv-mount has them, and clusters/ "
                      "with <cluster id>/home/ and <cluster id>/shared/ for every cluster of the federation.")
    mode.add_argument("--home", dest="mode", action="store_const", const="home",
                      help="Mount your home project (on the home cluster) at the root.")
    mode.add_argument("--shared", dest="mode", action="store_const", const="shared",
                      help="Mount the projects shared with you (on the home cluster) at the root.")
    mode.add_argument("--by-tag", dest="mode", action="store_const", const="by_tag",
                      help="Mount the collections of the home cluster by tag at the root.")
    mode.add_argument("--project", metavar="UUID",
                      help="Mount the project or filter group with this UUID, of any cluster, at the root.")
    g.add_argument("--mount-home", metavar="DIR", action="append", default=[], type=_dir_name,
                   help="Make DIR at the root your home project. Repeatable; replaces the default layout.")
    g.add_argument("--mount-shared", metavar="DIR", action="append", default=[], type=_dir_name,
                   help="Make DIR at the root the projects shared with you. Repeatable; replaces the default "
                   "layout.")
    g.add_argument("--mount-by-tag", metavar="DIR", action="append", default=[], type=_dir_name,
                   help="Make DIR at the root the collections by tag. Repeatable; replaces the default "
                   "layout.")
    g.add_argument("--filters", metavar="JSON", type=_filters, default=[],
                   help="Filters (a JSON list of [attribute, operator, operand] lists, a file holding one, "
                   "or - for standard input) applied to every project, shared and tag listing, as "
                   "arv-mount applies them; table.attribute applies to that table only.")
    g.add_argument("--mount-by-id", metavar="DIR", action="append", default=[], type=_dir_name,
                   help="Make DIR at the root a by_id directory (collections by UUID or PDH). Repeatable; "
                   "replaces the default layout.")
    g.add_argument("--mount-by-pdh", metavar="DIR", action="append", default=[], type=_dir_name,
                   help="Make DIR at the root a directory of collections by portable data hash only. "
                   "Repeatable; replaces the default layout.")

    g = p.add_argument_group("lifecycle")
    g.add_argument("--foreground", action="store_true",
                   help="Stay in the foreground (default: detach once the mount is ready).")
    g.add_argument("--exec", dest="exec_args", nargs=argparse.REMAINDER, metavar="CMD",
                   help="Mount, run CMD with its arguments (everything after --exec), unmount, and exit "
                   "with CMD's status. Put MOUNTPOINT before --exec.")
    g.add_argument("--unmount", action="store_true",
                   help="Unmount MOUNTPOINT, even if its daemon is dead or hung, without contacting any API; "
                   "exit 1 if it is not mounted.")
    g.add_argument("--unmount-timeout", metavar="SECONDS", type=seconds, default=2.0,
                   help="How long --unmount (and --replace) keep trying (default 2).")
    g.add_argument("--replace", action="store_true",
                   help="If MOUNTPOINT is already a FUSE mount (live or dead), unmount it first.")
    g.add_argument("--nonempty", action="store_true",
                   help="Mount even if MOUNTPOINT is not empty, hiding its files until unmounted (libfuse "
                   "2's nonempty option; by default a non-empty MOUNTPOINT is refused, as arv-mount does).")
    g.add_argument("--allow-other", action="store_true",
                   help="Let other users (and containers) read the mount; needs user_allow_other in "
                   "/etc/fuse.conf unless run as root.")
    g.add_argument("--subtype", metavar="NAME", default="fedmount",
                   help="Filesystem subtype shown in /proc/mounts as fuse.NAME (default fedmount).")
    g.add_argument("--read-only", action="store_true",
                   help="Accepted for arv-mount compatibility; collections are always read-only "
                   "(only --mount-tmp directories take writes).")

    g = p.add_argument_group("federation")
    g.add_argument("--route", choices=("auto", "home", "direct"), default="auto",
                   help="auto (default): ask the home cluster for every collection and read a remote "
                   "cluster's blocks from its own Keep with a salted token while its keepstores answer, "
                   "else through the home keepstore (decided per cluster, tried again after a failure "
                   "at growing intervals); home: read remote blocks through the home cluster's "
                   "keepstore (as arv-mount does); direct: ask the owning cluster for its collections "
                   "and read them from its Keep with a salted token.")
    g.add_argument("--refresh-time", metavar="SECONDS", type=seconds, default=15.0,
                   help="How often collections addressed by UUID are re-checked, and how long a "
                   "collection id that does not exist is remembered as missing (default 15).")
    g.add_argument("--api-wait", metavar="SECONDS", type=seconds, default=defaults.API_WAIT,
                   help="How long a lookup, stat, listing or open waits for an API answer: loading a "
                   "collection not yet mounted, or re-checking a UUID collection. Past it, a lookup fails "
                   "with ETIMEDOUT and a re-checked collection is served as it was; the request goes on in "
                   "the background, for the next one. While a request to a cluster is pending past this "
                   f"wait, that cluster's collections do not wait at all (default {defaults.API_WAIT:g}).")
    g.add_argument("--max-manifest-size", metavar="BYTES", type=parse_size,
                   default=defaults.MAX_MANIFEST_SIZE,
                   help="Refuse a collection whose API record (its manifest and the rest) is bigger "
                   "than this, with one line in the log and EIO: loading one costs the daemon a few "
                   f"times its size in memory (default {defaults.MAX_MANIFEST_SIZE >> 20}M).")

    g = p.add_argument_group("cache and read-ahead")
    cache_kind = g.add_mutually_exclusive_group()
    cache_kind.add_argument("--disk-cache", dest="cache_kind", action="store_const", const="disk",
                            default="disk", help="Keep blocks in a disk cache, over a RAM cache "
                            "(default): one per user, shared by that user's mounts on the host.")
    cache_kind.add_argument("--ram-cache", dest="cache_kind", action="store_const", const="ram",
                            help="Keep blocks in RAM only. A block being read stays in the cache "
                            "until its readers are past it; readers beyond the cache's size wait "
                            "their turn.")
    g.add_argument("--disk-cache-dir", metavar="DIR",
                   help="Disk cache directory, shared by every fedmount of the same user on the host "
                   "(default $XDG_CACHE_HOME/fedmount or ~/.cache/fedmount). It must belong to that "
                   "user and be writable by no one else, or it is refused with one line and blocks "
                   "are cached in RAM only.")
    g.add_argument("--file-cache", metavar="BYTES", type=parse_size, default=0,
                   help="Size of the disk cache, or of the RAM cache with --ram-cache, as arv-mount "
                   "takes it (0: automatic).")
    g.add_argument("--disk-cache-size", metavar="BYTES", type=parse_size, default=0,
                   help="Size of the disk cache (default: --file-cache, else 10%% of the cache "
                   "filesystem, at most 25%% of its free space counting the cache's own blocks as free; "
                   "fedmount stage uses the same default).")
    g.add_argument("--ram-cache-size", metavar="BYTES", type=parse_size, default=0,
                   help="Size of the RAM cache (default 256M, or --file-cache with --ram-cache).")
    g.add_argument("--read-ahead-blocks", metavar="N", type=int, default=defaults.READ_AHEAD_BLOCKS,
                   help="How many blocks to read ahead of a sequential reader "
                   f"(default {defaults.READ_AHEAD_BLOCKS}).")
    g.add_argument("--keep-stall-timeout", metavar="SECONDS", type=seconds, default=15.0,
                   help="Abandon a keep service that sends no byte for this long and read the "
                   "block from the next replica (default 15).")
    g.add_argument("--keep-hedge-after", metavar="SECONDS|auto", type=hedge_after, default=None,
                   help="Send a second request for a block to the next replica when the first has "
                   "sent no byte for SECONDS; the first verified answer wins. auto (the default): "
                   "1.5 times the cluster's recent p95 time to first byte, 0.5 to 5 s; 0 or off: never. "
                   "At most 10%% of the requests of the last 30 s (plus 5) are such hedges.")
    g.add_argument("--keep-min-rate", metavar="BYTES", type=parse_size, default=defaults.KEEP_MIN_RATE,
                   help="Abandon a keep service that sends a block slower than BYTES per second on "
                   "average over --keep-rate-window, and read the block from the next replica "
                   f"(default {defaults.KEEP_MIN_RATE >> 10}K, as the Arvados SDK; 0: never).")
    g.add_argument("--keep-rate-window", metavar="SECONDS", type=seconds, default=defaults.KEEP_RATE_WINDOW,
                   help="The span in seconds over which --keep-min-rate is averaged; a transfer is "
                   f"first judged once it has run this long (default {defaults.KEEP_RATE_WINDOW:g}, as the "
                   "Arvados SDK).")
    g.add_argument("--read-ahead-kb", metavar="KB", type=int, default=4096,
                   help="Kernel read-ahead of the mount (its BDI read_ahead_kb); needs root, skipped "
                   "otherwise; 0 keeps the kernel default (default 4096).")

    g = p.add_argument_group("statistics and logging")
    g.add_argument("--crunchstat-interval", metavar="SECONDS", type=seconds, default=0.0,
                   help="Print crunchstat: lines (keep calls, bytes, cache hits, FUSE ops, process "
                   "figures) to stderr every SECONDS (0: never).")
    g.add_argument("--stats-port", metavar="PORT", type=int, default=None,
                   help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics "
                   f"({defaults.STATS_MAX_CONNECTIONS} connections at a time at most, each closed "
                   f"{defaults.STATS_CONNECTION_SECONDS:g} seconds after it was accepted).")
    g.add_argument("--debug", action="store_true", help="Log debugging detail.")
    g.add_argument("--logfile", metavar="FILE",
                   help="Write the log to FILE (default: stderr with --foreground or --exec; detached, a "
                   "file named after MOUNTPOINT in $XDG_STATE_HOME/fedmount/logs, or "
                   "~/.local/state/fedmount/logs, rotated at 10 MiB keeping 3 old files; "
                   "the \"mounted\" line names it); a new log file is created readable by its owner only.")

    g = p.add_argument_group("accepted for arv-mount compatibility, without effect")
    g.add_argument("--disable-event-listening", action="store_true",
                   help="fedmount never listens to events: UUID collections are re-checked every "
                   "--refresh-time.")
    add_write_options(p, dir_name=_dir_name, size=parse_size)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.project:
        args.mode = "project"
    names = args.mount_by_id + args.mount_by_pdh + args.mount_home + args.mount_shared + args.mount_by_tag
    check_write_options(parser, args)
    names += args.mount_tmp
    if args.collection and (names or args.mode):
        parser.error("--collection cannot be combined with another layout option")
    if args.mode and names:
        parser.error(f"cannot combine the {args.mode} mode with --mount-* options")
    if len(set(names)) != len(names):
        parser.error("each --mount-* directory name may be given once")
    if args.exec_args is not None and not args.exec_args:
        parser.error("--exec needs a command")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = parse_args(argv)
    from fedmount import mount  # after parsing: --help stays fast and needs no FUSE

    try:
        setup_logging(args.debug, args.logfile)
    except OSError as e:
        print(f"fedmount: cannot write the log to {args.logfile}: {e.strerror}", file=sys.stderr)
        return 1
    if args.unmount:
        return unmount_command(os.path.abspath(args.mountpoint), args.unmount_timeout)
    opts = mount.MountOptions.from_args(args)
    if opts.detached and not args.logfile and opts.log_path and not add_detached_log(opts.log_path):
        opts.log_path = None
    return mount.run(opts)
