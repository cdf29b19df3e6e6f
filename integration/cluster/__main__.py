"""``python -m integration.cluster up --state DIR [...]``: run the emulated federation.

Runs in the foreground until SIGINT or SIGTERM. Bad input (a cluster id that is not 5
lowercase letters/digits, a port in use, a state directory that cannot be written) stops
it with one line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from pathlib import Path

from .httpbase import PortInUse
from .model import DEFAULT_TTL


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m integration.cluster", description="Emulated Arvados federation on loopback."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the federation in the foreground until SIGINT/SIGTERM")
    up.add_argument(
        "--state", required=True, type=Path, help="state directory (federation.json, ca.pem, ...)"
    )
    up.add_argument("--clusters", default="zzzzz,zbbbb,zcccc", help="comma-separated ids; the first is home")
    up.add_argument("--seed", choices=("demo", "none"), default="demo")
    up.add_argument("--blob-ttl", type=int, default=DEFAULT_TTL, help="blob signature TTL in seconds")
    up.add_argument(
        "--base-port",
        type=int,
        default=0,
        help="listen on consecutive ports from this one (control, then each cluster's "
        "controller, keep0, keep1); default: any free ports",
    )
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"integration.cluster: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: argparse.Namespace) -> list[str]:
    ids = [c.strip() for c in args.clusters.split(",") if c.strip()]
    if not ids:
        fail("--clusters is empty; give at least one cluster id, e.g. --clusters zzzzz,zbbbb")
    for cid in ids:
        if not re.fullmatch(r"[a-z0-9]{5}", cid):
            fail(f"cluster id {cid!r} is not 5 lowercase letters or digits")
    if len(set(ids)) != len(ids):
        fail(f"cluster ids repeat in --clusters {args.clusters}")
    if args.blob_ttl <= 0:
        fail("--blob-ttl must be a positive number of seconds")
    try:
        args.state.mkdir(parents=True, exist_ok=True)
        probe = args.state / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
        (args.state / "federation.json").unlink(missing_ok=True)
    except OSError as exc:
        fail(f"cannot write the state directory {args.state}: {exc.strerror}; choose another --state")
    return ids


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ids = check_args(args)
    from .emulator import Emulator  # after the checks: importing trustme and friends takes a moment

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        emulator = Emulator(args.state.resolve(), ids, args.blob_ttl, args.base_port)
    except PortInUse as exc:
        fail(f"{exc}; free the port or choose another --base-port")
    except OSError as exc:
        fail(f"cannot start: {exc}")
    started = time.time()
    emulator.seed(args.seed)
    emulator.start()
    print(
        f"integration.cluster: {len(ids)} clusters up in {time.time() - started:.1f}s; "
        f"state in {args.state / 'federation.json'}",
        file=sys.stderr,
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    emulator.stop()


if __name__ == "__main__":
    main()
