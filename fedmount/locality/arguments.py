"""The command lines of ``fedmount locate``, ``fedmount stage`` and ``fedmount unpin``: their
help (which ``fedmount --help`` lists) and their parsers.

Light on purpose (argparse and the standalone helpers only): ``fedmount --help`` reads
`SUBCOMMANDS` without loading trio or the cache; `commands` runs what was parsed.
"""

from __future__ import annotations

import argparse

from fedmount.cliutil import Subcommand, parse_size
from fedmount.defaults import BYTES_PER_SECOND

DEFAULT_LOCATE_CONCURRENCY = 16
DEFAULT_STAGE_CONCURRENCY = 4

LOCATE = Subcommand(
    "locate",
    "ID...|--for RECORD [--json] [--cluster X] [--route auto|home|direct] [--concurrency N] "
    "[--disk-cache-dir DIR]",
    "For each collection (UUID or portable data hash of any cluster): how many of its blocks and "
    "bytes each cluster's Keep holds (HEAD requests with the token that cluster accepts), how much "
    "this host's cache has, which cluster would serve each block, and the time to pull the rest "
    "from each cluster at the throughput fedmount observed (fedmount stage and every mount record "
    f"it in the cache directory; {BYTES_PER_SECOND >> 20} MiB/s until one has been measured; "
    "estimates say \"observed\" "
    "or \"default\"). --json prints the fedmount-locate/1 document. --cluster X asks only X. "
    "--route (default auto, the mount's default) answers for a mount with that --route: with auto, "
    "per remote cluster whose blocks a collection names, whether the mount reads them directly from "
    "that cluster's Keep or through the home cluster's keepstore, and why (decided as the mount "
    "decides, confirmed with a HEAD of one block along that way); the estimates follow that way. "
    "--concurrency N: HEAD requests at once "
    f"(default {DEFAULT_LOCATE_CONCURRENCY}). Exit: 0 complete answer (with --cluster: X holds every "
    "block); 1 X lacks a block; 2 something could not be answered (bad or unknown ID, unreachable "
    "cluster or keepstore). --for RECORD (a container record, as fedmount-run takes it) asks where "
    "the step could run instead: for every cluster, whether an instance type of its exported "
    "configuration fits the runtime_constraints and its API reaches the inputs, and the bytes that "
    "would cross clusters if it ran there; the clusters ranked, and the arv:ClusterTarget CWL hint "
    "that pins the step to the first (--json: the fedmount-placement/1 document; exit 0 some "
    "cluster can run it, 1 none can, 2 bad record or input).",
)
STAGE = Subcommand(
    "stage",
    "ID... [--pin] [--json] [--quiet] [--disk-cache-size BYTES] [--route auto|home|direct] "
    "[--concurrency N] [--disk-cache-dir DIR] [--to-cluster X [--save-as NAME]]",
    "Pull collections into this host's block cache before a run, in parallel (--concurrency N "
    f"blocks at once, default {DEFAULT_STAGE_CONCURRENCY}), with progress on stderr (bytes, rate, "
    "ETA; --quiet: none). "
    "Every block is md5-verified before it is cached. Blocks already cached are skipped, so an "
    "interrupted stage (Ctrl-C, exit 130) resumes when run again. A later mount with the same "
    "--disk-cache-dir reads the blocks without contacting Keep. --pin keeps them from eviction "
    "until `fedmount unpin`. --disk-cache-size bounds the cache while staging (default: the bound "
    "a mount of that directory uses). --route (default auto) reads the blocks the way a mount with "
    "that --route reads them: with auto, a remote cluster's blocks from its own Keep while it answers, "
    "else through the home keepstore. --json prints the fedmount-stage/1 document on stdout. "
    "Exit 0 when every block is cached, 2 otherwise. --to-cluster X stages into cluster X's Keep "
    "instead of this host's cache, for every host of X to read: X's keepstore copies each block it "
    "lacks from the cluster that holds it (asked with X-Keep-Signature: local, as the Arvados SDK "
    "refreshes a signature), so no byte passes through this host; blocks already there are not "
    "copied again. X must be the home cluster (another cluster's keepstore could only present a "
    "token salted for itself). The route does not matter there (auto and home are the same: this "
    "host reads no block), except that --route direct is refused: X's keepstore copies from the "
    "+R locators the home cluster gives, and direct mode asks the owning cluster instead. "
    "--save-as NAME (one ID) then makes collection NAME on X with X's own "
    "locators, the same PDH, which every host of X reads from X's Keep alone. --json: the "
    "fedmount-stage/1 document with \"cluster\": X (and \"saved\").",
)
UNPIN = Subcommand(
    "unpin",
    "ID... [--disk-cache-dir DIR]",
    "Release the pins of `fedmount stage --pin`; blocks another pinned collection needs stay "
    "pinned. The blocks stay cached until evicted normally. Exit 0 when every ID was released, "
    "2 otherwise.",
)
SUBCOMMANDS = (LOCATE, STAGE, UNPIN)


def _parser(command: Subcommand) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fedmount {command.name}", description=command.description)
    p.add_argument("ids", nargs="+", metavar="ID", help="Collection UUID or portable data hash.")
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-cache-dir", metavar="DIR",
                   help="The block cache directory, as given to the mount (default: the mount's default).")
    p.add_argument("--debug", action="store_true", help="Log debugging detail.")


def _add_route(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route", choices=("auto", "home", "direct"), default="auto",
                   help="Read the way a mount with this --route reads (default auto, the mount's default).")
    p.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help=f"Requests in flight at once (default: {DEFAULT_LOCATE_CONCURRENCY} for locate, "
                   f"{DEFAULT_STAGE_CONCURRENCY} for stage).")


class _LocateParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        parsed = super().parse_args(args, namespace)
        if bool(parsed.ids) == bool(parsed.record):
            self.error("give collection IDs or --for RECORD (one of the two)")
        if parsed.record and parsed.cluster:
            self.error("--for answers for every cluster; it cannot be combined with --cluster")
        return parsed


def build_locate_parser() -> argparse.ArgumentParser:
    p = _LocateParser(prog="fedmount locate", description=LOCATE.description)
    p.add_argument("ids", nargs="*", metavar="ID", help="Collection UUID or portable data hash.")
    p.add_argument("--json", action="store_true", help="Print the fedmount-locate/1 JSON document.")
    p.add_argument("--cluster", metavar="X",
                   help="Only ask cluster X; the exit status answers whether X holds every block.")
    p.add_argument("--for", dest="record", metavar="RECORD",
                   help="A container record (JSON file, or - for standard input): where could it run?")
    _add_route(p)
    _add_common(p)
    return p


class _StageParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        parsed = super().parse_args(args, namespace)
        if parsed.save_as is not None and (parsed.to_cluster is None or len(parsed.ids) != 1):
            self.error("--save-as needs --to-cluster and exactly one ID")
        if parsed.to_cluster is not None and parsed.route == "direct":
            self.error("--route direct cannot apply to --to-cluster: the cluster's keepstore copies a "
                       "block from the +R locator the home cluster gives (route auto or home), and "
                       "direct mode asks the owning cluster instead")
        return parsed


def build_stage_parser() -> argparse.ArgumentParser:
    p = _StageParser(prog="fedmount stage", description=STAGE.description)
    p.add_argument("ids", nargs="+", metavar="ID", help="Collection UUID or portable data hash.")
    p.add_argument("--pin", action="store_true", help="Keep the blocks from eviction until `fedmount unpin`.")
    p.add_argument("--json", action="store_true", help="Print the fedmount-stage/1 JSON document on stdout.")
    p.add_argument("--quiet", action="store_true", help="No progress display.")
    p.add_argument("--disk-cache-size", metavar="BYTES", type=parse_size, default=0,
                   help="Evict least recently used unpinned blocks beyond this size while staging "
                   "(default: the bound a mount of this cache directory uses).")
    p.add_argument("--to-cluster", metavar="X",
                   help="Stage into cluster X's Keep (the home cluster) instead of this host's cache.")
    p.add_argument("--save-as", metavar="NAME",
                   help="With --to-cluster and one ID: save the collection on X with X's own locators.")
    _add_route(p)
    _add_common(p)
    return p


def build_unpin_parser() -> argparse.ArgumentParser:
    p = _parser(UNPIN)
    _add_common(p)
    return p
