"""What another local user (or a lying cluster) can do to a running daemon, on real mounts.

- The ``--stats-port`` listener is open to every local user: a flood of idle connections
  must not eat the daemon's file descriptors (reads through the mount would then fail with
  EIO), and the port must answer again once the flood is gone.
- The daemon raises its soft open-file limit to the hard limit at start-up, as arv-mount does.
- A cluster that lies about itself (the emulator's ``uuid_prefix`` and ``keep_service_uuid``
  faults: a discovery ``uuidPrefix`` or keep service uuid that is not an id, built to close
  a Prometheus label and add a metric line) is refused with one log line, and the
  ``/metrics`` text stays well-formed.
- The ``--logfile`` is created readable by its owner only and, even at ``--debug``, never
  carries a locator's signature (a signature lets whoever reads it fetch the block).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import time
import urllib.request
from collections.abc import Iterator

from integration.mounting import fedmount_cmd, requires_fuse, run, timed_read
from integration.test_reliability import MiB, fresh

pytestmark = requires_fuse

FD_LIMIT = 256  # the daemon's open-file limit during the flood
FLOOD = 2 * FD_LIMIT  # idle connections to the stats port
MAX_CONNECTIONS = 16  # what the daemon promises (fedmount.stats_export)
INJECTION = '"} 1\nfedmount_injected 1\n# '  # closes a label value, adds a metric line
_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'  # a label value of the Prometheus text format, escapes and all
_TYPE_RE = re.compile(r"# TYPE fedmount_[a-z0-9_]+ (counter|gauge)")
_SAMPLE_RE = re.compile(rf"fedmount_[a-z0-9_]+(\{{[a-z_]+={_VALUE}(,[a-z_]+={_VALUE})*\}})? [0-9.e+-]+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_file_limit(pid: int) -> tuple[int, int]:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to `port` that never send a byte, closed at the end."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:  # the accept queue is full: the kernel dropped the SYN
                s.close()
                continue
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


def test_stats_port_flood_cannot_starve_the_mount_of_file_descriptors(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"during.bin": 4 * MiB})
    port = free_port()
    m = mount("--stats-port", str(port))
    pid = m.proc.pid
    assert "fedmount_fuse_ops" in scrape(port)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    baseline = open_fds(pid)
    with idle_connections(port, FLOOD) as flood:
        assert len(flood) > FD_LIMIT
        time.sleep(0.5)  # let the daemon accept whatever it will
        held = open_fds(pid)
        got = timed_read(m / f"by_id/{coll['uuid']}/during.bin", 60)
        assert got.ok, f"a read failed while {len(flood)} idle connections were open: {got.error}"
        assert got.md5 == coll["files"]["during.bin"]["md5"]
        assert held - baseline <= MAX_CONNECTIONS + 4, f"{held - baseline} descriptors for the flood"
    started = time.monotonic()
    text = scrape(port)  # once the flood is gone
    served_again = time.monotonic() - started
    assert "fedmount_keep_bytes" in text
    # Quiet: well under a second (the closed connections are drained 16 at a time); loaded 2-core: a few.
    assert served_again < 15
    assert m.proc.poll() is None
    record(f"stats-port flood ({len(flood)} idle connections, {FD_LIMIT} descriptors)",
           outcome=f"at most {MAX_CONNECTIONS} accepted at once, each closed after 5 s; reads through the "
           "mount unaffected", wrong_bytes=0, flood_descriptors=held - baseline,
           read_seconds=round(got.seconds, 2), served_again_seconds=round(served_again, 2))  # fmt: skip


def test_daemon_raises_its_soft_open_file_limit_to_the_hard_limit(fed, mount):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, hard, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # what the daemon inherits
    try:
        m = mount()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    expected = hard if hard != resource.RLIM_INFINITY else int(open("/proc/sys/fs/nr_open").read())
    assert low < expected and open_file_limit(m.proc.pid) == (expected, hard)


def assert_well_formed(metrics: str) -> None:
    """Every line a TYPE comment or a sample of a fedmount metric; no injected metric."""
    for line in metrics.splitlines():
        assert _TYPE_RE.fullmatch(line) or _SAMPLE_RE.fullmatch(line), line
        assert not line.startswith("fedmount_injected"), line


def test_remote_that_lies_about_its_cluster_id_is_refused_and_cannot_inject_metrics(fed, mount):
    coll = fresh(fed, "zbbbb", {"x.bin": MiB})
    port = free_port()
    m = mount("--route", "direct", "--stats-port", str(port))
    fed.set_fault("zbbbb", "controller", uuid_prefix="zbbbb" + INJECTION)
    done = run("cat", str(m / f"by_id/{coll['uuid']}/x.bin"), check=False, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert_well_formed(scrape(port))
    log = m.log.read_text()
    (line,) = [ln for ln in log.splitlines() if "invalid cluster id" in ln]  # one line, naming the cluster
    assert "(cluster zbbbb)" in line
    assert "Traceback" not in log and "\nfedmount_injected" not in log


def test_keep_service_uuid_lie_is_refused_and_cannot_inject_metrics(fed, mount):
    coll = fresh(fed, "zzzzz", {"x.bin": MiB})
    port = free_port()
    m = mount("--stats-port", str(port))
    fed.set_fault("zzzzz", "controller", keep_service_uuid="zzzzz-bi6l4-000000000000000" + INJECTION)
    for keepstore in ("keep0", "keep1"):  # bad bytes: the service's uuid becomes a label
        fed.set_fault("zzzzz", keepstore, corrupt=True)
    done = run("cat", str(m / f"by_id/{coll['uuid']}/x.bin"), check=False, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert_well_formed(scrape(port))
    log = m.log.read_text()
    (line,) = [ln for ln in log.splitlines() if "invalid UUID" in ln]  # one line, naming the collection
    assert "keep_services/accessible lists a service with an invalid UUID" in line and coll["uuid"] in line
    assert "Traceback" not in log and "\nfedmount_injected" not in log


def test_home_that_lies_about_its_cluster_id_is_refused_at_mount_time_in_one_line(fed, tmp_path):
    fed.set_fault(fed.home, "controller", uuid_prefix="zzzzz" + INJECTION)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = run(*fedmount_cmd("--disk-cache-dir", str(tmp_path / "cache"), str(mnt)), check=False,
                   env=fed.env(), timeout=60)  # fmt: skip
    finally:
        run(*fedmount_cmd("--unmount", str(mnt)), check=False, timeout=30)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "cannot use the home cluster" in line and "invalid cluster id" in line


SIGNATURE_RE = re.compile(r"(\+|%2B)(A|R[a-z0-9]{5}-)[0-9a-f]{40}")


def test_debug_logfile_is_private_and_never_carries_a_locator_signature(fed, mount, tmp_path):
    local = fresh(fed, "zzzzz", {"local.bin": MiB})
    remote = fresh(fed, "zbbbb", {"remote.bin": MiB})  # +R locators through the home keepstore
    logfile = tmp_path / "debug.log"
    m = mount("--debug", "--logfile", str(logfile), "--route", "home")  # +R locators in GETs
    for coll, name in ((local, "local.bin"), (remote, "remote.bin")):
        assert timed_read(m / f"by_id/{coll['uuid']}/{name}").md5 == coll["files"][name]["md5"]
    m.stop()
    log = logfile.read_text()
    assert os.stat(logfile).st_mode & 0o777 == 0o600
    assert "+A<signature>@" in log and "+Rzbbbb-<signature>@" in log  # the debug lines are there
    assert SIGNATURE_RE.findall(log) == []
