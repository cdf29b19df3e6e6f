"""fedmount as the arv-mount of the real crunch-run: its exact sequence, replayed on real mounts.

`integration.crunchrun_replay.CrunchRun` runs an ``arv-mount`` that is fedmount with
crunch-run's command lines, README poll, input stats, Docker binds, output capture and
unmount, against the emulated federation. Each scenario is named after what would break
a container if fedmount got it wrong:

- the output a container writes into ``tmp0`` is saved signed and Keep-backed: the record
  read from ``.arvados#collection`` is accepted by the controller (which checks every
  signature, as Rails does) and the real SDK reads every file back byte for byte, for
  inputs by PDH with a disk cache (the container as root) and by UUID with a RAM cache (the
  container as an unprivileged user, as many images run); the mount is ready, and
  gone within crunch-run's 9 s, with nothing left mounted, running or on disk;
- collections stay read-only under ``--read-write``: EROFS under ``by_id/`` and ``by_uuid/``;
- a Keep write failure fails the read of ``.arvados#collection`` with one "Keep write error"
  line (the phrase crunch-run turns into a runtime warning), keeps the files, and the next
  read saves them; storage classes reach the keepstores;
- crunchstat-summary (the real one, 3.2.1: ``make crunchstat-summary``, ``CRUNCHSTAT_SUMMARY``
  or PATH) reads keep and FUSE figures from the mount's log.

Needs FUSE and root (crunch-run's mounts use ``--allow-other`` and Docker binds them), and
Docker; each test says so when it skips.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from integration import images
from integration.crunchrun_replay import CrunchRun, Mount, install_arv_mount, run_container
from integration.mounting import REPO, requires_fuse

pytestmark = [requires_fuse, pytest.mark.skipif(os.geteuid() != 0, reason="crunch-run's mounts need root")]


@pytest.fixture(scope="module")
def docker_image():
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    ensure = REPO / "integration" / "ensure_docker.sh"
    done = subprocess.run(["sh", str(ensure)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"no Docker daemon: {done.stderr.strip()}")
    return images.ensure_image()


@pytest.fixture
def crunch(fed, tmp_path):
    """`crunch(mounts, **options)`: a `CrunchRun` whose arv-mount is fedmount; cleaned up after."""
    arv_mount = install_arv_mount(tmp_path / "bin")
    runs: list[CrunchRun] = []

    def make(mounts: list[Mount], **options) -> CrunchRun:
        work = tmp_path / f"crunch-run{len(runs)}"
        work.mkdir()
        run = CrunchRun(arv_mount, fed.env(), fed.token(), work, mounts, **options)
        runs.append(run)
        return run

    yield make
    for run in runs:
        if run.running():
            run.cleanup()


def tree_of(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def sdk_files(api, manifest: str) -> dict[str, bytes]:
    """Every file of `manifest`, read back from Keep by the real SDK."""
    import arvados.collection

    coll = arvados.collection.CollectionReader(manifest, api_client=api)
    out = {}
    for path in _paths(coll, ""):
        with coll.open(path, "rb") as f:
            out[path] = f.read()
    return out


def _paths(coll, prefix: str) -> list[str]:
    import arvados.collection

    found = []
    for name in coll:
        item = coll[name]
        if isinstance(item, arvados.collection.Subcollection):
            found += _paths(item, f"{prefix}{name}/")
        else:
            found.append(prefix + name)
    return found


CONTAINER_SCRIPT = """
set -e
cp -r /keep/in /out/copied
mkdir -p "/out/sub/deeper dir"
echo result > "/out/sub/deeper dir/a:b c.txt"
dd if=/dev/urandom of=/out/big.bin bs=1048576 count=70 2>/dev/null
head -c 1000 /out/big.bin > /out/head.bin
mv /out/head.bin /out/sub/moved.bin
printf 'to be cut' > /out/cut.txt
truncate -s 5 /out/cut.txt
touch /out/empty
rm -f /out/copied/{drop}
"""


@pytest.mark.parametrize("variant", ["pdh-disk-cache", "uuid-ram-cache"])
def test_container_output_in_tmp0_is_saved_signed_and_the_sdk_reads_it_back(
    fed, crunch, docker_image, sdk, variant
):
    source = fed.collections["nested" if variant.startswith("pdh") else "shared"]
    by = {"pdh": source["portable_data_hash"]} if variant.startswith("pdh") else {"uuid": source["uuid"]}
    run = crunch([Mount("/keep/in", **by), Mount("/out", writable=True)],
                 cache="disk" if "disk" in variant else "ram", stat_interval=1)
    ready = run.start()
    assert "fedmount" in run.version and "--mount-tmp" in run.argv
    assert ("--mount-by-pdh" in run.argv) == variant.startswith("pdh")
    drop = "empty.txt" if variant.startswith("pdh") else "shared.txt"
    user = None if variant.startswith("pdh") else "1000:1000"
    done = run_container(docker_image, {"/keep/in": (run.sources["/keep/in"], True),
                                        "/out": (run.sources["/out"], False)},
                         CONTAINER_SCRIPT.format(drop=drop), user=user)
    assert done.returncode == 0, done.stderr
    written = tree_of(Path(run.sources["/out"]))
    inputs = tree_of(Path(run.sources["/keep/in"]))
    assert {f"copied/{p}" for p in inputs if p != drop} <= set(written)
    assert written["cut.txt"] == b"to be "[:5] and len(written["big.bin"]) == 70 << 20
    record = json.loads(run.output_record("/out"))
    assert record["uuid"] is None and record["storage_classes_desired"] == ["default"]
    assert "+A" in record["manifest_text"]
    api = sdk()
    assert sdk_files(api, record["manifest_text"]) == written
    body = {"collection": {"manifest_text": record["manifest_text"]}}
    saved = api.collections().create(body=body).execute()
    assert saved["portable_data_hash"] == record["portable_data_hash"]  # every signature accepted
    took = run.cleanup()
    assert took < 9 and run.killed == [] and not run.mountpoint.exists()
    assert run.warnings == [], run.warnings
    assert ready < 10
    assert [n for n in os.listdir("/tmp") if n.startswith("fedmount-scratch-")] == []


def test_collections_stay_read_only_under_read_write(fed, crunch):
    text = fed.collections["text"]
    run = crunch([Mount("/in", uuid=text["uuid"]), Mount("/out", writable=True)])
    run.start()
    mnt = run.mountpoint
    for path in (mnt / f"by_id/{text['uuid']}", mnt / f"by_uuid/{text['uuid']}",
                 mnt / f"by_id/{text['portable_data_hash']}"):
        for attempt in (lambda p: open(p / "hello.txt", "a"), lambda p: open(p / "new.txt", "w"),
                        lambda p: os.mkdir(p / "dir"), lambda p: os.unlink(p / "hello.txt"),
                        lambda p: os.rename(p / "hello.txt", p / "moved.txt")):
            with pytest.raises(OSError) as e:
                attempt(path)
            assert e.value.errno == errno.EROFS, path
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / "by_id" / "new")
    assert e.value.errno == errno.EROFS
    (mnt / "tmp0" / "fine.txt").write_text("scratch is writable\n")
    with pytest.raises(OSError) as e:
        os.rename(mnt / "tmp0" / "fine.txt", mnt / f"by_id/{text['uuid']}/fine.txt")
    assert e.value.errno in (errno.EXDEV, errno.EROFS)
    assert run.cleanup() < 9 and run.killed == []
    assert run.log_text().count("outside the --mount-tmp directories was refused (EROFS)") == 1


def test_keep_write_failure_fails_the_read_in_one_line_keeps_the_files_and_a_retry_saves_them(
    fed, crunch, sdk
):
    run = crunch([Mount("/out", writable=True)])
    run.start()
    out = Path(run.sources["/out"])
    (out / "result.txt").write_bytes(b"precious\n")
    fed.set_fault(fed.home, "keep0", down=True)  # one keepstore left: 1 copy of the 2 wanted
    with pytest.raises(OSError) as e:
        run.output_record("/out")
    assert e.value.errno == errno.EIO
    assert (out / "result.txt").read_bytes() == b"precious\n"
    fed.clear_faults()
    record = json.loads(run.output_record("/out"))
    assert sdk_files(sdk(), record["manifest_text"]) == {"result.txt": b"precious\n"}
    assert run.cleanup() < 9
    [warning] = run.warnings
    assert "Keep write error: block " in warning and "wanted 2 copies in class default, stored 1" in warning


def test_storage_classes_reach_the_keepstores(fed, crunch):
    run = crunch([Mount("/out", writable=True)], storage_classes=["archive"])
    run.start()
    (Path(run.sources["/out"]) / "cold.txt").write_bytes(b"archive me\n")
    mark = fed.mark()
    with pytest.raises(OSError):  # only keep1 has the class: 1 copy of the 2 the cluster wants
        run.output_record("/out")
    puts = {(r["service"], r["status"]) for r in fed.requests(since=mark) if r["method"] == "PUT"}
    assert puts == {("keep0", 507), ("keep1", 200)}
    assert run.cleanup() < 9
    assert any("class archive" in w for w in run.warnings)


def _crunchstat_summary() -> str | None:
    """``CRUNCHSTAT_SUMMARY``, else ``make crunchstat-summary``'s, else one on PATH."""
    made = REPO / ".venv-crunchstat-summary" / "bin" / "crunchstat-summary"
    return os.environ.get("CRUNCHSTAT_SUMMARY") or (str(made) if made.exists() else None) or shutil.which(
        "crunchstat-summary")


def test_crunchstat_summary_reads_keep_and_fuse_figures_from_the_log(fed, crunch, tmp_path):
    tool = _crunchstat_summary()
    if tool is None:
        pytest.skip("crunchstat-summary 3.2.1 not found: make crunchstat-summary, or set CRUNCHSTAT_SUMMARY")
    text = fed.collections["text"]
    mounts = [Mount("/in", pdh=text["portable_data_hash"]), Mount("/out", writable=True)]
    run = crunch(mounts, stat_interval=1)
    run.start()
    data = (Path(run.sources["/in"]) / "lorem.txt").read_bytes()
    (Path(run.sources["/out"]) / "copy.txt").write_bytes(data)
    run.output_record("/out")
    time.sleep(2.5)
    run.cleanup()
    done = subprocess.run([tool, "--log-file", str(run.log_path), "--format", "text"],
                          capture_output=True, text=True, timeout=120, env=fed.env())  # it makes a client
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines() if "\t" in line]
    total = {(row[0], row[1]): float(row[-1]) for row in rows[1:] if row[-1] not in ("-", "")}
    assert total[("keepcalls", "put")] >= 1 and total[("net:keep0", "tx")] >= 2 * len(data)
    assert total[("keepcalls", "get")] >= 1 and total[("net:keep0", "rx")] >= len(data)
    assert total[("fuseops", "write")] >= 1 and total[("blkio:0:0", "write")] == len(data)
    assert total[("blkio:0:0", "read")] >= len(data)
    assert ("cpu", "user") not in total and ("mem", "rss") not in total  # the container's, not ours
