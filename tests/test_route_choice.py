"""The automatic route: `AutoRoutes`' decision per cluster (fake clock, fake source and probe),
`KeepClient` reading ``+R`` blocks along it (fake keepstores), and `Federation` in auto mode
(fake federation over httpx.MockTransport)."""

from __future__ import annotations

import hashlib

import pytest
import trio

from fedmount.api.federation import Federation
from fedmount.api.route_choice import AutoRoutes
from fedmount.arvados.errors import ClusterUnreachable, TokenNotSaltable
from fedmount.arvados.ids import parse_collection_id, parse_locator
from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.routes import KeepRoute, KeepService, direct_locator
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import ApiToken, salt_for
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.transport import TransportError
from fedmount.stats import Stats
from tests.test_keep import FakeKeep, ok, status

HOME_TOKEN = "v2/zzzzz-gj3su-000000000000000/secretsecretsecret"
SALTED = "v2/zzzzz-gj3su-000000000000000/salted"
REMOTE_SIG = "b" * 40 + "@7fffffff"
HOME_SVC = KeepService("zzzzz-bi6l4-000000000000000", "http://keep.zzzzz.test:25107/")
REMOTE_SVC = KeepService("zbbbb-bi6l4-000000000000000", "http://keep.zbbbb.test:25107/")
REMOTE_ROUTE = KeepRoute("zbbbb", SALTED, (REMOTE_SVC,))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The API side's answer for a cluster's own route, counted; `error` makes it fail."""

    def __init__(self, error: Exception | None = None, delay: float = 0.0):
        self.error = error
        self.delay = delay
        self.asked = 0

    async def __call__(self, cluster: str) -> KeepRoute:
        self.asked += 1
        await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return REMOTE_ROUTE


async def test_the_first_use_decides_direct_once_while_concurrent_readers_wait_for_it():
    source = Source(delay=0.01)
    routes = AutoRoutes(source, clock=Clock())
    got: list[KeepRoute | None] = []

    async def reader() -> None:
        got.append(await routes.direct("zbbbb"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert got == [REMOTE_ROUTE] * 5 and source.asked == 1
    assert routes.state("zbbbb") == "direct"


async def test_an_unreachable_remote_is_home_for_a_growing_wait_and_then_tried_again():
    source, clock = Source(ClusterUnreachable("zbbbb", "connect refused")), Clock()
    routes = AutoRoutes(source, clock=clock, first_wait=30, max_wait=100)
    assert await routes.direct("zbbbb") is None
    assert routes.state("zbbbb") == "home" and source.asked == 1
    clock.now += 29
    assert await routes.direct("zbbbb") is None and source.asked == 1  # no second trial yet
    clock.now += 1
    assert await routes.direct("zbbbb") is None and source.asked == 2
    for wait in (60, 100, 100):  # doubling, bounded
        clock.now += wait - 1
        assert routes.state("zbbbb") == "home"
        clock.now += 1
        assert await routes.direct("zbbbb") is None
    assert source.asked == 5
    clock.now += 100
    source.error = None
    assert await routes.direct("zbbbb") == REMOTE_ROUTE


async def test_a_flapping_cluster_costs_one_failed_read_per_wait_not_every_block():
    source, clock = Source(), Clock()
    routes = AutoRoutes(source, clock=clock, first_wait=30, max_wait=900)
    for _ in range(4):  # answers at each trial, fails on the next read
        clock.now += 1000
        assert await routes.direct("zbbbb") == REMOTE_ROUTE
        clock.now += 1
        routes.failed("zbbbb", "reset")
        for _ in range(50):  # the blocks read meanwhile go home without trying
            assert await routes.direct("zbbbb") is None
    assert routes.state("zbbbb") == "home" and source.asked == 4
    assert routes._clusters["zbbbb"].wait == 240  # 30, 60, 120, 240: each flap waits longer


async def test_a_cluster_that_worked_longer_than_its_wait_starts_the_wait_over():
    clock = Clock()
    routes = AutoRoutes(Source(), clock=clock, first_wait=30)
    for _ in range(3):
        assert await routes.direct("zbbbb") == REMOTE_ROUTE
        clock.now += 3600  # worked for an hour
        routes.failed("zbbbb", "reset")
        assert routes._clusters["zbbbb"].wait == 30
        clock.now += 30


async def test_failures_of_blocks_in_flight_together_count_once():
    routes = AutoRoutes(Source(), clock=Clock(), first_wait=30)
    assert await routes.direct("zbbbb") == REMOTE_ROUTE
    for _ in range(8):
        routes.failed("zbbbb", "connect: refused")
    assert routes._clusters["zbbbb"].wait == 30


async def test_a_token_that_cannot_be_salted_is_home_for_good():
    source, clock = Source(TokenNotSaltable("zbbbb", "needs a v2 token")), Clock()
    routes = AutoRoutes(source, clock=clock)
    assert await routes.direct("zbbbb") is None
    clock.now += 100_000
    assert await routes.direct("zbbbb") is None and source.asked == 1


async def test_a_trial_that_does_not_end_is_cut_and_means_home():
    routes = AutoRoutes(Source(delay=10), trial_timeout=0.05)
    with trio.fail_after(2):
        assert await routes.direct("zbbbb") is None
    assert routes.state("zbbbb") == "home"


def test_the_direct_locator_turns_the_remote_hint_into_its_signature():
    loc = parse_locator(f"{'a' * 32}+3+Azzzz{'c' * 36}@7fffffff+Rzbbbb-{REMOTE_SIG}+Kzbbbb")
    assert str(direct_locator(loc)) == f"{'a' * 32}+3+A{REMOTE_SIG}+Kzbbbb"


# --- KeepClient along an auto route ------------------------------------------------------------

DATA = b"remote block bytes"
LOCATOR = parse_locator(f"{hashlib.md5(DATA).hexdigest()}+{len(DATA)}+Rzbbbb-{REMOTE_SIG}")


def auto_home_route(routes: AutoRoutes) -> KeepRoute:
    return KeepRoute("zzzzz", HOME_TOKEN, (HOME_SVC,), remotes=routes)


async def test_a_remote_block_is_read_from_its_cluster_with_the_salted_token_and_its_own_signature():
    fake = FakeKeep(DATA, {HOME_SVC.root_url: ok, REMOTE_SVC.root_url: ok})
    keep = KeepClient(fake, stats=Stats(), backoff=0)
    assert await keep.get(LOCATOR, auto_home_route(AutoRoutes(Source()))) == DATA
    direct_get = ("GET", REMOTE_SVC.root_url + str(direct_locator(LOCATOR)))
    assert [(m, url) for m, url, _ in fake.calls] == [direct_get]
    assert {h["Authorization"] for _, _, h in fake.calls} == {f"Bearer {SALTED}"}


@pytest.mark.parametrize("remote", [TransportError("connect", "refused"), status(401), status(503)])
async def test_a_remote_keepstore_that_fails_is_read_through_the_home_and_not_asked_again(remote):
    fake = FakeKeep(DATA, {HOME_SVC.root_url: ok, REMOTE_SVC.root_url: remote})
    keep = KeepClient(fake, stats=Stats(), backoff=0)
    routes = AutoRoutes(Source())
    for _ in range(3):
        assert await keep.get(LOCATOR, auto_home_route(routes)) == DATA
    remote_calls = [(m, h["Authorization"]) for m, url, h in fake.calls
                    if url.startswith(REMOTE_SVC.root_url)]  # fmt: skip
    assert remote_calls == [("GET", f"Bearer {SALTED}")]  # one round, once, then home
    home_calls = [(url, h["Authorization"]) for m, url, h in fake.calls if url.startswith(HOME_SVC.root_url)]
    assert home_calls == [(HOME_SVC.root_url + str(LOCATOR), f"Bearer {HOME_TOKEN}")] * 3


async def test_a_direct_get_that_fails_after_the_choice_is_read_again_through_the_home():
    answers = iter([ok, TransportError("network", "reset")])
    current = {"behaviour": next(answers)}

    def remote(method, data):
        behaviour = current["behaviour"]
        if isinstance(behaviour, BaseException):
            raise behaviour
        return behaviour(method, data)

    fake = FakeKeep(DATA, {HOME_SVC.root_url: ok, REMOTE_SVC.root_url: remote})
    keep = KeepClient(fake, stats=Stats(), backoff=0)
    routes = AutoRoutes(Source())
    assert await keep.get(LOCATOR, auto_home_route(routes)) == DATA  # direct
    current["behaviour"] = next(answers)
    assert await keep.get(LOCATOR, auto_home_route(routes)) == DATA  # direct fails once: home
    assert routes.state("zbbbb") == "home"
    methods = [(m, url.split("/")[2]) for m, url, _ in fake.calls]
    assert methods == [("GET", "keep.zbbbb.test:25107"), ("GET", "keep.zbbbb.test:25107"),
                       ("GET", "keep.zzzzz.test:25107")]


async def test_a_home_block_on_an_auto_route_goes_home_without_a_choice():
    data = b"home bytes"
    loc = parse_locator(f"{hashlib.md5(data).hexdigest()}+{len(data)}+A{'c' * 40}@7fffffff")
    fake = FakeKeep(data, {HOME_SVC.root_url: ok})
    source = Source()
    assert await KeepClient(fake, backoff=0).get(loc, auto_home_route(AutoRoutes(source))) == data
    assert source.asked == 0 and [m for m, _, _ in fake.calls] == ["GET"]


# --- Federation in auto mode ---------------------------------------------------------------------

async def test_auto_mode_fetches_records_from_the_home_and_reads_remote_blocks_from_the_owner(fake):
    rec = fake.add_collection("zbbbb", "21", {"r.txt": b"remote"})
    settings = Settings("api.zzzzz.example", fake.token)
    fed = await Federation.connect(settings, mode="auto", transport=fake.transport)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    record_asked = [r.host for r in fake.requests if r.path.startswith("/arvados/v1/collections")]
    assert record_asked == ["api.zzzzz.example"]  # the record: as in home mode
    assert got.route.cluster == "zzzzz" and got.route.token == fake.token.text
    assert got.route.remotes is not None
    assert [r.path for r in fake.requests if r.host == "api.zbbbb.example"][-1:] == [
        "/arvados/v1/keep_services/accessible"
    ]  # the choice for zbbbb, made as the record loaded
    loc = parse_manifest(got.manifest_text).find("r.txt").segments()[0].locator
    direct = await got.route.remotes.direct(loc.remote[0])
    assert direct is not None and direct.cluster == "zbbbb"
    assert direct.token == salt_for(fake.token, "zbbbb").text
    assert all(s.uuid.startswith("zbbbb-") for s in direct.services)
    assert fake.token.text not in fake.tokens_seen("api.zbbbb.example")
    await fed.aclose()


async def test_auto_mode_with_a_v1_token_that_cannot_be_salted_is_home_mode(fake):
    fake.home.tokens.add(fake.token.secret)
    settings = Settings("api.zzzzz.example", ApiToken(None, fake.token.secret))
    rec = fake.add_collection("zbbbb", "22", {"r.txt": b"remote"})
    fed = await Federation.connect(settings, mode="auto", transport=fake.transport)
    got = await fed.get_collection(parse_collection_id(rec["uuid"]))
    assert got.route.remotes is None and got.route.cluster == "zzzzz"
    assert {r.host for r in fake.requests} == {"api.zzzzz.example"}
    await fed.aclose()
