"""Manifest text for a tree of files whose bytes were cut into blocks (the writer's side).

`manifest_text` writes what the Arvados SDK writes for a collection (``Collection
.manifest_text()``, ``_internal/streams.normalize_stream``), so the portable data hash
fedmount announces is the one the API server computes:

- one stream per directory that holds files, depth first with names sorted (the files of
  a directory, then its subdirectories); the root is ``.``, the others ``./a/b``;
- a stream lists each block its files touch once, in order of first use, and each file
  as ``position:length:name`` tokens over that stream's blocks, adjacent pieces merged;
- an empty file is ``0:0:name``, a stream with no bytes lists the empty block
  ``d41d8cd98f00b204e9800998ecf8427e+0``, and an empty directory is a stream holding
  only a file named ``\\056`` (``.``), as the SDK encodes it;
- names are escaped as the SDK escapes them (backslash, colon and bytes 0-32 as
  ``\\ooo``), and so are the bytes of a name that is not UTF-8 (the surrogates of
  ``os.fsdecode``), which JSON could not carry.

Blocks may be shared between streams (small files of several directories packed into
one block, as arv-put does): each stream then lists the shared block too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

EMPTY_BLOCK_LOCATOR = "d41d8cd98f00b204e9800998ecf8427e+0"
_ESCAPED = re.compile(r"[\\:\000-\040\udc80-\udcff]")


def escape(name: str) -> str:
    """A stream or file name as a manifest token."""

    def octal(m: re.Match[str]) -> str:
        code = ord(m.group(0))
        return "\\%03o" % (code - 0xDC00 if code >= 0xDC00 else code)

    return _ESCAPED.sub(octal, name)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a file's bytes inside one block: block index, offset in it, length."""

    block: int
    offset: int
    length: int


@dataclass
class FileEntry:
    name: str
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class DirEntry:
    """A directory of the tree to write: its files and subdirectories (any order)."""

    files: list[FileEntry] = field(default_factory=list)
    dirs: dict[str, DirEntry] = field(default_factory=dict)


def manifest_text(root: DirEntry, locators: Sequence[str], sizes: Sequence[int]) -> str:
    """The manifest of `root`; `locators[i]` (signed or not) and `sizes[i]` are block i's."""
    lines: list[str] = []
    _write(root, ".", locators, sizes, lines, is_root=True)
    return "".join(lines)


def _write(d: DirEntry, stream: str, locators: Sequence[str], sizes: Sequence[int],
           lines: list[str], *, is_root: bool) -> None:
    files = sorted(d.files, key=lambda f: f.name)
    if files:
        lines.append(_stream_line(stream, files, locators, sizes))
    elif not d.dirs and not is_root:
        lines.append(f"{escape(stream)} {EMPTY_BLOCK_LOCATOR} 0:0:\\056\n")
    for name in sorted(d.dirs):
        _write(d.dirs[name], f"{stream}/{name}", locators, sizes, lines, is_root=False)


def _stream_line(stream: str, files: list[FileEntry], locators: Sequence[str], sizes: Sequence[int]) -> str:
    start: dict[int, int] = {}  # block index -> its position in this stream
    tokens = [escape(stream)]
    position = 0
    for f in files:
        for p in f.pieces:
            if p.block not in start:
                start[p.block] = position
                position += sizes[p.block]
                tokens.append(locators[p.block])
    if len(tokens) == 1:
        tokens.append(EMPTY_BLOCK_LOCATOR)
    for f in files:
        name = escape(f.name)
        span: list[int] | None = None
        for p in f.pieces:
            at = start[p.block] + p.offset
            if span is not None and at == span[1]:
                span[1] += p.length
                continue
            if span is not None:
                tokens.append(f"{span[0]}:{span[1] - span[0]}:{name}")
            span = [at, at + p.length]
        tokens.append(f"{span[0]}:{span[1] - span[0]}:{name}" if span else f"0:0:{name}")
    return " ".join(tokens) + "\n"
