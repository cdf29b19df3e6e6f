"""Manifest parsing and PDH: the cases of reference/arvados-protocol.md §3."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from fedmount.arvados.ids import Locator
from fedmount.arvados.manifest import (
    SORT_RUN,
    Directory,
    File,
    ManifestError,
    parse_manifest,
    portable_data_hash,
    unescape,
)

EMPTY = "d41d8cd98f00b204e9800998ecf8427e+0"
A = "930625b054ce894ac40596c3f5a0d947"
B = "acbd18db4cc2f85cedef654fccc4a4d8"
C = "37b51d194a7513e45b56f6524f2d51f2"
SIG = "+A" + "f" * 40 + "@7fffffff"


def segs(f: File) -> list[tuple[str, int, int, int]]:
    return [(str(s.locator), s.block_offset, s.length, s.file_offset) for s in f.segments()]


def test_pdh_test_vector():
    text = f". {A}+33 0:0:a 0:0:b 0:33:output.txt\n./c {EMPTY} 0:0:d\n"
    assert portable_data_hash(text) == "a195f5f4d549f9bb9aa39e5dd8638618+111"


def test_pdh_strips_hints_but_not_normalization():
    plain = f". {A}+33 0:33:x\n"
    signed = f". {A}+33{SIG}+Kzzzzz 0:33:x\n"
    remote = f". {A}+33+Rzbbbb-{'e' * 40}@7fffffff 0:33:x\n"
    assert portable_data_hash(signed) == portable_data_hash(plain) == portable_data_hash(remote)
    assert portable_data_hash("") == EMPTY


def test_empty_manifest():
    m = parse_manifest("")
    assert len(m.root) == 0 and list(m.walk()) == [] and m.blocks() == []


def test_single_file_and_lookup():
    m = parse_manifest(f". {A}+33{SIG} 0:33:output.txt\n")
    f = m.root.get("output.txt")
    assert isinstance(f, File) and f.name == "output.txt" and f.size == 33
    assert segs(f) == [(f"{A}+33{SIG}", 0, 33, 0)]
    assert f.segments()[0].locator.signature == "f" * 40 + "@7fffffff"
    assert m.root.get("nope") is None
    assert m.find("output.txt") == f and m.find("output.txt/x") is None


def test_file_spanning_blocks_and_read_ahead_view():
    m = parse_manifest(f". {A}+10 {B}+10 {C}+10 5:20:f 25:5:g\n")
    f = m.find("f")
    assert segs(f) == [(f"{A}+10", 5, 5, 0), (f"{B}+10", 0, 10, 5), (f"{C}+10", 0, 5, 15)]
    first = f.segments()[0]
    assert [loc.hash for loc in first.stream.blocks[first.block_index + 1 :]] == [B, C]
    assert segs(m.find("g")) == [(f"{C}+10", 5, 5, 0)]


def test_empty_blocks_are_skipped():
    m = parse_manifest(f". {A}+10 {EMPTY} {B}+10 5:10:f\n")
    assert segs(m.find("f")) == [(f"{A}+10", 5, 5, 0), (f"{B}+10", 0, 5, 5)]
    assert [s.block_index for s in m.find("f").segments()] == [0, 2]


def test_same_path_in_several_streams_concatenates_in_order():
    text = f". {A}+10 0:4:f 4:6:g\n./d {B}+10 0:10:x\n. {C}+10 2:3:f 0:0:f 0:2:f\n"
    m = parse_manifest(text)
    f = m.find("f")
    assert f.size == 9
    assert segs(f) == [(f"{A}+10", 0, 4, 0), (f"{C}+10", 2, 3, 4), (f"{C}+10", 0, 2, 7)]
    assert [n for n, _ in m.root.entries()] == ["d", "f", "g"]
    assert len(m.root) == 3


def test_segments_from_any_offset_are_the_tail_of_the_whole_list():
    text = f". {A}+10 {B}+10 {C}+10 0:5:f 12:0:f 5:20:f 3:1:f 29:1:f 0:30:g\n"
    m = parse_manifest(text)
    for f in (m.find("f"), m.find("g")):  # pieces spanning blocks, an empty piece; one piece
        whole = segs(f)
        assert f.size == sum(length for *_, length, _ in whole) and f.size in (27, 30)
        for offset in range(f.size + 1):
            tail = [(loc, bo + max(offset - fo, 0), ln - max(offset - fo, 0), max(fo, offset))
                    for loc, bo, ln, fo in whole if fo + ln > offset]  # fmt: skip
            got = [(str(s.locator), s.block_offset, s.length, s.file_offset) for s in f.segments_from(offset)]
            assert got == tail, offset


def test_segments_from_the_end_of_a_file_of_many_pieces_is_found_without_a_walk():
    text = f". {A}+10 " + " ".join(f"{i % 10}:1:f" for i in range(200_000)) + "\n"
    f = parse_manifest(text).find("f")
    assert f.size == 200_000
    started = time.perf_counter()
    for offset in range(199_000, 200_000):
        assert next(f.segments_from(offset)).file_offset == offset
    assert time.perf_counter() - started < 1.0  # ~10 ms here; a walk over the pieces takes minutes


def test_empty_files_and_directory_markers():
    text = f". {A}+33 0:0:a 0:33:b\n./empty {EMPTY} 0:0:\\056\n./x {EMPTY} 0:0:y/\\056 0:0:z\n"
    m = parse_manifest(text)
    assert m.find("a").size == 0 and m.find("a").segments() == []
    empty = m.find("empty")
    assert isinstance(empty, Directory) and len(empty) == 0
    assert isinstance(m.find("x/y"), Directory) and len(m.find("x/y")) == 0
    assert m.find("x/z").size == 0
    assert sorted(p for p, _ in m.walk()) == ["a", "b", "x/z"]


def test_zero_length_file_named_like_a_directory_is_a_marker():
    m = parse_manifest(f". {EMPTY} 0:0:d\n./d {A}+3 0:3:f\n")
    assert isinstance(m.find("d"), Directory) and m.find("d/f").size == 3


def test_escapes_are_decoded_after_splitting():
    text = f"./a\\040dir {A}+20 0:5:b\\072c\\040d 5:5:back\\134slash 10:5:\\141\\\\z 15:5:t\\011ab\n"
    m = parse_manifest(text)
    d = m.find("a dir")
    assert isinstance(d, Directory) and d.name == "a dir"
    assert sorted(n for n, _ in d.entries()) == ["a\\z", "b:c d", "back\\slash", "t\tab"]
    assert m.streams[0].name == "./a dir"


def test_unescape_bytes_become_utf8_or_surrogates():
    assert unescape("caf\\303\\251") == "café"
    assert unescape("x\\377").encode("utf-8", "surrogateescape") == b"x\xff"
    assert unescape("\\777") == "\\777"  # not a byte: left alone
    assert unescape("a\\040\ud800").encode("utf-8", "surrogateescape") == b"a \xed\xa0\x80"  # hostile JSON
    assert unescape("\\12") == "\\12"


def test_non_normalized_names_with_slashes():
    m = parse_manifest(f". {A}+10 0:3:a/b/c.txt 3:3:a/d.txt 6:4:./e//f\n./a {B}+1 0:1:b/g\n")
    assert m.find("a/b/c.txt").size == 3
    assert m.find("a/d.txt").size == 3
    assert m.find("e/f").size == 4
    assert sorted(n for n, _ in m.find("a/b").entries()) == ["c.txt", "g"]
    assert sorted(p for p, _ in m.walk()) == ["a/b/c.txt", "a/b/g", "a/d.txt", "e/f"]


def test_blocks_distinct_by_key_in_stream_order():
    text = f". {B}+3{SIG} {A}+33 0:36:x\n./d {B}+3 {C}+1 0:4:y\n"
    m = parse_manifest(text)
    assert [b.key for b in m.blocks()] == [f"{B}+3", f"{A}+33", f"{C}+1"]
    assert m.blocks()[0] == Locator(B, 3, ("A" + "f" * 40 + "@7fffffff",))


def test_file_views_are_equal_and_hashable():
    m = parse_manifest(f". {A}+33 0:33:x 0:1:y\n")
    assert m.root.get("x") == m.root.get("x") and m.root.get("x") != m.root.get("y")
    assert len({m.root.get("x"), m.root.get("x")}) == 1


def test_missing_final_newline_is_tolerated():
    assert parse_manifest(f". {A}+33 0:33:x").find("x").size == 33


@pytest.mark.parametrize(
    "text, line, token, words",
    [
        (f". {A}+33 0:33:x\n\n", 2, 1, "stream name"),
        (f"foo {A}+33 0:33:x\n", 1, 1, "stream name"),
        (f". {A}+33 0:33:x\n. 0:1:x\n", 2, 2, "at least one locator"),
        (f". {A}+33\n", 1, 0, "at least one file token"),
        (f". {A}+33 xyz\n", 1, 3, "invalid locator"),
        (f". {A[:-1]}+33 0:1:x\n", 1, 2, "invalid locator"),
        (f". {A}+33+a 0:1:x\n", 1, 2, "bad hint"),
        (f". {A}+{1 << 27} 0:1:x\n", 1, 2, "64 MiB"),
        (f". {A}+33 0:1:x {B}+3\n", 1, 4, "file token"),
        (f". {A}+33 0:1:\n", 1, 3, "file token"),
        (f". {A}+33 a:1:x\n", 1, 3, "file token"),
        (f". {A}+33 0:34:x\n", 1, 3, "past the 33-byte stream"),
        (f". {A}+33 0:1:a {1 << 70}:1:x\n", 1, 4, "past the 33-byte stream"),
        (f". {A}+33 0:1:..\n", 1, 3, "not a file name"),
        (f". {A}+33 0:1:x/\n", 1, 3, "not a file name"),
        (f". {A}+33 0:1:../x\n", 1, 3, "'..'"),
        (f"./a/../b {A}+33 0:1:x\n", 1, 1, "'..'"),
        (f". {A}+33 0:1:d\n./d {A}+33 0:1:x\n", 1, 0, "clashes with a directory"),
    ],
)
def test_malformed_manifests_name_line_and_token(text, line, token, words):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    assert (info.value.line, info.value.token) == (line, token)
    assert words in str(info.value) and str(info.value).startswith("malformed manifest: line ")


def test_large_directory_lookup():
    n = 5000
    text = f". {A}+{n} " + " ".join(f"{i}:1:f{i}" for i in range(n)) + "\n"
    m = parse_manifest(text)
    assert len(m.root) == n
    for i in range(0, n, 7):
        f = m.root.get(f"f{i}")
        assert f.name == f"f{i}" and segs(f) == [(f"{A}+{n}", i, 1, 0)]
    assert m.root.get("f5000") is None


def test_non_ascii_and_undecodable_names_round_trip():
    # Literal non-ASCII takes the bulk path, escapes the token path; "é" repeats across both.
    text = f". {A}+4 0:1:é 1:1:x 2:1:日本\n. {B}+2 0:1:\\303\\251 1:1:bad\\377\n"
    m = parse_manifest(text)
    assert [n for n, _ in m.root.entries()] == ["é", "x", "日本", "bad\udcff"]
    assert segs(m.root.get("é")) == [(f"{A}+4", 0, 1, 0), (f"{B}+2", 0, 1, 1)]
    assert m.root.get("日本").name == "日本" and m.root.get("bad\udcff").size == 1
    assert m.root.get("bad") is None and m.root.get("\udcff") is None


def test_parse_memory_is_about_the_tree():
    """No Python object per file survives its line, and the tree is about the text's size."""
    n = 20_000
    lines = [f"./s{s} {A}+{n // 10} " + " ".join(f"{i}:1:file_{s}_{i:05d}.dat" for i in range(n // 10))
             for s in range(10)]
    text = "\n".join(lines) + "\n"
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    m = parse_manifest(text)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(1 for _ in m.walk()) == n
    # The tree was 2.6x the text before its arrays were narrowed; a str per file made the peak 6.5x.
    assert current - base < 1.75 * len(text) and peak - base < 4 * len(text)


def test_parse_memory_does_not_depend_on_the_line_structure():
    n = 200_000
    names = [f"file_{i:07d}.dat" for i in range(n)]
    shapes = {"one line": [names], "1,000 lines": [names[i : i + n // 1000] for i in range(0, n, n // 1000)],
              "every file on two lines": [names[: n // 2]] * 2}  # fmt: skip
    peaks = {}
    for shape, lines in shapes.items():
        text = "".join(f". {A}+10 " + " ".join(f"0:1:{name}" for name in line) + "\n" for line in lines)
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        m = parse_manifest(text)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(m.root) == len(set().union(*lines))
        peaks[shape] = (peak - base) / len(text)
    # ~4.9x each (the sort's temporaries weigh more in a small directory than in the 1M-file
    # one above); before: one line 13.5x, 1,000 lines 6x, every name on two lines 10.5x.
    assert max(peaks.values()) < 1.25 * min(peaks.values()) and max(peaks.values()) < 6, peaks


def test_a_directory_bigger_than_a_sort_run_is_sorted_in_bins_and_found():
    n = 5 * SORT_RUN
    text = f". {A}+10 " + " ".join(f"0:1:f{i}" for i in range(n)) + "\n"
    root = parse_manifest(text).root
    assert list(root._hashes) == sorted(root._hashes) and sorted(root._order) == list(range(n))
    for i in range(0, n, 997):
        f = root.get(f"f{i}")
        assert f is not None and f.name == f"f{i}"
    assert root.get(f"f{n}") is None


def test_lookup_hashes_that_collide_are_told_apart_by_name(monkeypatch):
    monkeypatch.setattr("fedmount.arvados.manifest_tree._HIGH_HALF", (62).__rrshift__)  # 4 values, 200 names
    names = [f"f{i}" for i in range(200)]
    first = f". {A}+200 " + " ".join(f"{i}:1:{n}" for i, n in enumerate(names))
    text = f"{first}\n. {B}+3 0:3:f7 0:0:sub\n./sub {B}+3 0:3:x\n"
    m = parse_manifest(text)
    assert [n for n, _ in m.root.entries()] == ["sub", *names]
    for name in names:
        f = m.root.get(name)
        assert f is not None and f.name == name and f.size == (4 if name == "f7" else 1)
    assert segs(m.root.get("f7")) == [(f"{A}+200", 7, 1, 0), (f"{B}+3", 0, 3, 1)]
    assert m.root.get("f200") is None and isinstance(m.root.get("sub"), Directory)


def test_arrays_take_the_narrowest_type_their_values_fit():
    small = parse_manifest(f". {A}+300 " + " ".join(f"{i}:1:f{i}" for i in range(300)) + "\n").root
    assert [a.itemsize for a in (small._p_len, small._p_stream, small._p_pos, small._order)] == [1, 1, 2, 2]
    big = 5 << 30  # a file of 5 GiB, at an offset past 4 GiB
    blocks = " ".join([f"{A}+{1 << 26}", f"{B}+{1 << 26}"] * 80)  # 10 GiB
    text = f". {blocks} {big}:{big}:huge 0:1:a\n"
    root = parse_manifest(text).root
    assert root._p_len.itemsize == root._p_pos.itemsize == 8
    assert root.get("huge").size == big and segs(root.get("huge"))[0][:2] == (f"{A}+{1 << 26}", 0)


def test_the_earliest_signature_expiry_of_any_line_is_found_in_the_locators_only():
    sig = "a" * 40
    text = (
        f". {A}+3+A{sig}@65000000 {B}+3+Rzbbbb-{sig}@64000000 0:6:x\n"
        f"./d {A}+3+Kzbbbb+A{sig}@66000000 0:3:f+A{sig}@00000001\n"  # a file name is not a signature
    )
    assert parse_manifest(text).earliest_signature_expiry == 0x64000000
    assert parse_manifest(f". {A}+3 0:3:x\n").earliest_signature_expiry is None
    assert parse_manifest("").earliest_signature_expiry is None
