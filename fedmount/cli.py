"""The ``fedmount`` command line.

``fedmount [options] MOUNTPOINT`` mounts; ``fedmount --unmount MOUNTPOINT`` unmounts
without talking to any API. arv-mount's read-path flags are accepted where they mean the
same thing, so fedmount can stand in for arv-mount under crunch-run; its write flags
(`fedmount.write_flags`) write only into ``--mount-tmp`` scratch directories.

Subcommands (``fedmount NAME ...``) dispatch on the first argument through `SUBCOMMANDS`
before the mount parser sees anything, so later tools (``fedmount locate``, ``fedmount
stage``) register one line here and own their own argument parsing. Their synopses and
descriptions live here too (`SUBCOMMAND_HELP`): ``fedmount --help`` lists them after the
options and each subcommand's own ``--help`` opens with its description.

The help strings below are also the text of ``man/fedmount.1``; a unit test keeps the two
in step.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import textwrap
from collections.abc import Sequence

from fedmount import __version__
from fedmount.api.controller import DEFAULT_MAX_ANSWER
from fedmount.arvados.tokens import redact
from fedmount.blocks.prefetch import DEFAULT_PREFETCH_BLOCKS
from fedmount.blocks.throughput import DEFAULT_BYTES_PER_SECOND
from fedmount.blocks.transport import Timeouts
from fedmount.daemon_log import add_detached_log, open_private
from fedmount.fs.calls import DEFAULT_API_WAIT
from fedmount.fs.stats_export import CONNECTION_SECONDS, MAX_CONNECTIONS
from fedmount.write_flags import add_write_options, check_write_options

# name -> "module:function"; the function takes the remaining argv and returns an exit status.
SUBCOMMANDS: dict[str, str] = {
    "locate": "fedmount.locality.commands:locate_main",
    "stage": "fedmount.locality.commands:stage_main",
    "unpin": "fedmount.locality.commands:unpin_main",
}

DESCRIPTION = """\
Mount Arvados collections of every cluster of a federation, read-only, at MOUNTPOINT.
The mount root holds README and by_id/: look up any collection UUID or portable data
hash under by_id/ and its files appear. Settings come from ARVADOS_API_HOST,
ARVADOS_API_TOKEN, ARVADOS_API_HOST_INSECURE and ~/.config/arvados/settings.conf."""

# name -> (synopsis after "fedmount NAME", description)
SUBCOMMAND_HELP: dict[str, tuple[str, str]] = {
    "locate": (
        "ID... [--json] [--cluster X] [--route home|direct] [--concurrency N] [--disk-cache-dir DIR]",
        "For each collection (UUID or portable data hash of any cluster): how many of its blocks and "
        "bytes each cluster's Keep holds (HEAD requests with the token that cluster accepts), how much "
        "this host's cache has, which cluster would serve each block, and the time to pull the rest "
        "from each cluster at the throughput fedmount observed (fedmount stage and every mount record "
        f"it in the cache directory; {DEFAULT_BYTES_PER_SECOND >> 20} MiB/s until one has been measured; "
        "estimates say \"observed\" "
        "or \"default\"). --json prints the fedmount-locate/1 document. --cluster X asks only X. "
        "--route answers for a mount with that --route. --concurrency N: HEAD requests at once "
        "(default 16). Exit: 0 complete answer (with --cluster: X holds every block); 1 X lacks a "
        "block; 2 something could not be answered (bad or unknown ID, unreachable cluster or keepstore).",
    ),
    "stage": (
        "ID... [--pin] [--json] [--quiet] [--disk-cache-size BYTES] [--route home|direct] "
        "[--concurrency N] [--disk-cache-dir DIR]",
        "Pull collections into this host's block cache before a run, in parallel (--concurrency N "
        "blocks at once, default 4), with progress on stderr (bytes, rate, ETA; --quiet: none). "
        "Every block is md5-verified before it is cached. Blocks already cached are skipped, so an "
        "interrupted stage (Ctrl-C, exit 130) resumes when run again. A later mount with the same "
        "--disk-cache-dir reads the blocks without contacting Keep. --pin keeps them from eviction "
        "until `fedmount unpin`. --disk-cache-size bounds the cache while staging (default: the bound "
        "a mount of that directory uses). --json prints the fedmount-stage/1 document on stdout. "
        "Exit 0 when every block is cached, 2 otherwise.",
    ),
    "unpin": (
        "ID... [--disk-cache-dir DIR]",
        "Release the pins of `fedmount stage --pin`; blocks another pinned collection needs stay "
        "pinned. The blocks stay cached until evicted normally. Exit 0 when every ID was released, "
        "2 otherwise.",
    ),
}


def _subcommands_text() -> str:
    lines = ["subcommands (each has its own --help):"]
    for name, (synopsis, description) in SUBCOMMAND_HELP.items():
        wrap = {"break_on_hyphens": False, "break_long_words": False}
        lines += textwrap.wrap(f"fedmount {name} {synopsis}", 90, initial_indent="  ",
                               subsequent_indent="        ", **wrap)
        lines += textwrap.wrap(description, 90, initial_indent="      ", subsequent_indent="      ", **wrap)
    return "\n".join(lines)


EPILOG = f"""\
{_subcommands_text()}

Statistics: MOUNTPOINT/.fedmount/stats.json (hidden). Extended attributes: getfattr -d FILE.
See fedmount(1)."""

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64M``, ``64MiB``, ``1.5G`` (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1048576, 512M, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** "_kmgtp".index(unit)) if unit else int(number)


def seconds(text: str) -> float:
    """argparse type of a SECONDS option (fedmount's and fedmount-run's): a number, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _dir_name(text: str) -> str:
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} must be a single directory name such as by_id")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmount", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="Directory to mount on (or to unmount, with --unmount).")
    p.add_argument("--version", action="version", version=f"fedmount {__version__}")

    g = p.add_argument_group("layout (default: README and by_id/ at the root)")
    g.add_argument("--collection", metavar="ID",
                   help="Mount the one collection with this UUID or portable data hash at the root.")
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
                   help="Accepted for arv-mount compatibility; fedmount is always read-only.")

    g = p.add_argument_group("federation")
    g.add_argument("--route", choices=("home", "direct"), default="home",
                   help="home: read remote blocks through the home cluster's keepstore (as arv-mount "
                   "does); direct: read them from the owning cluster's Keep with a salted token.")
    g.add_argument("--refresh-time", metavar="SECONDS", type=seconds, default=15.0,
                   help="How often collections addressed by UUID are re-checked, and how long a "
                   "collection id that does not exist is remembered as missing (default 15).")
    g.add_argument("--api-wait", metavar="SECONDS", type=seconds, default=DEFAULT_API_WAIT,
                   help="How long a lookup, stat, listing or open waits for an API answer: loading a "
                   "collection not yet mounted, or re-checking a UUID collection. Past it, a lookup fails "
                   "with ETIMEDOUT and a re-checked collection is served as it was; the request goes on in "
                   "the background, for the next one. While a request to a cluster is pending past this "
                   f"wait, that cluster's collections do not wait at all (default {DEFAULT_API_WAIT:g}).")
    g.add_argument("--max-manifest-size", metavar="BYTES", type=parse_size, default=DEFAULT_MAX_ANSWER,
                   help="Refuse a collection whose API record (its manifest and the rest) is bigger "
                   "than this, with one line in the log and EIO: loading one costs the daemon a few "
                   f"times its size in memory (default {DEFAULT_MAX_ANSWER >> 20}M).")

    g = p.add_argument_group("cache and read-ahead")
    cache_kind = g.add_mutually_exclusive_group()
    cache_kind.add_argument("--disk-cache", dest="cache_kind", action="store_const", const="disk",
                            default="disk", help="Keep blocks in a host-wide disk cache, over a RAM cache "
                            "(default).")
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
    g.add_argument("--prefetch-blocks", metavar="N", type=int, default=DEFAULT_PREFETCH_BLOCKS,
                   help="How many blocks to read ahead of a sequential reader "
                   f"(default {DEFAULT_PREFETCH_BLOCKS}).")
    g.add_argument("--keep-stall-timeout", metavar="SECONDS", type=seconds, default=15.0,
                   help="Abandon a keep service that sends no byte for this long and read the "
                   "block from the next replica (default 15).")
    g.add_argument("--keep-min-rate", metavar="BYTES", type=parse_size, default=int(Timeouts.min_rate),
                   help="Abandon a keep service that sends a block slower than BYTES per second on "
                   "average over --keep-rate-window, and read the block from the next replica "
                   f"(default {int(Timeouts.min_rate) >> 10}K, as the Arvados SDK; 0: never).")
    g.add_argument("--keep-rate-window", metavar="SECONDS", type=seconds, default=Timeouts.rate_window,
                   help="The span in seconds over which --keep-min-rate is averaged; a transfer is "
                   f"first judged once it has run this long (default {Timeouts.rate_window:g}, as the "
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
                   f"({MAX_CONNECTIONS} connections at a time at most, each closed "
                   f"{CONNECTION_SECONDS:g} seconds after it was accepted).")
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


class RedactingFilter(logging.Filter):
    """Masks anything token-shaped, and locator signatures, in a record, its arguments and its
    traceback (`redact`), at every level: urllib3's debug lines carry signed locators."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _logfile_handler(path: str) -> logging.Handler:
    """Appends to `path`, creating it readable by its owner only (an existing file keeps its mode)."""
    return logging.StreamHandler(open_private(path))


def setup_logging(debug: bool, logfile: str | None) -> None:
    """Log to `logfile` (OSError if it cannot be written) or stderr, redacted."""
    handler: logging.Handler = _logfile_handler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedmount[%(process)d] %(levelname)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "pyfuse3", "trio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collection and (args.mount_by_id or args.mount_by_pdh):
        parser.error("--collection cannot be combined with --mount-by-id/--mount-by-pdh")
    names = args.mount_by_id + args.mount_by_pdh + args.mount_tmp
    if len(set(names)) != len(names):
        parser.error("each --mount-by-id/--mount-by-pdh/--mount-tmp directory name may be given once")
    check_write_options(parser, args)
    if args.exec_args is not None and not args.exec_args:
        parser.error("--exec needs a command")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module, function = SUBCOMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = parse_args(argv)
    from fedmount import mount  # after parsing: --help stays fast and needs no FUSE

    try:
        setup_logging(args.debug, args.logfile)
    except OSError as e:
        print(f"fedmount: cannot write the log to {args.logfile}: {e.strerror}", file=sys.stderr)
        return 1
    if args.unmount:
        return mount.unmount_command(os.path.abspath(args.mountpoint), args.unmount_timeout)
    opts = mount.MountOptions.from_args(args)
    if opts.detached and not args.logfile and opts.log_path and not add_detached_log(opts.log_path):
        opts.log_path = None
    return mount.run(opts)
