"""``--route auto`` on real mounts: a remote cluster's blocks straight from its keepstores with
the salted token while they answer, through the home keepstore when they do not, at a cost
paid once (one probe round), never the home token to a remote."""

from __future__ import annotations

import time

import pytest

from fedmount.arvados.tokens import parse_token, salt_for
from integration.harness import Federation
from integration.mounting import Mount, md5sums, requires_fuse

pytestmark = requires_fuse


def read_all(m: Mount, coll: dict, cid: str) -> None:
    expected = {p: meta["md5"] for p, meta in coll["files"].items()}
    assert md5sums(m / f"by_id/{cid}", sorted(expected)) == expected


def block_gets(fed: Federation, since: int) -> list[dict]:
    """GETs of blocks that clients (not keepstores proxying for them) sent and got."""
    return [r for r in fed.requests(since=since) if r["service"].startswith("keep") and r["method"] == "GET"
            and r["status"] == 200 and not r.get("from_service")]  # fmt: skip


def keepstores(fed: Federation, cluster: str) -> list[str]:
    return [f"keep{i}" for i in range(len(fed.keep_services(cluster)))]


def test_auto_route_reads_a_remote_directly_and_the_home_token_stays_home(fed, mount):
    m = mount("--route", "auto")
    nested = fed.collections["nested"]  # zcccc
    mark = fed.mark()
    read_all(m, nested, nested["uuid"])
    gets = block_gets(fed, mark)
    assert gets and {r["cluster"] for r in gets} == {"zcccc"}  # the home keepstore was not asked
    salted = salt_for(parse_token(fed.token()), "zcccc").text
    assert {r["token"] for r in gets} == {salted}
    seen = fed.requests(since=mark)
    assert [r for r in seen if r["cluster"] != fed.home and r["token"] == fed.token()] == []
    assert [r for r in seen if r["cluster"] == "zcccc" and r["service"] == "controller"
            and not r.get("from_service")] != []  # its keep_services/accessible, salted
    assert "reading cluster zcccc's blocks from its own keep services" in m.log.read_text()


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 403}])
def test_auto_route_falls_back_to_the_home_when_the_remote_keepstores_are_unreachable(fed, mount, fault):
    """The emulator's faults hit every client of a keepstore, the home keepstore's proxy reads
    too, so each of zbbbb's keepstores fails only its first request: the first block's direct
    GET, one round over them. They answer again at once; auto stays home for its wait all the
    same, so trying them cost that once. (No read-ahead: one block in flight at a time. A
    ``down`` fault cannot be counted reliably, it resets at accept; unreachable keepstores
    are tests/test_route_choice.py's.)"""
    m = mount("--route", "auto", "--read-ahead-blocks", "0")
    coll = fed.collections["big"]  # zbbbb, five 64 MiB blocks
    for service in keepstores(fed, "zbbbb"):
        fed.set_fault("zbbbb", service, count=1, **fault)
    started = time.monotonic()
    mark = fed.mark()
    read_all(m, coll, coll["uuid"])
    elapsed = time.monotonic() - started
    assert fed.faults() == {}  # every keepstore of zbbbb was asked once
    gets = block_gets(fed, mark)
    assert gets and {r["cluster"] for r in gets} == {fed.home}
    assert all(r["token"] == fed.token() for r in gets)
    direct = [r for r in fed.requests(since=mark) if r["cluster"] == "zbbbb"
              and r["service"].startswith("keep") and not r.get("from_service")]
    assert all(r["status"] != 200 for r in direct) and len(direct) <= len(keepstores(fed, "zbbbb"))
    assert "reading cluster zbbbb's blocks through the home cluster for 30 s" in m.log.read_text()
    assert elapsed < 60


def test_auto_route_reads_a_block_again_through_the_home_when_a_direct_get_fails(fed, mount):
    m = mount("--route", "auto", "--read-ahead-blocks", "0")  # one block in flight: it meets both faults
    shared = fed.collections["shared"]  # zbbbb too
    read_all(m, shared, shared["uuid"])  # the choice is made: direct
    assert "reading cluster zbbbb's blocks from its own keep services" in m.log.read_text()
    for service in keepstores(fed, "zbbbb"):
        fed.set_fault("zbbbb", service, status=503, count=1)
    big = fed.collections["big"]
    mark = fed.mark()
    read_all(m, big, big["uuid"])
    home_gets = [r for r in block_gets(fed, mark) if r["cluster"] == fed.home]
    assert home_gets and all(r["token"] == fed.token() for r in home_gets)
    assert "reading cluster zbbbb's blocks through the home cluster for 30 s" in m.log.read_text()
