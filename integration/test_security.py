"""Security properties of a real fedmount mount, each a test.

- The home token goes only to the home cluster: every request any other cluster received
  during a full read of remote collections (request log, every route) carried some other
  token (the salted one).
- No token (the home token or any token salted from it) appears in the ``--debug`` log,
  the stats file, the Prometheus text, the command lines of fedmount and its children, or
  what ``fedmount-run`` leaves behind (result.json and the other output files).
- The mount is read-only on every path (EROFS), mounted ``ro``, without ``allow_other``
  unless asked, and another user cannot read it unless ``--allow-other`` was given.
- A collection whose manifest does not hash to the PDH asked for is never served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from fedmount.arvados.tokens import parse_token, salt_for
from integration.harness import Federation
from integration.mounting import REPO, Mount, md5sums, requires_fuse, run

pytestmark = requires_fuse


def secrets_of(fed: Federation) -> set[str]:
    """Every secret that must stay out of sight: the home token's and those salted from it."""
    home = parse_token(fed.token())
    return {home.secret} | {salt_for(home, cluster).secret for cluster in fed.clusters if cluster != fed.home}


def leaked(text: str, fed: Federation) -> list[str]:
    return [s[:6] + "..." for s in secrets_of(fed) if s in text]


def read_all(m: Mount, coll: dict, cid: str) -> None:
    expected = {p: meta["md5"] for p, meta in coll["files"].items()}
    assert md5sums(m / f"by_id/{cid}", sorted(expected)) == expected


@pytest.mark.parametrize("route", ["home", "direct", "auto"])
def test_remote_clusters_never_receive_the_home_token(fed, mount, route):
    m = mount("--route", route)
    mark = fed.mark()
    read_all(m, fed.collections["nested"], fed.collections["nested"]["uuid"])  # zcccc
    read_all(m, fed.collections["shared"], fed.collections["shared"]["portable_data_hash"])  # PDH fan-out
    big = fed.collections["big"]  # zbbbb, five 64 MiB blocks
    read_all(m, big, big["uuid"])
    seen = fed.requests(since=mark)
    remote = [r for r in seen if r["cluster"] != fed.home]
    assert {r["cluster"] for r in remote} == {"zbbbb", "zcccc"}  # they were asked, for records or blocks
    assert any(r["service"].startswith("keep") for r in remote)
    home = fed.token()
    secret = parse_token(home).secret
    assert [r for r in remote if r["token"] == home or secret in json.dumps(r)] == []
    salted = {c: salt_for(parse_token(home), c).text for c in ("zbbbb", "zcccc")}
    assert all(r["token"] in (salted[r["cluster"]], None, "", "xxx") for r in remote), {
        (r["cluster"], r["service"], r["token"][:20] if r["token"] else r["token"]) for r in remote
    }


def test_tokens_never_appear_in_logs_stats_metrics_or_command_lines(fed, mount, tmp_path):
    logfile = tmp_path / "debug.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = mount("--debug", "--logfile", str(logfile), "--route", "direct", "--stats-port", str(port))
    nested = fed.collections["nested"]
    read_all(m, nested, nested["uuid"])
    read_all(m, fed.collections["shared"], fed.collections["shared"]["portable_data_hash"])
    run("ls", str(m / "by_id/zbbbb-4zz18-000000000000000"), check=False)  # a miss
    fed.set_fault("zcccc", "controller", status=401, count=3)  # an error that names a token problem
    run("ls", str(m / "by_id/zcccc-4zz18-000000000000001"), check=False)
    fed.set_fault("zbbbb", "*", down=True)  # block errors
    coll = fed.add_collection("zbbbb", f"sec-{os.getpid()}", {"x.bin": (1 << 20, "sec")})
    run("cat", str(m / f"by_id/{coll['uuid']}/x.bin"), check=False, timeout=60)
    fed.clear_faults()
    stats_text = (m / ".fedmount/stats.json").read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    procs = [psutil.Process(m.proc.pid), *psutil.Process(m.proc.pid).children(recursive=True)]
    cmdlines = "\n".join(" ".join(p.cmdline()) for p in procs)
    m.proc.terminate()
    m.proc.wait(20)
    log = logfile.read_text()
    assert "DEBUG" in log and nested["uuid"] in log
    assert leaked(log, fed) == [], "token in the --debug log"
    assert leaked(stats_text, fed) == [], "token in stats.json"
    assert leaked(metrics, fed) == [], "token in the Prometheus metrics"
    assert leaked(cmdlines, fed) == [], "token in a command line"
    assert leaked(m.log.read_text(), fed) == [], "token on stderr"


def _docker_usable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    done = subprocess.run(["sh", str(REPO / "integration/ensure_docker.sh")], capture_output=True, text=True)
    return None if done.returncode == 0 else f"no Docker daemon: {done.stderr.strip()}"


def test_fedmount_run_results_and_its_fedmount_command_line_hold_no_token(fed, tmp_path):
    why = _docker_usable()
    if why:
        pytest.skip(f"fedmount-run needs the test image from Docker: {why}")
    from integration import images

    images.ensure_image()
    (tmp_path / "image").mkdir()
    tar = Path(images.save_image(str(tmp_path / "image")))
    image = fed.add_collection("zbbbb", f"sec-image-{os.getpid()}", {tar.name: tar.read_bytes()})
    nested = fed.collections["nested"]
    rec = {
        "command": ["sh", "-c", "cat /remote/c/deep.txt; env > /out/env.txt; sleep 2"],
        "container_image": image["uuid"],
        "cwd": "/out",
        "mounts": {"/out": {"kind": "tmp"},
                   "/remote": {"kind": "collection", "uuid": nested["uuid"], "path": "a/b"}},
        "output_path": "/out",
        "runtime_constraints": {"ram": 256 << 20, "vcpus": 1, "keep_cache_ram": 64 << 20},
    }  # fmt: skip
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    out, tdir = tmp_path / "results", tmp_path / "t"
    tdir.mkdir()
    argv = [sys.executable, "-m", "fedmount.runner.cli", str(tmp_path / "rec.json"), "--output-dir", str(out),
            "--tmpdir", str(tdir), "--runtime", "local", "--no-reuse"]  # fmt: skip
    proc = subprocess.Popen(argv, env=fed.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cmdlines: list[str] = []
    runner = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            cmdlines += [" ".join(p.cmdline()) for p in runner.children(recursive=True)]
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert any("fedmount" in c for c in cmdlines), "never saw fedmount-run's fedmount"
    assert leaked("\n".join(cmdlines), fed) == [], "token in a command line of fedmount-run's children"
    result = (out / "result.json").read_text()
    assert json.loads(result)["state"] == "Complete"
    assert leaked(result, fed) == [], "token in result.json"
    for path in out.rglob("*"):
        if path.is_file() and path.name != "env.txt":  # env.txt: what the container chose to print
            assert leaked(path.read_text(errors="replace"), fed) == [], f"token in {path.name}"
    assert leaked(stderr.decode(errors="replace"), fed) == []


def test_the_mount_is_read_only_on_every_path(fed, mount):
    m = mount()
    text = fed.collections["text"]
    coll = m / f"by_id/{text['portable_data_hash']}"
    file, subdir = coll / "hello.txt", coll / "data"
    before = file.read_bytes()
    attempts = {
        "open O_WRONLY": lambda: os.open(file, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(file, os.O_RDWR),
        "open O_APPEND": lambda: os.open(file, os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": lambda: os.open(file, os.O_WRONLY | os.O_TRUNC),
        "truncate": lambda: os.truncate(file, 0),
        "chmod": lambda: os.chmod(file, 0o777),
        "chown": lambda: os.chown(file, 1, 1),
        "utime": lambda: os.utime(file, (0, 0)),
        "setxattr": lambda: os.setxattr(file, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(file, "user.arvados.uuid"),
        "unlink": lambda: os.unlink(file),
        "rmdir": lambda: os.rmdir(subdir),
        "rename": lambda: os.rename(file, coll / "moved.txt"),
        "rename dir": lambda: os.rename(subdir, coll / "moved"),
        "link": lambda: os.link(file, coll / "hard"),
    }
    for where in (m.path, m / "by_id", coll, subdir):
        attempts |= {
            f"create in {where.name}": lambda w=where: os.open(w / "new", os.O_CREAT | os.O_WRONLY, 0o644),
            f"mkdir in {where.name}": lambda w=where: os.mkdir(w / "newdir"),
            f"symlink in {where.name}": lambda w=where: os.symlink("hello.txt", w / "link"),
            f"mkfifo in {where.name}": lambda w=where: os.mkfifo(w / "fifo"),
        }
    wrong = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            wrong[name] = "succeeded"
        except OSError as e:
            if e.errno != errno.EROFS:
                wrong[name] = errno.errorcode.get(e.errno, str(e.errno))
    assert wrong == {}
    assert file.read_bytes() == before and stat.S_IMODE(file.stat().st_mode) == 0o555
    options = mount_options(m.path)
    assert "ro" in options and "allow_other" not in options


def mount_options(path: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    raise AssertionError(f"{path} not in /proc/mounts")


def test_other_users_cannot_read_the_mount_unless_allow_other(fed, mount):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("running a reader as another user needs root and setpriv")
    text = fed.collections["text"]
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # the mount point is reachable by anyone; only FUSE decides
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"]
        private = mount(base=Path(d) / "private")
        os.chmod(private.path.parent, 0o755)
        hello = f"by_id/{text['uuid']}/hello.txt"
        assert (private / hello).read_text() == "hello world\n"  # the owner reads
        denied = run(*as_nobody, str(private / hello), check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert "allow_other" not in mount_options(private.path)
        shared = mount("--allow-other", base=Path(d) / "shared")
        os.chmod(shared.path.parent, 0o755)
        assert "allow_other" in mount_options(shared.path)
        assert run(*as_nobody, str(shared / hello)).stdout == "hello world\n"
        for m in (private, shared):
            m.stop()


@pytest.mark.parametrize("route", ["home", "direct"])
def test_collection_whose_manifest_does_not_hash_to_the_asked_pdh_is_rejected(fed, mount, route):
    name = f"truth-{route}-{os.getpid()}"
    truth = fed.add_collection("zbbbb", name, {"true.txt": b"the real content\n"})
    lie = {"lie.txt": b"a lie\n"}
    fed.add_collection("zcccc", f"liar-{name}", lie, claim_pdh=truth["portable_data_hash"])
    ghost_manifest = f". d41d8cd98f00b204e9800998ecf8427e+0 0:0:ghost-{name}\n"
    ghost = f"{hashlib.md5(ghost_manifest.encode()).hexdigest()}+{len(ghost_manifest)}"
    fed.add_collection("zcccc", f"ghost-{name}", {"lie.txt": b"another lie\n"}, claim_pdh=ghost)
    m = mount("--route", route)
    mark = fed.mark()
    assert sorted(os.listdir(m / f"by_id/{truth['portable_data_hash']}")) == ["true.txt"]
    assert (m / f"by_id/{truth['portable_data_hash']}/true.txt").read_text() == "the real content\n"
    with pytest.raises(OSError) as e:
        os.listdir(m / f"by_id/{ghost}")  # only a liar claims it
    assert e.value.errno in (errno.ENOENT, errno.EIO)
    assert fed.wait_requests(mark, where=lambda r: r["cluster"] == "zcccc" and ghost[:32] in r["path"])
    with pytest.raises(OSError):  # asked again (perhaps from a negative cache): still nothing
        os.stat(m / f"by_id/{ghost}/lie.txt")
