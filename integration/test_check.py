"""``fedmount-run --check RECORD`` on this host against the emulated federation: YES, and NO
for each reason (a runtime, the image, memory, CPUs, scratch space, a GPU, a missing block,
an input the token may not read), with the fedmount-check/1 document checked field by field.

Docker is needed for the YES (the busybox test image, `integration/images.py`); the test
says so when it skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from integration import images
from integration.test_locality import MiB, block_keys, place
from integration.test_runner import REPO

CHECK = [sys.executable, "-m", "fedmount.runner.cli", "--check", "--json"]
TOP_KEYS = {"schema", "result", "host", "runtime", "reasons", "inputs", "estimate"}
INPUT_KEYS = {"field", "id", "portable_data_hash", "readable", "bytes", "bytes_cached", "bytes_by_cluster",
              "estimate"}  # fmt: skip


@pytest.fixture(scope="module")
def docker():
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    script = str(REPO / "integration" / "ensure_docker.sh")
    ready = subprocess.run(["sh", script], capture_output=True, text=True)
    if ready.returncode != 0:
        pytest.skip(f"no Docker daemon: {ready.stderr.strip()}")
    images.ensure_image()


def check(fed, tmp_path: Path, record: dict, *args: str, env: dict | None = None) -> tuple[int, dict]:
    path = tmp_path / f"rec-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(record))
    run = subprocess.run([*CHECK, str(path), *args], env=env or fed.env(), cwd=REPO, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    assert run.returncode in (0, 1), (run.returncode, run.stderr)
    doc = json.loads(run.stdout)
    assert set(doc) == TOP_KEYS and doc["schema"] == "fedmount-check/1"
    assert all(set(i) == INPUT_KEYS for i in doc["inputs"])
    assert all(set(r) == {"check", "ok", "field", "detail"} for r in doc["reasons"])
    assert (run.returncode == 0) == (doc["result"] == "YES")
    return run.returncode, doc


def record(pdh: str, image: str = images.IMAGE, **constraints: object) -> dict:
    return {"command": ["true"], "container_image": image, "output_path": "/out",
            "mounts": {"/in": {"kind": "collection", "portable_data_hash": pdh}, "/out": {"kind": "tmp"}},
            "runtime_constraints": {"ram": 64 * MiB, "vcpus": 1, **constraints}}  # fmt: skip


def failed(doc: dict) -> dict[str, str]:
    return {r["check"]: r["detail"] for r in doc["reasons"] if not r["ok"]}


def test_check_says_yes_with_bytes_per_cluster_and_an_estimate(fed, tmp_path, docker):
    entry = place(fed, f"chk-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    status, doc = check(fed, tmp_path, record(entry["portable_data_hash"]))
    assert status == 0 and doc["result"] == "YES" and doc["runtime"] == "docker", failed(doc)
    assert {r["check"] for r in doc["reasons"]} == {"runtime", "image", "ram", "vcpus", "scratch", "input"}
    [one] = doc["inputs"]
    size = 3 * MiB + 1000
    assert one["field"] == 'mounts["/in"].portable_data_hash' and one["readable"] and one["bytes"] == size
    assert one["bytes_by_cluster"] == {"zzzzz": 0, "zbbbb": size, "zcccc": 0} and one["bytes_cached"] == 0
    assert one["estimate"]["bytes"] == size and one["estimate"]["seconds"] > 0
    assert doc["estimate"] == {"bytes_to_transfer": size, "seconds": one["estimate"]["seconds"]}


def test_check_reads_an_image_collection_without_mounting_it(fed, tmp_path, docker):
    tar = Path(images.save_image(str(tmp_path)))
    image = fed.add_collection("zbbbb", f"check-image-{uuid.uuid4().hex[:6]}", {tar.name: tar.read_bytes()})
    entry = place(fed, f"chi-{uuid.uuid4().hex[:8]}", ("zcccc",))
    status, doc = check(fed, tmp_path, record(entry["portable_data_hash"], image=image["portable_data_hash"]))
    assert status == 0, failed(doc)
    [detail] = [r["detail"] for r in doc["reasons"] if r["check"] == "image"]
    assert detail.endswith(tar.name)
    assert {i["field"] for i in doc["inputs"]} == {'mounts["/in"].portable_data_hash', "container_image"}


def test_check_says_no_for_each_reason_it_finds(fed, tmp_path, docker):
    entry = place(fed, f"chn-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    pdh = entry["portable_data_hash"]
    _, doc = check(fed, tmp_path, record(pdh, image="fedmount-test/absent:0"))
    assert set(failed(doc)) == {"image"} and "not a local Docker image" in failed(doc)["image"]
    _, doc = check(fed, tmp_path, record(pdh, ram=1 << 50, vcpus=4096))
    assert set(failed(doc)) == {"ram", "vcpus"} and "memory" in failed(doc)["ram"]
    _, doc = check(fed, tmp_path, record(pdh, gpu={"stack": "cuda", "device_count": 1}))
    if shutil.which("nvidia-smi") is None:
        assert set(failed(doc)) == {"gpu"} and "has none" in failed(doc)["gpu"]
    missing = "0" * 31 + "1+12"
    _, doc = check(fed, tmp_path, record(missing))
    assert set(failed(doc)) == {"input"} and "not found" in failed(doc)["input"]
    gone = place(fed, f"chg-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    key = block_keys(fed, gone)[0]
    assert any([fed.delete_block("zbbbb", svc, key) for svc in ("keep0", "keep1")])
    _, doc = check(fed, tmp_path, record(gone["portable_data_hash"]))
    assert set(failed(doc)) == {"input"} and "1 of 4 blocks cannot be read" in failed(doc)["input"]
    assert doc["inputs"][0]["readable"] is False


def test_check_says_no_when_the_scratch_space_asked_exceeds_the_hosts(fed, tmp_path, docker):
    entry = place(fed, f"chs-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    rec = record(entry["portable_data_hash"])
    rec["mounts"]["/out"] = {"kind": "tmp", "capacity": 1 << 50}  # 1 PiB of tmp
    status, doc = check(fed, tmp_path, rec, "--tmpdir", str(tmp_path))
    assert status == 1 and doc["result"] == "NO"
    assert set(failed(doc)) == {"scratch"}, failed(doc)
    assert failed(doc)["scratch"].startswith("needs 1048576.0 GiB of scratch space, has "), failed(doc)
    rec["mounts"]["/out"]["capacity"] = 1 << 20  # what this host has: yes again
    assert check(fed, tmp_path, rec, "--tmpdir", str(tmp_path))[1]["result"] == "YES"


def test_check_says_no_naming_an_input_another_user_keeps_private(fed, tmp_path, docker):
    secret = fed.hidden[f"{fed.home}:other/private/secret"]  # the second user's, shared with nobody
    assert secret["why"] == "private"
    mine = place(fed, f"chp-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    rec = record(mine["portable_data_hash"])
    rec["mounts"]["/secret"] = {"kind": "collection", "uuid": secret["uuid"]}
    status, doc = check(fed, tmp_path, rec)
    assert status == 1 and doc["result"] == "NO"
    [refused] = [r for r in doc["reasons"] if not r["ok"]]
    assert refused["check"] == "input" and refused["field"] == 'mounts["/secret"].uuid', refused
    assert secret["uuid"] in refused["detail"] and "not readable with this token" in refused["detail"]
    by_field = {i["field"]: i for i in doc["inputs"]}
    assert by_field['mounts["/in"].portable_data_hash']["readable"]  # the other input still answered
    assert by_field['mounts["/secret"].uuid']["readable"] is False
    owner = check(fed, tmp_path, rec, env={**fed.env(), "ARVADOS_API_TOKEN": fed.other_token()})[1]
    assert owner["result"] == "YES", failed(owner)  # its owner may read it


def test_check_without_any_runtime_says_no_and_why(fed, tmp_path):
    entry = place(fed, f"chr-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    env = {**fed.env(), "PATH": str(tmp_path / "empty-path")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    _, doc = check(fed, tmp_path, record(entry["portable_data_hash"]), env=env)
    assert doc["runtime"] is None and "no runtime" in failed(doc)["runtime"] and "image" in failed(doc)


def test_check_of_a_refused_record_exits_2_in_one_line(fed, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"command": ["true"]}')
    run = subprocess.run([*CHECK, str(path)], env=fed.env(), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "container_image" in run.stderr
