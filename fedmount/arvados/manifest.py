"""Manifest text -> a compact file tree whose files map to block segments; the PDH.

Format (reference/arvados-protocol.md §3, Go ``fs_collection.go`` ``loadManifest``):
every line is a stream ``<name> <locator>... <pos>:<len>:<file>...``. A stream's blocks
are concatenated into one byte space and every file token names a range of it, which may
span blocks. The same path may appear many times, in one or several streams: its pieces
are concatenated in manifest order. Names are escaped (``\\ooo`` octal bytes, and ``\\\\``
as Go accepts it); a token is decoded only after it was split on spaces and on its first
two colons, then its path is split on ``/`` (names may contain ``/``: non-normalized
manifests). A last component ``.`` only marks a directory (``0:0:\\056`` keeps an empty
directory), and so does a zero-length file named like a directory.

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
  byte needs a walk over its pieces). Every array but the
  hashes has the narrowest unsigned typecode its values fit (``B`` to ``Q``): file sizes,
  offsets, stream and name indexes are mostly small. With 1,000,000 16-byte files in
  1,000 directories (a 25.4 MB signed manifest) the tree is 30.7 MB: 16 MB of names,
  then per file 4 bytes of hash, 2 each of name end, file index, stream index and
  offset, and 1 of length; with 8-byte hashes and 4- and 8-byte arrays it was 56 MB.
  The parse takes as long as it did then (1.45 s).
- `File` is a two-slot view (directory, index) built on demand; `File.segments_from()`
  bisects to the piece holding an offset, maps pieces to blocks by bisecting the
  stream's block offsets, and builds each `Segment` only when the reader gets to it.

Parsing walks the text line by line (no list of lines); a line's head (stream name and
locators) is split up to its first file token. Names, their hashes and pieces are
appended straight into each directory's growing `bytearray` and arrays (which move to a
wider typecode when a value does not fit), so the per-file strings of a window (below)
die with it (a window whose file tokens are all plain is added in bulk with one regex
pass; any escape, ``/`` or anomaly takes the token-by-token path, which also produces the
precise error). `Directory._finish()` then sorts the hashes; only
if two files have one name or a file is named like a sub-directory does it merge them
(keeping manifest order), drop directory markers and reject file/directory clashes; the
files of one name are chained in an array for that, not grouped in Python objects.

Whatever the line structure, no step of the parse works on more than a bounded piece: a
line is handled ``WINDOW`` characters at a time (cut at spaces), a directory of more than
``SORT_RUN`` files is sorted in bins of its hashes' top bits, and the PDH is hashed in
windows. So what a manifest costs does not depend on how its files are spread over
lines, and no single C call holds the GIL for long: the parse runs in a worker thread
and never stops the trio thread for more than a few milliseconds.

The portable data hash is the md5 of the text with every locator cut to ``hash+size``,
then ``+`` and the byte length (Go ``PortableDataHash``); the text is not re-normalized.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, count, islice
from operator import add, eq, itemgetter
from typing import overload

from .ids import EMPTY_BLOCK_HASH, MAX_BLOCK_SIZE, IdError, Locator, parse_locator

_LOCATOR_RE = re.compile(r"[0-9a-f]{32}\+([0-9]+)(?:\+[A-Z][A-Za-z0-9@_-]*)*", re.ASCII)
_SEGMENT_RE = re.compile(r"([0-9]+):([0-9]+):(.+)", re.ASCII | re.DOTALL)
_FILE_TOKEN_RE = re.compile(r"(?<![^ ])([0-9]+):([0-9]+):([^ ]+)", re.ASCII)
_ESCAPE_RE = re.compile(rb"\\([0-7]{3}|\\)")
_HINTS_RE = re.compile(r"( [0-9a-f]{32}\+[0-9]+)\+[^ \n]*")
_EMPTY_PDH = f"{EMPTY_BLOCK_HASH}+0"  # the empty text hashes as the empty block does
_HIGH_HALF = (32).__rrshift__  # h -> h >> 32: the top half of a hash, which sorts as the hash does
_WIDER = {"B": "H", "H": "I", "I": "Q"}
WINDOW = 1 << 18  # characters of a line handled by one step of the parse
SORT_RUN = 1 << 16  # files of a directory sorted by one call (one hold of the GIL)


class ManifestError(ValueError):
    """Malformed manifest text; names the line (1-based) and token (1-based, 0 = whole line)."""

    def __init__(self, line: int, token: int, text: str, why: str):
        self.line = line
        self.token = token
        shown = text if len(text) <= 80 else text[:77] + "..."
        where = f"line {line}" + (f", token {token} {shown!r}" if token else "")
        super().__init__(f"malformed manifest: {where}: {why}")


def portable_data_hash(text: str, *, window: int = WINDOW) -> str:
    """``md5hex+len`` of `text` with every block locator cut to ``hash+size``, hashed about
    `window` characters at a time (cut before a space, so no locator is cut)."""
    if not text:
        return _EMPTY_PDH
    md5, size, start = hashlib.md5(), 0, 0
    while start < len(text):
        cut = text.find(" ", start + window) if start + window < len(text) else -1
        stop = len(text) if cut < 0 else cut
        data = _HINTS_RE.sub(r"\1", text[start:stop]).encode()
        md5.update(data)
        size += len(data)
        start = stop
    return f"{md5.hexdigest()}+{size}"


def _unescape_match(m: re.Match[bytes]) -> bytes:
    seq = m.group(1)
    if seq == b"\\":
        return b"\\"
    value = int(seq, 8)
    return bytes((value,)) if value < 256 else m.group(0)


def unescape(name: str) -> str:
    """Decode ``\\ooo`` (a byte) and ``\\\\``; bytes that are not UTF-8 become surrogates
    (``os.fsencode`` gives them back), so any name the cluster stores survives a mount. A
    lone surrogate the text itself holds (a hostile cluster's JSON may send ``\\ud800``)
    is kept as its three bytes."""
    if "\\" not in name:
        return name
    try:
        encoded = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        encoded = name.encode("utf-8", "surrogatepass")
    return _ESCAPE_RE.sub(_unescape_match, encoded).decode("utf-8", "surrogateescape")


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
        # While parsing: one entry per file token (names repeat, hashes unsorted); see _finish().
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

    def _subdir(self, name: str) -> Directory:
        sub = self._dirs.get(name)
        if sub is None:
            sub = self._dirs[name] = Directory(name, self._streams)
        return sub

    def _add_names(self, names: list[str]) -> None:
        """Append one line's file names (in a directory being parsed) to the packed buffers."""
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

    def _add_pieces(self, streams: list[int], positions: list[int], lengths: list[int]) -> None:
        """Append the pieces of the files `_add_names` just added (one piece each)."""
        self._p_stream = _extend(self._p_stream, streams)
        self._p_pos = _extend(self._p_pos, positions)
        self._p_len = _extend(self._p_len, lengths)

    def _finish(self) -> None:
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

    __slots__ = ("root", "streams")

    def __init__(self, root: Directory, streams: list[Stream]):
        self.root = root
        self.streams: Sequence[Stream] = streams

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


def _walk_to(root: Directory, parts: list[str], line: int, token: int, text: str) -> Directory:
    """The directory named by `parts` (``""`` and ``"."`` skipped), created as needed."""
    node = root
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            raise ManifestError(line, token, text, "'..' is not allowed in a path")
        node = node._subdir(part)
    return node


def _parse_locators(tokens: list[str], line: int, first_file_token: str) -> array:
    """Validate a line's head: the locator tokens after the stream name; return block starts."""
    starts = array("q", [0])
    total = 0
    match = _LOCATOR_RE.fullmatch
    for i in range(1, len(tokens)):
        m = match(tokens[i])
        size = int(m.group(1)) if m else -1
        if m is None or size > MAX_BLOCK_SIZE:
            try:
                parse_locator(tokens[i])
                why = "not a locator"
            except IdError as e:
                why = str(e)
            raise ManifestError(line, i + 1, tokens[i], why)
        total += size
        starts.append(total)
    if len(tokens) == 1:
        raise ManifestError(line, 2, first_file_token, "a stream needs at least one locator")
    return starts


def _add_files_fast(
    directory: Directory, text: str, start: int, end: int, stream_index: int, stream_size: int
) -> bool:
    """Add the file tokens in text[start:end] in bulk if they are plain (no escape, no ``/``,
    no marker, all well formed and in range); False leaves them to the token-by-token path."""
    if text.find("\\", start, end) >= 0 or text.find("/", start, end) >= 0:
        return False
    found = _FILE_TOKEN_RE.findall(text, start, end)
    if len(found) != text.count(" ", start, end) + 1:
        return False
    names = list(map(itemgetter(2), found))
    if names.count(".") or names.count(".."):
        return False
    pos = list(map(int, map(itemgetter(0), found)))
    length = list(map(int, map(itemgetter(1), found)))
    if max(map(add, pos, length)) > stream_size:
        return False
    directory._add_names(names)
    directory._add_pieces([stream_index] * len(found), pos, length)
    return True


def _add_files(
    directory: Directory, text: str, start: int, end: int, stream_index: int, stream_size: int,
    lineno: int, first: int,
) -> None:  # fmt: skip
    """Add the file tokens in text[start:end], one at a time (any escape or anomaly); `first`
    is the 0-based index of the first of them in its line, for the error messages."""
    segment = _SEGMENT_RE.fullmatch
    for t, token in enumerate(text[start:end].split(" "), first):
        m = segment(token)
        if m is None:
            raise ManifestError(lineno, t + 1, token, "expected a file token <position>:<length>:<name>")
        pos_text, len_text, name = m.groups()
        pos, length = int(pos_text), int(len_text)
        if pos + length > stream_size:
            raise ManifestError(lineno, t + 1, token, f"range ends past the {stream_size}-byte stream")
        target = directory
        if "\\" in name:
            name = unescape(name)
        if "/" in name:
            parts = name.split("/")
            target = _walk_to(directory, parts[:-1], lineno, t + 1, token)
            name = parts[-1]
        if name == ".":
            continue  # marks the directory, which _walk_to created
        if name in ("", ".."):
            raise ManifestError(lineno, t + 1, token, f"{name!r} is not a file name")
        target._add_names([name])
        target._add_pieces([stream_index], [pos], [length])


def _windows(text: str, start: int, end: int, window: int) -> Iterator[tuple[int, int]]:
    """text[start:end] cut at spaces into ranges of about `window` characters: splitting
    each range on spaces gives, end to end, what splitting the whole would give."""
    while True:
        cut = text.find(" ", start + window, end) if start + window < end else -1
        stop = end if cut < 0 else cut
        yield start, stop
        if stop == end:
            return
        start = stop + 1


def parse_manifest(text: str, *, window: int = WINDOW) -> Manifest:
    """Parse manifest text into a `Manifest`; raise `ManifestError` on malformed input.

    A line is handled `window` characters at a time (see the module docstring)."""
    streams: list[Stream] = []
    root = Directory("", streams)
    lineno = 0
    line_start = 0
    while line_start < len(text):  # a missing final newline is tolerated, as the Python SDK does
        line_end = text.find("\n", line_start)
        if line_end < 0:
            line_end = len(text)
        lineno += 1
        # The head ends before the first token with a colon after the stream name (locators have none).
        space = text.find(" ", line_start, line_end)
        colon = text.find(":", space + 1, line_end) if space >= 0 else -1
        offset = text.rfind(" ", line_start, colon) + 1 if colon >= 0 else line_end + 1
        tokens: list[str] = []
        for a, b in _windows(text, line_start, offset - 1, window):
            tokens += text[a:b].split(" ")
        stream_name = unescape(tokens[0])
        if stream_name != "." and not stream_name.startswith("./"):
            raise ManifestError(lineno, 1, tokens[0], "a stream name is '.' or starts with './'")
        stream_parts = stream_name.split("/")[1:]
        stream_dir = _walk_to(root, stream_parts, lineno, 1, tokens[0])
        first_end = text.find(" ", offset, line_end)
        starts = _parse_locators(tokens, lineno, text[offset : line_end if first_end < 0 else first_end])
        if colon < 0:
            raise ManifestError(lineno, 0, "", "a stream needs at least one file token")
        stream_index = len(streams)
        stream_size = starts[-1]
        streams.append(Stream(stream_name, stream_index, tokens[1:], starts))
        first = len(tokens)
        for a, b in _windows(text, offset, line_end, window):
            if not _add_files_fast(stream_dir, text, a, b, stream_index, stream_size):
                _add_files(stream_dir, text, a, b, stream_index, stream_size, lineno, first)
            first += text.count(" ", a, b) + 1
        line_start = line_end + 1
    pending = [root]
    while pending:
        directory = pending.pop()
        directory._finish()
        pending.extend(directory._dirs.values())
    return Manifest(root, streams)
