"""The daemon's numbers, outside the process: crunchstat lines and a Prometheus endpoint.

(The third way out, ``.fedmount/stats.json`` inside the mount, is a file of `tree.py`.)

crunchstat
    ``--crunchstat-interval N`` writes arv-mount's lines to stderr every N seconds, each
    with the running totals and the change over the interval::

        crunchstat: keepcalls 0 put 12 get -- interval 10.0000 seconds 0 put 2 get

    The arv-mount groups (``keepcalls``, ``net:keep0``, ``keepcache``, ``fuseops``,
    ``blkio:0:0``, ``fuseop:<op>``) come first and count what arv-mount's count, so that
    crunchstat-summary, which reads them from crunch-run's ``arv-mount.txt``, gives the same
    figures: ``keepcalls get`` is block look-ups (cache hits and misses, as the SDK's
    ``KeepClient.get`` counts calls) and ``put`` blocks written, ``net:keep0`` bytes sent
    and received from Keep, ``fuseops``/``blkio:0:0`` FUSE writes and reads and their bytes.
    fedmount adds one ``net:keep:<cluster>`` group per cluster (bytes received, requests,
    errors, hedged GETs), ``read_ahead`` and the process figures from psutil
    (``fedmount:cpu`` user/sys seconds, ``fedmount:mem`` rss bytes):
    named so, not ``cpu`` and ``mem``, because crunchstat-summary reads ``arv-mount.txt``
    together with the container's ``crunchstat.txt`` and would take them for the
    container's own.

Prometheus
    ``--stats-port PORT`` serves `Stats.prometheus_text` (plus ``process_*`` gauges) at
    ``http://127.0.0.1:PORT/metrics``: a minimal HTTP/1.0 responder on trio, loopback only.
    Any local user can connect to it, so it must not be a way to starve the daemon:
    `serve_bounded` accepts a connection only while fewer than ``MAX_CONNECTIONS`` are
    open (the others wait in the kernel's accept queue, holding no descriptor of the
    daemon's) and closes each one ``CONNECTION_SECONDS`` after accepting it, answered or
    not. A flood of idle connections therefore costs the daemon at most
    ``MAX_CONNECTIONS`` file descriptors, the reads through the mount keep theirs, and the
    port answers again once the flood is gone. A scrape on loopback takes milliseconds.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

import psutil
import trio

from fedmount.defaults import STATS_CONNECTION_SECONDS, STATS_MAX_CONNECTIONS
from fedmount.stats import Stats

log = logging.getLogger("fedmount.stats")

Group = tuple[str, list[tuple[str, float]]]

MAX_CONNECTIONS = STATS_MAX_CONNECTIONS
CONNECTION_SECONDS = STATS_CONNECTION_SECONDS
# accept() errors that mean "out of descriptors or memory for now": wait, then accept again
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _labelled(stats: Stats, name: str, label: str) -> dict[str, float]:
    """``{label value: value}`` of a counter labelled by `label` (other labels summed)."""
    series = stats.snapshot().get(name)
    out: dict[str, float] = {}
    if isinstance(series, dict):
        for labels, value in series.items():
            for pair in labels.split(","):
                key, _, val = pair.partition("=")
                if key == label:
                    out[val] = out.get(val, 0) + value
    return out


def process_figures(process: psutil.Process) -> dict[str, float]:
    cpu = process.cpu_times()
    rss = process.memory_info().rss
    return {"cpu_user_seconds": cpu.user, "cpu_system_seconds": cpu.system, "rss_bytes": rss}


def crunchstat_groups(stats: Stats, process: psutil.Process) -> list[Group]:
    ops = _labelled(stats, "fuse_ops", "op")
    op_seconds = _labelled(stats, "fuse_seconds", "op")
    figures = process_figures(process)
    hits, misses = stats.get("cache_hits"), stats.get("cache_misses")
    groups: list[Group] = [
        ("keepcalls", [("put", stats.get("keep_puts")), ("get", hits + misses)]),
        ("net:keep0", [("tx", stats.get("keep_put_bytes")), ("rx", stats.get("keep_bytes"))]),
        ("keepcache", [("hit", hits), ("miss", misses)]),
        ("fuseops", [("write", ops.get("write", 0)), ("read", ops.get("read", 0))]),
        ("blkio:0:0", [("write", stats.get("fuse_write_bytes")), ("read", stats.get("fuse_read_bytes"))]),
    ]
    for op in sorted(ops):
        groups.append((f"fuseop:{op}", [("count", ops[op]), ("time", op_seconds.get(op, 0.0))]))
    keep_bytes = _labelled(stats, "keep_bytes", "cluster")
    keep_requests = _labelled(stats, "keep_requests", "cluster")
    keep_errors = _labelled(stats, "keep_errors", "cluster")
    keep_hedges = _labelled(stats, "keep_hedges", "cluster")
    for cluster in sorted(set(keep_bytes) | set(keep_requests)):
        groups.append((f"net:keep:{cluster}", [
            ("rx", keep_bytes.get(cluster, 0)), ("requests", keep_requests.get(cluster, 0)),
            ("errors", keep_errors.get(cluster, 0)), ("hedges", keep_hedges.get(cluster, 0)),
        ]))  # fmt: skip
    groups.append(("read_ahead", [("depth", stats.get("read_ahead_depth")),
                                ("started", stats.get("read_ahead_started"))]))
    cpu = [("user", figures["cpu_user_seconds"]), ("sys", figures["cpu_system_seconds"])]
    groups.append(("fedmount:cpu", cpu))
    groups.append(("fedmount:mem", [("rss", figures["rss_bytes"])]))
    return groups


def _value(value: float, name: str) -> str:
    if name in ("time", "user", "sys"):
        return f"{float(value):.6f} {name}"
    return f"{int(value)} {name}"


class CrunchStat:
    """Formats groups as arv-mount does: totals, then ``-- interval`` and the changes."""

    def __init__(self, interval: float, groups: Callable[[], list[Group]]):
        self.interval = interval
        self._groups = groups
        self._previous: dict[tuple[str, str], float] = {}

    def lines(self) -> list[str]:
        out = []
        for prefix, values in self._groups():
            totals = " ".join(_value(v, n) for n, v in values)
            deltas = " ".join(_value(v - self._previous.get((prefix, n), 0), n) for n, v in values)
            out.append(f"crunchstat: {prefix} {totals} -- interval {self.interval:.4f} seconds {deltas}")
            self._previous.update(((prefix, n), v) for n, v in values)
        return out

    async def run(self, stream: TextIO = sys.stderr) -> None:
        while True:
            await trio.sleep(self.interval)
            stream.write("".join(line + "\n" for line in self.lines()))
            stream.flush()


def prometheus_text(stats: Stats, process: psutil.Process) -> str:
    extra = "".join(
        f"# TYPE fedmount_process_{name} gauge\nfedmount_process_{name} {value:g}\n"
        for name, value in process_figures(process).items()
    )
    return stats.prometheus_text() + extra


async def serve_prometheus(stats: Stats, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """Serve ``/metrics`` on 127.0.0.1:`port` until cancelled; OSError if the port is taken."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)
    await serve_bounded(metrics_handler(stats), listeners, task_status=task_status)


def metrics_handler(stats: Stats) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """The HTTP/1.0 exchange of one connection: ``GET /metrics`` (or ``/``), else 404."""
    process = psutil.Process()

    async def answer(stream: trio.abc.Stream) -> None:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 8192:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            request += chunk
        parts = request.split(b" ", 2)
        if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (b"/", b"/metrics"):
            status, body = "200 OK", prometheus_text(stats, process).encode()
        else:
            status, body = "404 Not Found", b"try GET /metrics\n"
        head = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        await stream.send_all(head.encode() + body)

    return answer


async def serve_bounded(
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    limit: int = MAX_CONNECTIONS,
    seconds: float = CONNECTION_SECONDS,
    task_status=trio.TASK_STATUS_IGNORED,  # type: ignore[no-untyped-def]
) -> None:
    """`trio.serve_listeners` with bounds: at most `limit` connections open at once (no
    ``accept`` while they are), each closed `seconds` after it was accepted."""
    slots = trio.Semaphore(limit)

    async def serve_one(stream: trio.abc.Stream) -> None:
        try:
            with trio.move_on_after(seconds):
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            slots.release()

    async def accept_loop(listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as e:
                slots.release()
                if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("metrics port: cannot accept a connection (%s); waiting", e.strerror)
                await trio.sleep(1.0)
                continue
            nursery.start_soon(serve_one, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(listeners)
