"""Multi-buffer md5 (fedmount/blocks/md5.py) against hashlib, on every kernel this CPU runs."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmount.blocks import md5
from fedmount.blocks.md5 import MultiHasher, available_kernels, md5_many

KERNELS = available_kernels()
NATIVE = [k.name for k in md5.NATIVE_KERNELS]
MiB = 1 << 20

# Every edge of the 64-byte block and of the 56-byte padding limit, and multiples of 64 +- 1.
BOUNDARIES = sorted(
    {0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 121, 127, 128, 129}
    | {64 * k + d for k in range(2, 40) for d in (-1, 0, 1)}
    | {4095, 4096, 4097, MiB - 1, MiB, MiB + 1}
)


def reference(buffers: list[bytes]) -> list[bytes]:
    return [hashlib.md5(b).digest() for b in buffers]


def random_buffers(rng: random.Random, count: int, largest: int) -> list[bytes]:
    return [rng.randbytes(rng.randrange(largest + 1)) for _ in range(count)]


@pytest.fixture(scope="module")
def block_64mib() -> bytes:
    return random.Random(64).randbytes(64 * MiB)


def test_native_extension_is_built_here():
    # make venv builds it with gcc and python3-dev; without it every other test only covers hashlib.
    assert NATIVE, "fedmount.blocks._md5mb was not built: check `pip install -e .` output"
    assert NATIVE[-1] == "scalar"


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_boundary_size_in_one_batch_matches_hashlib(kernel):
    rng = random.Random(1)
    buffers = [rng.randbytes(n) for n in BOUNDARIES]
    assert md5_many(buffers, kernel) == reference(buffers)


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_boundary_size_alone_matches_hashlib(kernel):
    rng = random.Random(2)
    for n in BOUNDARIES:
        buf = rng.randbytes(n)
        assert md5_many([buf], kernel) == reference([buf]), n


@pytest.mark.parametrize("kernel", KERNELS)
def test_random_sizes_more_buffers_than_lanes_match_hashlib(kernel):
    rng = random.Random(3)
    for _ in range(20):
        buffers = random_buffers(rng, rng.randrange(1, 60), rng.choice([200, 5000, 300_000]))
        assert md5_many(buffers, kernel) == reference(buffers)


@pytest.mark.parametrize("kernel", KERNELS)
def test_64_mib_block_among_equal_and_small_ones(kernel, block_64mib):
    # 17 streams of which 16 are 64 MiB: more than any kernel's lanes, refills, and the last
    # long one alone (where auto narrows to scalar); views of one block are valid buffers.
    view = memoryview(block_64mib)
    buffers = [view] * 16 + [view[: 5 * MiB + 3], b"", b"x" * 65, view[1:]]
    expected = hashlib.md5(block_64mib).digest()
    got = md5_many(buffers, kernel)
    assert got[:16] == [expected] * 16
    assert got[16:] == reference([bytes(b) for b in buffers[16:]])


@pytest.mark.parametrize("kernel", KERNELS)
def test_buffer_types_and_an_empty_batch(kernel):
    data = random.Random(4).randbytes(1000)
    with mmap.mmap(-1, len(data)) as mapped:
        mapped.write(data)
        buffers = [data, bytearray(data), memoryview(data)[3:], mapped]
        assert md5_many(buffers, kernel) == reference([data, data, data[3:], data])
    assert md5_many([], kernel) == []


def test_unknown_kernel_is_a_one_line_error():
    with pytest.raises(ValueError, match="not one of auto"):
        md5_many([b"x"], "sse9")


def test_environment_forces_the_kernel_and_a_bad_value_warns_once(monkeypatch, caplog):
    monkeypatch.setenv(md5.ENV_KERNEL, "hashlib")
    assert md5.resolve_kernel() == "hashlib"
    assert MultiHasher().kernel == "hashlib"
    assert md5.resolve_kernel("auto") == ("auto" if NATIVE else "hashlib")  # the argument wins
    monkeypatch.setenv(md5.ENV_KERNEL, "avx9000")
    with caplog.at_level("WARNING", logger="fedmount.md5"):
        assert md5.resolve_kernel() == md5.resolve_kernel() == ("auto" if NATIVE else "hashlib")
    assert [r.getMessage() for r in caplog.records] == [
        f"{md5.ENV_KERNEL}=avx9000 is not one of {', '.join(KERNELS)} here; using auto"
    ]


@settings(max_examples=150, deadline=None)
@given(
    buffers=st.lists(st.binary(max_size=700), max_size=40),
    kernel=st.sampled_from(KERNELS),
)
def test_hypothesis_batches_match_hashlib(buffers, kernel):
    assert md5_many(buffers, kernel) == reference(buffers)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
@settings(max_examples=100, deadline=None)
@given(
    streams=st.lists(
        st.tuples(st.binary(max_size=2000), st.lists(st.integers(0, 300), max_size=12)), max_size=20
    ),
    kernel=st.sampled_from(["auto", *NATIVE]),
)
def test_hypothesis_native_states_fed_in_pieces_match_hashlib(streams, kernel):
    # update_many with several buffers per job, several calls per state, a digest in between.
    states = [md5._native.State() for _ in streams]
    cut = [0] * len(streams)
    for round_no in range(13):
        jobs = []
        for i, (data, sizes) in enumerate(streams):
            if round_no < len(sizes):
                piece = data[cut[i] : cut[i] + sizes[round_no]]
                jobs.append((states[i], [piece[: len(piece) // 2], piece[len(piece) // 2 :]]))
                cut[i] += len(piece)
        md5._native.update_many(jobs, kernel)
        if round_no == 6:
            prefixes = [d[:c] for (d, _), c in zip(streams, cut, strict=True)]
            assert [s.digest() for s in states] == reference(prefixes)
    md5._native.update_many([(s, [d[c:]]) for s, (d, _), c in zip(states, streams, cut, strict=True)], kernel)
    assert [s.digest() for s in states] == reference([d for d, _ in streams])
    assert [s.length for s in states] == [len(d) for d, _ in streams]


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_a_state_in_two_jobs_of_one_call_is_refused_and_left_usable():
    state = md5._native.State()
    with pytest.raises(ValueError, match="one job"):
        md5._native.update_many([(state, [b"a"]), (state, [b"b"])], "auto")
    md5._native.update_many([(state, [b"abc"])], "auto")
    assert state.digest() == hashlib.md5(b"abc").digest()


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_hashing_releases_the_gil(block_64mib):
    # While a worker thread is inside update_many (4 x 64 MiB on the scalar kernel, ~0.4 s
    # quiet), this thread keeps running Python. Holding the GIL would allow ~0 iterations.
    started, done = threading.Event(), threading.Event()

    def hash_blocks() -> None:
        started.set()
        md5_many([block_64mib] * 4, "scalar")
        done.set()

    worker = threading.Thread(target=hash_blocks)
    worker.start()
    started.wait()
    spins = 0
    while not done.is_set():
        spins += 1
    worker.join()
    assert spins > 1000


def feed(stream, data: bytes, rng: random.Random, largest_piece: int) -> None:
    view, at = memoryview(data), 0
    while at < len(data):
        n = rng.randrange(largest_piece + 1)
        stream.update(view[at : at + n])
        at += n


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_streams_fed_by_several_threads_in_random_pieces_match_hashlib(kernel, threads):
    rng = random.Random(5)
    blocks = [rng.randbytes(n) for n in [0, 1, 63, 64, 65, 3 * MiB + 7, 2 * MiB, 100_000] + [MiB] * 8]
    results: dict[int, bytes] = {}

    def receive(i: int, hasher: MultiHasher) -> None:
        stream = hasher.stream()
        pieces = random.Random(i)
        feed(stream, blocks[i], pieces, pieces.choice([100, 4096, 70_000, 400_000]) if blocks[i] else 1)
        results[i] = stream.digest()

    with MultiHasher(kernel=kernel, threads=threads) as hasher:
        receivers = [threading.Thread(target=receive, args=(i, hasher)) for i in range(len(blocks))]
        for t in receivers:
            t.start()
        for t in receivers:
            t.join()
    assert [results[i] for i in range(len(blocks))] == reference(blocks)


@pytest.mark.parametrize("kernel", KERNELS)
def test_stream_fed_with_boundary_pieces_matches_hashlib(kernel):
    data = random.Random(6).randbytes(sum(BOUNDARIES[:60]))
    with MultiHasher(kernel=kernel) as hasher:
        stream, at = hasher.stream(), 0
        for n in BOUNDARIES[:60]:
            stream.update(data[at : at + n])
            at += n
        assert stream.hexdigest() == hashlib.md5(data).hexdigest()
        assert stream.digest() == hashlib.md5(data).digest()  # a second digest() is the same


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    piece=st.integers(1, 500),
    kernel=st.sampled_from(KERNELS),
)
def test_hypothesis_interleaved_streams_match_hashlib(data, piece, kernel):
    with MultiHasher(kernel=kernel) as hasher:
        streams = [hasher.stream() for _ in data]
        for at in range(0, max(map(len, data)), piece):
            for stream, d in zip(streams, data, strict=True):
                stream.update(d[at : at + piece])
        assert [s.digest() for s in streams] == reference(data)


@pytest.mark.parametrize("kernel", KERNELS)
def test_backlogs_longer_than_one_call_are_hashed_in_order(kernel):
    # 20 MiB queued in 1 MiB chunks before the worker may start: it takes BATCH_BYTES of
    # each stream per call, and digest() hashes what is left.
    rng = random.Random(7)
    long, short = rng.randbytes(20 * MiB + 5), rng.randbytes(3 * MiB)
    with MultiHasher(kernel=kernel, gather=30.0) as hasher:
        a, b = hasher.stream(), hasher.stream()
        for at in range(0, len(long), MiB):
            a.update(long[at : at + MiB])
        b.update(short)  # now every open stream has chunks: the worker starts
        time.sleep(0.05)
        assert b.digest() == hashlib.md5(short).digest()
        assert a.digest() == hashlib.md5(long).digest()


def test_a_lone_stream_is_not_held_back_by_the_gather_wait():
    # With one open stream every chunk is hashed at once; its digest does not wait `gather`.
    with MultiHasher(gather=30.0) as hasher:
        stream = hasher.stream()
        stream.update(b"a" * MiB)
        time.sleep(0.2)
        other = hasher.stream()  # opened after the chunk was taken
        started = time.monotonic()
        assert stream.digest() == hashlib.md5(b"a" * MiB).digest()
        other.close()
    assert time.monotonic() - started < 10  # ~ms quiet; 30 s if it waited for the gather


def test_close_drops_queued_chunks_and_releases_the_buffer():
    # Failover reuses the block's buffer: after close() no worker holds a view of it, so an
    # mmap'ed cache buffer can be closed (it refuses while views exist).
    with MultiHasher(gather=30.0) as hasher:
        waiting = hasher.stream()  # open and empty: the worker waits for it
        mapped = mmap.mmap(-1, 4 * MiB)
        abandoned = hasher.stream()
        abandoned.update(memoryview(mapped)[: 2 * MiB])
        abandoned.close()
        mapped.close()
        with pytest.raises(ValueError):
            abandoned.update(b"late")
        with pytest.raises(ValueError):
            abandoned.digest()
        waiting.update(b"abc")
        assert waiting.digest() == hashlib.md5(b"abc").digest()


def test_digest_finishes_streams_after_the_hasher_is_closed():
    hasher = MultiHasher(gather=30.0)
    first, second = hasher.stream(), hasher.stream()
    first.update(b"x" * 1000)
    hasher.close()
    second.update(b"y")
    assert first.digest() == hashlib.md5(b"x" * 1000).digest()
    assert second.digest() == hashlib.md5(b"y").digest()
    with pytest.raises(RuntimeError):
        hasher.stream()


def test_stream_is_a_transport_sink_and_refuses_strided_views():
    with MultiHasher() as hasher:
        stream = hasher.stream()
        stream(memoryview(b"abcdef")[1:4])
        with pytest.raises(BufferError):
            stream.update(memoryview(b"abcdef")[::2])
        assert stream.digest() == hashlib.md5(b"bcd").digest()


FALLBACK = """
import hashlib, logging, sys
logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s")
sys.modules["fedmount.blocks._md5mb"] = None  # what a failed build or a foreign CPU looks like
from fedmount.blocks import md5
assert md5.available_kernels() == ("auto", "hashlib"), md5.available_kernels()
assert md5.resolve_kernel() == "hashlib"
data = [b"", b"a" * 65, bytes(range(256)) * 999]
assert md5.md5_many(data) == [hashlib.md5(d).digest() for d in data]
with md5.MultiHasher(threads=2) as hasher:
    streams = [hasher.stream() for _ in data]
    for s, d in zip(streams, data):
        s.update(d[:7]); s.update(d[7:])
    assert [s.digest() for s in streams] == [hashlib.md5(d).digest() for d in data]
print("fallback ok")
"""


def test_without_the_extension_everything_runs_on_hashlib_with_one_debug_line():
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, md5.ENV_KERNEL: ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fallback ok"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedmount.md5")]
    assert lines == [
        "fedmount.md5 DEBUG multi-buffer md5 unavailable (import of fedmount.blocks._md5mb "
        "halted; None in sys.modules); verifying with hashlib"
    ]
