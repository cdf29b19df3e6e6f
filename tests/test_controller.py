"""ControllerClient against a fake cluster behind httpx.MockTransport (no sockets)."""

from __future__ import annotations

import gc
import json
import ssl
import time

import httpx
import pytest
import trio

from fedmount.api.controller import DECODE_IN_STEPS, ControllerClient
from fedmount.arvados.errors import AnswerTooBig, ApiError, BadAnswer, ClusterUnreachable
from fedmount.arvados.routes import KeepService
from fedmount.arvados.tokens import parse_token
from fedmount.stats import Stats

HOME_TOKEN = "v2/zzzzz-gj3su-000000000000001/" + "s3cr3t" * 8  # the fake federation's (conftest.py)
EMPTY = "d41d8cd98f00b204e9800998ecf8427e+0"


def client(fake, **kw) -> ControllerClient:
    kw.setdefault("backoff", 0.001)
    return ControllerClient("api.zzzzz.example", fake.token, transport=fake.transport, **kw)


async def test_discovery_is_fetched_once_and_names_the_cluster(fake):
    c = client(fake)
    assert await c.cluster_id() == "zzzzz"
    await c.current_user()
    await c.current_user()
    paths = [r.path for r in fake.requests]
    assert paths.count("/discovery/v1/apis/arvados/v1/rest") == 1
    assert c.cluster == "zzzzz"
    await c.aclose()


async def test_discovery_is_sent_without_token_and_calls_with_bearer(fake):
    c = client(fake)
    await c.current_user()
    assert fake.requests[0].token is None
    assert fake.requests[1].token == HOME_TOKEN
    await c.aclose()


async def test_get_collection_by_uuid_and_pdh_percent_encodes(fake):
    rec = fake.add_collection("zzzzz", "1", {"a.txt": b"hello"})
    c = client(fake)
    assert (await c.get_collection(rec["uuid"]))["manifest_text"] == rec["manifest_text"]
    by_pdh = await c.get_collection(rec["portable_data_hash"])
    assert by_pdh["uuid"] == rec["portable_data_hash"]
    await c.aclose()


class _JsonStream(httpx.AsyncByteStream):
    """A body made as it is sent, in two chunks, as a socket delivers it (nothing keeps it)."""

    def __init__(self, doc: dict):
        self.doc = doc

    async def __aiter__(self):
        body = json.dumps(self.doc).encode()
        yield body[:10]
        yield body[10:]


async def test_an_answer_body_is_not_kept_after_the_call():
    """httpx keeps a body read with `aread` on its response, in a reference cycle: a big
    manifest would outlive the call until the cyclic collector ran."""
    record = {"uuid": "zzzzz-4zz18-bodybodybodybod", "manifest_text": ". " + "0" * 32 + "+0 0:0:x\n"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz", "rootUrl": "https://h/"})
        return httpx.Response(200, stream=_JsonStream(record))

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(handler))
    gc.collect()
    gc.disable()
    try:
        assert await c.get_collection(record["uuid"]) == record
        bodies = [
            r
            for o in gc.get_objects()
            for r in gc.get_referents(o)
            if isinstance(r, (bytes, bytearray)) and b"bodybodybodybod" in r
        ]
    finally:
        gc.enable()
    assert bodies == []
    await c.aclose()


class _Chunks(httpx.AsyncByteStream):
    """A body of `count` chunks of `size` bytes made as they are read; counts those read."""

    def __init__(self, count: int, size: int):
        self.count, self.size, self.sent = count, size, 0

    async def __aiter__(self):
        for _ in range(self.count):
            self.sent += 1
            yield b" " * self.size


def discovery_or(answer):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz", "rootUrl": "https://h/"})
        return answer(request)

    return handler


@pytest.mark.parametrize("declared", [True, False])
async def test_an_answer_over_max_answer_is_refused_in_one_line_without_reading_the_rest(declared):
    body = _Chunks(1000, 1 << 16)  # 64 MiB
    headers = {"content-length": str(1000 << 16)} if declared else {}
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, headers=headers, stream=body)

    stats = Stats()
    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(discovery_or(answer)),
                         max_answer=1 << 20, stats=stats, backoff=0.001)  # fmt: skip
    with pytest.raises(ApiError) as e:
        await c.get_collection("zzzzz-4zz18-000000000000001")
    assert isinstance(e.value, AnswerTooBig) and "\n" not in e.value.message
    assert "bigger than 1 MiB" in e.value.message and "--max-manifest-size" in e.value.message
    assert len(calls) == 1  # not retried
    assert body.sent <= (0 if declared else 17)  # stopped at the limit, not at 64 MiB
    assert stats.get("api_errors", cluster="zzzzz") == 1
    await c.aclose()


async def test_a_big_answer_decodes_as_json_loads_decodes_it():
    files = " ".join(f"0:0:f\\040{i}" for i in range(400_000))  # escapes, spaces: decoded in steps
    record = {"uuid": "zzzzz-4zz18-000000000000001", "name": "ü", "manifest_text": f". {EMPTY} {files}\n"}
    body = json.dumps(record).encode()
    assert len(body) > DECODE_IN_STEPS

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(discovery_or(answer)))
    assert await c.get_collection(record["uuid"]) == record
    await c.aclose()


async def test_pdh_path_is_percent_encoded():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz", "rootUrl": "https://h/"})
        return httpx.Response(200, json={"uuid": "x"})

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(handler))
    await c.get_collection("d41d8cd98f00b204e9800998ecf8427e+0")
    assert seen[-1] == b"/arvados/v1/collections/d41d8cd98f00b204e9800998ecf8427e%2B0"
    await c.aclose()


async def test_get_collection_with_select_sends_the_fields_as_a_json_list():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.url.params))
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz", "rootUrl": "https://h/"})
        return httpx.Response(200, json={"uuid": "x"})

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(handler))
    await c.get_collection("zzzzz-4zz18-000000000000001", ["uuid", "portable_data_hash"])
    await c.get_collection("zzzzz-4zz18-000000000000001")
    selects = [json.loads(p["select"]) if p else None for p in seen[1:]]
    assert selects == [["uuid", "portable_data_hash"], None]
    await c.aclose()


async def test_keep_services_are_cached_dataclasses(fake):
    c = client(fake)
    services = await c.keep_services()
    assert services == [
        KeepService("zzzzz-bi6l4-000000000025107", "http://keep0.zzzzz.example:25107/", "disk", False),
        KeepService("zzzzz-bi6l4-000000000025108", "http://keep1.zzzzz.example:25108/", "disk", False),
    ]
    await c.keep_services()
    assert [r.path for r in fake.requests].count("/arvados/v1/keep_services/accessible") == 1
    await c.aclose()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
async def test_transient_statuses_are_retried(fake, status):
    fake.home.fail_next = [status, status]
    stats = Stats()
    c = client(fake, stats=stats)
    assert (await c.current_user())["is_active"]
    assert stats.get("api_retries") == 2
    await c.aclose()


async def test_network_errors_are_retried(fake):
    fake.home.fail_next = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]
    c = client(fake)
    assert await c.cluster_id() == "zzzzz"
    await c.aclose()


@pytest.mark.parametrize("status", [401, 403, 404, 422])
async def test_answers_are_not_retried(fake, status):
    c = client(fake)
    await c.discovery()
    fake.home.fail_next = [status]
    with pytest.raises(ApiError) as info:
        await c.current_user()
    assert info.value.status == status and info.value.cluster == "zzzzz"
    assert len(fake.requests) == 2
    await c.aclose()


async def test_retries_are_bounded_by_count(fake):
    fake.home.fail_next = [503] * 10
    c = client(fake, retries=3)
    with pytest.raises(ApiError) as info:
        await c.discovery()
    assert info.value.status == 503 and "injected 503" in info.value.message
    assert len(fake.requests) == 4
    await c.aclose()


async def test_retries_are_bounded_by_time(fake):
    fake.home.fail_next = [503] * 100
    c = client(fake, retries=100, backoff=0.05, max_backoff=0.05, retry_budget=0.3)
    started = time.monotonic()
    with pytest.raises(ApiError):
        await c.discovery()
    assert time.monotonic() - started < 0.6
    assert len(fake.requests) < 100
    await c.aclose()


async def test_backoff_grows_exponentially_with_jitter(fake, monkeypatch):
    import fedmount.api.controller as controller

    delays = []

    async def fake_sleep(seconds):
        delays.append(seconds)

    monkeypatch.setattr(controller.trio, "sleep", fake_sleep)
    fake.home.fail_next = [503] * 4
    c = client(fake, backoff=1.0, max_backoff=4.0, retries=4, retry_budget=1000)
    await c.discovery()
    caps = [1.0, 2.0, 4.0, 4.0]
    assert len(delays) == 4 and all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    await c.aclose()


async def test_unreachable_is_status_zero_and_one_line(fake):
    fake.home.fail_next = [httpx.ConnectError("Connection refused\nsecond line")] * 3
    stats = Stats()
    c = client(fake, retries=2, stats=stats)
    with pytest.raises(ApiError) as info:
        await c.discovery()
    assert isinstance(info.value, ClusterUnreachable) and "\n" not in str(info.value)
    assert "cannot reach api.zzzzz.example" in str(info.value)
    assert stats.get("api_errors", cluster="api.zzzzz.example") == 1
    await c.aclose()


async def test_untrusted_certificate_is_named_and_not_retried(fake):
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except ssl.SSLCertVerificationError as e:
            e.verify_message = "self-signed certificate in certificate chain"
            raise httpx.ConnectError("") from e

    stats = Stats()
    c = ControllerClient("h", fake.token, transport=httpx.MockTransport(handler), retries=5, stats=stats)
    with pytest.raises(ApiError) as info:
        await c.discovery()
    text = str(info.value)
    assert "TLS certificate of h is not trusted (self-signed certificate" in text and "\n" not in text
    assert "REQUESTS_CA_BUNDLE" in text
    assert stats.get("api_requests") == 1
    await c.aclose()


async def test_error_message_never_contains_the_token():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz"})
        return httpx.Response(401, json={"errors": [f"bad token {HOME_TOKEN}\nBearer {HOME_TOKEN}"]})

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError) as info:
        await c.current_user()
    text = str(info.value)
    assert HOME_TOKEN not in text and "s3cr3t" not in text and "\n" not in text
    await c.aclose()


async def test_non_json_answer_is_an_api_error():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz"})
        return httpx.Response(200, content=b"<html>proxy</html>")

    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError, match="not JSON"):
        await c.current_user()
    await c.aclose()


async def test_discovery_without_uuid_prefix_is_rejected():
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"kind": "x"}))
    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=transport)
    with pytest.raises(ApiError, match="without uuidPrefix"):
        await c.discovery()
    await c.aclose()


LIES = ["zbbbb\nfedmount_injected 1", 'z"} 1', "ZBBBB", "zbbbbb", 12345]


@pytest.mark.parametrize("prefix", LIES)
async def test_discovery_with_a_uuid_prefix_that_is_not_a_cluster_id_is_refused_in_one_line(prefix):
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"uuidPrefix": prefix}))
    stats = Stats()
    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=transport, stats=stats)
    with pytest.raises(ApiError, match="invalid cluster id") as info:
        await c.discovery()
    assert "\n" not in str(info.value) and c.cluster == "h"
    assert all(str(prefix) not in labels for labels in stats.snapshot()["api_requests"])  # type: ignore[union-attr]
    await c.aclose()


async def test_a_cluster_that_calls_itself_another_is_refused(fake):
    c = ControllerClient("api.zzzzz.example", fake.token, transport=fake.transport, cluster="zbbbb")
    with pytest.raises(ApiError, match="calls itself cluster zzzzz, not zbbbb"):
        await c.current_user()
    await c.aclose()


def _keep_services_answer(**changes: object) -> httpx.MockTransport:
    item = {"uuid": "zzzzz-bi6l4-000000000000000", "service_host": "keep0.example", "service_port": 25107,
            "service_ssl_flag": False, "service_type": "disk", **changes}  # fmt: skip
    item = {k: v for k, v in item.items() if v is not None}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/discovery"):
            return httpx.Response(200, json={"uuidPrefix": "zzzzz"})
        return httpx.Response(200, json={"items": [item]})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"uuid": 'zzzzz-bi6l4-00000000000000"\nfedmount_injected 1'}, "invalid UUID"),
        ({"uuid": "zzzzz-bi6l4-000000000000000\n"}, "invalid UUID"),
        ({"uuid": None}, "without 'uuid'"),
        ({"service_host": "keep0\n.example"}, "invalid host name"),
        ({"service_port": "25107/x"}, "invalid port"),
    ],
)
async def test_keep_services_with_a_malformed_service_are_refused_in_one_line(changes, words):
    c = ControllerClient("h", parse_token(HOME_TOKEN), transport=_keep_services_answer(**changes))
    with pytest.raises(ApiError, match=words) as info:
        await c.keep_services()
    assert "\n" not in str(info.value) and isinstance(info.value, BadAnswer)
    assert (await c.discovery())["uuidPrefix"] == "zzzzz"
    await c.aclose()


async def test_stats_count_requests_and_bytes_per_cluster(fake):
    stats = Stats()
    c = client(fake, stats=stats)  # the cluster id comes from discovery, for that request too
    await c.current_user()
    assert stats.get("api_requests", cluster="zzzzz") == 2 == stats.get("api_requests")
    assert stats.get("api_bytes", cluster="zzzzz") > 50
    await c.aclose()


def test_tls_settings_build_the_client(tmp_path):
    import trustme

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    token = parse_token(HOME_TOKEN)
    ControllerClient("h", token, ca_file=str(ca_file))
    ControllerClient("h", token, insecure=True)
    with pytest.raises(FileNotFoundError):
        ControllerClient("h", token, ca_file=str(tmp_path / "missing.pem"))


def _raise_chain(*errors: BaseException) -> None:
    """Raise errors[0] from errors[1] from ... (as httpx under trio chains them)."""
    for outer, inner in zip(errors[:-1], errors[1:], strict=True):
        outer.__cause__ = inner
    raise errors[0]


async def test_plain_http_api_host_gives_the_tls_reason_not_an_empty_one(fake):
    # httpx under trio: ConnectError('') from httpcore's from BrokenResourceError() from ssl.SSLError
    tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")

    def handler(request: httpx.Request) -> httpx.Response:
        _raise_chain(httpx.ConnectError(""), trio.BrokenResourceError(), tls)

    c = ControllerClient("h:8080", fake.token, transport=httpx.MockTransport(handler), retries=0)
    with pytest.raises(ApiError) as info:
        await c.discovery()
    text = str(info.value)
    assert "TLS with h:8080 failed ([SSL: WRONG_VERSION_NUMBER] wrong version number)" in text
    assert "HTTPS controller" in text
    assert "ConnectError:;" not in text and "\n" not in text
    await c.aclose()


async def test_an_empty_transport_error_takes_the_reason_of_its_cause(fake):
    def handler(request: httpx.Request) -> httpx.Response:
        refused = ConnectionRefusedError(111, "refused")
        _raise_chain(httpx.ConnectError(""), trio.BrokenResourceError(), refused)

    c = ControllerClient("h", fake.token, transport=httpx.MockTransport(handler), retries=0)
    with pytest.raises(ApiError) as info:
        await c.discovery()
    assert info.value.message == "cannot reach h: ConnectError: ConnectionRefusedError: [Errno 111] refused"
    await c.aclose()
