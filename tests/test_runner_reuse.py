"""The record of successful runs: what it hands back and when it refuses an entry (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

from fedmount.runner.reuse import RunRecord, default_reuse_dir, hand_back


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
