"""Federation routing, token salting and PDH verification against a fake federation."""

from __future__ import annotations

import json

import httpx
import pytest

from fedmount.api.federation import Federation, parse_timestamp
from fedmount.arvados.errors import (
    AccessDenied,
    ApiError,
    BadAnswer,
    ClusterUnreachable,
    NotFound,
    TokenNotSaltable,
    UnknownCluster,
)
from fedmount.arvados.ids import parse_collection_id
from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import ApiToken, salt_for
from fedmount.stats import Stats


def settings(fake) -> Settings:
    return Settings("api.zzzzz.example", fake.token)


async def connect(fake, mode="home", **kw) -> Federation:
    kw.setdefault("backoff", 0.001)
    return await Federation.connect(settings(fake), mode=mode, transport=fake.transport, **kw)


def assert_home_token_stays_home(fake) -> None:
    for cid, cluster in fake.clusters.items():
        seen = fake.tokens_seen(cluster.host)
        if cid != "zzzzz":
            assert fake.token.text not in seen
            assert seen <= {None, salt_for(fake.token, cid).text}


async def test_connect_reads_discovery_and_checks_token(fake):
    fake.home.ttl = 3600
    fed = await connect(fake)
    assert fed.home_cluster == "zzzzz" and fed.blob_signature_ttl == 3600
    assert fed.remote_clusters == ["zbbbb", "zcccc"]
    assert fed.user["uuid"] == "zzzzz-tpzed-000000000000001"
    assert [r.path for r in fake.requests] == [
        "/discovery/v1/apis/arvados/v1/rest",
        "/arvados/v1/users/current",
    ]
    await fed.aclose()


async def test_wrong_token_is_one_line_api_error(fake):
    fake.home.tokens = {"something else"}
    with pytest.raises(ApiError) as info:
        await connect(fake)
    e = info.value
    assert isinstance(e, AccessDenied) and e.cluster == "zzzzz" and "check ARVADOS_API_TOKEN" in str(e)
    assert "\n" not in str(e) and "s3cr3t" not in str(e)


async def test_unreachable_home_is_one_line_api_error(fake):
    fake.home.fail_next = [httpx.ConnectError("Connection refused")] * 10
    with pytest.raises(ApiError) as info:
        await connect(fake, retries=1)
    assert isinstance(info.value, ClusterUnreachable) and "check ARVADOS_API_HOST" in str(info.value)


async def test_bad_mode_is_rejected(fake):
    with pytest.raises(ValueError):
        await connect(fake, mode="sideways")


async def test_home_mode_local_uuid(fake):
    rec = fake.add_collection("zzzzz", "1", {"a.txt": b"hello"})
    fed = await connect(fake)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.uuid == rec["uuid"] and got.portable_data_hash == rec["portable_data_hash"]
    assert got.cluster == "zzzzz" and got.answer == rec
    assert got.route.cluster == "zzzzz" and got.route.token == fake.token.text
    assert [s.root_url for s in got.route.services] == [
        "http://keep0.zzzzz.example:25107/",
        "http://keep1.zzzzz.example:25108/",
    ]
    assert got.modified_at == pytest.approx(parse_timestamp("2024-05-06T07:08:09.123456789Z"))
    assert parse_manifest(got.manifest_text).find("a.txt").size == 5
    await fed.aclose()


async def test_keep_services_setting_replaces_the_home_list_only(fake):
    home_rec = fake.add_collection("zzzzz", "12", {"m": b"local keepstore"})
    remote_rec = fake.add_collection("zbbbb", "13", {"n": b"remote"})
    s = Settings("api.zzzzz.example", fake.token, keep_services=("http://127.0.0.1:25107/",))
    fed = await Federation.connect(s, mode="direct", transport=fake.transport)
    home = await fed.get_collection(parse_collection_id(home_rec["uuid"]))
    services = [(k.root_url, k.service_type) for k in home.route.services]
    assert services == [("http://127.0.0.1:25107/", "proxy")]
    remote = await fed.get_collection(parse_collection_id(remote_rec["uuid"]))
    assert all(k.uuid.startswith("zbbbb-") for k in remote.route.services)
    assert "/arvados/v1/keep_services/accessible" not in [r.path for r in fake.requests if "zzzzz" in r.host]
    await fed.aclose()


async def test_home_mode_remote_uuid_goes_through_home_with_r_hints(fake):
    rec = fake.add_collection("zbbbb", "2", {"b.txt": b"remote bytes"})
    fed = await connect(fake)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.cluster == "zbbbb" and got.route.cluster == "zzzzz" and got.route.token == fake.token.text
    loc = parse_manifest(got.manifest_text).find("b.txt").segments()[0].locator
    assert loc.remote is not None and loc.remote[0] == "zbbbb"
    assert {r.host for r in fake.requests} == {"api.zzzzz.example"}
    await fed.aclose()


async def test_home_mode_pdh_verified(fake):
    rec = fake.add_collection("zzzzz", "3", {"c.txt": b"content"})
    fed = await connect(fake)
    got = await fed.get_collection(parse_collection_id(rec["portable_data_hash"]))
    assert got.uuid == rec["portable_data_hash"] and got.route.cluster == "zzzzz"
    await fed.aclose()


async def test_pdh_answer_that_does_not_hash_is_rejected_naming_the_cluster(fake):
    rec = fake.add_collection("zzzzz", "4", {"d.txt": b"content"})
    pdh = rec["portable_data_hash"]
    fake.home.collections[pdh] = dict(rec, manifest_text=rec["manifest_text"].replace("d.txt", "e.txt"))
    fed = await connect(fake)
    with pytest.raises(ApiError) as info:
        await fed.get_collection(parse_collection_id(pdh))
    e = info.value
    assert isinstance(e, BadAnswer) and e.cluster == "zzzzz" and "hash" in e.message
    await fed.aclose()


@pytest.mark.parametrize("mode", ["home", "direct"])
async def test_a_uuid_record_claiming_a_pdh_its_manifest_does_not_hash_to_is_rejected(fake, mode):
    rec = fake.add_collection("zbbbb", "5", {"f.txt": b"content"})
    other = fake.add_collection("zbbbb", "6", {"g.txt": b"other content"})
    pdh = rec["portable_data_hash"]
    for cluster in (fake.home, fake.clusters["zbbbb"]):
        cluster.collections[rec["uuid"]]["portable_data_hash"] = other["portable_data_hash"]
    fed = await connect(fake, mode=mode)
    with pytest.raises(ApiError) as info:
        await fed.get_collection(parse_collection_id(rec["uuid"]))
    cluster = "zzzzz" if mode == "home" else "zbbbb"
    assert isinstance(info.value, BadAnswer) and info.value.cluster == cluster
    assert f"claims portable data hash {other['portable_data_hash']}" in info.value.message
    assert f"hashes to {pdh}" in info.value.message
    await fed.aclose()


async def test_a_uuid_record_gets_the_pdh_its_manifest_hashes_to(fake):
    rec = fake.add_collection("zzzzz", "7", {"h.txt": b"content"})
    pdh = rec.pop("portable_data_hash")  # a record that says nothing of it
    fed = await connect(fake)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.portable_data_hash == pdh
    await fed.aclose()


def selecting(fake) -> tuple[httpx.MockTransport, list[tuple[str, list[str] | None]]]:
    """`fake`'s transport, answering ``select`` as the API does (only those fields, plus
    ``kind`` and ``etag``); and the (host, select) of every collections request."""
    asked: list[tuple[str, list[str] | None]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        response = fake.handle(request)
        if not request.url.path.startswith("/arvados/v1/collections/"):
            return response
        select = json.loads(request.url.params["select"]) if "select" in request.url.params else None
        asked.append((request.url.host, select))
        if select is None or response.status_code != 200:
            return response
        record = response.json()
        return httpx.Response(200, json={"kind": "arvados#collection", "etag": "e", **{
            k: record[k] for k in select if k in record}})

    return httpx.MockTransport(handle), asked


@pytest.mark.parametrize(
    ("mode", "host", "token"),
    [("home", "api.zzzzz.example", "home"), ("direct", "api.zbbbb.example", "salted")],
)
async def test_a_summary_is_routed_like_the_record_and_carries_no_manifest(fake, mode, host, token):
    rec = fake.add_collection("zbbbb", "21", {"s.txt": b"summary"})
    transport, asked = selecting(fake)
    fed = await Federation.connect(settings(fake), mode=mode, transport=transport)
    cid = parse_collection_id(rec["uuid"])
    whole = await fed.get_collection(cid)
    got = await fed.get_summary(cid, ["uuid", "portable_data_hash", "modified_at"])
    assert asked == [(host, None), (host, ["uuid", "portable_data_hash", "modified_at"])]
    assert fake.requests[-1].token == (fake.token if token == "home" else salt_for(fake.token, "zbbbb")).text
    assert not hasattr(got, "manifest_text") and "manifest_text" not in got.answer
    assert (got.uuid, got.portable_data_hash, got.modified_at, got.cluster, got.route) == (
        whole.uuid, whole.portable_data_hash, whole.modified_at, whole.cluster, whole.route)
    assert_home_token_stays_home(fake)
    await fed.aclose()


async def test_a_summary_without_a_portable_data_hash_is_rejected(fake):
    rec = fake.add_collection("zzzzz", "22", {"t.txt": b"no hash"})
    del fake.home.collections[rec["uuid"]]["portable_data_hash"]
    transport, _ = selecting(fake)
    fed = await Federation.connect(settings(fake), transport=transport)
    with pytest.raises(ApiError) as info:
        await fed.get_summary(parse_collection_id(rec["uuid"]), ["uuid", "portable_data_hash"])
    assert isinstance(info.value, BadAnswer) and "portable_data_hash" in info.value.message
    await fed.aclose()


@pytest.mark.parametrize("mode", ["home", "direct"])
async def test_there_is_no_summary_of_a_pdh_nor_one_with_a_manifest(fake, mode):
    rec = fake.add_collection("zzzzz", "23", {"u.txt": b"verified by its manifest"})
    fed = await connect(fake, mode=mode)
    asked = len(fake.requests)
    with pytest.raises(ValueError):
        await fed.get_summary(parse_collection_id(rec["portable_data_hash"]), ["portable_data_hash"])
    with pytest.raises(ValueError):
        await fed.get_summary(parse_collection_id(rec["uuid"]), ["portable_data_hash", "manifest_text"])
    assert len(fake.requests) == asked  # refused before asking anyone
    await fed.aclose()


async def test_direct_mode_remote_uuid_uses_salted_token_and_remote_keep(fake):
    rec = fake.add_collection("zbbbb", "5", {"f.txt": b"direct"})
    fed = await connect(fake, mode="direct")
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    salted = salt_for(fake.token, "zbbbb").text
    assert got.route.cluster == "zbbbb" and got.route.token == salted
    assert all(s.uuid.startswith("zbbbb-") for s in got.route.services)
    assert got.manifest_text == rec["manifest_text"]  # +A, signed for the salted token
    assert fake.tokens_seen("api.zbbbb.example") == {None, salted}
    assert_home_token_stays_home(fake)
    # One discovery per cluster, however many collections.
    await fed.get_collection(parse_collection_id(fake.add_collection("zbbbb", "6", {"g": b"x"})["uuid"]))
    discoveries = [
        r for r in fake.requests if r.host == "api.zbbbb.example" and r.path.startswith("/discovery")
    ]
    assert len(discoveries) == 1
    await fed.aclose()


async def test_direct_mode_home_uuid_stays_home(fake):
    rec = fake.add_collection("zzzzz", "7", {"h": b"home"})
    fed = await connect(fake, mode="direct")
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.route.cluster == "zzzzz" and got.route.token == fake.token.text
    assert {r.host for r in fake.requests} == {"api.zzzzz.example"}
    await fed.aclose()


@pytest.mark.parametrize("home_fans_out", [True, False])
async def test_direct_mode_pdh_tries_home_then_all_remotes(fake, home_fans_out):
    rec = fake.add_collection("zcccc", "8", {"i": b"only on zcccc"})
    if not home_fans_out:
        del fake.home.collections[rec["portable_data_hash"]]
    fed = await connect(fake, mode="direct")
    got = await fed.get_collection(parse_collection_id(rec["portable_data_hash"]))
    assert got.route.cluster == "zcccc" and got.route.token == salt_for(fake.token, "zcccc").text
    assert got.cluster == "zcccc"
    hosts = [r.host for r in fake.requests if "/collections/" in r.path]
    assert hosts[0] == "api.zzzzz.example" and set(hosts) == {
        "api.zzzzz.example",
        "api.zbbbb.example",
        "api.zcccc.example",
    }
    assert_home_token_stays_home(fake)
    await fed.aclose()


async def test_direct_mode_pdh_skips_a_remote_with_a_bad_manifest(fake):
    rec = fake.add_collection("zcccc", "9", {"j": b"good"})
    pdh = rec["portable_data_hash"]
    fake.clusters["zbbbb"].collections[pdh] = dict(
        rec, manifest_text=rec["manifest_text"].replace(":j", ":k")
    )
    fed = await connect(fake, mode="direct")
    got = await fed.get_collection(parse_collection_id(pdh))
    assert got.route.cluster == "zcccc"
    await fed.aclose()


@pytest.mark.parametrize(
    "remote_failures, combined",
    [((404, 404), NotFound), ((404, 503), ApiError), ((404, 403), NotFound)],
)
async def test_direct_mode_pdh_failures_combine_like_the_controller(fake, remote_failures, combined):
    for cid, failure in zip(("zbbbb", "zcccc"), remote_failures, strict=True):
        fake.clusters[cid].fail_next = [failure] * 10
    fed = await connect(fake, mode="direct", retries=1)
    with pytest.raises(ApiError) as info:
        await fed.get_collection(parse_collection_id("0123456789abcdef0123456789abcdef+5"))
    assert type(info.value) is combined and "not found in the federation" in info.value.message
    await fed.aclose()


async def test_direct_mode_unknown_cluster(fake):
    fed = await connect(fake, mode="direct")
    with pytest.raises(ApiError) as info:
        await fed.get_collection(parse_collection_id("zqqqq-4zz18-000000000000001"))
    assert isinstance(info.value, UnknownCluster) and "not a remote cluster of zzzzz" in info.value.message
    assert_home_token_stays_home(fake)
    await fed.aclose()


async def test_a_remote_host_that_is_not_a_cluster_id_is_dropped_with_one_warning(fake, caplog):
    fake.home.remote_hosts['zb"}\nfedmount_injected 1'] = "api.evil.example"
    fed = await connect(fake, mode="direct")
    assert fed.remote_clusters == ["zbbbb", "zcccc"]
    (line,) = [r.getMessage() for r in caplog.records if "not a cluster id" in r.getMessage()]
    assert "\n" not in line and "zzzzz" in line
    await fed.aclose()


async def test_direct_mode_refuses_a_remote_that_calls_itself_another_cluster(fake):
    rec = fake.add_collection("zbbbb", "1", {"a.txt": b"hello"})
    fake.clusters["zbbbb"].cluster = "zcccc"  # its discovery document now says uuidPrefix zcccc
    fed = await connect(fake, mode="direct")
    with pytest.raises(ApiError, match="calls itself cluster zcccc, not zbbbb") as info:
        await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert info.value.cluster == "zbbbb"
    await fed.aclose()


async def test_remote_down_retries_then_fails(fake):
    rec = fake.add_collection("zbbbb", "10", {"k": b"x"})
    fake.clusters["zbbbb"].fail_next = [503, httpx.ConnectError("refused")]
    stats = Stats()
    fed = await connect(fake, mode="direct", stats=stats)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.route.cluster == "zbbbb"
    assert stats.get("api_retries", cluster="zbbbb") == 2
    assert stats.get("api_requests", cluster="zbbbb") >= 3
    await fed.aclose()


async def test_already_salted_token_is_never_sent_to_a_remote(fake):
    salted_home = ApiToken(fake.token.uuid, "0123456789" * 4)  # a 40-hex secret counts as salted
    fake.home.tokens = {salted_home.text}
    fed = await Federation.connect(
        Settings("api.zzzzz.example", salted_home), mode="direct", transport=fake.transport
    )
    with pytest.raises(ApiError, match="cannot salt"):
        await fed.get_collection(parse_collection_id("zbbbb-4zz18-000000000000001"))
    assert {r.host for r in fake.requests} == {"api.zzzzz.example"}
    await fed.aclose()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024-05-06T07:08:09Z", 1714979289.0),
        ("2024-05-06T07:08:09.5Z", 1714979289.5),
        ("2024-05-06T07:08:09.123456789Z", 1714979289.123456789),
        ("2024-05-06T09:08:09+02:00", 1714979289.0),
        (None, None),
        ("", None),
        ("yesterday", None),
    ],
)
def test_parse_timestamp(text, expected):
    assert parse_timestamp(text) == (pytest.approx(expected) if expected else None)


async def test_controller_gives_the_home_token_only_to_the_home_cluster(fake):
    fed = await connect(fake)  # home mode: the remote clients exist only for direct asks
    assert fed.controller("zzzzz") is fed.home and fed.home.token == fake.token
    for cid in ("zbbbb", "zcccc"):
        client = fed.controller(cid)
        assert client is fed.controller(cid) and client.cluster == cid
        assert client.token == salt_for(fake.token, cid) and client.token.text != fake.token.text
        await client.current_user()
    with pytest.raises(ApiError) as info:
        fed.controller("zqqqq")
    assert isinstance(info.value, UnknownCluster)
    assert_home_token_stays_home(fake)
    await fed.aclose()


def v1_settings(fake) -> Settings:
    """The home token's bare secret, accepted by the home as a v1 token."""
    fake.home.tokens.add(fake.token.secret)
    return Settings("api.zzzzz.example", ApiToken(None, fake.token.secret))


@pytest.mark.parametrize("mode", ["home", "direct"])
async def test_v1_token_is_made_v2_at_connect_so_remote_reads_can_be_salted(fake, mode):
    fake.home.token_uuid = fake.token.uuid
    rec = fake.add_collection("zbbbb", "11", {"f.txt": b"remote"})
    fed = await Federation.connect(v1_settings(fake), mode=mode, transport=fake.transport)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    # Every later request (API and Keep) uses the v2 form, which the home keepstore (+R
    # blocks, home mode) or fedmount (direct mode) can salt for zbbbb.
    assert fed.settings.token == fake.token and fed.home.token == fake.token
    assert got.route.token == (fake.token if mode == "home" else salt_for(fake.token, "zbbbb")).text
    assert_home_token_stays_home(fake)
    assert fake.token.secret not in fake.tokens_seen("api.zbbbb.example")
    await fed.aclose()


async def test_v1_token_whose_uuid_the_home_does_not_give_stays_v1_and_salting_says_why(fake, caplog):
    rec = fake.add_collection("zbbbb", "12", {"f.txt": b"remote"})
    home_rec = fake.add_collection("zzzzz", "13", {"h.txt": b"home"})
    with caplog.at_level("WARNING", "fedmount.federation"):
        fed = await Federation.connect(v1_settings(fake), mode="direct", transport=fake.transport)
    assert fed.settings.token.is_v1
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "v1 token" in warning and "v2/<uuid>/<secret>" in warning and fake.token.secret not in warning
    home = await fed.get_collection(parse_collection_id(home_rec["uuid"]))
    assert home.route.token == fake.token.secret  # the home takes the bare secret
    with pytest.raises(ApiError) as info:
        await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert isinstance(info.value, TokenNotSaltable) and "\n" not in info.value.message
    message = info.value.message
    assert "needs a v2 token" in message and "arv api_client_authorization current" in message
    assert {r.host for r in fake.requests} == {"api.zzzzz.example"}  # nothing reached zbbbb
    await fed.aclose()


async def test_home_mode_names_a_cluster_the_home_does_not_know_without_asking(fake):
    fed = await connect(fake)
    asked = len(fake.requests)
    for cid in ("zqqqq-4zz18-000000000000001", "zqqqq-4zz18-000000000000002"):
        with pytest.raises(ApiError) as info:
            await fed.get_collection(parse_collection_id(cid))
        assert isinstance(info.value, UnknownCluster) and info.value.cluster == "zqqqq"
        assert info.value.message == "cluster zqqqq is not a remote cluster of zzzzz"
    assert len(fake.requests) == asked
    await fed.aclose()
