"""Multi-buffer md5: the md5 of many Keep blocks at once, on one core, for verification.

Every Keep block (up to 64 MiB) is checked against the md5 in its locator before a byte of
it is served. MD5 is serial within a stream: each 64-byte block's 64 steps need the state
the previous block left, so one stream runs at one core's scalar speed (~0.7 GB/s with
OpenSSL here) however wide the CPU is. Blocks, though, are independent.

Lanes. The native kernels (`_md5mb.c`) run W streams in the W 32-bit lanes of one SIMD
register: vector register a holds word a of W different md5 states, and one instruction
does the same step for all of them. Each 64-byte message block is loaded lane by lane and
transposed so that vector M[w] holds word w of every lane's block. ``avx512`` has 16 lanes
(zmm, with vpternlogd for the round functions and vprold for the rotates), ``avx2`` 8,
``scalar`` 1 (portable C, as fast as OpenSSL). A vector step costs the same with one lane
busy or all of them, and on some CPUs (AMD Zen 5: a vector add takes 2 cycles, a scalar
one 1) one lane is slower than a scalar stream, so ``auto`` (the default) picks, each time
the set of busy lanes changes, the kernel whose fillable lanes times its per-lane speed is
highest; per-lane speeds are timed at import (~1 ms). One stream therefore runs scalar, a
few streams scalar or vector, many streams vector. ``FEDMOUNT_MD5_KERNEL`` (or the
``kernel`` argument) forces one of `available_kernels()` for tests and benchmarks:
``auto``, the native kernels this CPU runs, or ``hashlib``.

Unequal lengths. A call hands the kernel a list of jobs (a state and the buffers to absorb
into it, in order). Jobs are sorted longest first and given to lanes; the kernel runs for
as many 64-byte blocks as the shortest busy lane has left, then every lane whose job has
run out of whole blocks takes the next job, so one long block does not keep the other
lanes idle while jobs are waiting (ISA-L's job manager does the same). Idle lanes reread a
busy lane's bytes and their results are dropped. A buffer that ends inside a 64-byte block
leaves the tail in the state's carry, completed by the job's next buffer. `md5_many` is
that call over whole buffers.

Arriving data. `MultiHasher` serves blocks that arrive in pieces over sockets, several at
once, each received by its own worker thread: ``stream = hasher.stream()`` per block,
``stream.update(chunk)`` for each received chunk (it only queues a view of the chunk and
returns), ``stream.digest()`` once the last byte is in. A hashing call takes the queued
chunks of several open streams, at most ``BATCH_BYTES`` of each, and as many streams as
the kernel ``auto`` picks for them has lanes (one when that is scalar, so that a second
call may take the next). At most ``threads`` calls run at once, one by default: a call
costs about the same whatever number of lanes is busy, so one core with full lanes is the
cheapest per byte. The worker thread starts a call when every open stream it could take
has a chunk queued, or when the oldest queued chunk has waited ``gather`` seconds: hashing
each chunk the moment it lands would run nearly empty lanes at scalar cost per byte.
``digest()`` does not wait for the worker: while its stream has chunks queued and a call
may start, the calling thread makes the call itself, its own stream first and then the
streams waiting longest, so the block being finished goes first and the lanes stay full.
A block's final digest thus waits for its own backlog plus at most the calls in progress
(milliseconds while hashing keeps up with the network). `HashStream` is callable, so it is
the transport's ``sink`` as it is.

Contract. The buffers given to `update` or `md5_many` must not change until ``digest()`` or
``close()`` returns (Keep blocks are received into their own buffer, never rewritten).
Every stream ends with ``digest()`` or, when its transfer is abandoned (failover to
another replica reusing the buffer), ``close()``, which drops its queued chunks and waits
until no worker holds them.

Why the whole md5 first. The locator's md5 covers the whole block and nothing smaller:
until the last byte has been hashed nothing in the block is verified, and a byte served
before then could be a corrupt one the reader has already used. Multi-buffer hashing does
not change that; it makes verification cheap enough that receiving, hashing and serving
overlap: while the reader is served block N, blocks N+1..N+k are received and hashed in
the lanes, and each one's digest is ready a few milliseconds after its last byte.

In the read path. One `MultiHasher` per process (`keep.shared_hasher`), shared by all
in-flight GETs: `KeepClient._fetch` makes a stream per GET (the transport's sink), takes
its digest after a complete body and closes it after a failed one. Lanes fill only with as
many blocks receiving at once as there are lanes: the read-ahead window (readahead.py)
keeps several blocks in flight, and one or two streams run scalar, as fast as hashlib. It
uses ``threads=1``: a second call only adds throughput with more streams than one core's
lanes, and otherwise halves the lanes each call fills. Small blocks need no special case:
digest() hashes a small block's one chunk at once itself. Without the extension (no
compiler at install time, another CPU architecture) everything here runs on hashlib,
logged once at debug; the shared hasher then runs one thread per core, each hashing one
stream, as a thread per block did before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("fedmount.md5")

# Bytes of one stream a worker hashes per call: bounds how long a call runs, so a digest()
# that must wait for the call holding its stream's chunks waits milliseconds, not the
# whole backlog of every stream.
BATCH_BYTES = 8 << 20

ENV_KERNEL = "FEDMOUNT_MD5_KERNEL"

try:
    from . import _md5mb as _native
except ImportError as exc:  # not built (no compiler at install time) or not loadable here
    _native = None
    log.debug("multi-buffer md5 unavailable (%s); verifying with hashlib", exc)


@dataclass(frozen=True)
class Kernel:
    name: str
    lanes: int
    lane_rate: float  # bytes per second per lane, timed at import


NATIVE_KERNELS: tuple[Kernel, ...] = tuple(Kernel(*row) for row in _native.kernels()) if _native else ()


def available_kernels() -> tuple[str, ...]:
    """Every name `kernel` accepts here: ``auto``, the native kernels this CPU runs, ``hashlib``."""
    return ("auto", *(k.name for k in NATIVE_KERNELS), "hashlib")


def auto_kernel(live: int) -> str:
    """The kernel ``auto`` uses while `live` streams have whole blocks to hash."""
    return _native.auto_kernel(live) if _native else "hashlib"


def resolve_kernel(kernel: str | None = None) -> str:
    """`kernel`, else ``$FEDMOUNT_MD5_KERNEL``, else ``auto``; ``auto`` is ``hashlib`` without the
    extension. A bad argument raises ValueError; a bad environment value is logged and ignored."""
    if kernel is None:
        kernel = _environment_kernel(os.environ.get(ENV_KERNEL) or "auto")
    elif kernel not in available_kernels():
        raise ValueError(f"md5 kernel {kernel!r} is not one of {', '.join(available_kernels())} here")
    return "hashlib" if kernel == "auto" and _native is None else kernel


@functools.cache
def _environment_kernel(value: str) -> str:
    """``$FEDMOUNT_MD5_KERNEL`` checked once per value: a bad one is one warning, then auto."""
    if value in available_kernels():
        return value
    log.warning("%s=%s is not one of %s here; using auto", ENV_KERNEL, value, ", ".join(available_kernels()))
    return "auto"


# A C-contiguous bytes-like object (collections.abc.Buffer from Python 3.12 on).
Buffer = bytes | bytearray | memoryview | mmap.mmap


class _State(Protocol):
    def digest(self) -> bytes: ...


Job = tuple[Any, list[Buffer]]


Engine = tuple[Callable[[], _State], Callable[[Sequence[Job]], None], Callable[[int], int]]


def _engine(kernel: str) -> Engine:
    """(new state, absorb jobs, lanes of the kernel that hashes `live` streams) for a resolved kernel."""
    if kernel == "hashlib":
        return hashlib.md5, _absorb_hashlib, lambda live: 1
    assert _native is not None
    lanes = {k.name: k.lanes for k in NATIVE_KERNELS}

    def absorb(jobs: Sequence[Job]) -> None:
        _native.update_many(jobs, kernel)

    def lanes_for(live: int) -> int:
        return lanes[_native.auto_kernel(live) if kernel == "auto" else kernel]

    return _native.State, absorb, lanes_for


def _absorb_hashlib(jobs: Sequence[Job]) -> None:
    for state, chunks in jobs:
        for chunk in chunks:
            state.update(chunk)


def md5_many(buffers: Sequence[Buffer], kernel: str | None = None) -> list[bytes]:
    """The md5 digest of each buffer, hashed together in SIMD lanes; the GIL is released."""
    new_state, absorb, _ = _engine(resolve_kernel(kernel))
    states = [new_state() for _ in buffers]
    absorb([(state, [buf]) for state, buf in zip(states, buffers, strict=True)])
    return [state.digest() for state in states]


class HashStream:
    """One block's md5, fed chunk by chunk; made by `MultiHasher.stream`."""

    def __init__(self, hasher: MultiHasher, state: _State):
        self._hasher = hasher
        self._state = state
        self._pending: list[memoryview] = []
        self._since = 0.0  # when the oldest pending chunk was queued
        self._busy = False  # a thread is hashing this stream's chunks
        self._digest: bytes | None = None
        self._closed = False
        self._error: BaseException | None = None

    def _take(self, limit: int) -> list[memoryview]:
        """The oldest queued chunks, until they hold `limit` bytes (at least one chunk)."""
        taken = n = 0
        while n < len(self._pending) and taken < limit:
            taken += self._pending[n].nbytes
            n += 1
        chunks, self._pending = self._pending[:n], self._pending[n:]
        return chunks

    def update(self, chunk: Buffer) -> None:
        """Queue `chunk` (not copied: it must not change until digest() or close() returns)."""
        view = memoryview(chunk)
        if not view.c_contiguous:
            raise BufferError("md5 chunks must be C-contiguous buffers")
        if not view.nbytes:
            return
        hasher = self._hasher
        with hasher._cond:
            if self._closed or self._digest is not None:
                raise ValueError("update() after digest() or close()")
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append(view)
            hasher._cond.notify_all()

    __call__ = update

    def digest(self) -> bytes:
        """Wait until every chunk is hashed, helping with the hashing, and return the md5."""
        hasher = self._hasher
        with hasher._cond:
            if self._closed:
                raise ValueError("digest() after close()")
            if self._digest is not None:
                return self._digest
            while self._pending or self._busy:
                if self._busy or hasher._calls == hasher._threads:
                    hasher._cond.wait()
                    continue
                batch = hasher._claim([self])
                hasher._cond.release()
                try:
                    hasher._run(batch)
                finally:
                    hasher._cond.acquire()
            hasher._open.pop(self, None)
        if self._error is not None:
            raise RuntimeError(f"md5 hashing failed: {self._error}") from self._error
        self._digest = self._state.digest()
        return self._digest

    def hexdigest(self) -> str:
        return self.digest().hex()

    def close(self) -> None:
        """Abandon the stream: drop its queued chunks and wait until no worker holds any of them."""
        hasher = self._hasher
        with hasher._cond:
            self._pending = []
            self._closed = True
            while self._busy:
                hasher._cond.wait()
            hasher._open.pop(self, None)
            hasher._cond.notify_all()

    def __enter__(self) -> HashStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._digest is None:
            self.close()


class MultiHasher:
    """Hashes the queued chunks of all open `HashStream`s together, in lanes: `threads` calls at
    most at once, made by its worker threads or by digest() callers (see the module docstring)."""

    def __init__(self, *, kernel: str | None = None, threads: int = 1, gather: float = 0.02):
        if threads < 1:
            raise ValueError("a MultiHasher needs at least one thread")
        self.kernel = resolve_kernel(kernel)
        self._new_state, self._absorb, self._lanes_for = _engine(self.kernel)
        self._threads = threads
        self._gather = gather
        self._cond = threading.Condition()
        self._open: dict[HashStream, None] = {}  # streams not yet digested or closed, oldest first
        self._calls = 0  # hashing calls running, at most `threads` (workers and digest() helpers)
        self._workers: list[threading.Thread] = []
        self._closed = False

    def stream(self) -> HashStream:
        """A new stream; end it with digest() or close()."""
        with self._cond:
            if self._closed:
                raise RuntimeError("stream() on a closed MultiHasher")
            while len(self._workers) < self._threads:
                worker = threading.Thread(target=self._work, name="md5-lanes", daemon=True)
                worker.start()
                self._workers.append(worker)
            stream = HashStream(self, self._new_state())
            self._open[stream] = None
            return stream

    def close(self) -> None:
        """Stop the workers; streams still open finish in their own digest() calls."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> MultiHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._run(batch)

    def _take_batch(self) -> list[tuple[HashStream, list[memoryview]]] | None:
        """Wait for work worth a call (see the module docstring); None once closed."""
        with self._cond:
            while not self._closed:
                idle = [s for s in self._open if not s._busy]
                ready = [s for s in idle if s._pending]
                if not ready or self._calls == self._threads:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                oldest = min(s._since for s in ready)
                if len(ready) == len(idle) or now - oldest >= self._gather:
                    return self._claim([])
                self._cond.wait(oldest + self._gather - now)
            return None

    def _claim(self, first: list[HashStream]) -> list[tuple[HashStream, list[memoryview]]]:
        """Under the lock: `first`, then the streams waiting longest, as many as the kernel that
        would hash them all has lanes (one, if that is scalar: another thread may take the next)."""
        others = sorted((s for s in self._open if s._pending and not s._busy and s not in first), key=_since)
        candidates = first + others
        self._calls += 1
        batch = []
        for stream in candidates[: self._lanes_for(len(candidates))]:
            batch.append((stream, stream._take(BATCH_BYTES)))
            stream._busy = True
        return batch

    def _run(self, batch: list[tuple[HashStream, list[memoryview]]]) -> None:
        """Hash a claimed batch (without the lock), then hand its streams back."""
        try:
            self._absorb([(stream._state, chunks) for stream, chunks in batch])
        except BaseException as exc:  # MemoryError: the streams' digest() reports it
            for stream, _ in batch:
                stream._error = exc
        with self._cond:
            self._calls -= 1
            for stream, _ in batch:
                stream._busy = False
            self._cond.notify_all()


def _since(stream: HashStream) -> float:
    return stream._since
