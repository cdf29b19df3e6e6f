"""fedmount's write flags: ``--mount-tmp`` scratch directories, and what arv-mount passes with them.

`add_write_options` adds them to fedmount's parser: ``--read-write`` (accepted:
collections stay read-only whatever it says), ``--mount-tmp NAME`` (a writable scratch
directory, `fedmount.fs.scratch`), where its bytes live and how many it may hold, and
``--storage-classes`` for what those directories save. This module imports nothing
heavy, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_write_options(parser: argparse.ArgumentParser, *, dir_name: Callable[[str], str],
                      size: Callable[[str], int]) -> None:
    g = parser.add_argument_group("writing (only into --mount-tmp directories)")
    g.add_argument("--mount-tmp", metavar="NAME", action="append", default=[], type=dir_name,
                   help="Make NAME at the root a writable scratch directory, the only place the mount "
                   "takes writes: files and directories, their bytes on local disk. Reading its hidden "
                   ".arvados#collection saves what it holds to the home cluster's Keep and answers the "
                   "record of that collection (its signed manifest), as crunch-run expects of arv-mount. "
                   "Its content vanishes at unmount. Repeatable.")
    g.add_argument("--mount-tmp-dir", metavar="DIR",
                   help="Where the bytes of --mount-tmp files live, in files with no name (default: "
                   "$TMPDIR or /tmp).")
    g.add_argument("--mount-tmp-size", metavar="BYTES", type=size, default=0,
                   help="How many bytes the --mount-tmp directories may hold together; past it, writes "
                   "fail with ENOSPC (default: 95%% of the free space of --mount-tmp-dir at start).")
    g.add_argument("--storage-classes", metavar="LIST",
                   help="Comma-separated storage classes of the blocks --mount-tmp directories save "
                   "(default: the cluster's default classes).")
    g.add_argument("--read-write", action="store_true",
                   help="Accepted for arv-mount compatibility: collections stay read-only (EROFS) "
                   "whatever it says; only --mount-tmp directories take writes.")


def check_write_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (exit 2) for write flags that cannot go together with the rest: a
    scratch directory is an entry of a root of directories, which --collection and the
    single-directory modes (--project, --home, ...) do not make."""
    if args.mount_tmp and (args.collection or args.mode):
        parser.error("--mount-tmp cannot be combined with --collection or a mode such as --project")
