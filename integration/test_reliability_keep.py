"""Keepstores that answer, but too slowly: a real mount moves on to the replica.

A keepstore that sends no byte at all is caught by ``--keep-stall-timeout``
(test_reliability.py). One that *trickles* (the emulator's ``bandwidth`` fault, 512 B/s
here) never lets a socket timeout fire; ``--keep-min-rate`` over ``--keep-rate-window``
(the Arvados SDK's low-speed limit: 32 KiB/s over 256 s by default) abandons it. The
tests use a 2 s window so that the bound is seconds, not minutes. Asserted: the read
completes from the replica within a bound, with the file's exact md5 (0 wrong bytes), and a
keepstore that is slow but above the floor is not abandoned.

A stalled keepstore need not cost the stall timeout at all: a GET that has received no body
byte within the hedge delay (``--keep-hedge-after``, auto: 1 s until the cluster has eight
times to first byte, then 1.5 × their p95, 0.5 to 5 s) is hedged to the next replica, and
the stalled request is aborted (hedge.py). Asserted with a 30 s stall timeout: a cold read
of a multi-block file ends in well under half of it, byte for byte, and the mount's stats
count the hedges.
"""

from __future__ import annotations

from integration.mounting import requires_fuse, timed_read
from integration.test_reliability import MiB, block_hashes, first_choice, fresh, keep_gets

pytestmark = requires_fuse

WINDOW = "2"  # --keep-rate-window of these tests, seconds
TRICKLE = 512  # bytes per second: a 64 MiB block would take 36 hours
STALL = "30"  # --keep-stall-timeout of the hedging test, seconds


def test_trickling_keepstore_is_abandoned_for_the_replica_within_the_rate_window(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 4 * MiB})  # four 1 MiB blocks
    m = mount("--keep-min-rate", "64K", "--keep-rate-window", WINDOW)
    path = m / f"by_id/{coll['uuid']}/data.bin"
    first, second = first_choice(fed, "zzzzz", block_hashes(path)[0])
    fed.set_fault("zzzzz", first, bandwidth=TRICKLE)
    mark = fed.mark()
    got = timed_read(path, 60)  # unabandoned, the first block alone would take 34 minutes
    assert got.ok and got.md5 == coll["files"]["data.bin"]["md5"], got.error
    # One window (2 s) and a GET from the replica: ~2.5 s on a quiet machine; the bound
    # leaves room for a loaded 2-core one.
    assert got.seconds < 15, f"a trickling keepstore held the read for {got.seconds:.1f}s (window {WINDOW}s)"
    whole = [r for r in keep_gets(fed, mark, "zzzzz") if r["status"] == 200 and r["bytes"] == MiB]
    assert {r["service"] for r in whole} == {second} and len(whole) == 4
    log = m.log.read_text()
    assert "abandoned for block" in log and "below the minimum 65536 B/s" in log
    record("trickling keepstore (512 B/s)", outcome="abandoned for the replica after --keep-rate-window "
           f"({WINDOW} s in the test, 256 s default)", wrong_bytes=0,
           read_seconds=round(got.seconds, 2))  # fmt: skip


def test_keepstore_slower_than_usual_but_above_the_minimum_rate_is_not_abandoned(fed, mount):
    coll = fresh(fed, "zzzzz", {"data.bin": 4 * MiB}, block_size=4 * MiB)  # one block: 4 s at 1 MiB/s
    m = mount("--keep-min-rate", "64K", "--keep-rate-window", WINDOW)
    path = m / f"by_id/{coll['uuid']}/data.bin"
    first, _ = first_choice(fed, "zzzzz", block_hashes(path)[0])
    fed.set_fault("zzzzz", first, bandwidth=MiB)
    mark = fed.mark()
    got = timed_read(path, 60)
    assert got.ok and got.md5 == coll["files"]["data.bin"]["md5"], got.error
    assert [r["service"] for r in keep_gets(fed, mark, "zzzzz")] == [first]
    assert "abandoned" not in m.log.read_text()


def test_stalled_keepstore_is_hedged_to_the_replica_long_before_the_stall_timeout(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 8 * MiB})  # eight 1 MiB blocks, each on keep0 and keep1
    m = mount("--keep-stall-timeout", STALL)
    path = m / f"by_id/{coll['uuid']}/data.bin"
    hashes = block_hashes(path)
    first, second = first_choice(fed, "zzzzz", hashes[0])
    fed.set_fault("zzzzz", first, stall=True)  # status line and headers, then nothing
    mark = fed.mark()
    got = timed_read(path, 90)
    assert got.ok and got.md5 == coll["files"]["data.bin"]["md5"], got.error
    # Unhedged, each block asked first of the stalled keepstore would wait the 30 s stall.
    assert got.seconds < float(STALL) / 2, f"the read took {got.seconds:.1f}s (stall timeout {STALL}s)"
    stats = m.stats()
    hedges, wins = stats["keep_hedges"]["cluster=zzzzz"], stats["keep_hedge_wins"]["cluster=zzzzz"]
    assert hedges > 0 and wins > 0
    gets = keep_gets(fed, mark, "zzzzz")
    assert {r["path"][1:33] for r in gets if r["service"] == second and r["status"] == 200} == set(hashes)
    record("stalled keepstore, hedging on (default)", outcome=f"hedged to the replica ({int(hedges)} "
           f"hedged GETs, {int(wins)} won), the stalled GETs aborted; --keep-stall-timeout {STALL} s",
           wrong_bytes=0, read_seconds=round(got.seconds, 2))  # fmt: skip
