"""`fedmount.memory.release`: glibc's malloc_trim when there is one, else nothing."""

from __future__ import annotations

import platform

import pytest

from fedmount import memory


def test_release_trims_every_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    memory.release()
    assert calls == [0]


def test_release_without_malloc_trim_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_TRIM", None)
    memory.release()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_malloc_trim_is_found_and_runs() -> None:
    assert memory._TRIM is not None
    memory.release()
