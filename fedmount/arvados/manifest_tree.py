"""The parsed manifest: a compact file tree whose files map to block segments.

`fedmount.arvados.manifest` parses the text into these types; this module is what the
parse builds and what the block reader and the filesystem read.

Memory is the design constraint: a collection may have millions of files and a mount may
hold many collections, so the tree must cost about as much as the text, not ten times it,
and parsing must not leave the process bigger than the tree. Nothing is kept per file as
a Python object, not even its name (a million small objects alive through the parse, among
long-lived per-line ones, pin pymalloc pools that are never given back):

- A `Stream` keeps its locator tokens as the strings of the text plus an `array` of block
  start offsets; `Locator` objects are made when asked for.
- A `Directory` keeps its files' decoded names UTF-8 encoded (``surrogatepass``, so any
  decoded name round-trips) and concatenated into one `bytes` with an array of end
  offsets, the files' pieces as parallel arrays (stream index, stream offset, length),
  and, for lookups, the top 32 bits of the names' ``hash()`` sorted in an array next to
  the matching file index: `get()` bisects the hashes and decodes only the candidates'
  names to compare. A name is decoded only when asked for (`get`, `entries`,
  `File.name`). A file's pieces are contiguous in the piece arrays (``piece_start`` is
  omitted when every file has exactly one piece, the common case; with it, ``p_offset``
  has each piece's offset in its file, so neither a file's size nor the piece holding a
  byte needs a walk over its pieces). Every array but the hashes has the narrowest
  unsigned typecode its values fit (``B`` to ``Q``): file sizes, offsets, stream and name
  indexes are mostly small, so a file costs its name's bytes plus about a dozen bytes
  (4 of hash, 2 each of name end, file index, stream index and offset, 1 of length).
- `File` is a two-slot view (directory, index) built on demand; `File.segments_from()`
  bisects to the piece holding an offset, maps pieces to blocks by bisecting the
  stream's block offsets, and builds each `Segment` only when the reader gets to it.

While parsing, names, their hashes and pieces are appended straight into each directory's
growing `bytearray` and arrays (`Directory.add_names`, `add_pieces`; an array moves to a
wider typecode when a value does not fit). `Directory.finish()` then sorts the hashes
(a directory of more than ``SORT_RUN`` files in bins of its hashes' top bits, so that no
single sort holds the GIL for long); only if two files have one name or a file is named
like a sub-directory does it merge them (keeping manifest order), drop directory markers
and reject file/directory clashes; the files of one name are chained in an array for
that, not grouped in Python objects.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, count, islice
from operator import eq
from typing import overload

from .ids import Locator

_HIGH_HALF = (32).__rrshift__  # h -> h >> 32: the top half of a hash, which sorts as the hash does
_WIDER = {"B": "H", "H": "I", "I": "Q"}
SORT_RUN = 1 << 16  # files of a directory sorted by one call (one hold of the GIL)


class ManifestError(ValueError):
    """Malformed manifest text; names the line (1-based) and token (1-based, 0 = whole line)."""

    def __init__(self, line: int, token: int, text: str, why: str):
        self.line = line
        self.token = token
        shown = text if len(text) <= 80 else text[:77] + "..."
        where = f"line {line}" + (f", token {token} {shown!r}" if token else "")
        super().__init__(f"malformed manifest: {where}: {why}")



@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of a file inside one block."""

    locator: Locator
    block_offset: int
    length: int
    file_offset: int
    stream: Stream
    block_index: int


class _Blocks(Sequence[Locator]):
    """A stream's locators, kept as their validated text and parsed when read."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: list[str]):
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    @overload
    def __getitem__(self, index: int) -> Locator: ...
    @overload
    def __getitem__(self, index: slice) -> list[Locator]: ...

    def __getitem__(self, index: int | slice) -> Locator | list[Locator]:
        if isinstance(index, slice):
            return [_locator(t) for t in self._tokens[index]]
        return _locator(self._tokens[index])


def _typecode(top: int) -> str:
    """The narrowest unsigned array typecode that holds 0 to `top`."""
    return next(code for code in "BHIQ" if top < 1 << 8 * array(code).itemsize)


def _narrow(values: array) -> array:
    """`values` (none negative) in the narrowest unsigned typecode that holds every one."""
    code = _typecode(max(values, default=0))
    return values if values.typecode == code else array(code, values)


def _extend(values: array, more: list[int]) -> array:
    """`values` with `more` appended, moved to wider unsigned typecodes until every one fits."""
    while True:
        try:
            values.fromlist(more)  # all or nothing
            return values
        except OverflowError:
            values = array(_WIDER[values.typecode], values)


def _locator(token: str) -> Locator:
    hash_, size, *hints = token.split("+")
    return Locator(hash_, int(size), tuple(hints))


class Stream:
    """One manifest line's block space: its locators in order and where each starts."""

    __slots__ = ("name", "blocks", "_tokens", "_starts", "index")

    def __init__(self, name: str, index: int, tokens: list[str], starts: array):
        self.name = name  # decoded stream name, "." or "./a/b"
        self.index = index  # 0-based line number
        self._tokens = tokens
        self.blocks: Sequence[Locator] = _Blocks(tokens)
        self._starts = starts  # len(blocks) + 1 offsets; the last is the stream size

    @property
    def size(self) -> int:
        return self._starts[-1]

    def segments(self, pos: int, length: int, file_offset: int) -> Iterator[Segment]:
        """The block pieces of stream range [pos, pos+length), skipping empty blocks."""
        starts = self._starts
        index = bisect_right(starts, pos) - 1
        end = pos + length
        while pos < end:
            block_end = starts[index + 1]
            if block_end > pos:
                take = min(block_end, end) - pos
                yield Segment(self.blocks[index], pos - starts[index], take, file_offset, self, index)
                pos += take
                file_offset += take
            index += 1

    def __repr__(self) -> str:
        return f"Stream({self.name!r}, {len(self.blocks)} blocks, {self.size} bytes)"


class File:
    """A view of one file of a `Directory`; cheap to make, equal to any view of the same file."""

    __slots__ = ("_dir", "_index")

    def __init__(self, directory: Directory, index: int):
        self._dir = directory
        self._index = index

    @property
    def name(self) -> str:
        return self._dir._file_name(self._index)

    @property
    def index(self) -> int:
        """The file's place among its directory's files (`Directory.entries` order, after the
        sub-directories); stable for the life of the parsed manifest."""
        return self._index

    @property
    def size(self) -> int:
        d = self._dir
        first, last = d._piece_range(self._index)
        if d._p_offset is None:
            return d._p_len[first]
        return d._p_offset[last - 1] + d._p_len[last - 1]

    def segments(self) -> list[Segment]:
        """The file's block pieces in file order, contiguous from offset 0."""
        return list(self.segments_from(0))

    def segments_from(self, offset: int) -> Iterator[Segment]:
        """The file's block pieces from the one holding byte `offset` on, in file order, made
        one at a time: finding the first costs two bisections, each next one O(1), whatever
        the number of pieces (a legal file may have millions of one-byte pieces)."""
        d = self._dir
        first, last = d._piece_range(self._index)
        piece, at = first, 0
        if d._p_offset is not None:
            piece = max(bisect_right(d._p_offset, offset, first, last) - 1, first)
            at = d._p_offset[piece]
        for p in range(piece, last):
            length = d._p_len[p]
            skip = min(max(offset - at, 0), length)
            yield from d._streams[d._p_stream[p]].segments(d._p_pos[p] + skip, length - skip, at + skip)
            at += length

    def __eq__(self, other: object) -> bool:
        return isinstance(other, File) and other._dir is self._dir and other._index == self._index

    def __hash__(self) -> int:
        return hash((id(self._dir), self._index))

    def __repr__(self) -> str:
        return f"File({self.name!r}, {self.size})"


class Directory:
    """A directory of the tree: sub-directories in a dict, files packed in arrays."""

    __slots__ = (
        "name", "_dirs", "_streams", "_names", "_name_ends", "_hashes", "_order",
        "_piece_start", "_p_stream", "_p_pos", "_p_len", "_p_offset",
    )  # fmt: skip

    def __init__(self, name: str, streams: list[Stream]):
        self.name = name
        self._dirs: dict[str, Directory] = {}
        self._streams = streams
        # While parsing: one entry per file token (names repeat, hashes unsorted); see _finish_one().
        self._names: bytearray | bytes = bytearray()
        self._name_ends = array("B")
        self._hashes = array("q")
        self._order = array("B")
        self._piece_start: array | None = None
        self._p_offset: array | None = None  # with _piece_start: each piece's offset in its file
        self._p_stream = array("B")
        self._p_pos = array("B")
        self._p_len = array("B")

    def __len__(self) -> int:
        return len(self._dirs) + len(self._name_ends)

    def get(self, name: str) -> Directory | File | None:
        sub = self._dirs.get(name)
        if sub is not None:
            return sub
        index = self._find_file(name)
        return None if index < 0 else File(self, index)

    def entries(self) -> Iterable[tuple[str, Directory | File]]:
        """Sub-directories, then files in the order the manifest first names them."""
        yield from self._dirs.items()
        for i in range(len(self._name_ends)):
            yield self._file_name(i), File(self, i)

    def __repr__(self) -> str:
        return f"Directory({self.name!r}, {len(self)} entries)"

    def _raw_name(self, index: int) -> bytes:
        start = self._name_ends[index - 1] if index else 0
        return self._names[start : self._name_ends[index]]

    def _file_name(self, index: int) -> str:
        return self._raw_name(index).decode("utf-8", "surrogatepass")

    def _find_file(self, name: str) -> int:
        h = _HIGH_HALF(hash(name))
        hashes = self._hashes
        i = bisect_left(hashes, h)
        while i < len(hashes) and hashes[i] == h:
            index = self._order[i]
            if self._file_name(index) == name:
                return index
            i += 1
        return -1

    def _piece_range(self, index: int) -> tuple[int, int]:
        ps = self._piece_start
        if ps is None:
            return index, index + 1
        return ps[index], ps[index + 1]

    def subdir(self, name: str) -> Directory:
        """The sub-directory `name`, made if there is none (while parsing)."""
        sub = self._dirs.get(name)
        if sub is None:
            sub = self._dirs[name] = Directory(name, self._streams)
        return sub

    def add_names(self, names: list[str]) -> None:
        """Append one line's file names to the packed buffers (while parsing)."""
        blob = "".join(names)
        if blob.isascii():
            data = blob.encode("ascii")
            lengths: Iterable[int] = map(len, names)
        else:
            encoded = [name.encode("utf-8", "surrogatepass") for name in names]
            data = b"".join(encoded)
            lengths = map(len, encoded)
        ends = list(islice(accumulate(lengths, initial=len(self._names)), 1, None))
        self._name_ends = _extend(self._name_ends, ends)
        self._names += data  # type: ignore[operator]
        self._hashes.extend(map(hash, names))

    def add_pieces(self, streams: list[int], positions: list[int], lengths: list[int]) -> None:
        """Append the pieces of the files `add_names` just added, one piece each (while parsing)."""
        self._p_stream = _extend(self._p_stream, streams)
        self._p_pos = _extend(self._p_pos, positions)
        self._p_len = _extend(self._p_len, lengths)

    def finish(self) -> None:
        """End the parse of this directory and of every one below it (`_finish_one`)."""
        pending = [self]
        while pending:
            directory = pending.pop()
            directory._finish_one()
            pending.extend(directory._dirs.values())

    def _finish_one(self) -> None:
        """Sort the lookup hashes; merge repeated names, drop markers, reject clashes if any."""
        self._names = bytes(self._names)
        self._sort()
        if self._repeats_a_name() or any(self._find_file(d) >= 0 for d in self._dirs):
            self._merge()
            self._sort()

    def _sort(self) -> None:
        """Order the files by the full hashes of their names; keep the hashes' top halves.

        A big directory is sorted bin by bin (binned by the hashes' top bits, in order), so
        that no single sort holds the GIL for long or makes a Python int of every file."""
        hashes = self._hashes
        n = len(hashes)
        bits = max(n // SORT_RUN, 1).bit_length() - 1  # 2**bits bins of about SORT_RUN files
        bins: list[Sequence[int]] = [range(n)]
        if bits:
            bins = [array(_typecode(n)) for _ in range(1 << bits)]
            put = [b.append for b in bins]
            shift, bias = 64 - bits, 1 << (bits - 1)  # signed top bits -> bin 0 .. 2**bits - 1
            for i, h in enumerate(hashes):
                put[(h >> shift) + bias](i)
        self._hashes, self._order = array("i"), array(_typecode(n))
        for files in bins:
            order = sorted(files, key=hashes.__getitem__)
            self._hashes.extend(map(_HIGH_HALF, map(hashes.__getitem__, order)))
            self._order.fromlist(order)

    def _name_groups(self) -> Iterator[list[int]]:
        """Each set of two or more files of one name, in index order. Only files whose hashes
        are equal are compared: consecutive runs of the sorted hashes."""
        hashes, order = self._hashes, self._order
        run: list[int] = []
        last = -1
        for k in compress(count(1), map(eq, hashes, islice(hashes, 1, None))):  # hashes[k-1] == hashes[k]
            if k != last + 1:  # a new run
                yield from self._same_name(run)
                run = [order[k - 1]]
            run.append(order[k])
            last = k
        yield from self._same_name(run)

    def _same_name(self, files: list[int]) -> Iterator[list[int]]:
        groups: dict[bytes, list[int]] = {}
        for i in sorted(files):
            groups.setdefault(self._raw_name(i), []).append(i)
        yield from (group for group in groups.values() if len(group) > 1)

    def _repeats_a_name(self) -> bool:
        """Whether two files have one name."""
        return next(self._name_groups(), None) is not None

    def _merge(self) -> None:
        """One file per name, where the name first appears, with the pieces of every file of
        that name in manifest order; zero-length files named like a sub-directory dropped
        (they mark it), others rejected. The files of one name are chained in an array
        (`after`), so that a manifest naming every file twice costs no object per file."""
        n = len(self._name_ends)
        first = array(_typecode(n), range(n))  # the file where each file's name first appears
        after = array(_typecode(n), [n]) * n  # the next file of the same name; n: none
        for group in self._name_groups():
            for a, b in zip(group, group[1:], strict=False):
                after[a], first[b] = b, group[0]
        clashing = sorted(first[i] for i in map(self._find_file, self._dirs) if i >= 0)
        for head in clashing:
            j = head
            while j != n:
                if self._p_len[j]:
                    name = self._file_name(head)
                    line = self._p_stream[head] + 1
                    raise ManifestError(line, 0, name, f"file {name!r} clashes with a directory of that name")
                j = after[j]
        dropped = set(clashing)  # a zero-length file named like a directory marks it
        kept, kept_ends, hashes = bytearray(), array(self._name_ends.typecode), array("q")
        p_stream, p_pos = array(self._p_stream.typecode), array(self._p_pos.typecode)
        p_len, p_offset = array(self._p_len.typecode), array("Q")
        starts = array(_typecode(n), [0])
        for i in range(n):
            if first[i] != i or i in dropped:
                continue
            raw = self._raw_name(i)
            kept += raw
            kept_ends.append(len(kept))
            hashes.append(hash(raw.decode("utf-8", "surrogatepass")))
            at, j = 0, i
            while j != n:
                p_stream.append(self._p_stream[j])
                p_pos.append(self._p_pos[j])
                p_len.append(self._p_len[j])
                p_offset.append(at)
                at += self._p_len[j]
                j = after[j]
            starts.append(len(p_len))
        self._names, self._name_ends, self._hashes = bytes(kept), kept_ends, hashes
        self._p_stream, self._p_pos, self._p_len = p_stream, p_pos, p_len
        if len(p_len) != len(kept_ends):
            self._piece_start, self._p_offset = starts, _narrow(p_offset)


class Manifest:
    """A parsed manifest: the directory tree and the streams its files point into."""

    __slots__ = ("root", "streams", "earliest_signature_expiry")

    def __init__(self, root: Directory, streams: list[Stream], earliest_signature_expiry: int | None = None):
        self.root = root
        self.streams: Sequence[Stream] = streams
        # The earliest expiry (Unix time) of a +A or +R block signature, None if none is signed.
        self.earliest_signature_expiry = earliest_signature_expiry

    def blocks(self) -> list[Locator]:
        """Every block once (by ``hash+size``), in stream order, with its first hints."""
        seen: set[str] = set()
        out: list[Locator] = []
        for stream in self.streams:
            for token in stream._tokens:
                hash_, size = token.split("+", 2)[:2]
                k = f"{hash_}+{size}"
                if k not in seen:
                    seen.add(k)
                    out.append(_locator(token))
        return out

    def walk(self) -> Iterator[tuple[str, File]]:
        """``("dir/file", File)`` for every file, depth first."""
        stack: list[tuple[str, Directory]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            for name, entry in directory.entries():
                if isinstance(entry, File):
                    yield prefix + name, entry
                else:
                    stack.append((prefix + name + "/", entry))

    def find(self, path: str) -> Directory | File | None:
        """The entry at ``a/b/c`` (no leading ``./``), or None."""
        node: Directory | File | None = self.root
        for part in path.split("/"):
            if not isinstance(node, Directory):
                return None
            if part:
                node = node.get(part)
        return node

