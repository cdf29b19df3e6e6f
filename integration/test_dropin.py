"""Switching from arv-mount: what an arv-mount user does must work, or fail in one clear line.

Real fedmount processes on real FUSE mounts of the emulated federation:

- a v1 token (the bare secret the SDK and arv-mount take) mounts, reads home and remote
  collections on every route (home, direct, auto), and never reaches a remote cluster nor a log (the emulator
  takes v1 tokens as a real cluster does: the controller yes, keepstore not with ``+R``);
- a non-empty mount point is refused (its files stay visible) unless ``--nonempty``;
- a detached daemon keeps logging, to a 0600 file the "mounted" line names;
- the smaller ones: an unknown cluster is named as such, a plain-HTTP API host gives a
  real reason, ``--unmount`` of what is not mounted fails, ``--collection`` of an unknown
  id says so once, ``df -i`` is not full, a block no keepstore has is
  logged as crunch-run's "Block not found error", the demo tour tells what ``ls by_id`` shows,
  ``fedmount-run`` without ``--output-dir`` writes its results next to the record;
- ``make`` waits for the dpkg lock held by another apt run instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.tokens import parse_token, salt_for
from integration.demo import tour
from integration.mounting import REPO, fedmount_cmd, is_mounted, md5sums, requires_fuse, run, wait_for

pytestmark = requires_fuse


def v1_env(fed) -> dict[str, str]:
    """The environment of an SDK user whose ARVADOS_API_TOKEN is the home token's bare secret."""
    env = fed.env()
    env["ARVADOS_API_TOKEN"] = parse_token(fed.token()).secret
    return env


def test_emulator_takes_v1_tokens_as_a_real_cluster_does(fed):
    """The controller takes the bare secret and names its uuid; keepstore refuses it with +R
    (it cannot salt it: services/keepstore proxy_remote_test.go), and takes the v2 form."""
    home = parse_token(fed.token())
    assert fed.request(None, "/arvados/v1/users/current", token=home.secret).status == 200
    auth = fed.request(None, "/arvados/v1/api_client_authorizations/current", token=home.secret)
    assert auth.status == 200 and auth.json()["uuid"] == home.uuid
    shared = fed.collections["shared"]  # on zbbbb: the home answers with +R hints
    for token, status in ((home.secret, 400), (home.text, 200)):
        record = fed.request(None, f"/arvados/v1/collections/{shared['uuid']}", token=token).json()
        locator = record["manifest_text"].split()[1]
        assert "+Rzbbbb-" in locator
        assert fed.request(None, "/" + locator, service="keep0", token=token).status == status, token[:2]


@pytest.mark.parametrize("route", ["home", "direct", "auto"])
def test_v1_token_reads_home_and_remote_collections_and_stays_home(fed, mount, route):
    m = mount("--debug", "--route", route, env=v1_env(fed))
    mark = fed.mark()
    for name in ("text", "shared", "nested"):  # zzzzz, zbbbb, zcccc
        coll = fed.collections[name]
        expected = {p: meta["md5"] for p, meta in coll["files"].items()}
        assert md5sums(m / f"by_id/{coll['uuid']}", sorted(expected)) == expected, name
    home = parse_token(fed.token())
    remote = [r for r in fed.requests(since=mark) if r["cluster"] != fed.home]
    assert {r["cluster"] for r in remote} == {"zbbbb", "zcccc"}
    assert [r for r in remote if home.secret in json.dumps(r)] == []  # neither bare nor v2 form
    salted = {c: salt_for(home, c).text for c in ("zbbbb", "zcccc")}
    assert all(r["token"] in (salted[r["cluster"]], None, "", "xxx") for r in remote)
    log = m.log.read_text()
    assert "v1 token; using its v2 form" in log and home.secret not in log


def test_non_empty_mount_point_is_refused_and_its_files_stay_visible(fed, mount, tmp_path):
    mnt = tmp_path / "busy"
    mnt.mkdir()
    (mnt / "results.csv").write_text("not to be hidden\n")
    started = time.monotonic()
    try:
        done = run(*fedmount_cmd("--foreground", str(mnt)), env=fed.env(), cwd=REPO, check=False, timeout=30)
    finally:
        if is_mounted(mnt):  # what happened before: mounted over the file
            run(*fedmount_cmd("--unmount", str(mnt)), cwd=REPO, check=False)
    assert done.returncode == 1 and not is_mounted(mnt)
    assert done.stderr.strip().splitlines() == [
        f"fedmount: {mnt} is not empty (1 entry, which the mount would hide); use an empty directory, "
        "or --nonempty to mount over it"
    ]
    assert time.monotonic() - started < 10  # refused before contacting any API (about 0.3 s quiet)
    assert (mnt / "results.csv").read_text() == "not to be hidden\n"
    over = tmp_path / "over"
    (over / "mnt").mkdir(parents=True)
    (over / "mnt" / "kept.txt").write_text("under the mount\n")
    m = mount("--nonempty", base=over)  # mounted over it, as asked
    assert sorted(os.listdir(m.path)) == ["README", "by_id", "by_tag", "clusters", "home", "shared"]
    m.stop()
    assert (m.path / "kept.txt").read_text() == "under the mount\n"


def test_detached_daemon_keeps_logging_to_a_private_file_the_mounted_line_names(fed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**fed.env(), "XDG_STATE_HOME": str(tmp_path / "state")}
    done = run(*fedmount_cmd("--disk-cache-dir", str(tmp_path / "cache"), str(mnt)), env=env, cwd=REPO)
    try:
        assert done.returncode == 0 and (mnt / "by_id/README").exists()
        [line] = [ln for ln in done.stderr.splitlines() if "mounted at" in ln]
        logfile = Path(re.search(r"; log in (\S+)$", line).group(1))
        assert logfile.parent == tmp_path / "state/fedmount/logs"
        assert stat.S_IMODE(logfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(logfile.parent.stat().st_mode) == 0o700
        # After detaching, a lookup failure is still written down.
        missing = "zzzzz-4zz18-0000000000nolog"
        assert not (mnt / "by_id" / missing).exists()
        wait_for(lambda: missing in logfile.read_text(), 10, "the lookup's log line")
    finally:
        run(*fedmount_cmd("--unmount", str(mnt)), cwd=REPO, check=False)
    wait_for(lambda: "unmounted" in logfile.read_text(), 10, "the unmount's log line")
    assert parse_token(fed.token()).secret not in logfile.read_text()


def test_unknown_cluster_is_named_on_the_home_route_without_asking_it(fed, mount):
    m = mount()
    mark = fed.mark()
    done = run("ls", str(m / "by_id/zqqqq-4zz18-000000000000001"), check=False)
    assert done.returncode == 2 and "No such file or directory" in done.stderr
    wait_for(lambda: "zqqqq-4zz18-000000000000001" in m.log.read_text(), 10, "the log line")
    [line] = [ln for ln in m.log.read_text().splitlines() if "zqqqq-4zz18-000000000000001" in ln]
    assert line.endswith("(cluster zqqqq): cluster zqqqq is not a remote cluster of zzzzz")
    assert [r for r in fed.requests(since=mark) if "zqqqq" in r["path"]] == []


def test_plain_http_api_host_fails_with_a_real_reason(fed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = fed.env()
    env["ARVADOS_API_HOST"] = fed.keep_services()[0].removeprefix("http://")  # a plain-HTTP server
    done = run(*fedmount_cmd("--foreground", str(mnt)), env=env, cwd=REPO, check=False, timeout=60)
    assert done.returncode == 1 and not is_mounted(mnt)
    [line] = done.stderr.strip().splitlines()
    assert "ConnectError:;" not in line and "wrong version number" in line.lower(), line
    assert "HTTPS controller" in line


def test_unmount_of_a_path_that_is_not_mounted_exits_1_with_one_line(tmp_path):
    done = run(*fedmount_cmd("--unmount", str(tmp_path)), cwd=REPO, check=False)
    assert done.returncode == 1 and done.stderr == f"fedmount: {tmp_path} is not mounted\n"


@pytest.mark.parametrize("detached", [False, True])
def test_collection_that_does_not_exist_is_reported_once(fed, tmp_path, detached):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = "zzzzz-4zz18-000000000000000"
    args = ["--collection", missing, *([] if detached else ["--foreground"]), str(mnt)]
    env = {**fed.env(), "XDG_STATE_HOME": str(tmp_path / "state")}
    done = run(*fedmount_cmd(*args), env=env, cwd=REPO, check=False)
    assert done.returncode == 1 and not is_mounted(mnt)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"fedmount: cannot mount --collection {missing}: ") and "not found" in line


def test_block_missing_on_every_keepstore_logs_crunch_runs_block_not_found_error(fed, mount):
    """crunch-run scans the mount's stderr for "Block not found error" (arv-mount's phrase for
    a block no keepstore has) and turns it into a warning: a block that every keepstore
    answers 404 for is EIO and that phrase, one line per failed read; a block that is only unreadable
    (every keepstore failing) is not called "not found"."""
    names = [f"dropin-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("lost", "broken")]
    lost, broken = (fed.add_collection(fed.home, name, {"x.bin": (4096, name)}) for name in names)
    record = fed.request(None, f"/arvados/v1/collections/{lost['uuid']}", token=fed.token()).json()
    (key,) = [b.key for b in parse_manifest(record["manifest_text"]).blocks()]
    assert all([fed.delete_block(fed.home, svc, key) for svc in ("keep0", "keep1")])  # both had it
    m = mount()
    done = run("cat", str(m / f"by_id/{lost['uuid']}/x.bin"), check=False, timeout=60)
    assert done.returncode == 1 and "Input/output error" in done.stderr and done.stdout == ""
    lines = [ln for ln in m.log.read_text().splitlines() if key in ln]  # one per failed read (kernel retries)
    assert lines and all(f"Block not found error: collection {lost['uuid']}" in ln and "x.bin" in ln
                         for ln in lines), lines  # fmt: skip
    for svc in ("keep0", "keep1"):
        fed.set_fault(fed.home, svc, status=500)
    try:
        done = run("cat", str(m / f"by_id/{broken['uuid']}/x.bin"), check=False, timeout=60)
    finally:
        fed.clear_faults(fed.home)
    assert done.returncode == 1 and done.stdout == ""
    lines = [ln for ln in m.log.read_text().splitlines() if broken["uuid"] in ln and "Block" in ln]
    assert lines and all("Block read error" in ln for ln in lines), lines


def test_df_inodes_shows_a_mount_with_free_inodes(fed, mount):
    m = mount()
    run("ls", str(m / f"by_id/{fed.collections['many']['portable_data_hash']}"))  # 10,000 inodes in use
    vfs = os.statvfs(m.path)
    assert vfs.f_files - vfs.f_ffree > 10_000 and vfs.f_ffree >= 1 << 30 and vfs.f_favail == vfs.f_ffree
    use = run("df", "--output=ipcent", str(m.path)).stdout.splitlines()[-1].strip()
    assert use == "1%", use  # was 100%: monitoring alarms on that


def test_demo_tour_says_what_ls_by_id_shows(fed, mount):
    m = mount()
    listed = run("ls", str(m / "by_id")).stdout.split()
    rows = tour(fed, str(m.path)).splitlines()
    [row] = [ln for ln in rows if ln.strip().startswith(f"ls {m.path}/by_id ")]
    assert listed == ["README"] and "README" in row and "empty" not in row


def test_fedmount_run_without_output_dir_writes_results_next_to_the_record(fed, tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap (package bubblewrap) is not installed: the local runtime needs it")
    text = fed.collections["text"]
    record = {
        "command": ["cat", "/in/hello.txt"],
        "container_image": "/",
        "mounts": {"/in": {"kind": "collection", "portable_data_hash": text["portable_data_hash"]}},
        "runtime_constraints": {"keep_cache_ram": 64 << 20},
    }
    (tmp_path / "job.json").write_text(json.dumps(record))
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    argv = [sys.executable, "-m", "fedmount.runner.cli", "job.json", "--runtime", "local",
            "--tmpdir", str(tmpdir)]
    env = {**fed.env(), "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [results] = [p for p in tmp_path.iterdir() if p.name.startswith("job-")]
    assert done.stderr.splitlines()[0] == f"fedmount-run: results in {results.name}"
    assert (results / "stdout.txt").read_text() == "hello world\n"
    assert json.loads((results / "result.json").read_text())["state"] == "Complete"
    assert os.listdir(tmpdir) == []


APT_LOCKS = ("/var/lib/apt/lists/lock", "/var/lib/dpkg/lock-frontend")


def _apt_unusable() -> str | None:
    if os.geteuid() != 0:
        return "holding the dpkg lock needs root"
    if shutil.which("apt-get") is None or shutil.which("make") is None:
        return "needs apt-get and make (a Debian machine)"
    return None


@pytest.mark.skipif(_apt_unusable() is not None, reason=str(_apt_unusable()))
def test_make_waits_for_the_dpkg_lock_another_apt_run_holds():
    # A package that is installed but named with its version: dpkg-query does not match the
    # name, so make runs apt-get update and install, which has nothing to do once it has the lock.
    version = run("dpkg-query", "-W", "-f=${Version}", "attr").stdout
    held = []
    try:
        for path in APT_LOCKS:  # what cloud-init's apt-get update / unattended-upgrades hold
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            held.append(fd)
        started = time.monotonic()
        argv = ["make", "--no-print-directory", "system-deps", f"SYSTEM_PACKAGES=attr={version}"]
        make = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(4)
        assert make.poll() is None, f"make gave up while the lock was held: {make.communicate()[0]}"
    finally:
        for fd in held:
            os.close(fd)  # the other apt run finishes
    out = make.communicate(timeout=600)[0]
    assert make.returncode == 0, out
    assert "waiting up to 600 s for another apt run" in out and time.monotonic() - started >= 4
