"""fedmount-run end to end: real fedmount mounts, real Docker and bubblewrap containers.

Inputs come from collections on the home cluster (zzzzz) and on remote clusters of the
emulated federation; the container image is the busybox test image (integration/images.py)
stored as arv-keepdocker stores it in a collection on a remote cluster, so it reaches the
daemon through Keep and the mount. After every test — passing, refused, failing or
interrupted — the test's private temporary directory must be empty, /proc/mounts must list
nothing under it, and Docker must hold no container of ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from integration import images

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "fedmount.runner.cli"]
MISSING_PDH = "0badc0ffee0badc0ffee0badc0ffee00+42"
RUNNING: list[subprocess.Popen] = []


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3"
    try:
        import pyfuse3  # noqa: F401

        from fedmount import mount  # noqa: F401
    except ImportError as exc:
        return f"fedmount cannot mount here: {exc}"
    return None


def _docker_usable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    res = subprocess.run(
        ["sh", str(REPO / "integration" / "ensure_docker.sh")], capture_output=True, text=True
    )
    return None if res.returncode == 0 else f"no Docker daemon: {res.stderr.strip()}"


pytestmark = pytest.mark.skipif(_fuse_usable() is not None, reason=str(_fuse_usable()))


@pytest.fixture(scope="module")
def docker():
    why = _docker_usable()
    if why:
        pytest.skip(why)
    images.ensure_image()


@pytest.fixture(scope="module")
def image_collection(federation, docker, tmp_path_factory) -> dict:
    """The test image as an arv-keepdocker collection on remote cluster zbbbb."""
    tar = Path(images.save_image(str(tmp_path_factory.mktemp("image"))))
    return federation.add_collection("zbbbb", "runner-image", {tar.name: tar.read_bytes()})


@pytest.fixture
def tmpdir_clean(tmp_path):
    """`--tmpdir` for one run; afterwards it must be empty, unmounted, and no container left.

    A run the test left running (it failed half-way) gets SIGTERM first, so that a failing
    test cannot leave a mount behind for the next one."""
    tdir = tmp_path / "t"
    tdir.mkdir()
    yield tdir
    for proc in RUNNING:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    RUNNING.clear()
    assert [ln for ln in Path("/proc/mounts").read_text().splitlines() if str(tdir) in ln] == []
    assert os.listdir(tdir) == []
    if shutil.which("docker"):
        left = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "label=fedmount-run"], capture_output=True, text=True
        ).stdout.split()
        assert left == []


def fedmount_run(fed, record: dict, out: Path, tmpdir: Path, *args: str, wait: bool = True):
    rec = out.parent / f"{out.name}.json"
    rec.write_text(json.dumps(record))
    argv = [
        *RUN,
        str(rec),
        "--output-dir",
        str(out),
        "--tmpdir",
        str(tmpdir),
        "--crunchstat-interval",
        "1",
        "--reuse-dir",  # each test its own record of successful runs: no test reuses another's
        str(out.parent / f"{out.name}-runs"),
        *args,
    ]
    proc = subprocess.Popen(
        argv, env=fed.env("zzzzz"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    RUNNING.append(proc)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    proc.stdout_text, proc.stderr_text = stdout, stderr
    return proc


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def no_token_in(out: Path, fed) -> None:
    secrets = {t.split("/")[2] for t in (c["token"] for c in fed.clusters.values())}
    for path in out.rglob("*"):
        if path.is_file() and path.name not in ("stdout.txt",):
            text = path.read_text(errors="replace")
            assert not any(s in text for s in secrets), f"token in {path}"


def wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def record(fed, image: dict, command: str, **over) -> dict:
    text, nested = fed.collections["text"], fed.collections["nested"]
    rec = {
        "command": ["sh", "-c", command],
        "container_image": image["uuid"],
        "cwd": "/out",
        "environment": {"GREETING": "hi"},
        "mounts": {
            "/out": {"kind": "tmp"},
            "/local": {"kind": "collection", "portable_data_hash": text["portable_data_hash"]},
            "/remote": {"kind": "collection", "uuid": nested["uuid"], "path": "a/b"},
        },
        "output_path": "/out",
        # a RAM cache of its own: every run reads from Keep, whatever earlier runs cached
        "runtime_constraints": {"ram": 256 << 20, "vcpus": 1, "keep_cache_ram": 64 << 20},
    }
    rec.update(over)
    return rec


READ_BOTH = (
    "cat /local/hello.txt /remote/c/deep.txt; md5sum /local/data/numbers.csv > /out/sum.txt; echo $GREETING"
)


@pytest.mark.parametrize("runtime", ["docker", "local"])
def test_inputs_from_local_and_remote_clusters_reach_the_container(
    fed, image_collection, tmpdir_clean, tmp_path, runtime
):
    out = tmp_path / "results"
    proc = fedmount_run(
        fed, record(fed, image_collection, READ_BOTH), out, tmpdir_clean, "--runtime", runtime
    )
    assert proc.returncode == 0, proc.stderr_text
    assert (out / "stdout.txt").read_text() == "hello world\ndeep\nhi\n"
    numbers = "".join(f"{i},{i * i}\n" for i in range(1000)).encode()
    assert (out / "output" / "sum.txt").read_text().split()[0] == hashlib.md5(numbers).hexdigest()
    r = result(out)
    assert r["state"] == "Complete" and r["exit_code"] == 0 and r["error"] is None and r["runtime"] == runtime
    assert sum(r["fedmount"]["bytes_read_by_cluster"].values()) > 0
    assert r["resources"]["samples"] >= 0 and r["timings"]["mount_seconds"] > 0
    no_token_in(out, fed)


def test_image_is_loaded_from_a_remote_collection_through_the_mount(
    fed, image_collection, tmpdir_clean, tmp_path
):
    image_id = next(iter(image_collection["files"]))[: -len(".tar")]
    subprocess.run(["docker", "rmi", "--force", image_id], capture_output=True)
    assert images.image_id(image_id) is None
    mark = fed.mark()
    out = tmp_path / "results"
    proc = fedmount_run(fed, record(fed, image_collection, "true"), out, tmpdir_clean, "--runtime", "docker")
    assert proc.returncode == 0, proc.stderr_text
    assert images.image_id(image_id) == image_id
    assert result(out)["timings"]["image_seconds"] > 0
    # the tarball's blocks were fetched from Keep (through the home keepstore or zbbbb's)
    assert any(r["service"].startswith("keep") and r["method"] == "GET" for r in fed.requests(since=mark))


@pytest.mark.parametrize("runtime", ["docker", "local"])
def test_exit_code_and_stderr_are_propagated(fed, image_collection, tmpdir_clean, tmp_path, runtime):
    out = tmp_path / "results"
    proc = fedmount_run(
        fed, record(fed, image_collection, "echo oops >&2; exit 7"), out, tmpdir_clean, "--runtime", runtime
    )
    assert proc.returncode == 7
    assert (out / "stderr.txt").read_text() == "oops\n"
    r = result(out)
    assert r["state"] == "Complete" and r["exit_code"] == 7


@pytest.mark.parametrize("runtime", ["docker", "local"])
@pytest.mark.parametrize("api", [False, True])
def test_api_variables_are_present_only_when_asked_for(
    fed, image_collection, tmpdir_clean, tmp_path, runtime, api
):
    out = tmp_path / "results"
    cmd = (
        'env | cut -d= -f1 | grep "^ARVADOS_" | sort; [ "$ARVADOS_API_TOKEN" = "$EXPECT" ] && echo same; true'
    )
    rec = record(fed, image_collection, cmd, runtime_constraints={"API": api})
    rec["environment"] = {"EXPECT": fed.token("zzzzz")}
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", runtime)
    assert proc.returncode == 0, proc.stderr_text
    expected = "ARVADOS_API_HOST\nARVADOS_API_TOKEN\nsame\n" if api else ""
    assert (out / "stdout.txt").read_text() == expected
    no_token_in(out, fed)


def test_stdin_comes_from_a_collection_file(fed, image_collection, tmpdir_clean, tmp_path):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "wc -l")
    rec["mounts"]["stdin"] = {
        "kind": "collection",
        "uuid": fed.collections["text"]["uuid"],
        "path": "data/numbers.csv",
    }
    rec["mounts"]["stdout"] = {"kind": "file", "path": "/out/count.txt"}
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "docker")
    assert proc.returncode == 0, proc.stderr_text
    assert (out / "output" / "count.txt").read_text().strip() == "1000"
    assert (out / "stdout.txt").read_text().strip() == "1000"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda rec: rec["mounts"]["/local"].update(portable_data_hash=MISSING_PDH),
            'mounts["/local"].portable_data_hash: collection',
        ),
        (lambda rec: rec["mounts"]["/remote"].update(path="a/nothing"), 'mounts["/remote"].path:'),
        (lambda rec: rec.update(container_image="zzzzz-4zz18-000000000000000"), "container_image:"),
    ],
)
def test_missing_inputs_are_refused_after_mounting_and_nothing_is_left(
    fed, image_collection, tmpdir_clean, tmp_path, change, field
):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "true")
    change(rec)
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "docker")
    assert proc.returncode == 2
    assert proc.stderr_text.startswith(f"fedmount-run: {field}") and proc.stderr_text.count("\n") == 1
    assert result(out)["state"] == "Cancelled"


def test_image_collection_without_a_tarball_is_refused(fed, image_collection, tmpdir_clean, tmp_path):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "true", container_image=fed.collections["text"]["portable_data_hash"])
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "docker")
    assert proc.returncode == 2
    assert (
        proc.stderr_text.startswith("fedmount-run: container_image: collection")
        and "holds no" in proc.stderr_text
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda rec: rec["mounts"].update({"/k": {"kind": "keep"}}), 'mounts["/k"].kind'),
        (lambda rec: rec["mounts"]["/local"].update(writable=True), 'mounts["/local"].writable'),
        (lambda rec: rec.pop("command"), "command"),
    ],
)
def test_unsupported_records_are_refused_before_anything_starts(
    fed, image_collection, tmpdir_clean, tmp_path, change, field
):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "true")
    change(rec)
    proc = fedmount_run(fed, rec, out, tmpdir_clean)
    assert proc.returncode == 2
    assert proc.stderr_text.startswith(f"fedmount-run: {field}:") and proc.stderr_text.count("\n") == 1
    assert not out.exists()


def test_invalid_json_is_refused(fed, tmpdir_clean, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"command": ["true"')
    proc = subprocess.run(
        [*RUN, str(bad), "--output-dir", str(tmp_path / "o"), "--tmpdir", str(tmpdir_clean)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"fedmount-run: {bad}: not valid JSON")


@pytest.mark.parametrize(
    ("runtime", "signum"),
    [("docker", signal.SIGTERM), ("local", signal.SIGTERM), ("docker", signal.SIGINT)],
)
def test_sigterm_stops_the_container_and_unmounts(
    fed, image_collection, tmpdir_clean, tmp_path, runtime, signum
):
    out = tmp_path / "results"
    # A sleep no other process on this shared machine runs, so pgrep finds only ours.
    sleeper = f"sleep {100000 + os.getpid() % 1000 * 100 + signum}"
    rec = record(fed, image_collection, f"echo started; {sleeper}")
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", runtime, wait=False)
    wait_for(lambda: (out / "stdout.txt").exists() and (out / "stdout.txt").read_text() == "started\n")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert stderr == f"fedmount-run: interrupted by {signal.Signals(signum).name}\n"
    r = result(out)
    assert r["state"] == "Cancelled" and r["exit_code"] is None
    assert subprocess.run(["pgrep", "-f", sleeper], capture_output=True).returncode == 1


def test_fedmount_dying_stops_the_container(fed, image_collection, tmpdir_clean, tmp_path):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "echo started; sleep 120")
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "docker", wait=False)
    wait_for(lambda: (out / "stdout.txt").exists() and (out / "stdout.txt").read_text() == "started\n")
    mnt = str(next(Path(tmpdir_clean).glob("fedmount-run-*/mnt")))
    daemon = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and "--foreground" in p.info["cmdline"] and mnt in p.info["cmdline"]
    ]
    assert len(daemon) == 1
    os.kill(daemon[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr.startswith("fedmount-run: fedmount exited during the run")
    assert result(out)["state"] == "Cancelled"


def test_mount_that_cannot_start_fails_the_run_and_leaves_nothing(
    fed, image_collection, tmpdir_clean, tmp_path
):
    """fedmount refuses a token the home cluster does not know: exit 1, its reason on one line."""
    out = tmp_path / "results"
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps(record(fed, image_collection, "true")))
    env = {**fed.env("zzzzz"), "ARVADOS_API_TOKEN": "v2/zzzzz-gj3su-000000000000000/nosuchsecret"}
    proc = subprocess.run(
        [*RUN, str(rec), "--output-dir", str(out), "--tmpdir", str(tmpdir_clean), "--runtime", "docker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.startswith("fedmount-run: fedmount exited with status") and proc.stderr.count("\n") == 1
    )
    assert "nosuchsecret" not in proc.stderr and "nosuchsecret" not in (out / "fedmount.log").read_text()
    assert result(out)["state"] == "Cancelled"


def test_unknown_local_image_is_refused(fed, image_collection, tmpdir_clean, tmp_path):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "true", container_image="fedmount-test/no-such-image:1")
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "docker")
    assert proc.returncode == 2
    assert proc.stderr_text.startswith(
        "fedmount-run: container_image: fedmount-test/no-such-image:1 is not a local"
    )


def keep_gets(fed, since: int) -> list[dict]:
    return [r for r in fed.requests(since=since) if r["service"].startswith("keep") and r["method"] == "GET"]


def test_staged_run_reads_nothing_from_keep_once_staging_is_done(
    fed, image_collection, tmpdir_clean, tmp_path
):
    out = tmp_path / "results"
    # the container waits for the test's word, so the request-log mark falls between the stage and its reads
    wait_then_read = "while [ ! -e /out/go ]; do sleep 0.1; done; " + READ_BOTH
    rec = record(fed, image_collection, wait_then_read)
    mark = fed.mark()
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "local", "--stage", wait=False)
    wait_for(lambda: "fedmount-run: --stage: done" in _text(out / "fedmount.log") or proc.poll() is not None)
    assert keep_gets(fed, mark), "the stage fetched nothing"
    staged = fed.mark()
    wait_for(lambda: (out / "output").is_dir() or proc.poll() is not None)
    (out / "output" / "go").touch()
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    assert proc.returncode == 0, proc.stderr_text
    assert (out / "stdout.txt").read_text() == "hello world\ndeep\nhi\n"
    assert keep_gets(fed, staged) == []  # the image unpacking and the container's reads: all from the cache
    r = result(out)
    assert r["fedmount"]["keep_requests_by_cluster"] == {} and r["fedmount"]["cache_hits"] > 0
    stage = r["stage"]
    assert stage["collections"] == 3 and stage["bytes_staged"] > 0 and stage["seconds"] > 0
    assert stage["bytes_staged"] + stage["bytes_already_cached"] == stage["bytes"]
    assert r["timings"]["stage_seconds"] == stage["seconds"]
    log = (out / "fedmount.log").read_text()
    assert "fedmount-run: --stage: staging 3 collections" in log and "staged:" in log
    no_token_in(out, fed)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_stage_of_an_unknown_collection_refuses_the_run_with_nothing_mounted(
    fed, image_collection, tmpdir_clean, tmp_path
):
    out = tmp_path / "results"
    rec = record(fed, image_collection, "true")
    rec["mounts"]["/local"]["portable_data_hash"] = MISSING_PDH
    proc = fedmount_run(fed, rec, out, tmpdir_clean, "--runtime", "local", "--stage")
    assert proc.returncode == 2
    field = 'mounts["/local"].portable_data_hash'
    expected = f"fedmount-run: {field}: cannot stage: collection {MISSING_PDH} not found"
    assert proc.stderr_text.startswith(expected), proc.stderr_text
    assert proc.stderr_text.count("\n") == 1
    r = result(out)
    assert r["state"] == "Cancelled" and r["stage"] is None


def test_sigint_while_staging_interrupts_the_run_with_nothing_left(
    fed, image_collection, tmpdir_clean, tmp_path
):
    out = tmp_path / "results"
    for svc in ("keep0", "keep1"):  # the run's route, auto: the image's blocks come from zbbbb itself
        fed.set_fault("zbbbb", svc, bandwidth=1 << 20)  # the image tarball takes seconds
    proc = fedmount_run(fed, record(fed, image_collection, "true"), out, tmpdir_clean, "--runtime", "local",
                        "--stage", wait=False)  # fmt: skip
    wait_for(lambda: "fedmount-run: --stage: staging" in _text(out / "fedmount.log"))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "fedmount-run: interrupted by SIGINT\n"
    r = result(out)
    assert r["state"] == "Cancelled" and r["stage"] is None
    assert "fedmount-run: --stage: interrupted" in (out / "fedmount.log").read_text()


def test_a_repeated_step_is_reused_without_starting_a_container(
    fed, image_collection, tmpdir_clean, tmp_path
):
    entry = fed.add_collection("zzzzz", f"reuse-{time.time_ns()}", {"data.txt": "first\n"})
    mounts = {"/out": {"kind": "tmp"}, "/in": {"kind": "collection", "uuid": entry["uuid"]}}
    rec = record(fed, image_collection, "cat /in/data.txt > /out/copy.txt; echo ran", mounts=mounts)

    def run(name: str, *args: str):  # type: ignore[no-untyped-def]
        proc = fedmount_run(fed, rec, tmp_path / name, tmpdir_clean, "--runtime", "docker",
                            "--reuse-dir", str(tmp_path / "runs"), *args)  # fmt: skip
        assert proc.returncode == 0, proc.stderr_text
        return proc, result(tmp_path / name)

    _, r1 = run("first")
    assert r1["reuse"]["key"] and r1["reuse"]["reused_from"] is None
    mark = fed.mark()
    again, r2 = run("again")
    assert r2["reuse"]["reused_from"]["results_dir"] == str(tmp_path / "first") and r2["state"] == "Complete"
    assert (tmp_path / "again" / "output" / "copy.txt").read_text() == "first\n"
    assert (tmp_path / "again" / "stdout.txt").read_text() == "ran\n"
    assert "run_seconds" not in r2["timings"] and "mount_seconds" not in r2["timings"]  # nothing started
    assert [r for r in fed.requests(since=mark) if r["service"].startswith("keep")] == []
    assert "reused the results" in again.stderr_text

    _, forced = run("forced", "--no-reuse")
    assert forced["reuse"]["reused_from"] is None and "mount_seconds" in forced["timings"]

    # The UUID now names other content (a new PDH): a new key, so the step runs again.
    other = fed.add_collection("zzzzz", f"reuse-other-{time.time_ns()}", {"data.txt": "second\n"})
    signed = fed.request("zzzzz", f"/arvados/v1/collections/{other['uuid']}", token=fed.token()).json()
    body = json.dumps({"collection": {"manifest_text": signed["manifest_text"]}}).encode()
    update = fed.request("zzzzz", f"/arvados/v1/collections/{entry['uuid']}", method="PUT", token=fed.token(),
                         headers={"Content-Type": "application/json"}, body=body)  # fmt: skip
    assert update.status == 200, update.body
    _, moved = run("moved")
    assert moved["reuse"]["reused_from"] is None and moved["reuse"]["key"] != r1["reuse"]["key"]
    assert (tmp_path / "moved" / "output" / "copy.txt").read_text() == "second\n"


def test_a_failed_step_is_never_reused(fed, image_collection, tmpdir_clean, tmp_path):
    rec = record(fed, image_collection, f"echo {time.time_ns()}; exit 3")
    for name in ("one", "two"):
        proc = fedmount_run(fed, rec, tmp_path / name, tmpdir_clean, "--runtime", "docker",
                            "--reuse-dir", str(tmp_path / "runs"))  # fmt: skip
        assert proc.returncode == 3, proc.stderr_text
        assert result(tmp_path / name)["reuse"]["reused_from"] is None
        assert "run_seconds" in result(tmp_path / name)["timings"]
