"""Placement without sockets: exported instance types, what a record needs, `locate --for`'s
ranking over a fake federation, `stage --to-cluster` against fake keepstores, and the
`--check` document."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from test_locality import HOME, TOKEN, B, C, FakeFederation, FakeKeepstores, MiB, cache_at, client, make_block

from fedmount.api.cluster_config import ConfigError, instance_types, remote_clusters
from fedmount.arvados.ids import parse_locator
from fedmount.blocks.throughput import ThroughputBook
from fedmount.locality.cluster_stage import ClusterKeep, CopyRecord, stage_to_cluster
from fedmount.locality.placement import place
from fedmount.locality.stage_report import Outcome
from fedmount.runner.check import CheckReport, InputAnswer, Reason
from fedmount.runner.requirements import Capacity, Requirements, compare, instance_capacity, shortfalls
from fedmount.runner.spec import parse_record

GiB = 1 << 30
NO_GPU = {"Stack": "", "DriverVersion": "", "HardwareTarget": "", "DeviceCount": 0, "VRAM": 0}


def itype(vcpus: int, ram: int, scratch: int, price: float, gpu: dict | None = None) -> dict:
    return {"ProviderType": "x", "VCPUs": vcpus, "RAM": ram, "IncludedScratch": scratch, "AddedScratch": 0,
            "Price": price, "Preemptible": False, "GPU": gpu or NO_GPU}  # fmt: skip


A_GPU = {"Stack": "cuda", "DriverVersion": "12.4", "HardwareTarget": "8.6", "DeviceCount": 1,
         "VRAM": 24 * GiB}  # fmt: skip
PROXY = {"Proxy": True}
CONFIGS = {
    HOME: {"InstanceTypes": {"m1.xlarge": itype(16, 64 * GiB, 256 * GiB, 0.8),
                             "m1.small": itype(2, 8 * GiB, 32 * GiB, 0.1)},
           "RemoteClusters": {B: PROXY, C: PROXY, "*": {"Proxy": False}}},
    B: {"InstanceTypes": {"g1.large": itype(8, 64 * GiB, 128 * GiB, 1.5, A_GPU)},
        "RemoteClusters": {HOME: PROXY, C: PROXY}},
    C: {"InstanceTypes": {"t1.micro": itype(1, GiB, 8 * GiB, 0.01)}, "RemoteClusters": {HOME: PROXY}},
}  # fmt: skip


def spec_for(pdh: str, **constraints: object):  # type: ignore[no-untyped-def]
    return parse_record({
        "command": ["true"], "container_image": "img", "output_path": "/out",
        "mounts": {"/in": {"kind": "collection", "portable_data_hash": pdh},
                   "/out": {"kind": "tmp", "capacity": GiB}},
        "runtime_constraints": constraints,
    })  # fmt: skip


class PlacingFederation(FakeFederation):
    async def exported_config(self, cluster: str) -> dict:
        return CONFIGS[cluster]


def test_instance_types_read_both_gpu_schemas_cheapest_first():
    cuda = {"DriverVersion": "11.0", "HardwareCapability": "9.0", "DeviceCount": 2}
    old = {"InstanceTypes": {"a": {"VCPUs": 4, "RAM": 1, "Price": 2.0, "CUDA": cuda},
                             "b": itype(1, 2, 3, 1.0)}}  # fmt: skip
    a_type, b_type = instance_types(B, old)[1], instance_types(B, old)[0]
    assert b_type.name == "b" and b_type.gpu is None and b_type.scratch == 3
    assert a_type.gpu is not None
    assert (a_type.gpu.stack, a_type.gpu.device_count, a_type.gpu.vram) == ("cuda", 2, 0)
    [g] = instance_types(B, CONFIGS[B])
    assert g.gpu is not None and g.gpu.vram == 24 * GiB and g.gpu.driver_version == "12.4"
    with pytest.raises(ConfigError, match="InstanceTypes.bad.RAM"):
        instance_types(B, {"InstanceTypes": {"bad": {"RAM": -1}}})
    assert remote_clusters(CONFIGS[HOME]) == {B, C}


def test_requirements_add_the_mounts_caches_and_round_cpus_up():
    spec = spec_for("d41d8cd98f00b204e9800998ecf8427e+0", ram=GiB, keep_cache_ram=256 * MiB,
                    keep_cache_disk=2 * GiB, vcpus=1.5)  # fmt: skip
    need = Requirements.of(spec)
    assert (need.ram, need.vcpus, need.scratch, need.gpus) == (GiB + 256 * MiB, 2, 3 * GiB, 0)
    assert set(compare(need, Capacity(8 * GiB, 4, 100 * GiB))) == {"ram", "vcpus", "scratch"}
    assert shortfalls(need, Capacity(GiB, 1, GiB)).keys() == {"ram", "vcpus", "scratch"}


ONE_GPU = Capacity(GiB, 1, GiB, 1, "cuda", "12.4", GiB)


@pytest.mark.parametrize(("gpu", "have", "why"), [
    ({"device_count": 1}, Capacity(GiB, 1, GiB), "has none"),
    ({"device_count": 1, "driver_version": "12.10"}, ONE_GPU, "driver 12.10"),
    ({"device_count": 1, "vram": 2 * GiB}, ONE_GPU, "GPU memory"),
    ({"device_count": 1, "stack": "rocm"}, ONE_GPU, "rocm"),
])  # fmt: skip
def test_a_gpu_falls_short_in_one_line_that_says_how(gpu, have, why):
    need = Requirements.of(spec_for("d41d8cd98f00b204e9800998ecf8427e+0", gpu=gpu))
    assert why in shortfalls(need, have)["gpu"]
    cuda = Requirements.of(spec_for("d41d8cd98f00b204e9800998ecf8427e+0", cuda={"device_count": 1}))
    assert cuda.gpus == 1 and cuda.gpu_stack == "cuda"


@pytest.fixture
def world() -> tuple[FakeKeepstores, PlacingFederation]:
    """The fake keepstores, and the fake federation over them with exported configs."""
    keep = FakeKeepstores()
    return keep, PlacingFederation(keep)


async def test_placement_ranks_fit_then_bytes_then_price(world, tmp_path):
    keep, placing = world
    pdh = placing.add("zbbbb-4zz18-000000000000001", [make_block("p", 1000), make_block("q", 500)], on=(B,))
    book = ThroughputBook.in_cache_dir(None)
    report = await place(spec_for(pdh, ram=4 * GiB), placing, client(keep), cache_at(tmp_path), book)
    assert [c.cluster for c in report.clusters] == [B, HOME, C]
    assert report.best == B and report.exit_status() == 0
    doc = report.to_json()
    rows = {c["cluster"]: c for c in doc["clusters"]}
    assert rows[B]["bytes_crossing"] == 0 and rows[HOME]["bytes_crossing"] == 1500
    assert rows[HOME]["instance_type"]["name"] == "m1.small" and rows[C]["instance_type"] is None
    assert doc["cwl_hint"] == {"arv:ClusterTarget": {"cluster_id": B}}
    assert "cluster_id: zbbbb" in report.render()
    gpu_spec = spec_for(pdh, gpu={"device_count": 1})
    gpu = await place(gpu_spec, placing, client(keep), cache_at(tmp_path), book)
    assert [c.can_run for c in gpu.clusters] == [True, False, False] and gpu.best == B
    none = await place(spec_for(pdh, ram=1 << 40), placing, client(keep), cache_at(tmp_path), book)
    assert none.best is None and none.exit_status() == 1 and "no cluster" in none.render()


async def test_placement_of_an_unknown_input_is_an_error_naming_its_field(world, tmp_path):
    keep, placing = world
    report = await place(spec_for("0" * 31 + "1+12"), placing, client(keep), cache_at(tmp_path),
                         ThroughputBook.in_cache_dir(None))  # fmt: skip
    assert report.exit_status() == 2 and report.error.startswith('mounts["/in"].portable_data_hash: ')


class CopyingKeepstore:
    """The home keepstore for `stage --to-cluster`: a +R HEAD with X-Keep-Signature: local copies the
    block from `source` and answers a locally signed X-Keep-Locator; a plain HEAD finds stored blocks."""

    def __init__(self, source: FakeKeepstores):
        self.source = source
        self.stored: set[str] = set()
        self.copies = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "HEAD" and request.headers["Authorization"] == f"Bearer {TOKEN[HOME]}"
        loc = parse_locator(request.url.path[1:])
        if request.headers.get("X-Keep-Signature", "").startswith("local, ") and loc.remote:
            if loc.hash not in self.source.blocks[loc.remote[0]]:
                return httpx.Response(404)
            self.copies += 1
            self.stored.add(loc.hash)
            expiry = format(int(time.time()) + 86400, "x")
            return httpx.Response(200, headers={"X-Keep-Locator": f"{loc.key}+A{'1' * 40}@{expiry}"})
        return httpx.Response(200 if loc.signature and loc.hash in self.stored else 404)


async def test_stage_to_the_home_cluster_copies_each_block_once_and_resumes(world, tmp_path):
    keep, fed = world
    blocks = [make_block("s", 1000), make_block("t", 700), b""]
    fed.add("zbbbb-4zz18-000000000000002", blocks, on=(B,))
    store = CopyingKeepstore(keep)
    cluster_keep = ClusterKeep(transport=httpx.MockTransport(store))
    record = CopyRecord(str(tmp_path / "cache"))
    first = await stage_to_cluster(["zbbbb-4zz18-000000000000002"], fed, HOME, cluster_keep, record,
                                   progress_stream=None)  # fmt: skip
    [summary] = first.summaries()
    assert first.complete and store.copies == 2 and summary.count(Outcome.FETCHED).bytes == 1700
    assert json.loads(json.dumps(first.to_json()))["cluster"] == HOME
    again = await stage_to_cluster(["zbbbb-4zz18-000000000000002"], fed, HOME, cluster_keep, record,
                                   progress_stream=None)  # fmt: skip
    assert again.complete and store.copies == 2 and again.summaries()[0].count(Outcome.CACHED).blocks == 3
    assert "already there" in again.render() and f"in {HOME}'s Keep" in again.render()
    refused = await stage_to_cluster(["zbbbb-4zz18-000000000000002"], fed, B, cluster_keep, record,
                                     progress_stream=None)  # fmt: skip
    assert refused.exit_status() == 2 and "only the home cluster (zzzzz)" in (refused.error or "")
    record.close()
    await cluster_keep.aclose()


async def test_a_block_no_cluster_holds_fails_with_its_reason(world, tmp_path):
    keep, fed = world
    fed.add("zbbbb-4zz18-000000000000003", [make_block("u", 100)], on=(B,))
    keep.blocks[B].clear()
    cluster_keep = ClusterKeep(transport=httpx.MockTransport(CopyingKeepstore(keep)))
    report = await stage_to_cluster(["zbbbb-4zz18-000000000000003"], fed, HOME, cluster_keep,
                                    CopyRecord(None), progress_stream=None)  # fmt: skip
    [summary] = report.summaries()
    assert not report.complete and "could not copy it from zbbbb" in summary.failed[0]
    await cluster_keep.aclose()


def test_the_check_document_says_no_when_any_reason_is_not_met():
    key = hashlib.md5(b"x").hexdigest()
    report = CheckReport("host1", "docker", [Reason("runtime", True, "docker is usable"),
                                             Reason("ram", False, "needs 9 GiB, has 8 GiB")],
                         [InputAnswer('mounts["/in"].uuid', f"{key}+1", f"{key}+1", True, 1)])  # fmt: skip
    doc = report.to_json()
    assert doc["result"] == "NO" and report.exit_status() == 1
    assert doc["reasons"][1] == {"check": "ram", "ok": False, "field": None,
                                 "detail": "needs 9 GiB, has 8 GiB"}  # fmt: skip
    assert doc["estimate"] == {"bytes_to_transfer": 0, "seconds": 0} and doc["inputs"][0]["estimate"] is None
    assert "NO  ram: needs 9 GiB" in report.render()


def test_instance_capacity_carries_the_gpu():
    [g] = instance_types(B, CONFIGS[B])
    cap = instance_capacity(g)
    assert (cap.gpus, cap.gpu_stack, cap.gpu_vram) == (1, "cuda", 24 * GiB)


def test_the_saved_manifest_has_the_clusters_own_locators_and_the_same_pdh():
    from fedmount.arvados.manifest import portable_data_hash
    from fedmount.locality.cluster_stage import local_manifest

    h1, h2 = hashlib.md5(b"a").hexdigest(), hashlib.md5(b"bc").hexdigest()
    remote1, remote2 = f"{h1}+1+Rzbbbb-{'2' * 40}@7fffffff", f"{h2}+2+Rzbbbb-{'3' * 40}@7fffffff"
    text = f". {remote1} {remote2} 0:3:f.txt\n./d {h1}+1 0:1:g\n"
    local = {f"{h1}+1": parse_locator(f"{h1}+1+A{'4' * 40}@7fffffff")}
    out = local_manifest(text, local)
    assert out.splitlines()[0].split()[1] == f"{h1}+1+A{'4' * 40}@7fffffff"
    assert f"{h2}+2+Rzbbbb-" in out and out.splitlines()[1] == f"./d {h1}+1+A{'4' * 40}@7fffffff 0:1:g"
    assert portable_data_hash(out) == portable_data_hash(text)
