"""Shared fixtures for integration tests: the emulated federation.

- ``federation`` (session): the demo-seeded federation (three clusters), stopped when the
  session ends; its faults are cleared after every test that used ``fed``.
- ``fed``: the same federation for one test; clears faults and restores the blob TTL after.
- ``federation_factory`` (session): start more federations with other options
  (``federation_factory(clusters=..., seed="none", blob_ttl=...)``); all are stopped at the end.
"""

from __future__ import annotations

import pytest

from integration.harness import Federation


@pytest.fixture(scope="session")
def federation_factory(tmp_path_factory, request):
    started: list[Federation] = []

    def start(**options) -> Federation:
        fed = Federation.start(tmp_path_factory.mktemp("federation"), **options)
        started.append(fed)
        return fed

    def stop_all() -> None:
        for fed in started:
            fed.stop()

    request.addfinalizer(stop_all)
    return start


@pytest.fixture(scope="session")
def federation(federation_factory) -> Federation:
    return federation_factory(seed="demo")


@pytest.fixture
def fed(federation, request) -> Federation:
    def restore() -> None:
        federation.clear_faults()
        federation.set_blob_ttl(1209600)

    request.addfinalizer(restore)
    return federation
