"""Async client of one Arvados cluster's API (controller), over `httpx.AsyncClient`.

One `ControllerClient` talks to one cluster with one token, and is the only place
fedmount speaks the API protocol (reference/arvados-protocol.md §0–§2, §6):

- The discovery document (``GET /discovery/v1/apis/arvados/v1/rest``, no auth) is fetched
  once per client, under a lock so concurrent first callers share one request, and cached
  for the client's life. Calls go to ``rootUrl + servicePath + path`` as the Python SDK
  does; path parameters are percent-encoded (``+`` is ``%2B``).
- Every call sends ``Authorization: Bearer <token>`` with the exact token text the client
  was built with (the caller decides which token a cluster may see; see federation.py)
  and an ``X-Request-Id``.
- Retries: network errors and 408/429/5xx are retried with jittered exponential backoff
  (`fedmount.arvados.retry`: ``backoff * 2**attempt`` capped at ``max_backoff``), at most ``retries`` times
  and never past ``retry_budget`` seconds since the first attempt. Every other status is
  an answer: 401/403/404/422 mean what they say and are raised at once.
- Failures raise the `ApiError` tree of `fedmount.arvados.errors`: `ClusterUnreachable`
  when no HTTP answer came, `ApiRefused` (`AccessDenied`, `NotFound`) with the status the
  server sent, each with the cluster and a one-line message built from the server's
  ``{"errors": [...]}``, passed through `redact` so that no token can leak into a log line.
- What a cluster says about itself is checked before it is used anywhere (a stats label,
  a log line, a route): the discovery document's ``uuidPrefix`` must be a cluster id (and,
  for a client made for a named cluster, that cluster's), and every keep service must have
  an Arvados uuid, a host name and a port. A cluster that answers otherwise is refused
  with one `BadAnswer` line, as a broken or hostile answer.
- ``collections/{id}`` may be asked for with ``select`` (a JSON list of field names):
  a re-check asks for the record without its manifest text, a few hundred bytes.
- Bodies are read into a buffer of the client's own and decoded from it, so a large
  answer (a 25 MB manifest) is freed as soon as its caller drops it: a body read by httpx
  stays on its response, which a reference cycle keeps until the cyclic collector runs.
  A body is refused, without reading the rest, once it is bigger than ``max_answer``
  (``fedmount --max-manifest-size``): a collection's record is the biggest answer there
  is, and loading one costs a few times its size in memory. A small body is decoded on
  the event loop; one over ``DECODE_IN_STEPS`` bytes by `stepwise_json` in a worker
  thread, which never holds the GIL (and so the loop) for long, as ``json.loads`` of a
  whole big body would.
- TLS: a CA file, the system trust store, or no verification in insecure mode
  (``ARVADOS_API_HOST_INSECURE``). The transport is injectable: unit tests pass an
  `httpx.MockTransport` and no socket is opened.

Stats (label ``cluster``): ``api_requests``, ``api_bytes`` (response bodies),
``api_retries``, ``api_errors``.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
import trio

from fedmount import defaults
from fedmount.arvados.errors import AnswerTooBig, ApiRefused, BadAnswer, ClusterUnreachable, NotFound, refusal
from fedmount.arvados.ids import IdError, check_cluster_id, check_uuid
from fedmount.arvados.retry import backoff_delay, new_request_id
from fedmount.arvados.routes import KeepService
from fedmount.arvados.tokens import ApiToken
from fedmount.stats import Stats

from . import stepwise_json

log = logging.getLogger("fedmount.controller")

DISCOVERY_PATH = "/discovery/v1/apis/arvados/v1/rest"
KEEP_SERVICES = "keep_services/accessible"
MiB = 1 << 20
DEFAULT_MAX_ANSWER = defaults.MAX_MANIFEST_SIZE  # twice the API's default MaxRequestSize
DECODE_IN_STEPS = 4 * MiB  # bodies bigger than this are decoded in a worker thread, in steps
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")  # a DNS name, IPv4 or [IPv6] address


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions behind it, outermost first."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is."""
    return next((e for e in _causes(error) if isinstance(e, ssl.SSLCertVerificationError)), None)


def _error_text(response: httpx.Response, body: bytes | bytearray) -> str:
    """The server's reason, from ``{"errors": [...]}`` when it sent one, in one short line."""
    try:
        errors = json.loads(body).get("errors")
        text = "; ".join(str(e) for e in errors) if errors else ""
    except (ValueError, AttributeError):
        text = ""
    text = text or response.reason_phrase or "no reason given"
    return text if len(text) <= 200 else text[:197] + "..."


class ControllerClient:
    """One cluster's API, as seen with one token."""

    def __init__(
        self,
        api_host: str,
        token: ApiToken,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        stats: Stats | None = None,
        retries: int = 4,
        cluster: str | None = None,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        retry_budget: float = 60.0,
        timeout: float = 30.0,
        max_answer: int = DEFAULT_MAX_ANSWER,
    ):
        self.api_host = api_host
        self.token = token
        self.stats = stats or Stats()
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_budget = retry_budget
        self.max_answer = max_answer
        self._label = cluster or api_host  # the stats/error label until discovery names it
        self._expected_cluster = cluster
        # Counts made before we know the cluster id, added under it once discovery names it.
        self._pending: list[tuple[str, float]] | None = None if cluster else []
        verify: ssl.SSLContext | bool = False
        if not insecure:
            verify = ssl.create_default_context(cafile=ca_file)
        self._http = httpx.AsyncClient(
            transport=transport, verify=verify, timeout=httpx.Timeout(timeout, connect=10.0)
        )
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = trio.Lock()
        self._keep_services: list[KeepService] | None = None
        self._keep_lock = trio.Lock()

    @property
    def cluster(self) -> str:
        """The cluster id once discovery named it, else what the caller called it."""
        return self._label

    async def aclose(self) -> None:
        await self._http.aclose()

    async def discovery(self) -> dict[str, Any]:
        async with self._discovery_lock:
            if self._discovery is None:
                try:
                    doc = await self._request(f"https://{self.api_host}{DISCOVERY_PATH}", auth=False)
                    self._label = self._checked_prefix(doc)
                    self._discovery = doc
                finally:
                    self._flush_pending()
            return self._discovery

    def _checked_prefix(self, doc: Any) -> str:
        """The discovery document's uuidPrefix, if it is a cluster id and the expected one."""
        prefix = doc.get("uuidPrefix") if isinstance(doc, dict) else None
        document = f"{self.api_host} served a discovery document"
        if not prefix:
            raise BadAnswer(self._label, f"{document} without uuidPrefix")
        try:
            check_cluster_id(prefix if isinstance(prefix, str) else f"{prefix!r} (a {type(prefix).__name__})")
        except IdError as e:
            raise BadAnswer(self._label, f"{document} with an {e}") from None
        if self._expected_cluster not in (None, prefix):
            raise BadAnswer(self._label, f"{self.api_host} calls itself cluster {prefix}, "
                           f"not {self._expected_cluster}")  # fmt: skip
        return prefix

    def _count(self, name: str, value: float = 1) -> None:
        if self._pending is not None:
            self._pending.append((name, value))
        else:
            self.stats.add(name, value, cluster=self._label)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending or [], None
        for name, value in pending:
            self.stats.add(name, value, cluster=self._label)

    async def cluster_id(self) -> str:
        return (await self.discovery())["uuidPrefix"]

    async def get_collection(self, id: str, select: Sequence[str] | None = None) -> dict[str, Any]:
        """The collection's record; with `select`, only those fields (and the ``kind``,
        ``etag`` and ``writable_by`` the API adds to every select-ed answer).

        `NotFound` also for a 422: the controller's answer when no cluster of the federation
        has the collection but not every one said 404 (``lib/controller/federation``)."""
        params = None if select is None else {"select": list(select)}
        try:
            return await self.call(f"collections/{quote(id, safe='')}", params)
        except ApiRefused as e:
            if e.status == 422:
                raise NotFound(e.cluster, e.message, e.status) from None
            raise

    async def current_user(self) -> dict[str, Any]:
        return await self.call("users/current")

    async def keep_services(self) -> list[KeepService]:
        """The cluster's accessible keep services (disk and proxy), fetched once."""
        async with self._keep_lock:
            if self._keep_services is None:
                answer = await self.call(KEEP_SERVICES)
                items = answer.get("items")
                self._keep_services = [self._keep_service(item) for item in items or []]
            return list(self._keep_services)

    def _keep_service(self, item: Any) -> KeepService:
        """One item of keep_services/accessible, checked; `BadAnswer` (one line) if it is malformed."""
        try:
            uuid, host, port = item["uuid"], item["service_host"], item["service_port"]
            check_uuid(uuid if isinstance(uuid, str) else repr(uuid))
            if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
                raise IdError("host name", str(host), 0, "not a host name or address")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise IdError("port", str(port), 0, "not a port number")
        except KeyError as e:
            raise BadAnswer(self._label, f"{KEEP_SERVICES} lists a service without {e}") from None
        except TypeError:
            raise BadAnswer(self._label, f"{KEEP_SERVICES} lists a non-object") from None
        except IdError as e:
            raise BadAnswer(self._label, f"{KEEP_SERVICES} lists a service with an {e}") from None
        scheme = "https" if item.get("service_ssl_flag") else "http"
        return KeepService(
            uuid=uuid,
            root_url=f"{scheme}://{host}:{port}/",
            service_type=str(item.get("service_type") or "disk"),
            read_only=bool(item.get("read_only")),
        )

    async def call(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET ``<rootUrl><servicePath><path>``; non-string parameters are JSON-encoded."""
        doc = await self.discovery()
        base = doc.get("rootUrl") or f"https://{self.api_host}/"
        url = base.rstrip("/") + "/" + (doc.get("servicePath") or "arvados/v1/").strip("/") + "/" + path
        query = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}
        answer = await self._request(url, params=query)
        if not isinstance(answer, dict):
            raise BadAnswer(self._label, f"GET {path}: the answer is not a JSON object")
        return answer

    async def _request(self, url: str, *, auth: bool = True, params: dict[str, str] | None = None) -> Any:
        headers = {"Accept": "application/json", "X-Request-Id": new_request_id()}
        if auth:
            headers["Authorization"] = f"Bearer {self.token.text}"
        path = httpx.URL(url).path
        started = time.monotonic()
        attempt = 0
        while True:
            self._count("api_requests")
            try:
                response, body = await self._get(url, path, headers, params)
                self._count("api_bytes", len(body))
                if response.status_code < 400:
                    return await self._answer(path, body)
                failure = self._refusal(path, response, body)
                if not failure.transient:
                    self._count("api_errors")
                    raise failure
            except httpx.TransportError as e:
                failure = ClusterUnreachable(self._label, self._transport_failure(e))
                if _certificate_error(e):
                    raise failure from None  # retrying cannot make a certificate trusted
            delay = backoff_delay(attempt, self.backoff, self.max_backoff)
            if attempt >= self.retries or time.monotonic() - started + delay > self.retry_budget:
                self._count("api_errors")
                raise failure
            attempt += 1
            self._count("api_retries")
            log.debug("retrying in %.2fs after %s", delay, failure)
            await trio.sleep(delay)

    async def _get(
        self, url: str, path: str, headers: dict[str, str], params: dict[str, str] | None
    ) -> tuple[httpx.Response, bytearray]:
        """GET `url`, its body read into a buffer of our own (see the module docstring);
        `AnswerTooBig` as soon as it is known to be bigger than ``max_answer``."""
        async with self._http.stream("GET", url, headers=headers, params=params) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_answer:
                raise self._too_big(path)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_answer:
                    raise self._too_big(path)
        return response, body

    def _too_big(self, path: str) -> AnswerTooBig:
        self._count("api_errors")
        limit = f"{self.max_answer / MiB:g} MiB"
        why = f"the answer is bigger than {limit}, the limit --max-manifest-size sets"
        return AnswerTooBig(self._label, f"GET {path}: {why}; raise it to mount this collection")

    def _transport_failure(self, error: httpx.TransportError) -> str:
        cert = _certificate_error(error)
        if cert is not None:
            return (
                f"the TLS certificate of {self.api_host} is not trusted ({cert.verify_message}): point "
                "REQUESTS_CA_BUNDLE at the cluster's CA, or set ARVADOS_API_HOST_INSECURE=1"
            )
        chain = _causes(error)
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if tls is not None:  # e.g. a plain-HTTP server: "[SSL: WRONG_VERSION_NUMBER] wrong version number"
            said = re.sub(r" \(_ssl\.c:\d+\)$", "", str(tls))
            return (f"TLS with {self.api_host} failed ({said}): ARVADOS_API_HOST must be the host:port "
                    "of the cluster's HTTPS controller")
        # Under trio the outer errors often say nothing; the first one that does is the reason.
        said = next((e for e in chain if str(e)), None)
        if said is None:
            reason = "no reason given"
        else:
            reason = str(said) if said is error else f"{type(said).__name__}: {said}"
        return f"cannot reach {self.api_host}: {type(error).__name__}: {reason}"

    def _refusal(self, path: str, response: httpx.Response, body: bytearray) -> ApiRefused:
        return refusal(self._label, f"GET {path}: {_error_text(response, body)}", response.status_code)

    async def _answer(self, path: str, body: bytearray) -> Any:
        try:
            if len(body) > DECODE_IN_STEPS:
                return await trio.to_thread.run_sync(stepwise_json.loads, body)
            return json.loads(body)
        except ValueError:
            raise BadAnswer(self._label, f"GET {path}: the answer is not JSON") from None
