"""The Keep data path: one blocking HTTP request for one block, hashed while it arrives.

`KeepClient` (keep.py) owns the policy (which service, retries, verification); this module
owns the bytes. A `BlockTransport` is a blocking callable that runs in a trio worker
thread: it sends one GET or HEAD, and for a 200 GET reads exactly ``size`` bytes into one
preallocated buffer (``into``, when the caller gives one: the block cache hands out a
mapping of the block's future cache file, so the body lands in the page cache with no
further copy; else a new ``bytearray``), handing every received chunk, in order, to a
``sink``. The KeepClient's sink is a `HashStream` of its `MultiHasher` (md5.py), which
queues the chunk and hashes it in SIMD lanes together with the chunks of the other blocks
arriving meanwhile, so hashing overlaps the network instead of following it. Unit tests
implement the protocol with a plain function over a dict of blocks; no socket is involved.

Blocks go through a pooled `urllib3.PoolManager` in a worker thread: urllib3's
``read1`` into one preallocated buffer runs close to a raw socket's ``recv_into``, while an
async HTTP client under trio is several times slower for 64 MiB bodies.

The body is read with ``read1`` (at most one ``recv`` per call, into urllib3's buffer and
copied once into ours, as ``readinto`` does too, and as fast), so the transport sees every
byte as it arrives. That is what lets it abandon a keepstore that *trickles*: a socket timeout only
fires when no byte at all comes, and a 64 MiB block at 512 B/s would take 36 hours.
`RateFloor` is curl's low-speed limit, which the Arvados SDK sets (32 KiB/s over 256 s):
once a body has been arriving for ``rate_window`` seconds, the bytes received in the last
``rate_window`` seconds (measured from marks taken every eighth of the window) must average
at least ``min_rate`` bytes per second, or the request fails and the caller moves on to the
next replica. A trickling keepstore therefore costs a reader at most about ``rate_window``
seconds, plus ``stall`` if it then sends nothing at all.

Errors without an HTTP status raise `TransportError` with a ``kind``: ``connect``
(nothing answered within the connect timeout), ``stall`` (no byte for ``stall`` seconds:
the socket read timeout is exactly that), ``slow`` (below ``min_rate`` over ``rate_window``,
see above), ``length`` (Content-Length differs from the locator's size) or ``network``
(reset, short body, TLS failure).

Abort. A request may lose a race (hedge.py): `Abort.abort`, from any thread, ends it
promptly. The worker thread installs its request's `Abort` (``with abort.installed():``);
the urllib3 connection registers its socket with it just before waiting for the response
(`_Abortable`, for fresh and pooled connections alike) and unregisters it before the
connection goes back to the pool, so `abort` shuts exactly that socket down and the read
blocked on it (headers or body) returns at once; the request then fails (its kind does
not matter: the caller knows it aborted it). A request aborted before it reached that
point fails as soon as it does. Only the connect itself is not interrupted (at most
``connect`` seconds). A fake transport of the tests waits on `Abort.current()` instead.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import urllib3

from fedmount import defaults

CHUNK = 2 << 20  # most bytes per read1: big enough to hash in one call, small enough to overlap


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # seconds to establish a connection and send the request
    stall: float = 30.0  # seconds without receiving a single byte before the replica is abandoned
    min_rate: float = defaults.KEEP_MIN_RATE  # bytes/s a body must average over `rate_window` (0: no floor)
    rate_window: float = defaults.KEEP_RATE_WINDOW  # seconds over which `min_rate` is judged


@dataclass
class Response:
    status: int
    body: bytearray | memoryview | None = None  # the block, for a 200 GET only


class TransportError(Exception):
    """A request without a usable HTTP answer; `kind`: connect, stall, slow, length, network, aborted."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Abort:
    """Ends one blocking request from another thread (see the module docstring)."""

    _local = threading.local()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._event = threading.Event()

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    @classmethod
    def current(cls) -> Abort | None:
        """The `Abort` the calling thread's request installed, if any."""
        return getattr(cls._local, "abort", None)

    @contextmanager
    def installed(self) -> Iterator[Abort]:
        """Makes this the calling thread's `current` for the request run inside."""
        Abort._local.abort = self
        try:
            yield self
        finally:
            Abort._local.abort = None
            self.watch(None)

    def watch(self, sock: socket.socket | None) -> None:
        """The socket `abort` shuts down from now on (None: none); raises once aborted."""
        with self._lock:
            self._sock = sock
            if sock is not None and self.aborted:
                raise TransportError("aborted", "aborted: another request won")

    def abort(self) -> None:
        with self._lock:
            self._event.set()
            if self._sock is not None:
                try:  # the plain socket's shutdown, also under TLS: the blocked read sees EOF
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait(self, timeout: float | None) -> bool:
        """Blocks until aborted (True) or `timeout` seconds passed (False): for fake transports."""
        return self._event.wait(timeout)


def _watch(sock: object) -> None:
    """Registers the calling thread's request socket with its `Abort`, if it installed one."""
    abort = Abort.current()
    if abort is not None:
        abort.watch(sock if isinstance(sock, socket.socket) else None)


class _Abortable:
    """A urllib3 connection whose socket the thread's `Abort` can shut while waiting for the answer."""

    sock: object

    def getresponse(self, *args: object, **kwargs: object) -> object:
        _watch(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Abortable, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Abortable, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class RateFloor:
    """Fails a transfer whose rate over the last `window` seconds fell below `min_rate`.

    Call `received` with each chunk's size as it arrives; it raises `TransportError`
    (``slow``) once `window` seconds have passed since the start (or since the mark it
    judges from) and the bytes since then average less than `min_rate` per second. Marks
    of (time, bytes so far) are kept at most every ``window / 8`` seconds, so the judged
    span is between `window` and about 1.125 × `window` and the state stays small."""

    def __init__(self, min_rate: float, window: float, clock: Callable[[], float] = time.monotonic):
        self._min_rate = min_rate
        self._window = window
        self._clock = clock
        self._total = 0
        self._marks: deque[tuple[float, int]] = deque([(clock(), 0)])

    def received(self, n: int) -> None:
        self._total += n
        if self._min_rate <= 0 or self._window <= 0:
            return
        now, marks = self._clock(), self._marks
        while len(marks) > 1 and marks[1][0] <= now - self._window:
            marks.popleft()  # keep marks[0] the newest mark at least a window old
        since, then = marks[0]
        elapsed = now - since
        if elapsed >= self._window and self._total - then < self._min_rate * elapsed:
            rate = (self._total - then) / elapsed
            why = f"{rate:.0f} B/s over the last {elapsed:.0f}s, below the minimum {self._min_rate:.0f} B/s"
            raise TransportError("slow", why)
        if now - marks[-1][0] >= self._window / 8:
            marks.append((now, self._total))


Sink = Callable[[memoryview], None]


class BlockTransport(Protocol):
    def __call__(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        size: int,
        timeouts: Timeouts,
        sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        """Blocking. For a 200 GET return exactly `size` bytes (received into `into`, a writable
        buffer of `size` bytes, when given) and pass each chunk to `sink` in order."""
        ...


class Urllib3Transport:
    """The production transport: a pooled urllib3 client, keep-alive per keep service."""

    def __init__(self, *, ca_file: str | None = None, insecure: bool = False, pool_size: int = 8):
        self._pool = urllib3.PoolManager(
            num_pools=64,
            maxsize=pool_size,
            retries=False,
            cert_reqs="CERT_NONE" if insecure else "CERT_REQUIRED",
            ca_certs=ca_file,
        )
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def __call__(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        size: int,
        timeouts: Timeouts,
        sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        try:
            resp = self._pool.request(
                method,
                url,
                headers=dict(headers),
                preload_content=False,
                decode_content=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=timeouts.connect, read=timeouts.stall),
            )
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise TransportError("connect", f"connect timed out after {timeouts.connect:g}s") from exc
        except urllib3.exceptions.NewConnectionError as exc:
            raise TransportError("connect", f"cannot connect: {_reason(exc)}") from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise TransportError("stall", f"no response for {timeouts.stall:g}s") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError("network", _reason(exc)) from exc
        ok = False
        try:
            if method != "GET" or resp.status != 200:
                resp.drain_conn()
                ok = True
                return Response(resp.status)
            length = resp.headers.get("Content-Length")
            if length is not None and length != str(size):
                raise TransportError("length", f"Content-Length {length} but the locator says {size}")
            body = into if into is not None else bytearray(size)
            view = memoryview(body)
            floor = RateFloor(timeouts.min_rate, timeouts.rate_window)
            got = 0
            while got < size:
                chunk = resp.read1(min(CHUNK, size - got))
                n = len(chunk)
                if not n:
                    raise TransportError("network", f"body ended after {got} of {size} bytes")
                view[got : got + n] = chunk
                sink(view[got : got + n])
                got += n
                floor.received(n)
            ok = True
            return Response(200, body)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise TransportError("stall", f"no bytes for {timeouts.stall:g}s") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError("network", _reason(exc)) from exc
        finally:
            _watch(None)  # before the connection may serve another request
            if not ok:
                resp.close()
            resp.release_conn()


def _reason(exc: BaseException) -> str:
    """The innermost cause of an urllib3 error, on one line."""
    while exc.__context__ is not None and not str(exc):
        exc = exc.__context__
    return " ".join(str(exc).split()) or type(exc).__name__
