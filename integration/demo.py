"""``make demo``: an emulated three-cluster federation, mounted at ./mnt, and a short tour.

Starts the emulated federation (`integration.harness.Federation`, seed "demo"), mounts
fedmount on it at ./mnt in the foreground (its log goes to the terminal), prints what to
``ls`` and ``cat`` with the real collection IDs from federation.json, and waits. Ctrl-C
unmounts and stops the federation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from integration.harness import Federation

REPO = Path(__file__).resolve().parent.parent


def tour(fed: Federation, mnt: str) -> str:
    c = fed.collections
    text, nested, big, many, shared = c["text"], c["nested"], c["big"], c["many"], c["shared"]
    by_id = f"{mnt}/by_id"
    clusters = ", ".join(f"{cid}{' (home)' if cid == fed.home else ''}" for cid in fed.clusters)
    rows = [
        ("ls " + by_id, "only README: collections appear when you look them up"),
        (f"cat {by_id}/{text['uuid']}/hello.txt", f"a collection of the home cluster {text['cluster']}"),
        (f"ls -lR {by_id}/{nested['uuid']}", f"cluster {nested['cluster']}: odd names, an empty file"),
        (
            f"time md5sum {by_id}/{big['portable_data_hash']}/big.bin",
            f"300 MiB on {big['cluster']}, by PDH; run it twice",
        ),
        (f"find {by_id}/{many['portable_data_hash']} -type f | wc -l", "10,000 small files"),
        (f"getfattr -d {by_id}/{shared['uuid']}/blob.bin", "uuid, PDH, cluster, locators, cached bytes"),
        (f"cat '{by_id}/{text['uuid']}/.arvados#collection'", "the API record (hidden)"),
        (f"cat {mnt}/.fedmount/stats.json", "bytes per cluster, cache hits, FUSE ops"),
        (f"touch {by_id}/{text['uuid']}/new", "read-only: EROFS"),
    ]
    width = max(len(cmd) for cmd, _ in rows)
    lines = [
        "",
        f"fedmount is serving a federation of {clusters} at {mnt}.",
        "",
        "Try:",
        *(f"  {cmd.ljust(width)}  # {why}" for cmd, why in rows),
        "",
        "Collections (name: cluster, uuid, portable data hash):",
        *(f"  {name}: {v['cluster']} {v['uuid']} {v['portable_data_hash']}" for name, v in c.items()),
        "",
        f"Expected sizes and md5s: {fed.state_dir / 'federation.json'}",
        f"Every request the clusters received: {fed.state['requests_log']}",
        "Ctrl-C unmounts, stops the federation and removes its state.",
        "",
    ]
    return "\n".join(lines)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--mountpoint", default="mnt", help="where to mount (default ./mnt)")
    parser.add_argument("--route", choices=("home", "direct"), default="home", help="fedmount --route")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` or a timeout cleans up like Ctrl-C
    mnt = os.path.abspath(args.mountpoint)
    os.makedirs(mnt, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="fedmount-demo-"))
    print(f"starting the emulated federation (state in {state}) ...", flush=True)
    fed = Federation.start(state, seed="demo")
    fedmount = None
    try:
        cmd = [
            sys.executable,
            "-m",
            "fedmount",
            "--foreground",
            "--replace",
            "--route",
            args.route,
            "--disk-cache-dir",
            str(state / "cache"),
            mnt,
        ]
        fedmount = subprocess.Popen(cmd, env=fed.env(), cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(mnt, "by_id", "README")):
            if fedmount.poll() is not None:
                print(f"fedmount exited with status {fedmount.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("fedmount did not become ready within 30 s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(tour(fed, os.path.relpath(mnt) if mnt.startswith(os.getcwd()) else mnt), flush=True)
        try:
            fedmount.wait()
        except KeyboardInterrupt:
            print("\nunmounting ...", flush=True)
        return 0
    finally:
        if fedmount is not None:
            if is_mounted(mnt):
                subprocess.run([sys.executable, "-m", "fedmount", "--unmount", mnt], cwd=REPO)
            try:
                fedmount.wait(10)
            except subprocess.TimeoutExpired:
                fedmount.kill()
        fed.stop()
        shutil.rmtree(state, ignore_errors=True)
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
