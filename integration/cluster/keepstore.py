"""An emulated keepstore: GET/HEAD/PUT of blocks on one volume, with permission checks.

Follows ``services/keepstore/router.go`` and ``keepstore.go``:

- ``GET|HEAD /<hash>+<size>[+hints]``: the locator is checked like ``getLocatorInfo``
  (32 hex, ``+size`` first; else 400 "invalid locator"); a GET without a size is 405 unless
  it names the empty block. A locator with ``+R`` and no ``+A`` is read from the remote
  cluster (below). Otherwise the ``+A`` signature is checked over the token exactly as
  sent: no token 401, expired 401, missing or wrong signature 400. Then the block file is
  sent with ``Content-Length`` and ``Vary: X-Keep-Signature``, or 404 if absent.
- ``PUT /<hash>`` (``handleBlockWrite``, ``BlockWrite``, ``putProgress``): the body's
  md5 must equal the hash (else 400), its length the ``Content-Length`` (else 400);
  bodies over 64 MiB get 413. ``X-Keep-Storage-Classes`` names the classes wanted: a
  volume is written only if it has one of them (or none was asked), so a keepstore whose
  volume has none of them stores nothing and answers 507 "insufficient storage". The
  answer is the locator signed for the caller's token, one line, with
  ``X-Keep-Replicas-Stored: 1`` and ``X-Keep-Storage-Classes-Confirmed`` listing every
  class of the volume written (``archive=1, default=1``). The volume's classes are the
  cluster profile's (`profiles`).
- ``X-Keep-Signature: local, <time>`` on a GET or HEAD of a ``+R`` locator (and no
  ``+A``) is ``blockReadRemote`` with ``LocalLocator``: the block is read whole from the
  remote cluster (below), stored on this keepstore's volume, and the answer carries
  ``X-Keep-Locator: <hash>+<size>+A<signature for the caller>@<expiry>`` (the SDK's
  ``KeepClient.refresh_signature`` sends a HEAD for it). On a locally signed locator the
  header changes nothing.
- ``+R<cluster>-<sig>@<exp>`` (``blockReadRemote``): the cluster must be a known remote
  (else 400); a token that is not v2 is 400; the caller's token is salted for that
  cluster, the hint is turned back into ``+A``, the remote's service list is read from
  its controller's ``keep_services/accessible`` (cached 5 minutes, dummy token ``xxx``
  as keepstore's remote client sends), the block is fetched in probe order and streamed
  back. The last chunk is held until the md5 is verified, so corrupt data from a remote
  cuts the connection instead of being served. Any remote failure is 404, as
  keepclient's ``ErrNotFound`` maps. The remote keepstore logs that GET with
  ``from_service: "<cluster>/<keepN>"`` (the emulator's internal ``X-Emulator-From``
  header), so tests can count cross-cluster transfers in the request log.

Errors are text lines, as keepstore writes them. Keepstore never asks the API whether
a token is valid: the HMAC is the whole authorization.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

from fedmount.arvados.tokens import TokenError, parse_token, salt_for

from . import signing
from .httpbase import FileBody, Handler, Response, StreamBody
from .manifests import MAX_BLOCK

EMPTY_HASH = "d41d8cd98f00b204e9800998ecf8427e"
_REMOTE_SERVICES_TTL = 300
_remote_services: dict[str, tuple[float, list[tuple[str, str]]]] = {}
_remote_lock = threading.Lock()


class BadLocator(Exception):
    pass


def locator_info(loc: str) -> tuple[str, int, bool, bool]:
    """(hash, size or 0, signed, remote) with keepstore's rules (getLocatorInfo)."""
    parts = loc.split("+")
    if len(parts[0]) != 32 or any(c not in "0123456789abcdef" for c in parts[0]) or "" in parts:
        raise BadLocator(loc)
    size = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if any(p[0].isdigit() for p in parts[2:]):
        raise BadLocator(loc)
    return parts[0], size, any(p[0] == "A" for p in parts[1:]), any(p[0] == "R" for p in parts[1:])


def probe_order(block_hash: str, services: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(uuid, root) sorted by md5(hash + last 15 chars of uuid), descending (keep.py)."""
    return sorted(
        services, key=lambda s: hashlib.md5((block_hash + s[0][-15:]).encode()).hexdigest(), reverse=True
    )


class KeepstoreHandler(Handler):
    @property
    def volume(self) -> int:
        return int(self.server.name.removeprefix("keep"))

    @property
    def cluster(self):
        return self.server.world.clusters[self.server.cluster_id]

    def error(self, status: int, message: str) -> Response:
        return Response(status, f"{message}\n".encode(), content_type="text/plain; charset=utf-8")

    def route(self) -> Response:
        locator = unquote(self.url_path[1:])
        if self.command in ("GET", "HEAD") and "/" not in locator and locator:
            response = self.read_block(locator)
            response.headers["Vary"] = "X-Keep-Signature"
            return response
        if self.command == "PUT" and "/" not in locator and locator:
            return self.write_block(locator)
        if self.command == "OPTIONS":
            return Response(
                200,
                b"",
                {
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
                },
            )
        return self.error(400, "Bad Request")

    def read_block(self, locator: str) -> Response:
        try:
            block_hash, size, signed, remote = locator_info(locator)
        except BadLocator:
            return self.error(400, "invalid locator")
        if self.command == "GET" and size == 0 and block_hash != EMPTY_HASH:
            return self.error(405, "method not allowed")
        if remote and not signed:
            return self.read_remote(locator)
        cluster = self.cluster
        token = self.token_received
        if not token:
            return self.error(401, "no token provided in Authorization header")
        problem = signing.verify_locator(locator, token, cluster.signing_key, cluster.ttl)
        if problem == signing.EXPIRED:
            return self.error(401, "expired signature")
        if problem:
            return self.error(400, "invalid signature")
        path = cluster.block_path(self.volume, block_hash)
        try:
            length = path.stat().st_size
        except FileNotFoundError:
            return self.error(404, "file does not exist")
        return Response(200, FileBody(path, length), content_type="application/octet-stream")

    def write_block(self, locator: str) -> Response:
        try:
            block_hash, _, _, _ = locator_info(locator)
        except BadLocator:
            return self.error(400, "invalid locator")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BLOCK:
            return self.error(413, "request entity too large")
        data = self.read_body()
        if length and len(data) != length:
            return self.error(400, f"content length {len(data)} did not match specified data size {length}")
        digest = hashlib.md5(data).hexdigest()
        if digest != block_hash:
            return self.error(400, f"content hash {digest} did not match specified locator {block_hash}")
        wanted = {c.strip() for c in self.headers.get("X-Keep-Storage-Classes", "").split(",") if c.strip()}
        classes = self.cluster.profile.volume_storage_classes(self.volume)
        if wanted and not wanted & set(classes):
            return self.error(507, "insufficient storage")
        signed = self.store_locally(digest, data)
        return Response(
            200,
            f"{signed}\n".encode(),
            {
                "X-Keep-Replicas-Stored": "1",
                "X-Keep-Storage-Classes-Confirmed": ", ".join(f"{c}=1" for c in sorted(classes)),
            },
            content_type="text/plain; charset=utf-8",
        )

    def store_locally(self, digest: str, data: bytes) -> str:
        """Write the block to this keepstore's volume; its locator signed for the caller."""
        cluster = self.cluster
        cluster.store_block(digest, data, [self.volume])
        return signing.sign_locator(
            f"{digest}+{len(data)}", self.token_received or "", cluster.signing_key, cluster.ttl
        )

    # --- +R: read from the remote cluster ----------------------------------------------

    def read_remote(self, locator: str) -> Response:
        converted = signing.remote_hint_to_local(locator)
        world = self.server.world
        if converted is None or converted[0] not in world.clusters or converted[0] == self.server.cluster_id:
            return self.error(400, "invalid remote signature hint")
        remote_id, local_locator = converted
        if not self.token_received:
            return self.error(401, "no token provided in Authorization header")
        try:
            salted = salt_for(parse_token(self.token_received), remote_id).text
        except TokenError:
            return self.error(400, "remote signature hint requires a v2 token")
        try:
            services = self._remote_services(remote_id)
        except (OSError, ValueError, http.client.HTTPException):
            return self.error(404, f"cannot list keep services of {remote_id}")
        errors: list[str] = []
        local_signature = self.headers.get("X-Keep-Signature", "").split(",")[0].strip() == "local"
        for _, root in probe_order(local_locator[:32], services):
            if local_signature:
                data = self._fetch_whole(root, local_locator, salted, errors)
                if data is not None:
                    signed = self.store_locally(local_locator[:32], data)
                    return Response(
                        200, data, {"X-Keep-Locator": signed}, content_type="application/octet-stream"
                    )
                continue
            response = self._fetch(root, local_locator, salted, errors)
            if response is not None:
                return response
        return self.error(404, f"GET {local_locator[:32]} from {remote_id} failed: {'; '.join(errors)}")

    def _remote_services(self, remote_id: str) -> list[tuple[str, str]]:
        now = time.time()
        with _remote_lock:
            cached = _remote_services.get(remote_id)
        if cached and cached[0] > now:
            return cached[1]
        world = self.server.world
        conn = http.client.HTTPSConnection(
            world.clusters[remote_id].api_host, timeout=30, context=world.client_ssl
        )
        try:
            conn.request(
                "GET",
                "/arvados/v1/keep_services/accessible",
                headers={"Authorization": "Bearer xxx", "X-Request-Id": _request_id()},
            )
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise ValueError(f"keep_services/accessible answered {resp.status}")
        items = json.loads(body)["items"]
        services = [
            (
                s["uuid"],
                f"{'https' if s['service_ssl_flag'] else 'http'}://{s['service_host']}:{s['service_port']}/",
            )
            for s in items
        ]
        with _remote_lock:
            _remote_services[remote_id] = (now + _REMOTE_SERVICES_TTL, services)
        return services

    def _fetch_whole(self, root: str, locator: str, token: str, errors: list[str]) -> bytes | None:
        """GET the whole block from one remote service into memory, md5 checked."""
        split = urlsplit(root)
        conn = http.client.HTTPConnection(split.hostname, split.port, timeout=60)
        try:
            conn.request("GET", "/" + locator, headers=self._remote_headers(token))
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{root}: {exc}")
            return None
        finally:
            conn.close()
        if resp.status != 200:
            errors.append(f"{root}: {resp.status}")
            return None
        if hashlib.md5(data).hexdigest() != locator[:32]:
            errors.append(f"{root}: checksum mismatch")
            return None
        return data

    def _remote_headers(self, token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token}",
            "X-Request-Id": _request_id(),
            "X-Emulator-From": f"{self.server.cluster_id}/{self.server.name}",
        }

    def _fetch(self, root: str, locator: str, token: str, errors: list[str]) -> Response | None:
        split = urlsplit(root)
        conn = http.client.HTTPConnection(split.hostname, split.port, timeout=30)
        try:
            conn.request(self.command, "/" + locator, headers=self._remote_headers(token))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            errors.append(f"{root}: {exc}")
            return None
        if resp.status != 200:
            errors.append(f"{root}: {resp.status}")
            conn.close()
            return None
        length = int(resp.getheader("Content-Length") or 0)
        if self.command == "HEAD":
            conn.close()
            return Response(200, StreamBody((), length), content_type="application/octet-stream")
        return Response(
            200,
            StreamBody(_verified(resp, locator[:32]), length, conn.close),
            content_type="application/octet-stream",
        )


def _verified(resp: http.client.HTTPResponse, block_hash: str):
    """Yield the body, holding back the last chunk until its md5 is known to be right.

    The md5 runs in a worker thread (hashlib releases the GIL), overlapped with sending.
    """
    md5 = hashlib.md5()
    held = b""
    with ThreadPoolExecutor(max_workers=1) as hasher:
        pending = None
        while chunk := resp.read(4 << 20):
            if held:
                yield held
            if pending is not None:
                pending.result()
            pending = hasher.submit(md5.update, chunk)
            held = chunk
        if pending is not None:
            pending.result()
    if md5.hexdigest() != block_hash:
        raise ConnectionResetError(f"checksum mismatch from remote for {block_hash}")
    if held:
        yield held


def _request_id() -> str:
    return "req-" + secrets.token_hex(10)[:20]
