"""Differential test: our parser against the Arvados Python SDK's reading of the same text.

Hypothesis writes manifests with escapes (needed and gratuitous), files spanning blocks,
empty blocks, empty files, repeated paths across streams, directory markers and names
containing ``/``; `arvados.collection.Collection(text)` parses them offline (no API). Both
must agree on the directories, the files, their sizes and their (locator, block offset,
length) segments. File and directory names come from disjoint sets: on name clashes and
on non-ASCII escapes the SDKs themselves disagree (Go decodes bytes, Python code points),
and the Python SDK loses ranges that start on an empty block, so empty blocks appear
only as a stream's sole block.
"""

from __future__ import annotations

import hashlib
import re

import arvados.collection
import pytest
from arvados._internal.streams import escape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmount.arvados.manifest import (
    WINDOW,
    Directory,
    File,
    ManifestError,
    parse_manifest,
    portable_data_hash,
)

DIRS = ["d", "e f", "g:h", "i\\j"]
FILES = ["f", "x y", "c:d", "b\\s", "t\tab", "é", "a.b", "0:1:z"]
HASHES = [hashlib.md5(str(i).encode()).hexdigest() for i in range(5)]


@st.composite
def escaped(draw: st.DrawFn, name: str) -> str:
    """`name` escaped as writers do, with some plain ASCII characters escaped too."""
    out = []
    for ch in name:
        if ch.isascii() and ch.isalnum() and draw(st.booleans()):
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(escape(ch))
    return "".join(out)


@st.composite
def streams(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(DIRS), max_size=2))
    name = "/".join([".", *[draw(escaped(p)) for p in parts]])
    blocks = []
    # Empty blocks only alone: the SDK's first_block() bisects wrongly past empty blocks
    # (tests/test_manifest.py covers them against the Go semantics).
    empty_stream = draw(st.integers(0, 9)) == 0
    for _ in range(1 if empty_stream else draw(st.integers(1, 4))):
        size = 0 if empty_stream else draw(st.integers(1, 12))
        hint = draw(st.sampled_from(["", "+A" + "a" * 40 + "@7fffffff", "+Rzbbbb-" + "b" * 40 + "@7fffffff"]))
        blocks.append((f"{draw(st.sampled_from(HASHES))}+{size}{hint}", size))
    total = sum(size for _, size in blocks)
    files = []
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, total))
        length = draw(st.integers(0, total - pos))
        prefix = [draw(escaped(p)) + "/" for p in draw(st.lists(st.sampled_from(DIRS), max_size=2))]
        if draw(st.integers(0, 9)) == 0:
            base = "\\056"  # directory marker
            pos = length = 0
        else:
            base = draw(escaped(draw(st.sampled_from(FILES))))
        files.append(f"{pos}:{length}:{''.join(prefix)}{base}")
    return " ".join([name, *(b for b, _ in blocks), *files]) + "\n"


def ours(text: str, window: int = WINDOW) -> tuple[dict, set]:
    files: dict[str, tuple[int, list]] = {}
    dirs: set[str] = set()
    stack = [("", parse_manifest(text, window=window).root)]
    while stack:
        prefix, directory = stack.pop()
        for name, entry in directory.entries():
            if isinstance(entry, File):
                segs = [(str(s.locator), s.block_offset, s.length) for s in entry.segments()]
                files[prefix + name] = (entry.size, segs)
            else:
                assert isinstance(entry, Directory)
                dirs.add(prefix + name)
                stack.append((prefix + name + "/", entry))
    return files, dirs


def sdk(text: str) -> tuple[dict, set]:
    files: dict[str, tuple[int, list]] = {}
    dirs: set[str] = set()
    stack = [("", arvados.collection.Collection(text))]
    while stack:
        prefix, collection = stack.pop()
        for name, item in collection.items():
            if isinstance(item, arvados.collection.RichCollectionBase):
                dirs.add(prefix + name)
                stack.append((prefix + name + "/", item))
            else:
                # The SDK keeps zero-length pieces of empty blocks that a file spans.
                segs = [(r.locator, r.segment_offset, r.range_size) for r in item.segments() if r.range_size]
                files[prefix + name] = (item.size(), segs)
    return files, dirs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(streams(), min_size=1, max_size=4))
def test_parser_agrees_with_python_sdk(lines: list[str]) -> None:
    text = "".join(lines)
    assert ours(text) == sdk(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(streams(), min_size=1, max_size=4), st.integers(1, 60))
def test_lines_parsed_in_small_windows_give_the_same_tree(lines: list[str], window: int) -> None:
    text = "".join(lines)
    assert ours(text, window=window) == ours(text)


@pytest.mark.parametrize("line", [
    f". {HASHES[0]}+5 0:1:a 0:1:b ", f". {HASHES[0]}+5  0:1:a", f". {HASHES[0]}+5 {HASHES[1]}+5  0:1:a",
    f". {HASHES[0]}+5 0:1:a 0:1:b 0:1:c 0:1:d 0:9:e 0:1:f", f". {HASHES[0]}+5 0:1:a x 0:1:b", ". 0:1:a",
    f". {HASHES[0]}+5 {HASHES[1]} 0:1:a", f"x {HASHES[0]}+5 0:1:a", f". {HASHES[0]}+5 0:1:a/../b",
])  # fmt: skip
@pytest.mark.parametrize("window", [1, 3, 8])
def test_lines_parsed_in_small_windows_fail_the_same_way(line: str, window: int) -> None:
    with pytest.raises(ManifestError) as whole:
        parse_manifest(line + "\n")
    with pytest.raises(ManifestError) as windowed:
        parse_manifest(line + "\n", window=window)
    assert str(windowed.value) == str(whole.value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(streams(), min_size=1, max_size=4), st.integers(1, 60))
def test_pdh_hashed_in_small_windows_is_the_pdh_of_the_whole_text(lines: list[str], window: int) -> None:
    text = "".join(lines)
    stripped = re.sub(r"( [0-9a-f]{32}\+[0-9]+)\+[^ \n]*", r"\1", text).encode()
    assert portable_data_hash(text, window=window) == f"{hashlib.md5(stripped).hexdigest()}+{len(stripped)}"


def test_sdk_comparison_sees_segments():
    text = f". {HASHES[0]}+5 {HASHES[1]}+0 {HASHES[2]}+5 3:5:x\\040y 0:0:\\056\n"
    files, dirs = ours(text)
    assert files == {"x y": (5, [(f"{HASHES[0]}+5", 3, 2), (f"{HASHES[2]}+5", 0, 3)])}
    assert (files, dirs) == sdk(text)
