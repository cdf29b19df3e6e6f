"""Wire-level conformance of the emulator with Arvados: signatures, salting, keepstore
status codes, federation routing and the PDH fan-out error table
(reference/arvados-protocol.md §2, §4, §5, §6, §8)."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import quote

from fedmount.arvados.tokens import salted_secret
from integration.cluster import signing
from integration.cluster.keepstore import probe_order

KNOWN_KEY = (
    "13u9fkuccnboeewr0ne3mvapk28epf68a3bhj9q8sb4l6e4e5mkk"
    "p6nhj2mmpscgu1zze5h5enydxfe3j215024u16ij4hjaiqs5u4pzsl3nczmaoxnc"
    "ljkm4875xqn4xv058koz3vkptmzhyheiy6wzevzjmdvxhvcqsvr5abhl15c2d4o4"
    "jhl0s91lojy1mtrzqqvprqcverls0xvy9vai9t1l1lvvazpuadafm71jl4mrwq2y"
    "gokee3eamvjy8qq1fvy238838enjmy5wzy2md7yvsitp5vztft6j4q866efym7e6"
    "vu5wm9fpnwjyxfldw3vbo01mgjs75rgo7qioh8z8ij7jpyp8508okhgbbex3ceei"
    "786u5rw2a9gx743dj3fgq2irk"
)


def _salted(token: str, cluster: str) -> str:
    _, uuid, secret = token.split("/")[:3]
    return f"v2/{uuid}/{salted_secret(secret, cluster)}"


def _get(fed, cluster, ident, token, **params):
    query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
    return fed.request(
        cluster,
        f"/arvados/v1/collections/{quote(ident, safe='')}" + (f"?{query}" if query else ""),
        token=token,
    )


def _first_block(manifest: str) -> str:
    return manifest.split("\n")[0].split(" ")[1]


# --- test vectors ---------------------------------------------------------------------------


def test_blob_signature_matches_go_sdk_test_vector():
    sig = signing.signature(
        KNOWN_KEY.encode(),
        "acbd18db4cc2f85cedef654fccc4a4d8",
        "hocfupkn2pjhrpgp2vxv8rsku7tvtx49arbc9s4bvu7p7wxqvk",
        "7fffffff",
        1209600,
    )
    assert sig == "89118b78732c33104a4d6231e8b5a5fa1e4301e3"


def test_token_salting_matches_controller_test_vectors():
    secret = "3kg6k6lzmp9kj5cpkcoxie963cmvjahbt2fod9zru30k1jqdmi"
    assert salted_secret(secret, "zmock") == "7fd31b61f39c0e82a4155592163218272cedacdc"
    assert salted_secret(secret, "zzzzz") == "282d7d172b6cfdce364c5ed12ddf7417b2d00065"


def test_probe_order_matches_python_sdk_test_vectors():
    services = [(f"zzzzz-bi6l4-{i:015x}", f"http://s{i}/") for i in range(16)]
    expected = ["3eab2d5fc9681074", "097dba52e648f1c3", "c5b4e023f8a7d691", "9d81c02e76a3bf54"]
    for i, want in enumerate(expected):
        block = hashlib.md5(f"{i:064x}".encode()).hexdigest()  # hash = md5(sprintf("%064x", i))
        order = probe_order(block, services)
        assert "".join(f"{int(u[-15:], 16):x}" for u, _ in order) == want


# --- federation routing and salting ---------------------------------------------------------


def test_remote_uuid_is_forwarded_with_salted_token_and_via_header(federation):
    entry = federation.collections["big"]
    mark = federation.mark()
    reply = _get(federation, "zzzzz", entry["uuid"], federation.token("zzzzz"))
    assert reply.status == 200
    remote = federation.wait_requests(since=mark, cluster="zbbbb", service="controller")
    assert remote[0]["token"] == _salted(federation.token("zzzzz"), "zbbbb")
    assert f"/arvados/v1/collections/{entry['uuid']}" in remote[0]["path"]


def test_token_in_query_is_moved_to_header_and_salted(federation):
    entry = federation.collections["big"]
    mark = federation.mark()
    token = federation.token("zzzzz")
    reply = federation.request("zzzzz", f"/arvados/v1/collections/{entry['uuid']}?api_token={quote(token)}")
    assert reply.status == 200
    remote = federation.wait_requests(since=mark, cluster="zbbbb", service="controller")
    assert remote[0]["token"] == _salted(token, "zbbbb") and "api_token" not in remote[0]["path"]


def test_remote_cluster_validates_salted_token_by_calling_issuer_once(federation_factory):
    fresh = federation_factory(seed="none")  # a cold token cache
    salted = _salted(fresh.token("zzzzz"), "zcccc")
    mark = fresh.mark()
    for _ in range(3):
        reply = fresh.request("zcccc", "/arvados/v1/users/current", token=salted)
        assert reply.status == 200 and reply.json()["uuid"] == fresh.clusters["zzzzz"]["user_uuid"]
    callbacks = fresh.wait_requests(since=mark, count=2, cluster="zzzzz", service="controller")
    assert [r["path"] for r in callbacks] == [
        "/arvados/v1/api_client_authorizations/current?remote=zcccc",
        "/arvados/v1/users/current?remote=zcccc",
    ]
    assert all(r["token"] == salted for r in callbacks)
    fresh.stop()


def test_issuer_answers_remote_validation_with_null_api_token(federation):
    salted = _salted(federation.token("zzzzz"), "zbbbb")
    reply = federation.request(
        "zzzzz", "/arvados/v1/api_client_authorizations/current?remote=zbbbb", token=salted
    )
    assert reply.status == 200 and reply.json()["api_token"] is None
    assert reply.json()["uuid"] == federation.token("zzzzz").split("/")[1]


def test_salted_token_is_rejected_by_issuer_outside_identity_endpoints(federation):
    salted = _salted(federation.token("zzzzz"), "zbbbb")
    entry = federation.collections["text"]
    assert _get(federation, "zzzzz", entry["uuid"], salted).status == 401
    bad = federation.request(
        "zzzzz", "/arvados/v1/api_client_authorizations/current?remote=zcccc", token=salted
    )
    assert bad.status == 401


def test_token_of_unknown_cluster_and_garbage_token_are_401(federation):
    entry = federation.collections["text"]
    assert _get(federation, "zzzzz", entry["uuid"], "v2/zqqqq-gj3su-000000000000000/abc").status == 401
    assert _get(federation, "zzzzz", entry["uuid"], "garbage").status == 401
    assert _get(federation, "zzzzz", entry["uuid"], None).status == 401


# --- PDH fan-out ----------------------------------------------------------------------------


def test_pdh_found_only_on_remotes_is_fetched_by_fan_out_and_R_rewritten(federation):
    entry = federation.collections["shared"]
    mark = federation.mark()
    reply = _get(federation, "zzzzz", entry["portable_data_hash"], federation.token("zzzzz"))
    assert reply.status == 200
    record = reply.json()
    assert record["uuid"] == record["portable_data_hash"] == entry["portable_data_hash"]
    assert "+Rzbbbb-" in record["manifest_text"] or "+Rzcccc-" in record["manifest_text"]
    fanned = federation.wait_requests(
        since=mark, count=2, service="controller", where=lambda r: r["cluster"] != "zzzzz"
    )
    assert {r["cluster"] for r in fanned} == {"zbbbb", "zcccc"}
    assert all("forwarded_for=zzzzz-" in r["path"] for r in fanned)


def test_pdh_nowhere_in_federation_is_404(federation):
    pdh = hashlib.md5(b"nowhere").hexdigest() + "+123"
    reply = _get(federation, "zzzzz", pdh, federation.token("zzzzz"))
    assert reply.status == 404 and reply.json()["errors"]


def test_pdh_from_a_lying_remote_is_502(fed):
    lie = hashlib.md5(b"the claimed content").hexdigest() + "+58"
    fed.add_collection("zcccc", "liar", {"x.txt": b"other content"}, claim_pdh=lie)
    reply = _get(fed, "zzzzz", lie, fed.token("zzzzz"))
    assert reply.status == 502, reply.body


def test_pdh_fan_out_with_a_remote_5xx_is_502(fed):
    fed.set_fault("zbbbb", "controller", status=500)
    reply = _get(fed, "zzzzz", hashlib.md5(b"x").hexdigest() + "+1", fed.token("zzzzz"))
    assert reply.status == 502


def test_pdh_fan_out_with_only_4xx_failures_is_422(fed):
    fed.set_fault("zbbbb", "controller", status=403)
    reply = _get(fed, "zzzzz", hashlib.md5(b"x").hexdigest() + "+1", fed.token("zzzzz"))
    assert reply.status == 422


def test_pdh_fan_out_with_unreachable_remote_is_502(fed):
    fed.set_fault("zcccc", "controller", down="refuse")
    reply = _get(fed, "zzzzz", hashlib.md5(b"x").hexdigest() + "+1", fed.token("zzzzz"))
    assert reply.status == 502


def test_request_with_forwarded_for_never_fans_out_again(federation):
    entry = federation.collections["shared"]
    mark = federation.mark()
    reply = _get(
        federation, "zzzzz", entry["portable_data_hash"], federation.token("zzzzz"), forwarded_for="zbbbb-"
    )
    assert reply.status == 404
    federation.wait_requests(since=mark, cluster="zzzzz")
    time.sleep(0.3)
    assert [r["cluster"] for r in federation.requests(since=mark)] == ["zzzzz"]


def test_malformed_collection_ids_are_404(federation):
    token = federation.token("zzzzz")
    for ident in ("abc", "d41d8cd98f00b204e9800998ecf8427e", "zzzzz-4zz18-short"):
        assert _get(federation, "zzzzz", ident, token).status == 404


# --- keepstore ------------------------------------------------------------------------------


def _signed_block(fed, cluster="zzzzz", name="text"):
    reply = _get(fed, cluster, fed.collections[name]["uuid"], fed.token(cluster))
    return _first_block(reply.json()["manifest_text"])


def test_keepstore_serves_signed_block_with_length_and_vary(federation):
    locator = _signed_block(federation)
    reply = federation.request("zzzzz", "/" + locator, service="keep0", token=federation.token("zzzzz"))
    assert reply.status == 200
    assert hashlib.md5(reply.body).hexdigest() == locator[:32]
    assert reply.headers["content-length"] == locator.split("+")[1]
    assert reply.headers["vary"] == "X-Keep-Signature"
    head = federation.request(
        "zzzzz", "/" + locator, service="keep1", method="HEAD", token=federation.token("zzzzz")
    )
    assert head.status == 200 and head.body == b""


def test_keepstore_rejects_missing_wrong_and_foreign_signatures(federation):
    locator = _signed_block(federation)
    token = federation.token("zzzzz")
    bare = locator.split("+A")[0]
    sig = locator.split("+A")[1]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert federation.request("zzzzz", "/" + locator, service="keep0").status == 401
    assert federation.request("zzzzz", "/" + bare, service="keep0", token=token).status == 400
    assert federation.request("zzzzz", f"/{bare}+A{flipped}", service="keep0", token=token).status == 400
    other = federation.token("zbbbb")
    assert federation.request("zzzzz", "/" + locator, service="keep0", token=other).status == 400
    assert federation.request("zzzzz", "/" + locator[:32], service="keep0", token=token).status == 405
    assert federation.request("zzzzz", "/nothex+3", service="keep0", token=token).status == 400


def test_keepstore_rejects_expired_signature_with_401(fed):
    fed.set_blob_ttl(1)
    locator = _signed_block(fed)
    time.sleep(2.1)
    reply = fed.request("zzzzz", "/" + locator, service="keep0", token=fed.token("zzzzz"))
    assert reply.status == 401 and b"expired" in reply.body


def test_keepstore_answers_404_for_a_signed_block_it_does_not_hold(fed):
    entry = fed.add_collection("zzzzz", "doomed", {"gone.txt": b"soon deleted\n"})
    locator = _signed_block(fed, "zzzzz", "doomed")
    assert fed.delete_block("zzzzz", "keep0", locator)
    token = fed.token("zzzzz")
    assert fed.request("zzzzz", "/" + locator, service="keep0", token=token).status == 404
    assert fed.request("zzzzz", "/" + locator, service="keep1", token=token).status == 200
    assert entry["files"]["gone.txt"]["size"] == 13


def test_keepstore_put_returns_locator_signed_for_caller_and_checks_hash(federation):
    token = federation.token("zbbbb")
    data = b"put through the wire\n"
    digest = hashlib.md5(data).hexdigest()
    reply = federation.request("zbbbb", f"/{digest}", service="keep1", method="PUT", token=token, body=data)
    assert reply.status == 200 and reply.headers["x-keep-replicas-stored"] == "1"
    locator = reply.body.decode().strip()
    assert signing.SIGNED_LOCATOR_RE.match(locator) and locator.startswith(f"{digest}+{len(data)}+A")
    assert federation.request("zbbbb", "/" + locator, service="keep1", token=token).body == data
    bad = federation.request("zbbbb", f"/{digest}", service="keep0", method="PUT", token=token, body=b"other")
    assert bad.status == 400


def test_home_keepstore_proxies_R_block_with_token_salted_for_owner(federation):
    entry = federation.collections["shared"]
    token = federation.token("zzzzz")
    locator = _first_block(_get(federation, "zzzzz", entry["uuid"], token).json()["manifest_text"])
    assert "+Rzbbbb-" in locator
    mark = federation.mark()
    reply = federation.request("zzzzz", "/" + locator, service="keep1", token=token)
    assert reply.status == 200 and hashlib.md5(reply.body).hexdigest() == locator[:32]
    keep_reads = federation.wait_requests(
        since=mark, cluster="zbbbb", where=lambda r: r["service"].startswith("keep")
    )
    assert keep_reads and all(r["token"] == _salted(token, "zbbbb") for r in keep_reads)
    assert "+A" in keep_reads[0]["path"] and "+R" not in keep_reads[0]["path"]


def test_keepstore_rejects_R_hint_for_unknown_cluster_and_v1_token(federation):
    entry = federation.collections["shared"]
    token = federation.token("zzzzz")
    locator = _first_block(_get(federation, "zzzzz", entry["uuid"], token).json()["manifest_text"])
    unknown = locator.replace("+Rzbbbb-", "+Rzqqqq-")
    assert federation.request("zzzzz", "/" + unknown, service="keep0", token=token).status == 400
    v1 = token.split("/")[2]
    assert federation.request("zzzzz", "/" + locator, service="keep0", token=v1).status == 400


# --- controller requests --------------------------------------------------------------------


def test_controller_accepts_oauth2_method_override_and_form_bodies(federation):
    token = federation.token("zzzzz")
    entry = federation.collections["text"]
    path = f"/arvados/v1/collections/{entry['uuid']}"
    assert federation.request("zzzzz", path, headers={"Authorization": f"OAuth2 {token}"}).status == 200
    override = federation.request(
        "zzzzz",
        "/arvados/v1/collections",
        method="POST",
        token=token,
        headers={"X-Http-Method-Override": "GET", "Content-Type": "application/x-www-form-urlencoded"},
        body=f"filters={quote(json.dumps([['uuid', '=', entry['uuid']]]))}".encode(),
    )
    assert override.status == 200 and override.json()["items"][0]["uuid"] == entry["uuid"]
    form = federation.request(
        "zzzzz",
        "/arvados/v1/collections",
        method="POST",
        token=token,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=f"_method=GET&select={quote(json.dumps(['uuid']))}".encode(),
    )
    assert form.status == 200 and "items" in form.json()


def test_collection_create_needs_valid_signatures_and_strips_them(federation):
    token = federation.token("zzzzz")
    locator = _signed_block(federation)
    manifest = f". {locator} 0:{locator.split('+')[1]}:copy.txt\n"
    body = json.dumps({"collection": {"name": "signed copy", "manifest_text": manifest}}).encode()
    created = federation.request(
        "zzzzz",
        "/arvados/v1/collections?ensure_unique_name=true",
        method="POST",
        token=token,
        body=body,
        headers={"Content-Type": "application/json"},
    )
    assert created.status == 200
    unsigned = federation.request(
        "zzzzz",
        f"/arvados/v1/collections/{created.json()['uuid']}?select="
        + quote(json.dumps(["unsigned_manifest_text"])),
        token=token,
    )
    assert "+A" not in unsigned.json()["unsigned_manifest_text"]
    bare = manifest.replace("+A" + locator.split("+A")[1], "")
    form = f"collection={quote(json.dumps({'manifest_text': bare}))}".encode()
    rejected = federation.request(
        "zzzzz",
        "/arvados/v1/collections",
        method="POST",
        token=token,
        body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert rejected.status == 403 and rejected.json()["errors"]


def test_malformed_requests_get_rails_status_codes(federation):
    token = federation.token("zzzzz")
    assert federation.request("zzzzz", "/arvados/v1/collections?filters=notjson", token=token).status == 422
    assert federation.request("zzzzz", "/arvados/v1/collections?limit=x", token=token).status == 422
    assert (
        federation.request(
            "zzzzz", "/arvados/v1/collections?filters=" + quote('[["nope","=",1]]'), token=token
        ).status
        == 422
    )
    assert federation.request("zzzzz", "/arvados/v1/no_such_thing", token=token).status == 404
    assert federation.request("zzzzz", "/arvados/v1/collections").status == 401
    accessible = federation.request("zzzzz", "/arvados/v1/keep_services/accessible")
    assert accessible.status == 200 and len(accessible.json()["items"]) == 2


def test_no_remote_cluster_ever_received_the_home_token_unsalted(federation):
    secret = federation.token(federation.home).split("/")[2]
    for record in federation.requests():
        if record["cluster"] != federation.home and record["token"]:
            assert secret not in record["token"], record
