"""Arvados identifiers: collection UUIDs, portable data hashes and block locators.

Every string that names something in the federation passes through here before it is
used, so that a malformed one fails early with an `IdError` that names the bad token and
the position of the first bad character, and never reaches an API or a keepstore.

Grammar (reference/arvados-protocol.md §0, §3, §4):

- UUID: ``<5 cluster chars>-<5 infix chars>-<15 chars>``, lowercase alphanumerics.
  Collections have the infix ``4zz18``.
- PDH: ``<32 lowercase hex>+<decimal size>``, optionally followed by hints, which a
  lookup ignores (``hash+size`` is the identity).
- Locator: ``<32 lowercase hex>+<size>`` then hints ``+<A-Z>[A-Za-z0-9@_-]*``:
  ``+A<sig>@<exp>`` (local signature), ``+R<cluster>-<sig>@<exp>`` (remote signature),
  ``+K@<cluster or service>`` (legacy service hint); unknown hints are kept in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# \Z, not $: "$" also matches before a final newline, and "zzzzz\n" is not a cluster id.
UUID_RE = re.compile(r"^[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}\Z")
PDH_RE = re.compile(r"^[0-9a-f]{32}\+[0-9]+\Z")
HASH_RE = re.compile(r"^[0-9a-f]{32}\Z")
HINT_RE = re.compile(r"^[A-Z][A-Za-z0-9@_-]*\Z")
CLUSTER_RE = re.compile(r"^[a-z0-9]{5}\Z")

COLLECTION_INFIX = "4zz18"
EMPTY_BLOCK_HASH = "d41d8cd98f00b204e9800998ecf8427e"
MAX_BLOCK_SIZE = 1 << 26


class IdError(ValueError):
    """A malformed identifier; the message names the token and the bad position."""

    def __init__(self, kind: str, token: str, position: int, why: str):
        self.kind = kind
        self.token = token
        self.position = position
        shown = token if len(token) <= 80 else token[:77] + "..."
        super().__init__(f"invalid {kind} {shown!r} at position {position}: {why}")


def _first_mismatch(token: str, allowed: str, start: int = 0, end: int | None = None) -> int:
    for i, ch in enumerate(token[start:end], start):
        if ch not in allowed:
            return i
    return -1


_LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_HEX = "0123456789abcdef"


def _check_hash(kind: str, token: str) -> None:
    bad = _first_mismatch(token, _HEX, 0, 32)
    if bad < 0 and len(token) < 32:
        bad = len(token)
    if bad >= 0:
        raise IdError(kind, token, bad, "a hash is 32 lowercase hex digits")


def _parse_size(kind: str, token: str, start: int, end: int) -> int:
    digits = token[start:end]
    if not digits:
        raise IdError(kind, token, start, "expected a decimal size after '+'")
    bad = _first_mismatch(digits, "0123456789")
    if bad >= 0:
        raise IdError(kind, token, start + bad, "a size is decimal digits")
    return int(digits)


def check_uuid(token: str, infix: str | None = None) -> str:
    """Return `token` if it is a well-formed UUID (with `infix`, if given)."""
    if UUID_RE.match(token):
        if infix is not None and token[6:11] != infix:
            raise IdError("UUID", token, 6, f"not a {infix} object (infix {token[6:11]})")
        return token
    if len(token) != 27:
        raise IdError("UUID", token, min(len(token), 27), "a UUID is 27 characters")
    for pos in (5, 11):
        if token[pos] != "-":
            raise IdError("UUID", token, pos, "expected '-'")
    bad = next(i for i, ch in enumerate(token) if i not in (5, 11) and ch not in _LOWER_ALNUM)
    raise IdError("UUID", token, bad, "UUIDs use lowercase letters and digits")


def check_cluster_id(token: str) -> str:
    if not CLUSTER_RE.match(token):
        raise IdError("cluster id", token, 0, "a cluster id is 5 lowercase letters or digits")
    return token


@dataclass(frozen=True, slots=True)
class CollectionId:
    """A collection named by UUID or by portable data hash."""

    text: str  # canonical form: the UUID, or hash+size for a PDH

    @property
    def is_pdh(self) -> bool:
        return "+" in self.text

    @property
    def cluster(self) -> str | None:
        """The owning cluster of a UUID; None for a PDH (it may live anywhere)."""
        return None if self.is_pdh else self.text[:5]

    def __str__(self) -> str:
        return self.text


def looks_like_collection_id(name: str) -> bool:
    """Cheap pre-check for directory lookups: could `name` name a collection?

    Names that fail it never reach an API (negative lookups cost nothing)."""
    try:
        parse_collection_id(name)
    except IdError:
        return False
    return True


def parse_collection_id(token: str) -> CollectionId:
    """Parse a collection UUID or a PDH (hints after hash+size are dropped)."""
    if "+" in token:
        _check_hash("portable data hash", token)
        if len(token) == 32 or token[32] != "+":
            raise IdError("portable data hash", token, 32, "expected '+' after the hash")
        end = token.find("+", 33)
        end = len(token) if end < 0 else end
        size = _parse_size("portable data hash", token, 33, end)
        return CollectionId(f"{token[:32]}+{size}")
    if len(token) == 32 and HASH_RE.match(token):
        raise IdError("portable data hash", token, 32, "missing '+size' after the hash")
    return CollectionId(check_uuid(token, COLLECTION_INFIX))


@dataclass(frozen=True, slots=True)
class Locator:
    """A Keep block locator: content hash, size and hints in their original order."""

    hash: str
    size: int
    hints: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The content identity, ``hash+size``: the cache key of the block."""
        return f"{self.hash}+{self.size}"

    @property
    def is_empty(self) -> bool:
        """The empty block (md5 of nothing, size 0): no Keep service needs to be asked for it."""
        return self.size == 0 and self.hash == EMPTY_BLOCK_HASH

    @property
    def signature(self) -> str | None:
        """The ``+A`` hint without its letter, or None."""
        return next((h[1:] for h in self.hints if h.startswith("A")), None)

    @property
    def remote(self) -> tuple[str, str] | None:
        """``(cluster, sig@exp)`` from a ``+R<cluster>-<sig@exp>`` hint, or None."""
        for h in self.hints:
            if h.startswith("R") and len(h) > 7 and h[6] == "-":
                return h[1:6], h[7:]
        return None

    @property
    def signature_expiry(self) -> int | None:
        """Unix time at which the +A (else +R) signature expires, or None."""
        sig = self.signature or (self.remote[1] if self.remote else None)
        if sig and "@" in sig:
            try:
                return int(sig.rsplit("@", 1)[1], 16)
            except ValueError:
                return None
        return None

    def without_hints(self) -> Locator:
        return Locator(self.hash, self.size)

    def with_hints(self, hints: tuple[str, ...]) -> Locator:
        return Locator(self.hash, self.size, hints)

    def __str__(self) -> str:
        return "+".join((self.hash, str(self.size), *self.hints))


def parse_locator(token: str) -> Locator:
    """Parse ``hash+size[+hint...]``; raise IdError naming the first bad character."""
    _check_hash("locator", token)
    if len(token) == 32 or token[32] != "+":
        raise IdError("locator", token, 32, "expected '+size' after the hash")
    parts = token[33:].split("+")
    size = _parse_size("locator", token, 33, 33 + len(parts[0]))
    if size > MAX_BLOCK_SIZE:
        raise IdError("locator", token, 33, f"block size {size} exceeds 64 MiB")
    pos = 33 + len(parts[0]) + 1
    for hint in parts[1:]:
        if not HINT_RE.match(hint):
            raise IdError("locator", token, pos, f"bad hint {hint!r}")
        pos += len(hint) + 1
    return Locator(token[:32], size, tuple(parts[1:]))
