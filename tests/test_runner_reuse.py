"""The record of successful runs: what it hands back and when it refuses an entry; who gets a
key; what is never recorded; its bound (no sockets: the federation is tests/conftest.py's fake)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from fedmount.runner import reuse
from fedmount.runner.reuse import RunRecord, default_reuse_dir, hand_back
from fedmount.runner.runtimes.local import LocalRuntime
from fedmount.runner.spec import parse_record

OTHER_TOKEN = "v2/zzzzz-gj3su-000000000000002/" + "0th3r" * 8  # another user of the home cluster


def finished(path: Path, key: str, **result: object) -> Path:
    (path / "output").mkdir(parents=True)
    (path / "output" / "sum.txt").write_text("42\n")
    (path / "stdout.txt").write_text("ran\n")
    doc = {"state": "Complete", "exit_code": 0, "reuse": {"key": key}, "output_dir": str(path / "output"),
           "container_uuid": "zzzzz-dz642-000000000000001", "finished_at": "2026-12-02T13:00:00Z", **result}
    (path / "result.json").write_text(json.dumps(doc))  # fmt: skip
    return path


def test_an_entry_is_handed_back_while_its_run_succeeded_and_its_outputs_are_there(tmp_path):
    record = RunRecord(str(tmp_path / "runs"))
    good = finished(tmp_path / "good", "k1")
    record.remember("k1", str(good))
    found = record.find("k1")
    assert found is not None and found[0] == str(good)
    new = tmp_path / "new"
    new.mkdir()
    result = {"reuse": {"key": "k1", "reused_from": None}}
    hand_back(*found, str(new), result)
    assert (new / "output" / "sum.txt").read_text() == "42\n" and (new / "stdout.txt").read_text() == "ran\n"
    assert result["state"] == "Complete" and result["reuse"]["reused_from"]["results_dir"] == str(good)

    record.remember("k2", str(finished(tmp_path / "failed", "k2", exit_code=1)))
    record.remember("k3", str(finished(tmp_path / "other-key", "not-k3")))
    gone = finished(tmp_path / "gone", "k4")
    record.remember("k4", str(gone))
    (gone / "output" / "sum.txt").unlink()
    (gone / "output").rmdir()
    assert record.find("k2") is None and record.find("k3") is None and record.find("k4") is None
    assert record.find("k2") is None  # dropped, not merely skipped
    record.close()


def test_the_default_record_follows_xdg_cache_home():
    assert default_reuse_dir({"XDG_CACHE_HOME": "/c"}) == "/c/fedmount/runs"


def run_result(key: str, **end: object) -> dict:
    """A result as fedmount-run leaves it (state, exit_code, error), with this reuse key."""
    return {"state": "Complete", "exit_code": 0, "error": None,
            "reuse": {"key": key, "reused_from": None, "note": None}, **end}  # fmt: skip


def test_failed_cancelled_or_interrupted_runs_never_become_entries(tmp_path):
    runs = str(tmp_path / "runs")
    ends = {
        "failed": {"exit_code": 1},
        "cancelled": {"state": "Cancelled", "exit_code": None, "error": "interrupted by SIGTERM"},
        "interrupted after the container exited 0": {"error": "interrupted by SIGINT"},
        "cleanup failed": {"error": "cleanup: /x/mnt is still mounted"},
    }
    for i, (why, end) in enumerate(ends.items()):
        key = f"k{i}"
        results = finished(tmp_path / f"run{i}", key, **end)  # its result.json says so too
        assert reuse.remember(runs, str(results), run_result(key, **end)) is None, why
        record = RunRecord(runs)
        assert record.find(key) is None, why
        record.remember(key, str(results))  # recorded anyway (an older fedmount-run): never used
        assert record.find(key) is None, why
        record.close()
    ok = finished(tmp_path / "ok", "good")
    assert reuse.remember(runs, str(ok), run_result("good")) is None
    record = RunRecord(runs)
    assert record.find("good") is not None  # the same path, for a success, records it
    record.close()


def federation_transport(fake, private: set[str]) -> httpx.MockTransport:
    """The fake federation, where only the home token's user may read the `private` ids."""

    def handle(request: httpx.Request) -> httpx.Response:
        asked = request.url.path.rsplit("/", 1)[-1]
        if asked in private and request.headers.get("authorization") != f"Bearer {fake.token.text}":
            return httpx.Response(404, json={"errors": ["Path not found"]})  # what Arvados says
        return fake.handle(request)

    return httpx.MockTransport(handle)


def test_a_caller_who_cannot_read_an_input_gets_no_key_and_so_no_reuse(fake, tmp_path):
    fake.home.tokens.add(OTHER_TOKEN)
    data = fake.add_collection("zzzzz", "data", {"in.txt": b"private input\n"})
    image = fake.add_collection("zzzzz", "image", {"image.tar": b"not really a tarball"})
    transport = federation_transport(fake, {data["uuid"], data["portable_data_hash"]})
    spec = parse_record({
        "command": ["cat", "/in/in.txt"], "container_image": image["portable_data_hash"],
        "mounts": {"/in": {"kind": "collection", "portable_data_hash": data["portable_data_hash"]}},
    })  # fmt: skip
    env = {"ARVADOS_API_HOST": fake.home.host, "XDG_CONFIG_HOME": str(tmp_path)}

    def key_of(token: str) -> tuple[str | None, str]:
        return reuse.run_key(spec, LocalRuntime(), {**env, "ARVADOS_API_TOKEN": token}, transport=transport)

    key, why = key_of(fake.token.text)
    assert key is not None and why == ""
    assert key_of(fake.token.text)[0] == key  # the owner's key is stable: their next run is reused
    other, why = key_of(OTHER_TOKEN)
    assert other is None  # a PDH can be guessed, but the input must be readable to get the key
    assert why.startswith("an input could not be resolved") and data["portable_data_hash"] in why, why


def test_the_record_is_bounded_and_evicts_the_least_recently_used_first(tmp_path):
    empty = RunRecord(str(tmp_path / "empty"))
    base = empty._cache.volume()  # the empty database's own pages
    empty.close()
    limit = base + (16 << 10)  # room for some tens of entries of these sizes
    record = RunRecord(str(tmp_path / "runs"), size_limit=limit)
    record.remember("kept", str(finished(tmp_path / "kept", "kept")))
    for i in range(300):
        record.remember(f"k{i:03d}", str(finished(tmp_path / f"results-{i:03d}-{'x' * 64}", f"k{i:03d}")))
        assert record.find("kept") is not None  # used after every run: never the one evicted
    assert record.find("k000") is None and record.find("k299") is not None  # the oldest went first
    assert len(record._cache) < 150 and record._cache.volume() <= limit + (8 << 10)  # bounded
    record.close()
