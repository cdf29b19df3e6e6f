"""bench.workloads and bench.__main__ helpers that need no mount and no socket: readers on local
files, random offsets, collection entry counts, the quick/full configurations."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from bench import workloads
from bench.__main__ import Config, default_fedmount, keep_logs, parse_args
from bench.workloads import BenchCollection, BenchError


def test_dd_read_reports_seconds_and_checks_the_size(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert workloads.dd_read(str(path), 1 << 20, 3 << 20) > 0
    with pytest.raises(BenchError, match="expected"):
        workloads.dd_read(str(path), 1 << 20, 4 << 20)


def test_dd_output_is_parsed_in_the_c_locale():
    text = "3+0 records in\n3+0 records out\n3145728 bytes (3.1 MB, 3.0 MiB) copied, 0.00123 s, 2.6 GB/s\n"
    m = workloads.DD_RE.search(text)
    assert m is not None and (m.group(1), float(m.group(2))) == ("3145728", 0.00123)


def test_random_offsets_are_aligned_in_range_and_reproducible():
    offsets = workloads.random_offsets(10 * 4096 + 100, 4096, 500)
    assert offsets == workloads.random_offsets(10 * 4096 + 100, 4096, 500)
    assert all(o % 4096 == 0 and o + 4096 <= 10 * 4096 + 100 for o in offsets)
    assert len(set(offsets)) == 10
    with pytest.raises(BenchError):
        workloads.random_offsets(100, 4096, 1)


def test_random_read_and_first_byte_on_a_local_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(64 * 4096))
    assert workloads.random_read(str(path), workloads.random_offsets(64 * 4096, 4096, 50), 4096) > 0
    assert workloads.first_byte(str(path)) > 0
    with pytest.raises(BenchError, match="short read"):
        workloads.random_read(str(path), [64 * 4096], 4096)


def test_find_stat_and_cat_check_what_they_saw(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x", "a/b/y", "z"):
        (tmp_path / name).write_bytes(b"1234")
    assert workloads.find_stat(str(tmp_path), 6) > 0
    with pytest.raises(BenchError, match="saw 6 entries"):
        workloads.find_stat(str(tmp_path), 7)
    assert workloads.ls_long(str(tmp_path / "a"), 2) > 0
    with pytest.raises(BenchError, match="listed 2 entries"):
        workloads.ls_long(str(tmp_path / "a"), 3)
    paths = [str(tmp_path / n) for n in ("a/x", "a/b/y", "z")]
    assert workloads.cat_files(paths, 12) > 0
    with pytest.raises(BenchError, match="expected 13"):
        workloads.cat_files(paths, 13)


def test_collection_entries_count_files_directories_and_itself():
    c = BenchCollection("c", "zzzzz-4zz18-000000000000000", "zzzzz", {"a/b/f1": 1, "a/f2": 2, "g": 3})
    assert c.entries == 3 + 2 + 1
    assert c.total_bytes == 6


def test_quick_mode_is_smaller_than_full_mode():
    quick, full = Config.quick(), Config.full()
    assert quick.mode == "quick" and full.mode == "full"
    assert full.seq_size == 1 << 30 and full.walk_entries == 100_000 and full.rss_entries == 1_000_000
    assert full.small_files == 10_000
    assert full.tree_projects == 1_000 and full.project_collections == 10_000  # issue 17's sizes
    for name in ("runs", "seq_size", "small_files", "walk_entries", "rss_entries", "tree_projects"):
        assert getattr(quick, name) < getattr(full, name)


def test_command_line_defaults_to_quick_mode_against_fedmount():
    args = parse_args([])
    assert (args.full, args.check_json, args.target) == (False, False, "fedmount")
    assert parse_args(["--fedmount", "python3 -m fedmount"]).fedmount == ["python3", "-m", "fedmount"]
    command = default_fedmount()
    assert command[0].endswith("fedmount") or command == [sys.executable, "-m", "fedmount"]


def test_cache_dirs_share_the_warm_one_and_give_each_cold_mount_a_fresh_one(tmp_path):
    drops: list[str] = []
    caches = workloads.CacheDirs(str(tmp_path), drop=lambda: drops.append("dropped"))
    with caches.for_mount(cold=False) as warm:
        os.makedirs(os.path.join(warm, "keep"))
    with caches.for_mount(cold=False) as again:
        assert again == warm and os.path.isdir(os.path.join(warm, "keep"))
    assert drops == []
    seen = []
    for _ in range(2):
        with caches.for_mount(cold=True) as cold:
            assert drops and not os.path.exists(cold)  # page cache dropped, directory new
            os.makedirs(os.path.join(cold, "keep"))
            seen.append(cold)
        assert not os.path.exists(cold)
    assert len(set(seen)) == 2 and warm not in seen and len(drops) == 2
    assert os.path.isdir(os.path.join(warm, "keep"))


def test_arv_mount_is_measured_unless_told_not_to():
    assert parse_args([]).no_arv_mount is False
    assert parse_args(["--no-arv-mount"]).no_arv_mount is True


def test_process_rss_counts_this_process():
    assert workloads.process_rss(os.getpid()) > 1 << 20


def test_find_stat_over_its_time_limit_says_how_far_it_got(tmp_path):
    for i in range(200):
        (tmp_path / f"f{i}").write_bytes(b"")
    with pytest.raises(workloads.TooSlow, match=r"find listed [\d,]+ of 201 entries in 0 s"):
        workloads.find_stat(str(tmp_path), 201, timeout=1e-6)  # less than starting find takes
    assert workloads.find_stat(str(tmp_path), 201, timeout=60) > 0


def test_keep_logs_copies_only_the_logs_with_their_paths(tmp_path):
    (tmp_path / "fedmount").mkdir()
    (tmp_path / "fedmount" / "fedmount.log").write_text("lookup failed\n")
    (tmp_path / "federation").mkdir()
    (tmp_path / "federation" / "emulator.log").write_text("404\n")
    (tmp_path / "fedmount" / "block.bin").write_bytes(b"x" * 100)
    kept = keep_logs(str(tmp_path))
    try:
        found = sorted(os.path.relpath(os.path.join(t, f), kept) for t, _, fs in os.walk(kept) for f in fs)
        assert found == ["federation/emulator.log", "fedmount/fedmount.log"]
        assert open(os.path.join(kept, "fedmount", "fedmount.log")).read() == "lookup failed\n"
    finally:
        shutil.rmtree(kept)


def test_tree_find_lists_projects_and_collections_but_not_inside_them_nor_records(tmp_path):
    root = tmp_path / "tree"
    for p in range(3):
        for c in range(2):
            (root / f"p{p}" / f"c{c}").mkdir(parents=True)
            (root / f"p{p}" / f"c{c}" / "file").write_bytes(b"x")  # inside a collection: not listed
        (root / f"p{p}" / ".arvados#project").write_text("{}")
    (root / ".arvados#project").write_text("{}")
    assert workloads.find_stat(str(root), 1 + 3 + 6, tests=workloads.TREE_FIND) >= 0
    with pytest.raises(BenchError, match="saw 10 entries, expected 11"):
        workloads.find_stat(str(root), 11, tests=workloads.TREE_FIND)


def test_ls_long_over_its_time_limit_says_so(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    assert workloads.ls_long(str(tmp_path), 1, timeout=30) >= 0
    with pytest.raises(workloads.TooSlow, match="ls -l of 1 entries took over 0 s"):
        workloads.ls_long(str(tmp_path), 1, timeout=1e-9)


FAKE_STAGE = """
import json, os, sys
args = sys.argv[1:]
if "fail" in args[-1]:
    sys.exit("stage: cannot reach zbbbb")
cache = args[args.index("--disk-cache-dir") + 1]
assert not os.path.exists(cache), "a cache directory left by an earlier run"
os.makedirs(cache)
name = args[args.index("--save-as") + 1]
print(json.dumps({"saved": {"name": name, "uuid": "zzzzz-4zz18-" + str(len(name)).zfill(15),
                            "portable_data_hash": "d41d8cd98f00b204e9800998ecf8427e+0"}}))
"""


def test_stager_times_each_run_with_a_fresh_cache_and_keeps_what_the_last_run_saved(tmp_path):
    stager = workloads.Stager([sys.executable, "-c", FAKE_STAGE], dict(os.environ), str(tmp_path), "zzzzz", 4)
    remote = BenchCollection(
        "bench-seq-remote", "zbbbb-4zz18-000000000000001", "zbbbb", {"data.bin": 1 << 20}
    )
    rates = stager.samples(remote, 2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert stager.saved is not None and stager.saved.name == "bench-seq-remote staged 2"
    assert (stager.saved.cluster, stager.saved.files) == ("zzzzz", {"data.bin": 1 << 20})
    assert not [p for p in os.listdir(tmp_path) if p.startswith("stage-cache")]  # removed after each run
    failing = BenchCollection("fail", "zbbbb-4zz18-fail00000000000", "zbbbb", {"data.bin": 1})
    with pytest.raises(BenchError, match="stage exited with 1: stage: cannot reach zbbbb"):
        stager.samples(failing, 1)
