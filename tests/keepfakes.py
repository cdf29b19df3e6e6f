"""Shared by the fake Keep transports of the unit tests."""

from __future__ import annotations


def received(data: bytes, into: memoryview | None) -> bytearray | memoryview:
    """A 200 GET's body as a real transport returns it: received into `into` when the caller gave one."""
    if into is None:
        return bytearray(data)
    into[:] = data
    return into
