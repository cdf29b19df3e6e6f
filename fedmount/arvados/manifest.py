"""Manifest text -> a `Manifest` (`fedmount.arvados.manifest_tree`); the portable data hash.

Format (reference/arvados-protocol.md §3, Go ``fs_collection.go`` ``loadManifest``):
every line is a stream ``<name> <locator>... <pos>:<len>:<file>...``. A stream's blocks
are concatenated into one byte space and every file token names a range of it, which may
span blocks. The same path may appear many times, in one or several streams: its pieces
are concatenated in manifest order. Names are escaped (``\\ooo`` octal bytes, and ``\\\\``
as Go accepts it); a token is decoded only after it was split on spaces and on its first
two colons, then its path is split on ``/`` (names may contain ``/``: non-normalized
manifests). A last component ``.`` only marks a directory (``0:0:\\056`` keeps an empty
directory), and so does a zero-length file named like a directory.

Parsing walks the text line by line (no list of lines); a line's head (stream name and
locators) is split up to its first file token, and its signed locators give the
manifest's earliest signature expiry (`Manifest.earliest_signature_expiry`, what decides
when a mount must fetch fresh signatures). File tokens go straight into their directory's
packed arrays (`Directory.add_names`, `add_pieces`), so the per-file strings of a window
(below) die with it: a window whose file tokens are all plain is added in bulk with one
regex pass; any escape, ``/`` or anomaly takes the token-by-token path, which also
produces the precise error. `Directory.finish` then sorts and merges each directory.

Whatever the line structure, no step of the parse works on more than a bounded piece: a
line is handled ``WINDOW`` characters at a time (cut at spaces), a directory of more than
``SORT_RUN`` files is sorted in bins, and the PDH is hashed in windows. So what a manifest
costs does not depend on how its files are spread over lines, and no single C call holds
the GIL for long: the parse runs in a worker thread and never stops the trio thread for
more than a few milliseconds.

The portable data hash is the md5 of the text with every locator cut to ``hash+size``,
then ``+`` and the byte length (Go ``PortableDataHash``); the text is not re-normalized.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Iterator
from operator import add, itemgetter

from .ids import EMPTY_BLOCK_HASH, MAX_BLOCK_SIZE, IdError, parse_locator
from .manifest_tree import SORT_RUN, Directory, File, Manifest, ManifestError, Segment, Stream

__all__ = [
    "SORT_RUN", "WINDOW", "Directory", "File", "Manifest", "ManifestError", "Segment", "Stream",
    "parse_manifest", "portable_data_hash", "unescape",
]  # fmt: skip

_LOCATOR_RE = re.compile(r"[0-9a-f]{32}\+([0-9]+)(?:\+[A-Z][A-Za-z0-9@_-]*)*", re.ASCII)
_SIGNATURE_EXPIRY_RE = re.compile(r"\+[AR][0-9a-z-]*@([0-9a-f]{8})\b", re.ASCII)
_SEGMENT_RE = re.compile(r"([0-9]+):([0-9]+):(.+)", re.ASCII | re.DOTALL)
_FILE_TOKEN_RE = re.compile(r"(?<![^ ])([0-9]+):([0-9]+):([^ ]+)", re.ASCII)
_ESCAPE_RE = re.compile(rb"\\([0-7]{3}|\\)")
_HINTS_RE = re.compile(r"( [0-9a-f]{32}\+[0-9]+)\+[^ \n]*")
_EMPTY_PDH = f"{EMPTY_BLOCK_HASH}+0"  # the empty text hashes as the empty block does
WINDOW = 1 << 18  # characters of a line handled by one step of the parse


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


def _walk_to(root: Directory, parts: list[str], line: int, token: int, text: str) -> Directory:
    """The directory named by `parts` (``""`` and ``"."`` skipped), created as needed."""
    node = root
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            raise ManifestError(line, token, text, "'..' is not allowed in a path")
        node = node.subdir(part)
    return node


def _parse_locators(tokens: list[str], line: int, first_file_token: str) -> tuple[array, int | None]:
    """Validate a line's head: the locator tokens after the stream name. Returns the block
    starts and the earliest expiry of the line's block signatures (None if none is signed)."""
    starts = array("q", [0])
    total = 0
    expiry: int | None = None
    match = _LOCATOR_RE.fullmatch
    for i in range(1, len(tokens)):
        if "@" in tokens[i]:
            for found in _SIGNATURE_EXPIRY_RE.findall(tokens[i]):
                expiry = int(found, 16) if expiry is None else min(expiry, int(found, 16))
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
    return starts, expiry


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
    directory.add_names(names)
    directory.add_pieces([stream_index] * len(found), pos, length)
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
        target.add_names([name])
        target.add_pieces([stream_index], [pos], [length])


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
    expiry: int | None = None  # the earliest block signature expiry
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
        first_file_token = text[offset : line_end if first_end < 0 else first_end]
        starts, line_expiry = _parse_locators(tokens, lineno, first_file_token)
        if line_expiry is not None:
            expiry = line_expiry if expiry is None else min(expiry, line_expiry)
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
    root.finish()
    return Manifest(root, streams, expiry)
