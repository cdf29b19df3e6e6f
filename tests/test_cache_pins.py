"""Pins with owners in the cache index, and the migration of older pin records into it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from cacheblocks import block_file, fresh, make_block  # tests/ is on sys.path under pytest

MiB = 1 << 20
PDH_A, PDH_B = "a" * 32 + "+10", "b" * 32 + "+10"
UUID_A = "zzzzz-4zz18-00000000000000a"


async def test_a_block_two_owners_pin_stays_pinned_until_both_unpin(tmp_path: Path) -> None:
    cache, _ = fresh(tmp_path, disk_limit=6 * MiB, ram_limit=MiB)
    shared, only_a = make_block(3 * MiB, 1), make_block(MiB, 2)
    for key, data in (shared, only_a):
        await cache.put(key, data)
    cache.pin([shared[0], only_a[0]], owner=PDH_A, names=[UUID_A])
    cache.pin([shared[0]], owner=PDH_B)
    assert cache.pins_of(UUID_A) == cache.pins_of(PDH_A) == (PDH_A, sorted([shared[0], only_a[0]]))
    assert cache.unpin([shared[0], only_a[0]], PDH_A) == [only_a[0]]
    assert cache.pins_of(UUID_A) is None and cache.pinned() == {shared[0]}
    for seed in range(10, 14):  # eviction spares what an owner still pins
        await cache.put(*make_block(3 * MiB, seed))
    assert block_file(tmp_path, shared[0]).exists()
    assert cache.unpin([shared[0]], PDH_B) == [shared[0]] and cache.pinned() == set()


def test_a_pin_record_of_an_earlier_version_moves_into_the_index_once(tmp_path: Path) -> None:
    keys = [make_block(100, seed)[0] for seed in range(3)]
    pins = {PDH_A: {"ids": [UUID_A], "keys": keys[:2]}, PDH_B: {"ids": [], "keys": keys[1:]}}
    record = {"version": 1, "pins": pins}
    (tmp_path / "locality-pins.json").write_text(json.dumps(record))
    cache, _ = fresh(tmp_path)
    assert not (tmp_path / "locality-pins.json").exists()
    assert cache.pins_of(UUID_A) == (PDH_A, sorted(keys[:2]))
    assert cache.pins_of(PDH_B) == (PDH_B, sorted(keys[1:]))
    again, _ = fresh(tmp_path)  # a later process: nothing left to migrate, nothing doubled
    assert again.pinned() == set(keys) and again.pins_of(PDH_A) == (PDH_A, sorted(keys[:2]))
    assert again.unpin(keys[:2], PDH_A) == [keys[0]]  # the other record still needs keys[1]


def test_an_index_whose_pins_have_no_owners_keeps_them_as_ownerless_pins(tmp_path: Path) -> None:
    key = make_block(100)[0]
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.execute("CREATE TABLE blocks (key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)")
    db.execute("CREATE TABLE pins (key TEXT PRIMARY KEY)")
    db.execute("INSERT INTO pins VALUES (?)", (key,))
    db.commit()
    db.close()
    cache, _ = fresh(tmp_path)
    assert cache.pinned() == {key} and cache.pins_of(key) is None
    assert cache.unpin([key]) == [key] and cache.pinned() == set()
