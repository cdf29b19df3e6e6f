"""Shared fixtures for integration tests: the emulated federation.

- ``federation`` (session): the demo-seeded federation (three clusters), stopped when the
  session ends; its faults are cleared after every test that used ``fed``.
- ``fed``: the same federation for one test; clears faults and restores the blob TTL after.
- ``federation_factory`` (session): start more federations with other options
  (``federation_factory(clusters=..., seed="none", blob_ttl=...)``); all are stopped at the end.
- ``record`` (session): a `Recorder` for what reliability scenarios measured, appending to
  ``reliability.jsonl`` in pytest's base temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.harness import Federation
from integration.mounting import Mount, Recorder


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
def record(tmp_path_factory) -> Recorder:
    return Recorder(tmp_path_factory.getbasetemp() / "reliability.jsonl")


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


@pytest.fixture
def sdk(federation, monkeypatch):
    """`sdk(cluster=None, token=None)`: a real arvados-python-client API object for a cluster.

    The SDK finds the run's CA through ``SSL_CERT_FILE`` (``arvados.util.ca_certs_path``);
    retries are kept small so that a failing call fails in seconds, and no discovery cache.
    """
    import arvados

    monkeypatch.setenv("SSL_CERT_FILE", federation.ca_cert)
    monkeypatch.delenv("ARVADOS_API_HOST_INSECURE", raising=False)
    monkeypatch.delenv("ARVADOS_KEEP_SERVICES", raising=False)

    def make(cluster: str | None = None, token: str | None = None):
        return arvados.api(
            "v1",
            host=federation.api_host(cluster),
            token=token or federation.token(cluster),
            insecure=False,
            num_retries=1,
            cache=False,
        )

    return make


@pytest.fixture
def mount(fed, tmp_path):
    """`mount(*fedmount_args, federation=None, base=None, **Mount options)`: a real fedmount
    mount of `fed` (or of `federation`) under the test's tmp dir (or `base`), stopped after the test."""
    mounts: list[Mount] = []

    def make(*args: str, federation: Federation | None = None, base: Path | None = None, **kwargs) -> Mount:
        m = Mount(federation or fed, base or tmp_path / f"m{len(mounts)}", *args, **kwargs)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.stop()
