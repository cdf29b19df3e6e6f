"""Writing manifests the way Arvados writers do, and computing portable data hashes.

Format: ``doc/architecture/manifest-format.html.textile.liquid``; the writer follows
``sdk/python/arvados/collection.py`` / ``_internal/streams.py`` (normalized form):

- one line per directory (stream ``.`` or ``./a/b``), streams sorted, files sorted;
- the stream's bytes are its files concatenated in order and cut into blocks of at most
  `block_size` (64 MiB in Arvados; smaller to pack many small files into a few blocks);
  each file is a ``pos:len:name`` segment over that byte space;
- ``\\``, ``:`` and characters up to 0x20 in names are written as a backslash and three
  octal digits (a space is ``\\040``);
- a stream with no data still names the empty block ``d41d8cd98f00b204e9800998ecf8427e+0``;
  an empty directory is ``./dir d41d8cd98f00b204e9800998ecf8427e+0 0:0:\\056``.

PDH (``sdk/go/arvados/collection.go`` PortableDataHash): md5 hex of the text with every
block token cut to ``hash+size``, then ``+`` and that text's length in bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .content import Generated

EMPTY_LOCATOR = "d41d8cd98f00b204e9800998ecf8427e+0"
MAX_BLOCK = 1 << 26
_BLOCK_TOKEN_RE = re.compile(r"(?<![^ \n])([0-9a-f]{32}\+[0-9]+)(?:\+[^ \n]*)?")
PDH_ID_RE = re.compile(r"^[0-9a-f]{32}\+[0-9]+")


def escape_name(name: str) -> str:
    return "".join(f"\\{ord(ch):03o}" if ch in "\\:" or ord(ch) <= 0x20 else ch for ch in name)


def stripped(manifest: str) -> str:
    """The manifest with every block token cut to hash+size (the text the PDH covers)."""
    return _BLOCK_TOKEN_RE.sub(lambda m: m.group(1), manifest)


def portable_data_hash(manifest: str) -> str:
    text = stripped(manifest).encode()
    return f"{hashlib.md5(text).hexdigest()}+{len(text)}"


@dataclass
class Built:
    manifest: str
    files: dict[str, dict] = field(default_factory=dict)


class _Packer:
    """Cuts a stream's bytes into blocks and hands each finished block to `store`."""

    def __init__(self, block_size: int, store: Callable[[str, bytes], None]):
        self.block_size, self.store = block_size, store
        self.buf = bytearray()
        self.locators: list[str] = []
        self.position = 0

    def write(self, data: bytes) -> None:
        self.position += len(data)
        view = memoryview(data)
        while view:
            room = self.block_size - len(self.buf)
            self.buf += view[:room]
            view = view[room:]
            if len(self.buf) == self.block_size:
                self.flush()

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            digest = hashlib.md5(data).hexdigest()
            self.store(digest, data)
            self.locators.append(f"{digest}+{len(data)}")
            self.buf = bytearray()


def _chunks(source: bytes | Generated) -> Iterable[bytes]:
    return source.chunks() if isinstance(source, Generated) else (source,)


def build(
    files: Mapping[str, bytes | Generated],
    store: Callable[[str, bytes], None],
    empty_dirs: Iterable[str] = (),
    block_size: int = MAX_BLOCK,
) -> Built:
    """Manifest for `files` (path -> content) and `empty_dirs`; blocks go to `store(hash, data)`."""
    streams: dict[str, list[tuple[str, bytes | Generated]]] = {}
    for path, source in files.items():
        directory, _, name = path.rpartition("/")
        streams.setdefault(directory, []).append((name, source))
    for directory in empty_dirs:
        streams.setdefault(directory.strip("/"), [])
    built = Built("")
    lines = []
    for directory in sorted(streams):
        stream_name = "/".join(["."] + [escape_name(c) for c in directory.split("/") if c])
        packer = _Packer(block_size, store)
        segments = []
        for name, source in sorted(streams[directory]):
            start, md5 = packer.position, hashlib.md5()
            for chunk in _chunks(source):
                md5.update(chunk)
                packer.write(chunk)
            size = packer.position - start
            segments.append(f"{start}:{size}:{escape_name(name)}")
            path = f"{directory}/{name}" if directory else name
            built.files[path] = {"size": size, "md5": md5.hexdigest()}
        packer.flush()
        if not segments:
            segments.append("0:0:\\056")
        lines.append(" ".join([stream_name, *(packer.locators or [EMPTY_LOCATOR]), *segments]) + "\n")
    built.manifest = "".join(lines)
    return built
