"""The emulator itself: seeding, the control endpoint's faults and shaping, the request
log, the command line's handling of bad input, and keepstore throughput."""

from __future__ import annotations

import hashlib
import http.client
import shutil
import socket
import subprocess
import sys
import time

import pytest

from integration.cluster.content import Generated
from integration.cluster.signing import strip_signatures
from integration.harness import REPO, EmulatorError


def _signed_manifest(fed, name, cluster=None):
    entry = fed.collections[name]
    cluster = cluster or entry["cluster"]
    reply = fed.request(cluster, f"/arvados/v1/collections/{entry['uuid']}", token=fed.token(cluster))
    assert reply.status == 200
    return reply.json()["manifest_text"]


def _blocks(manifest_line: str) -> list[str]:
    return [t for t in manifest_line.split(" ")[1:] if "+" in t and ":" not in t]


def _keep_get(fed, cluster, locator, service="keep0", token=None, timeout=60):
    url = fed.keep_services(cluster)[int(service[-1])]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("GET", "/" + locator, headers={"Authorization": f"Bearer {token or fed.token(cluster)}"})
    return conn, conn.getresponse()


# --- seeding ------------------------------------------------------------------------------


def test_demo_seed_big_file_is_multi_block_and_matches_its_md5(federation):
    entry = federation.collections["big"]
    line = _signed_manifest(federation, "big").split("\n")[0]
    blocks = _blocks(line)
    assert len(blocks) == 5 and entry["files"]["big.bin"]["size"] == 300 << 20
    md5 = hashlib.md5()
    for locator in blocks:
        reply = federation.request(
            entry["cluster"], "/" + locator, service="keep1", token=federation.token("zbbbb")
        )
        assert reply.status == 200 and hashlib.md5(reply.body).hexdigest() == locator[:32]
        md5.update(reply.body)
    assert md5.hexdigest() == entry["files"]["big.bin"]["md5"]


def test_demo_seed_has_10000_small_files_in_a_few_blocks(federation):
    entry = federation.collections["many"]
    manifest = _signed_manifest(federation, "many")
    assert len(entry["files"]) == 10000
    assert 2 <= len(_blocks(manifest)) <= 10


def test_demo_seed_has_odd_names_empty_file_and_empty_directories(federation):
    entry = federation.collections["nested"]
    manifest = strip_signatures(_signed_manifest(federation, "nested"))
    assert "empty.txt" in entry["files"] and entry["files"]["empty.txt"]["size"] == 0
    assert "./empty\\040dir d41d8cd98f00b204e9800998ecf8427e+0 0:0:\\056" in manifest
    assert "./colon\\072dir" in manifest and "./back\\134slash" in manifest
    assert any(ord(c) > 127 for path in entry["files"] for c in path)


def test_demo_seed_shares_one_pdh_between_two_clusters(federation):
    a, b = federation.collections["shared"], federation.collections["shared-copy"]
    assert a["portable_data_hash"] == b["portable_data_hash"] and a["cluster"] != b["cluster"]


def test_generated_content_is_deterministic_and_does_not_repeat_per_mib():
    one, two = Generated(3 << 20, "s").read(), Generated(3 << 20, "s").read()
    assert one == two and len(one) == 3 << 20
    assert len({one[i : i + (1 << 20)] for i in range(0, 3 << 20, 1 << 20)}) == 3


# --- control endpoint ---------------------------------------------------------------------


def test_add_collection_at_run_time_serves_generated_content(fed):
    entry = fed.add_collection(
        "zbbbb", "runtime", {"gen.bin": (5 << 20, "rt"), "t.txt": "text"}, block_size=1 << 20
    )
    assert entry["files"]["gen.bin"] == {
        "size": 5 << 20,
        "md5": hashlib.md5(Generated(5 << 20, "rt").read()).hexdigest(),
    }
    manifest = _signed_manifest(fed, "runtime")
    assert len(_blocks(manifest)) == 6
    assert fed.attach(fed.state_dir).collections["runtime"]["uuid"] == entry["uuid"]


def test_control_rejects_unknown_cluster_service_and_fault_fields(fed):
    with pytest.raises(EmulatorError, match="400"):
        fed.set_fault("zqqqq", "keep0", status=500)
    with pytest.raises(EmulatorError, match="400"):
        fed.set_fault("zzzzz", "keep9", status=500)
    with pytest.raises(EmulatorError, match="400"):
        fed.set_fault("zzzzz", "keep0", explode=True)


def test_fault_status_answers_every_request_with_that_status(fed):
    fed.set_fault("zzzzz", "controller", status=503)
    assert fed.request("zzzzz", "/arvados/v1/config").status == 503
    fed.clear_faults()
    assert fed.request("zzzzz", "/arvados/v1/config").status == 200


def test_fault_count_applies_to_that_many_requests_only(fed):
    fed.set_fault("zzzzz", "controller", status=500, count=2)
    statuses = [fed.request("zzzzz", "/arvados/v1/config").status for _ in range(3)]
    assert statuses == [500, 500, 200]


def test_fault_down_refuse_refuses_connections_until_cleared(fed):
    fed.set_fault("zbbbb", "keep0", down="refuse")
    time.sleep(0.7)
    with pytest.raises(ConnectionRefusedError):
        fed.request("zbbbb", "/", service="keep0")
    fed.clear_faults()
    for _ in range(50):
        try:
            assert fed.request("zbbbb", "/", service="keep0").status == 400
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    else:
        pytest.fail("keep0 did not listen again after the fault was cleared")


def test_fault_down_reset_drops_connections(fed):
    fed.set_fault("zbbbb", "keep1", down=True)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        fed.request("zbbbb", "/", service="keep1")


def test_fault_corrupt_breaks_the_md5_of_served_blocks(fed):
    locator = _blocks(_signed_manifest(fed, "big"))[0]
    fed.set_fault("zbbbb", "keep0", corrupt=True)
    conn, resp = _keep_get(fed, "zbbbb", locator)
    body = resp.read()
    conn.close()
    assert resp.status == 200 and len(body) == 1 << 26 and hashlib.md5(body).hexdigest() != locator[:32]


def test_corrupt_remote_block_is_never_served_through_the_home_proxy(fed):
    locator = _blocks(_signed_manifest(fed, "shared", cluster="zzzzz"))[0]
    assert "+Rzbbbb-" in locator
    fed.set_fault("zbbbb", "keep0", corrupt=True)
    fed.set_fault("zbbbb", "keep1", corrupt=True)
    conn, resp = _keep_get(fed, "zzzzz", locator)
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()


def test_fault_stall_sends_headers_then_nothing_until_cleared(fed):
    locator = _blocks(_signed_manifest(fed, "text"))[0]
    fed.set_fault("zzzzz", "keep0", stall=True)
    conn, resp = _keep_get(fed, "zzzzz", locator, timeout=1)
    assert resp.status == 200
    with pytest.raises(TimeoutError):
        resp.read()
    conn.close()


def test_fault_latency_delays_answers(fed):
    fed.set_fault("zzzzz", "controller", latency_ms=300)
    started = time.monotonic()
    assert fed.request("zzzzz", "/arvados/v1/config").status == 200
    assert time.monotonic() - started >= 0.3


def test_fault_bandwidth_caps_each_connection(fed):
    locator = _blocks(_signed_manifest(fed, "shared"))[0]
    assert int(locator.split("+")[1]) > 3 << 20
    fed.set_fault("zbbbb", "keep1", bandwidth=4 << 20)
    started = time.monotonic()
    conn, resp = _keep_get(fed, "zbbbb", locator, service="keep1")
    body = resp.read()
    conn.close()
    assert hashlib.md5(body).hexdigest() == locator[:32]
    assert time.monotonic() - started >= 0.6


def test_blob_ttl_change_shows_in_discovery(fed):
    fed.set_blob_ttl(600, "zcccc")
    doc = fed.request("zcccc", "/discovery/v1/apis/arvados/v1/rest").json()
    assert doc["blobSignatureTtl"] == 600


# --- request log --------------------------------------------------------------------------


def test_request_log_records_cluster_service_method_path_token_status_bytes(federation):
    mark = federation.mark()
    reply = federation.request("zcccc", "/arvados/v1/users/current?alt=json", token=federation.token("zcccc"))
    (record,) = federation.wait_requests(since=mark, cluster="zcccc")
    assert record["service"] == "controller" and record["method"] == "GET"
    assert record["path"] == "/arvados/v1/users/current?alt=json"
    assert record["token"] == federation.token("zcccc") and record["status"] == 200
    assert record["bytes"] == len(reply.body) and record["time"] > 0


# --- command line -------------------------------------------------------------------------


def _up(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "integration.cluster", "up", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_with_port_in_use_fails_with_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        result = _up("--state", str(tmp_path), "--seed", "none", "--base-port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot listen" in result.stderr


def test_up_with_unwritable_state_dir_fails_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = _up("--state", str(tmp_path / "file" / "state"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "state directory" in result.stderr


def test_up_with_bad_cluster_id_fails_with_one_line(tmp_path):
    result = _up("--state", str(tmp_path), "--clusters", "zzzzz,Bad!")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_seed_none_federation_starts_fast_and_stops_on_sigterm(federation_factory):
    started = time.monotonic()
    fed = federation_factory(clusters=("zaaaa", "zbbbb"), seed="none", blob_ttl=3600)
    assert time.monotonic() - started < 15
    assert fed.collections == {} and set(fed.clusters) == {"zaaaa", "zbbbb"}
    assert fed.request("zbbbb", "/discovery/v1/apis/arvados/v1/rest").json()["blobSignatureTtl"] == 3600
    fed.stop()
    assert fed.process.returncode == 0


# --- throughput ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_keepstore_serves_a_64mib_block_to_curl_at_over_1_gb_per_second(federation):
    entry = federation.collections["big"]
    locator = _blocks(_signed_manifest(federation, "big"))[0]
    url = federation.keep_services(entry["cluster"])[0] + "/" + locator
    best = 0.0
    for _ in range(8):
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{speed_download}",
                "-H",
                f"Authorization: Bearer {federation.token(entry['cluster'])}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        assert int(out[0]) == 1 << 26
        best = max(best, float(out[1]))
    print(f"keepstore 64 MiB block to curl: {best / 1e9:.2f} GB/s")
    assert best >= 1e9
