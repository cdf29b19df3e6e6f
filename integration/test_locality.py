"""``fedmount locate`` and ``fedmount stage`` against the emulated federation.

The same content is placed on one, two and three clusters (the harness's add-collection
control; identical files give the identical PDH), and one block is deleted from one
cluster's keepstores for partial placement. Staging is checked through the request log:
a staged collection is read through the library's BlockReader, and through a real
``fedmount --exec`` mount, with no request to any keepstore, and a stage interrupted with
SIGINT resumes without fetching any block it had already cached. With ``--route auto`` (the
default, as for the mount) locate says per remote cluster whether its blocks are read from
its own keepstores or through the home, and stage reads them that way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedmount.api.federation import Federation
from fedmount.arvados.ids import parse_collection_id
from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import parse_token, salt_for
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.locality.federation_view import keep_client_for
from fedmount.locality.stage import stage_collections

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def settings_for(fed, tmp_path) -> Settings:
    return Settings.from_environment(fed.env(), settings_file=str(tmp_path / "none.conf"))


def env_for(fed) -> dict[str, str]:
    env = fed.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cli(fed, cache_dir: Path, *args: str, **popen: object):  # type: ignore[no-untyped-def]
    """``fedmount ARGS... --disk-cache-dir CACHE_DIR``: run to completion, or a Popen with `popen`."""
    cmd = [sys.executable, "-m", "fedmount", *args, "--disk-cache-dir", str(cache_dir)]
    env = env_for(fed)
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, **popen)
    return subprocess.run(cmd, env=env, cwd=REPO, text=True, capture_output=True, timeout=120)


def place(fed, name: str, clusters: tuple[str, ...], size: int = 3 * MiB + 1000) -> dict:
    """The same generated content on each of `clusters`; returns the first entry."""
    files = {"data.bin": (size, name)}
    entries = [fed.add_collection(c, f"{name}-{c}", files, block_size=MiB) for c in clusters]
    assert len({e["portable_data_hash"] for e in entries}) == 1
    return entries[0]


def block_keys(fed, entry: dict) -> list[str]:
    reply = fed.request(
        entry["cluster"], f"/arvados/v1/collections/{entry['uuid']}", token=fed.token(entry["cluster"])
    )
    return [loc.key for loc in parse_manifest(reply.json()["manifest_text"]).blocks()]


def keep_requests(fed, since: int, **match: object) -> list[dict]:
    return [r for r in fed.requests(since=since, **match) if r["service"].startswith("keep")]


def assert_home_token_stayed_home(fed, since: int) -> None:
    foreign = [r for r in fed.requests(since=since) if r["cluster"] != fed.home and r["token"] == fed.token()]
    assert foreign == [], f"the home token reached {sorted({(r['cluster'], r['service']) for r in foreign})}"


def test_locate_counts_blocks_on_one_two_and_three_clusters_and_partial(fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    one = place(fed, f"loc1-{tag}", ("zbbbb",))
    two = place(fed, f"loc2-{tag}", ("zbbbb", "zcccc"))
    three = place(fed, f"loc3-{tag}", ("zbbbb", "zcccc", "zzzzz"))
    partial = place(fed, f"locp-{tag}", ("zzzzz", "zcccc"))  # by its zzzzz UUID
    lost = block_keys(fed, partial)[1]
    assert any([fed.delete_block("zcccc", svc, lost) for svc in ("keep0", "keep1")])

    mark = fed.mark()
    ids = [one["uuid"], two["uuid"], three["portable_data_hash"], partial["uuid"]]
    run = cli(fed, tmp_path / "cache", "locate", "--json", "--route", "home", *ids)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["schema"] == "fedmount-locate/1" and doc["complete"] and doc["home_cluster"] == "zzzzz"
    cols = {c["id"]: c for c in doc["collections"]}
    size = 3 * MiB + 1000

    def held(col: dict) -> dict[str, tuple[int, int]]:
        return {name: (c["blocks_held"], c["bytes_held"]) for name, c in col["clusters"].items()}

    full, none = (4, size), (0, 0)
    assert held(cols[one["uuid"]]) == {"zzzzz": none, "zbbbb": full, "zcccc": none}
    assert held(cols[two["uuid"]]) == {"zzzzz": none, "zbbbb": full, "zcccc": full}
    assert held(cols[three["portable_data_hash"]]) == {"zzzzz": full, "zbbbb": full, "zcccc": full}
    lost_size = int(lost.split("+")[1])
    assert held(cols[partial["uuid"]]) == {"zzzzz": full, "zbbbb": none, "zcccc": (3, size - lost_size)}
    zc = cols[partial["uuid"]]["clusters"]["zcccc"]
    assert (zc["blocks_missing"], zc["bytes_missing"], zc["holds_all"]) == (1, lost_size, False)
    assert cols[one["uuid"]]["clusters"]["zzzzz"]["has_collection"] is False
    # home mode: a remote collection is served by its owner through the home keepstore
    assert cols[one["uuid"]]["served_by"] == {"zbbbb": {"blocks": 4, "bytes": size, "via": "zzzzz"}}
    assert cols[partial["uuid"]]["served_by"] == {"zzzzz": {"blocks": 4, "bytes": size, "via": None}}

    heads = keep_requests(fed, mark, method="HEAD")
    assert {r["cluster"] for r in heads} == {"zzzzz", "zbbbb", "zcccc"}
    assert keep_requests(fed, mark, method="GET") == []  # locate never reads data
    assert_home_token_stayed_home(fed, mark)

    human = cli(fed, tmp_path / "cache", "locate", "--route", "home", partial["uuid"])
    assert human.returncode == 0, human.stderr
    assert "zcccc    3/4" in human.stdout and "read route (home mode): zzzzz 4 blocks" in human.stdout


def test_locate_cluster_answers_yes_no_unknown_by_exit_status(fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    entry = place(fed, f"locx-{tag}", ("zbbbb", "zcccc"), size=2 * MiB)
    assert any([fed.delete_block("zcccc", svc, block_keys(fed, entry)[0]) for svc in ("keep0", "keep1")])
    cache = tmp_path / "cache"
    assert cli(fed, cache, "locate", "--cluster", "zbbbb", entry["uuid"]).returncode == 0
    no = cli(fed, cache, "locate", "--cluster", "zcccc", entry["uuid"])
    assert no.returncode == 1 and "zcccc holds everything: no" in no.stdout
    assert cli(fed, cache, "locate", "--cluster", "zzzzz", entry["uuid"]).returncode == 1

    fed.set_fault("zbbbb", "keep0", status=503)
    fed.set_fault("zbbbb", "keep1", status=503)
    unknown = cli(fed, cache, "locate", "--json", "--cluster", "zbbbb", entry["uuid"])
    assert unknown.returncode == 2
    doc = json.loads(unknown.stdout)
    assert doc["answer"] == "unknown" and "503" in doc["collections"][0]["clusters"]["zbbbb"]["error"]
    fed.clear_faults()

    bad = cli(fed, cache, "locate", "--json", "zbbbb-4zz18-zzzzzzzzzzzzzzz", "nonsense", entry["uuid"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    cols = json.loads(bad.stdout)["collections"]
    assert "not found" in cols[0]["error"] and "invalid" in cols[1]["error"] and cols[2]["complete"]


async def test_staged_collection_is_read_with_no_keep_request(fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    entry = place(fed, f"locs-{tag}", ("zbbbb",), size=5 * MiB + 77)
    settings = settings_for(fed, tmp_path)
    cache_dir = str(tmp_path / "cache")
    mark = fed.mark()
    report = await stage_collections([entry["uuid"]], settings, TieredCache(cache_dir, 1 << 30, 64 * MiB),
                                     mode="home", progress_stream=None)  # fmt: skip
    assert report.complete, report.render()
    gets = keep_requests(fed, mark, method="GET", cluster="zzzzz")  # via the home keepstore
    keys = set(block_keys(fed, entry))
    assert {r["path"].lstrip("/").split("+R")[0] for r in gets if r["status"] == 200} == keys
    assert_home_token_stayed_home(fed, mark)
    assert json.loads((tmp_path / "cache" / "locality-throughput.json").read_text())["clusters"]["zzzzz"]

    # a later reader (a fresh cache instance, as a mount would open it) needs no Keep at all
    mark = fed.mark()
    federation = await Federation.connect(settings)
    try:
        record = await federation.get_collection(parse_collection_id(entry["uuid"]))
        reader = BlockReader(keep_client_for(settings), TieredCache(cache_dir, 1 << 30, 64 * MiB))
        ((path, file),) = parse_manifest(record.manifest_text).walk()
        handle = reader.open(file, record.route)
        data = await handle.read(0, file.size)
        handle.close()
    finally:
        await federation.aclose()
    assert hashlib.md5(data).hexdigest() == entry["files"][path]["md5"]
    assert keep_requests(fed, mark) == []


def client_block_gets(fed, since: int) -> list[dict]:
    """Block GETs this host sent (not a keepstore proxying for it) that were answered 200."""
    gets = keep_requests(fed, since, method="GET")
    return [r for r in gets if r["status"] == 200 and not r.get("from_service")]


def block_key(path: str) -> str:
    return "+".join(path.lstrip("/").split("+")[:2])


def test_auto_locate_says_direct_and_stage_reads_the_remote_keepstores_with_the_salted_token(fed, tmp_path):
    entry = place(fed, f"loca-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    size, cache = 3 * MiB + 1000, tmp_path / "cache"
    run = cli(fed, cache, "locate", "--json", entry["uuid"])  # --route auto: the default
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    col = doc["collections"][0]
    assert doc["mode"] == "auto" and col["route"]["mode"] == "auto"
    way = col["route"]["remotes"]["zbbbb"]
    assert (way["way"], way["error"]) == ("direct", None) and "salted" in way["reason"]
    assert col["served_by"] == {"zbbbb": {"blocks": 4, "bytes": size, "via": None}}
    assert col["estimate"]["cluster"] == "zbbbb" and col["estimate"]["bytes"] == size
    human = cli(fed, cache, "locate", entry["uuid"])
    assert human.returncode == 0 and "zbbbb's blocks: read directly" in human.stdout

    mark = fed.mark()
    staged = cli(fed, cache, "stage", entry["uuid"])
    assert staged.returncode == 0, staged.stderr
    gets = client_block_gets(fed, mark)
    salted = salt_for(parse_token(fed.token()), "zbbbb").text
    assert {r["cluster"] for r in gets} == {"zbbbb"} and {r["token"] for r in gets} == {salted}
    assert sorted(block_key(r["path"]) for r in gets) == sorted(block_keys(fed, entry))  # each block once
    assert keep_requests(fed, mark, cluster="zzzzz") == []  # the home keepstore was not asked
    assert_home_token_stayed_home(fed, mark)
    book = json.loads((cache / "locality-throughput.json").read_text())["clusters"]
    assert "zzzzz" not in book  # what stage measured is zbbbb's own keepstores


def test_auto_reads_through_the_home_when_the_remote_keepstores_fail_this_host(fed, tmp_path):
    """The emulator's faults hit every client of a keepstore, the home keepstore's proxy reads
    too; so zbbbb's keepstores fail this host's first requests only (``count``), as
    integration/test_auto_route.py does for mounts: locate's HEAD at each of them (two rounds),
    then stage's first direct GET (one round). Both then go through the home, which reaches
    them again."""
    entry = place(fed, f"locah-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    size, cache = 3 * MiB + 1000, tmp_path / "cache"
    for svc in ("keep0", "keep1"):
        fed.set_fault("zbbbb", svc, status=503, count=2)
    # --cluster zzzzz: no HEAD at zbbbb for what it holds, only the way's
    run = cli(fed, cache, "locate", "--json", "--cluster", "zzzzz", entry["uuid"])
    assert run.returncode == 1, run.stderr  # answered: zzzzz has no copy
    assert fed.faults() == {}
    col = json.loads(run.stdout)["collections"][0]
    way = col["route"]["remotes"]["zbbbb"]
    assert way["way"] == "home" and "HTTP 503" in way["reason"] and way["error"] is None
    assert col["served_by"] == {"zbbbb": {"blocks": 4, "bytes": size, "via": "zzzzz"}}
    assert col["estimate"]["cluster"] == "zzzzz"

    for svc in ("keep0", "keep1"):
        fed.set_fault("zbbbb", svc, status=503, count=1)
    mark = fed.mark()
    staged = cli(fed, cache, "stage", "--concurrency", "1", entry["uuid"])
    assert staged.returncode == 0, staged.stderr
    assert fed.faults() == {}
    gets = client_block_gets(fed, mark)
    assert {r["cluster"] for r in gets} == {"zzzzz"} and {r["token"] for r in gets} == {fed.token()}
    assert sorted(block_key(r["path"]) for r in gets) == sorted(block_keys(fed, entry))
    direct = [r for r in keep_requests(fed, mark, cluster="zbbbb") if not r.get("from_service")]
    assert direct and all(r["status"] == 503 for r in direct) and len(direct) == 2
    assert_home_token_stayed_home(fed, mark)


def test_auto_reads_through_the_home_when_the_remote_lists_no_usable_keep_services(fed, tmp_path):
    """The trial fails (zbbbb's keep_services/accessible names its services with a malformed
    uuid, which fedmount refuses and the home keepstore's proxy does not mind): locate says
    home with that reason, and stage reads every block through the home with the home token."""
    entry = place(fed, f"locat-{uuid.uuid4().hex[:8]}", ("zbbbb",))
    cache = tmp_path / "cache"
    fed.set_fault("zbbbb", "controller", keep_service_uuid="not-a-uuid")
    run = cli(fed, cache, "locate", "--json", entry["uuid"])
    assert run.returncode == 2 and "Traceback" not in run.stderr  # zbbbb's holdings cannot be asked
    col = json.loads(run.stdout)["collections"][0]
    way = col["route"]["remotes"]["zbbbb"]
    assert way["way"] == "home" and "its keep services" in way["reason"] and way["error"] is None
    assert col["served_by"]["zbbbb"]["via"] == "zzzzz" and col["estimate"]["cluster"] == "zzzzz"
    human = cli(fed, cache, "locate", entry["uuid"])
    assert "zbbbb's blocks: read through zzzzz (its keep services" in human.stdout
    assert "auto route" not in human.stderr  # the report says it; no log line repeats it

    mark = fed.mark()
    staged = cli(fed, cache, "stage", entry["uuid"])
    assert staged.returncode == 0, staged.stderr
    gets = client_block_gets(fed, mark)
    assert {r["cluster"] for r in gets} == {"zzzzz"} and {r["token"] for r in gets} == {fed.token()}
    assert [r for r in keep_requests(fed, mark, cluster="zbbbb") if not r.get("from_service")] == []
    assert_home_token_stayed_home(fed, mark)


def cached_keys(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "blocks").glob("*/*") if "." not in p.name}


def interruptible() -> None:
    """In the child, before exec: SIGINT as a terminal delivers it. A test earlier in the same
    pytest process may leave SIGINT ignored or blocked, and both survive exec (a Python started
    with SIGINT ignored never raises KeyboardInterrupt): the stage would then not be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_interrupted_stage_resumes_without_refetching(fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    entry = place(fed, f"locr-{tag}", ("zzzzz",), size=8 * MiB)
    keys = set(block_keys(fed, entry))
    cache = tmp_path / "cache"
    for svc in ("keep0", "keep1"):
        fed.set_fault("zzzzz", svc, bandwidth=2 * MiB)  # half a second per block
    first = cli(fed, cache, "stage", "--concurrency", "1", entry["uuid"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)  # fmt: skip
    started = fed.mark()
    deadline = time.monotonic() + 60
    while len(cached_keys(cache)) < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    if first.poll() is None and len(cached_keys(cache)) < 2:
        first.kill()
        raise AssertionError(f"the stage fetched fewer than 2 blocks in 60 s: {first.communicate()[1]}")
    # Stall the keepstores before interrupting, so that a slow poll of this loop (a loaded CI
    # machine) cannot let the stage finish first: the interrupt always finds it mid-fetch.
    for svc in ("keep0", "keep1"):
        fed.set_fault("zzzzz", svc, stall=True)
    whole = len([r for r in keep_requests(fed, started, method="GET") if r["bytes"] == MiB])
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, f"{whole} whole GETs before the interrupt; {err}"
    assert "run the same command again" in err and "Traceback" not in err
    have = cached_keys(cache)
    assert 2 <= len(have) < len(keys)
    fed.clear_faults()

    mark = fed.mark()
    second = cli(fed, cache, "stage", entry["uuid"])
    assert second.returncode == 0, second.stderr
    # A GET the interrupted run left half-sent is logged when its keepstore notices, maybe after
    # `mark`: count the blocks sent whole.
    sent = [r for r in keep_requests(fed, mark, method="GET") if r["bytes"] == MiB]
    fetched = [r["path"].lstrip("/").split("+A")[0] for r in sent]
    assert sorted(fetched) == sorted(keys - have)  # each missing block once, nothing it already had
    assert cached_keys(cache) == keys
    assert "already cached" in second.stderr


def test_stage_pin_survives_eviction_until_unpin(fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    pinned = place(fed, f"locpin-{tag}", ("zzzzz",), size=3 * MiB)
    other = place(fed, f"loco-{tag}", ("zzzzz",), size=3 * MiB)
    cache = tmp_path / "cache"
    assert cli(fed, cache, "stage", "--pin", pinned["uuid"]).returncode == 0
    small = cli(fed, cache, "stage", "--disk-cache-size", "4M", other["uuid"])
    assert small.returncode == 2 and "evicted again" in small.stderr  # the pinned blocks stayed
    assert set(block_keys(fed, pinned)) <= cached_keys(cache)
    unpin = cli(fed, cache, "unpin", pinned["portable_data_hash"])
    assert unpin.returncode == 0 and "unpinned 3 blocks" in unpin.stdout
    assert cli(fed, cache, "stage", "--disk-cache-size", "4M", other["uuid"]).returncode == 0
    assert not set(block_keys(fed, pinned)) <= cached_keys(cache)


@pytest.mark.parametrize("route", ["direct"])
def test_locate_in_direct_mode_routes_to_the_owner(fed, tmp_path, route):
    entry = place(fed, f"locd-{uuid.uuid4().hex[:8]}", ("zcccc",), size=MiB + 5)
    run = cli(fed, tmp_path / "cache", "locate", "--json", "--route", route, entry["uuid"])
    assert run.returncode == 0, run.stderr
    col = json.loads(run.stdout)["collections"][0]
    assert col["route"] == {"cluster": "zcccc", "mode": "direct"}
    assert col["served_by"] == {"zcccc": {"blocks": 2, "bytes": MiB + 5, "via": None}}


def test_locate_with_a_cluster_down_reports_it_and_answers_the_rest(fed, tmp_path):
    entry = place(fed, f"locdown-{uuid.uuid4().hex[:8]}", ("zbbbb", "zcccc"), size=MiB)
    fed.set_fault("zcccc", "controller", down="refuse")
    started = time.monotonic()
    run = cli(fed, tmp_path / "cache", "locate", "--json", entry["uuid"])
    assert time.monotonic() - started < 30
    assert run.returncode == 2 and "Traceback" not in run.stderr
    col = json.loads(run.stdout)["collections"][0]
    assert col["clusters"]["zbbbb"]["holds_all"] is True
    zc = col["clusters"]["zcccc"]
    assert zc["holds_all"] is None and "unreachable" in zc["error"] and zc["blocks_unknown"] == 1
    assert cli(fed, tmp_path / "cache", "locate", "--cluster", "zbbbb", entry["uuid"]).returncode == 0


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_staged_collection_is_read_through_a_real_mount_with_no_keep_request(fed, tmp_path):
    entry = place(fed, f"locm-{uuid.uuid4().hex[:8]}", ("zcccc",), size=4 * MiB + 3)
    cache = tmp_path / "cache"
    staged = cli(fed, cache, "stage", "--pin", entry["uuid"])
    assert staged.returncode == 0, staged.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mark = fed.mark()
    target = mnt / "by_id" / entry["uuid"] / "data.bin"
    cmd = [sys.executable, "-m", "fedmount", "--disk-cache-dir", str(cache), str(mnt), "--exec", "md5sum"]
    run = subprocess.run([*cmd, str(target)], env=env_for(fed), cwd=REPO, text=True, capture_output=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == entry["files"]["data.bin"]["md5"]
    assert keep_requests(fed, mark) == []


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_locate_estimates_from_the_throughput_a_mount_observed(fed, tmp_path):
    entry = place(fed, f"loct-{uuid.uuid4().hex[:8]}", ("zcccc",), size=4 * MiB)
    cache = tmp_path / "cache"

    def throughput() -> str:
        run = cli(fed, cache, "locate", "--json", "--route", "direct", entry["uuid"])
        assert run.returncode == 0, run.stderr
        col = json.loads(run.stdout)["collections"][0]
        assert col["estimate"]["cluster"] == "zcccc"
        return col["estimate"]["throughput"]

    assert throughput() == "default"
    for svc in ("keep0", "keep1"):
        fed.set_fault("zcccc", svc, bandwidth=16 * MiB)  # a quarter second: a measurable sample
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "fedmount", "--route", "direct", "--disk-cache-dir", str(cache), str(mnt),
           "--exec", "md5sum", str(mnt / "by_id" / entry["uuid"] / "data.bin")]  # fmt: skip
    run = subprocess.run(cmd, env=env_for(fed), cwd=REPO, text=True, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == entry["files"]["data.bin"]["md5"]
    book = json.loads((cache / "locality-throughput.json").read_text())["clusters"]
    assert set(book) == {"zcccc"} and book["zcccc"]["bytes_per_second"] < 17 * MiB
    assert throughput() == "observed"
