"""Sockets, HTTP/1.1 and fault injection shared by every emulated service.

Each `Service` owns one listening socket on 127.0.0.1 and an accept thread; every
connection gets its own thread running a `Handler` (``http.server`` with keep-alive, TLS
for controllers). A handler subclass turns a request into a `Response`; the base class
applies the service's fault (see `faults`), sends the response and writes one line to the
request log.

Bodies are bytes, a `FileBody` (sent with ``os.sendfile`` straight from the block file, so a
keepstore serves a 64 MiB block at memory speed without holding the GIL) or a
`StreamBody` (an iterator, for proxied blocks). Corruption and bandwidth caps take the
slow path: the body is copied through user space in chunks.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .faults import Fault
from .model import World

CHUNK = 1 << 20


@dataclass
class FileBody:
    path: Path
    length: int


@dataclass
class StreamBody:
    chunks: Iterable[bytes]
    length: int
    close: Callable[[], None] = lambda: None


@dataclass
class Response:
    status: int
    body: bytes | FileBody | StreamBody = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj: object, **headers: str) -> Response:
        return cls(status, json.dumps(obj).encode(), dict(headers))

    @property
    def length(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else self.body.length


class Handler(BaseHTTPRequestHandler):
    """Per-connection request loop; subclasses implement `route()` and `error()`."""

    fault: Fault | None = None  # the fault of the request being answered

    protocol_version = "HTTP/1.1"
    logged = True
    disable_nagle_algorithm = True
    timeout = 300
    server: Service

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Silence http.server's stderr log; the request log has everything."""

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # --- request helpers ---------------------------------------------------------------

    def read_body(self) -> bytes:
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def header_token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        for scheme in ("Bearer ", "OAuth2 "):
            if auth.startswith(scheme):
                return auth[len(scheme) :].strip()
        return None

    # --- the request cycle -------------------------------------------------------------

    def setup_request(self) -> None:
        """Parse what every handler needs before faults apply (subclasses may read the body)."""
        split = urlsplit(self.path)
        self.url_path = split.path
        self.query = dict(parse_qsl(split.query, keep_blank_values=True))
        self.token_received = self.header_token() or self.query.get("api_token")

    def route(self) -> Response:
        raise NotImplementedError

    def error(self, status: int, message: str) -> Response:
        raise NotImplementedError

    def _dispatch(self) -> None:
        started = time.time()
        service = self.server
        self._body_read = False
        self.token_received = None
        sent, status = 0, None
        try:
            self.setup_request()
            fault, epoch = service.world.faults.take(service.cluster_id, service.name)
            self.fault = fault  # for route(), which may apply what the fault says to answer
            if fault and fault.down:
                _reset(self.connection)
                self.close_connection = True
                return
            if fault and fault.latency_ms:
                time.sleep(fault.latency_ms / 1000)
            try:
                response = (
                    self.error(fault.status, "injected fault") if fault and fault.status else self.route()
                )
            except Exception as exc:  # a bug in the emulator: show it, answer 500
                traceback.print_exc(file=sys.stderr)
                response = self.error(500, f"emulator error: {exc}")
            status = response.status
            if not self._body_read and self.command in ("POST", "PUT", "PATCH"):
                self.close_connection = True
            sent = self._send(response, fault, epoch)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError, OSError):
            self.close_connection = True
        finally:
            if self.logged:
                service.world.log.write(
                    cluster=service.cluster_id,
                    service=service.name,
                    method=self.command,
                    path=self.path,
                    token=self.token_received,
                    status=status,
                    bytes=sent,
                    from_service=self.headers.get("X-Emulator-From"),
                    time=started,
                    duration=round(time.time() - started, 6),
                )

    def _send(self, response: Response, fault: Fault | None, epoch: int) -> int:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(response.length))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        body = response.body
        try:
            if fault and fault.stall:
                self.server.world.faults.wait_changed(
                    self.server.cluster_id, self.server.name, epoch, self.server.world.stop
                )
                self.close_connection = True
                return 0
            if self.command == "HEAD":
                return 0
            if isinstance(body, FileBody) and not (fault and (fault.corrupt or fault.bandwidth)):
                return self._sendfile(body)
            return self._copy(_chunks_of(body), fault)
        finally:
            if isinstance(body, StreamBody):
                body.close()

    def _sendfile(self, body: FileBody) -> int:
        """socket.sendfile: os.sendfile in a loop that waits out EAGAIN under the socket timeout."""
        with open(body.path, "rb") as f:
            return self.connection.sendfile(f, 0, body.length)

    def _copy(self, chunks: Iterable[bytes], fault: Fault | None) -> int:
        sent, started = 0, time.monotonic()
        rate = fault.bandwidth if fault and fault.bandwidth else None
        piece = max(1, min(65536, rate // 20)) if rate else CHUNK
        for chunk in chunks:
            if fault and fault.corrupt:
                chunk = _corrupt(chunk, sent)
            for i in range(0, len(chunk), piece):
                part = chunk[i : i + piece]
                self.wfile.write(part)
                sent += len(part)
                if rate:
                    delay = sent / rate - (time.monotonic() - started)
                    if delay > 0:
                        time.sleep(delay)
        return sent


def _chunks_of(body: bytes | FileBody | StreamBody) -> Iterable[bytes]:
    if isinstance(body, bytes):
        return (body,) if body else ()
    if isinstance(body, StreamBody):
        return body.chunks
    return _file_chunks(body)


def _file_chunks(body: FileBody) -> Iterable[bytes]:
    with open(body.path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _corrupt(chunk: bytes, offset: int) -> bytes:
    """Flip one byte in every 4 KiB of the body (the body's first byte included)."""
    out = bytearray(chunk)
    for i in range((-offset) % 4096, len(out), 4096):
        out[i] ^= 0xFF
    return bytes(out)


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a crashed server's kernel would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class PortInUse(Exception):
    pass


class Service:
    """One listening service (a controller, a keepstore or the control endpoint)."""

    def __init__(
        self,
        world: World,
        cluster_id: str,
        name: str,
        handler: type[Handler],
        ssl_context: ssl.SSLContext | None = None,
        port: int = 0,
    ):
        self.world, self.cluster_id, self.name = world, cluster_id, name
        self.handler, self.ssl_context = handler, ssl_context
        self.listener = self._listen(port)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{cluster_id}-{name}", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            raise PortInUse(
                f"cannot listen on 127.0.0.1:{port} for {self.cluster_id} {self.name}: {exc.strerror}"
            ) from None
        sock.listen(128)
        sock.settimeout(0.5)
        return sock

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        faults, stop = self.world.faults, self.world.stop
        while not stop.is_set():
            fault = faults.peek(self.cluster_id, self.name)
            if fault and fault.down == "refuse":
                self.listener.close()
                while (
                    not stop.is_set()
                    and (f := faults.peek(self.cluster_id, self.name))
                    and f.down == "refuse"
                ):
                    time.sleep(0.05)
                self.listener = self._listen(self.port)
                continue
            try:
                conn, addr = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if fault and fault.down == "reset":
                _reset(conn)
                continue
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True).start()

    def _serve(self, conn: socket.socket, addr: tuple) -> None:
        conn.settimeout(None)
        try:
            if self.ssl_context is not None:
                conn.settimeout(30)
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            self.handler(conn, addr, self)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
