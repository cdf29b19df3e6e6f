"""fedmount under arv-mount's name and command line, for crunch-run.

crunch-run starts ``arv-mount`` from its PATH with a fixed command line (no setting
names another program) and logs ``arv-mount --version`` first::

    arv-mount --foreground --read-write --storage-classes CLASSES --crunchstat-interval=10
      [--allow-other] [--disk-cache --disk-cache-dir DIR --file-cache N | --ram-cache --file-cache N]
      [--mount-tmp tmp0 ...] (--mount-by-pdh by_id --disable-event-listening | --mount-by-id by_id)
      --mount-by-id by_uuid MOUNTPOINT
    arv-mount --unmount-timeout=8 --unmount MOUNTPOINT

fedmount's own command line takes every one of those flags with arv-mount's meaning, so
`main`, the ``fedmount-arv-mount`` command, is fedmount with arv-mount's ``--version``
line (``<argv0> <version>``, here naming fedmount). It is installed under that name,
never as ``arv-mount``, so that it cannot shadow a real arv-mount by accident; a site
that wants it under crunch-run links it into crunch-run's PATH as ``arv-mount`` (``make
arv-mount-link``, see the README).

The write flags crunch-run passes are fedmount's own (`fedmount.write_flags`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fedmount import __version__

VERSION_LINE = "{argv0} {version} (fedmount, standing in for arv-mount)"


def version_line(argv0: str) -> str:
    return VERSION_LINE.format(argv0=argv0, version=__version__)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedmount-arv-mount`` (linked as ``arv-mount``): fedmount with arv-mount's version line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    before_exec = argv[: argv.index("--exec")] if "--exec" in argv else argv
    if "--version" in before_exec:
        print(version_line(os.path.basename(sys.argv[0]) or "arv-mount"))
        return 0
    from fedmount import cli

    return cli.main(argv)
