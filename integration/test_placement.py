"""Placement on the emulated federation: ``fedmount locate --for RECORD`` and
``fedmount stage --to-cluster X``.

The emulated clusters export different instance types (`integration/cluster/profiles.py`):
general-purpose ones at home (zzzzz), a GPU type on zbbbb, only small-memory types on
zcccc, so the same record gets a different answer from each. Staging to a cluster is
checked through the request log: the remote blocks reach the home keepstore from the
owning cluster's keepstores (``from_service``), this host only sends HEADs, and a second
run copies nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedmount.arvados.ids import parse_locator
from fedmount.locality.cluster_stage import CopyRecord
from integration.test_locality import (
    REPO,
    MiB,
    assert_home_token_stayed_home,
    block_keys,
    cli,
    env_for,
    keep_requests,
    place,
)

GiB = 1 << 30
PLACEMENT_KEYS = {"schema", "record", "complete", "error", "requirements", "inputs", "clusters", "best",
                  "cwl_hint"}  # fmt: skip
CLUSTER_KEYS = {"cluster", "rank", "can_run", "instance_type", "reaches_inputs", "bytes_held",
                "bytes_crossing", "reasons", "error"}  # fmt: skip


def record(tmp_path: Path, pdh: str, **constraints: object) -> str:
    path = tmp_path / f"record-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({
        "command": ["true"], "container_image": "arvados/jobs", "output_path": "/out",
        "mounts": {"/in": {"kind": "collection", "portable_data_hash": pdh},
                   "/out": {"kind": "tmp", "capacity": GiB}},
        "runtime_constraints": constraints,
    }))  # fmt: skip
    return str(path)


def placement(fed, tmp_path: Path, path: str) -> tuple[int, dict]:
    run = cli(fed, tmp_path / "cache", "locate", "--json", "--for", path)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode, json.loads(run.stdout)


def test_locate_for_ranks_the_cluster_holding_the_inputs_first_and_prints_its_hint(fed, tmp_path):
    entry = place(fed, f"plc-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    size = 3 * MiB + 1000
    mark = fed.mark()
    path = record(tmp_path, entry["portable_data_hash"], ram=4 * GiB, vcpus=2)
    status, doc = placement(fed, tmp_path, path)
    assert status == 0 and set(doc) == PLACEMENT_KEYS and doc["schema"] == "fedmount-placement/1"
    assert all(set(c) == CLUSTER_KEYS for c in doc["clusters"])
    rows = {c["cluster"]: c for c in doc["clusters"]}
    assert [c["cluster"] for c in doc["clusters"]] == ["zbbbb", "zzzzz", "zcccc"]
    zb = rows["zbbbb"]
    assert (zb["can_run"], zb["bytes_crossing"], zb["bytes_held"]) == (True, 0, size)
    assert rows["zbbbb"]["instance_type"]["name"] == "c1.medium"
    assert (rows["zzzzz"]["can_run"], rows["zzzzz"]["bytes_crossing"]) == (True, size)
    assert rows["zzzzz"]["instance_type"]["name"] == "m1.small" and rows["zzzzz"]["reaches_inputs"]
    assert not rows["zcccc"]["can_run"] and rows["zcccc"]["instance_type"] is None
    assert any("no instance type fits" in r and "memory" in r for r in rows["zcccc"]["reasons"])
    assert doc["best"] == "zbbbb" and doc["cwl_hint"] == {"arv:ClusterTarget": {"cluster_id": "zbbbb"}}
    assert doc["requirements"]["ram"] == 4 * GiB and doc["requirements"]["scratch"] == GiB
    assert_home_token_stayed_home(fed, mark)

    text = cli(fed, tmp_path / "cache", "locate", "--for", record(tmp_path, entry["portable_data_hash"],
                                                                      ram=4 * GiB))  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "arv:ClusterTarget:\n    cluster_id: zbbbb" in text.stdout
    assert 'arv: "http://arvados.org/cwl#"' in text.stdout


def test_locate_for_a_gpu_step_names_the_one_cluster_with_a_gpu_type(fed, tmp_path):
    entry = place(fed, f"plg-{uuid.uuid4().hex[:8]}", ("zzzzz",))
    gpu = {"stack": "cuda", "device_count": 1, "driver_version": "12.0", "vram": 16 * GiB}
    status, doc = placement(fed, tmp_path, record(tmp_path, entry["portable_data_hash"], ram=GiB, gpu=gpu))
    rows = {c["cluster"]: c for c in doc["clusters"]}
    assert status == 0 and doc["best"] == "zbbbb" and rows["zbbbb"]["instance_type"]["name"] == "g1.large"
    assert rows["zbbbb"]["instance_type"]["gpus"] == 1 and rows["zbbbb"]["bytes_crossing"] == 3 * MiB + 1000
    assert not rows["zzzzz"]["can_run"] and any("GPU" in r for r in rows["zzzzz"]["reasons"])
    assert [c["can_run"] for c in doc["clusters"]] == [True, False, False]


def test_locate_for_a_step_no_cluster_fits_exits_1_and_a_bad_record_2(fed, tmp_path):
    entry = place(fed, f"pln-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    status, doc = placement(fed, tmp_path, record(tmp_path, entry["portable_data_hash"], ram=1 << 40))
    assert status == 1 and doc["best"] is None and doc["cwl_hint"] is None
    assert not any(c["can_run"] for c in doc["clusters"])
    human = cli(fed, tmp_path / "cache", "locate", "--for", record(tmp_path, entry["portable_data_hash"],
                                                                       ram=1 << 40))  # fmt: skip
    assert human.returncode == 1 and "no cluster of the federation can run this step" in human.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"command": []}')
    run = cli(fed, tmp_path / "cache", "locate", "--for", str(bad))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "command" in run.stderr


def test_stage_to_the_home_cluster_copies_remote_blocks_keepstore_to_keepstore_once(fed, tmp_path):
    entry = place(fed, f"stc-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    keys = block_keys(fed, entry)
    mark = fed.mark()
    run = cli(fed, tmp_path / "cache", "stage", "--to-cluster", "zzzzz", "--json", "--quiet", entry["uuid"])
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    [col] = doc["collections"]
    assert doc["schema"] == "fedmount-stage/1" and doc["cluster"] == "zzzzz" and doc["complete"]
    assert col["fetched"] == {"blocks": len(keys), "bytes": 3 * MiB + 1000}
    assert col["already_cached"]["blocks"] == 0
    # The home keepstore fetched each block from zbbbb; this host sent HEADs only.
    pulled = keep_requests(fed, mark, cluster="zbbbb", method="GET")
    assert len(pulled) == len(keys) and all((r["from_service"] or "").startswith("zzzzz/") for r in pulled)
    mine = [r for r in keep_requests(fed, mark) if r["from_service"] is None]
    assert mine and {r["method"] for r in mine} == {"HEAD"} and {r["cluster"] for r in mine} == {"zzzzz"}
    assert_home_token_stayed_home(fed, mark)
    # The blocks are in the home cluster's Keep, signed for the home token.
    copies = CopyRecord(str(tmp_path / "cache"))
    for key in keys:
        local = copies.get("zzzzz", key)
        assert local is not None and local.signature is not None and parse_locator(str(local)).key == key
        heads = [fed.request("zzzzz", f"/{local}", service=s, method="HEAD", token=fed.token()).status
                 for s in ("keep0", "keep1")]  # fmt: skip
        assert 200 in heads, heads
    copies.close()

    again_mark = fed.mark()
    again = cli(fed, tmp_path / "cache", "stage", "--to-cluster", "zzzzz", "--json", "--quiet", entry["uuid"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["collections"][0]["already_cached"]["blocks"] == len(keys)
    assert keep_requests(fed, again_mark, cluster="zbbbb") == []  # nothing crossed clusters again


def test_stage_to_another_cluster_is_refused_in_one_line(fed, tmp_path):
    entry = place(fed, f"str-{uuid.uuid4().hex[:8]}", ("zcccc",))
    run = cli(fed, tmp_path / "cache", "stage", "--to-cluster", "zbbbb", "--quiet", entry["uuid"])
    assert run.returncode == 2 and "only the home cluster (zzzzz)" in run.stderr


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_a_collection_saved_on_the_home_cluster_is_read_by_another_host_with_no_cross_cluster_get(
    fed, tmp_path
):
    entry = place(fed, f"sts-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    name = f"local copy {uuid.uuid4().hex[:6]}"
    run = cli(fed, tmp_path / "stager", "stage", "--to-cluster", "zzzzz", "--save-as", name, "--json",
              "--quiet", entry["uuid"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    saved = json.loads(run.stdout)["saved"]
    assert saved["name"] == name and saved["uuid"].startswith("zzzzz-4zz18-")
    assert saved["portable_data_hash"] == entry["portable_data_hash"]
    located = cli(fed, tmp_path / "stager", "locate", "--cluster", "zzzzz", entry["portable_data_hash"])
    assert located.returncode == 0, located.stdout + located.stderr  # zzzzz now holds every block

    # Another host of zzzzz: a new cache directory, a real mount, the saved collection.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mark = fed.mark()
    cmd = [sys.executable, "-m", "fedmount", "--disk-cache-dir", str(tmp_path / "other-host"), str(mnt),
           "--exec", "md5sum", str(mnt / "by_id" / saved["uuid"] / "data.bin")]  # fmt: skip
    read = subprocess.run(cmd, env=env_for(fed), cwd=REPO, text=True, capture_output=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert read.stdout.split()[0] == entry["files"]["data.bin"]["md5"]
    gets = keep_requests(fed, mark, method="GET")
    assert gets and {r["cluster"] for r in gets} == {"zzzzz"}  # read from the home keepstores only
    assert all(r["from_service"] is None for r in gets)  # and none of them fetched from zbbbb
