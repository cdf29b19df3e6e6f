"""A CWL workflow run by cwltool with Docker, reading inputs from two clusters through fedmount.

One fedmount mount (`--mount-by-id by_id --allow-other`) serves both inputs: a table from
the home cluster (zzzzz, by PDH) and a note from a remote cluster (zcccc, by UUID). The
workflow (integration/cwl/two-clusters.cwl) runs in the locally imported busybox image
(`DockerRequirement.dockerImageId`, `--disable-pull`: no registry); cwltool binds the input
files from the mount into each step's container. The outputs must hold the right bytes,
the mount must have read from Keep, and after the test nothing is mounted and no container
is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration import images
from integration.test_runner import _docker_usable, _fuse_usable

REPO = Path(__file__).resolve().parent.parent
CWLTOOL = Path(sys.executable).parent / "cwltool"
FEDMOUNT = [sys.executable, "-c", "import sys; from fedmount.cli import main; sys.exit(main())"]

pytestmark = [
    pytest.mark.skipif(_fuse_usable() is not None, reason=str(_fuse_usable())),
    pytest.mark.skipif(not CWLTOOL.exists(), reason="cwltool is not installed (pip install cwltool)"),
]


@pytest.fixture
def mount(fed, tmp_path):
    why = _docker_usable()
    if why:
        pytest.skip(why)
    images.ensure_image()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "fedmount.log", "w")
    proc = subprocess.Popen(
        [
            *FEDMOUNT,
            "--foreground",
            "--allow-other",
            "--ram-cache",
            "--file-cache",
            str(64 << 20),
            "--mount-by-id",
            "by_id",
            str(mnt),
        ],
        env=fed.env("zzzzz"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (mnt / "by_id" / "README").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "fedmount.log"
            ).read_text()
            time.sleep(0.1)
        yield mnt
    finally:
        subprocess.run([*FEDMOUNT, "--unmount", str(mnt)], env=fed.env("zzzzz"), timeout=30)
        proc.wait(timeout=30)
        log.close()
        assert str(mnt) not in Path("/proc/mounts").read_text()


def test_cwl_workflow_reads_inputs_from_two_clusters_through_the_mount(fed, mount, tmp_path):
    text, nested = fed.collections["text"], fed.collections["nested"]
    job = {
        "table": {"class": "File", "path": f"{mount}/by_id/{text['portable_data_hash']}/data/numbers.csv"},
        "note": {"class": "File", "path": f"{mount}/by_id/{nested['uuid']}/a/b/c/deep.txt"},
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    proc = subprocess.run(
        [
            str(CWLTOOL),
            "--disable-pull",
            "--outdir",
            str(out),
            "--tmpdir-prefix",
            f"{work}/",
            "--tmp-outdir-prefix",
            f"{work}/",
            str(REPO / "integration" / "cwl" / "two-clusters.cwl"),
            str(tmp_path / "job.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout)
    assert Path(outputs["count"]["path"]).read_text().strip() == "1000"
    assert Path(outputs["report"]["path"]).read_text() == "deep\n1000\n"
    stats = json.loads((mount / ".fedmount" / "stats.json").read_text())
    assert sum(stats.get("keep_bytes", {}).values()) > 0
    if shutil.which("docker"):
        ps = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "ancestor=fedmount-test/busybox:1"],
            capture_output=True,
            text=True,
        )
        assert ps.stdout.split() == []
