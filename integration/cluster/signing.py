"""Blob permission signatures, as the API server and keepstore compute them.

Follows ``sdk/go/arvados/blob_signature.go`` (SignLocator / VerifySignature / SignManifest)
and ``services/api/app/models/blob.rb``:

    signature = hex(HMAC-SHA1(BlobSigningKey, "<md5hex>@<token>@<expiry 8 hex>@<ttl hex>"))

- only the hash is signed; the token is the exact string the client sent (the whole
  ``v2/uuid/secret[/container]``); the TTL in seconds, lowercase hex without padding, is
  part of the input, so signer and verifier must agree on it;
- signing a manifest replaces every existing ``+A`` hint of a block token with a fresh one
  at the end of the token;
- the controller turns ``+A`` into ``+R<cluster>-`` when it returns a remote cluster's
  manifest (``lib/controller/federation/conn.go`` rewriteManifest), and keepstore turns
  it back (``services/keepstore/keepstore.go`` blockReadRemote).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

# sdk/go/arvados/blob_signature.go SignedLocatorRe
SIGNED_LOCATOR_RE = re.compile(
    r"^([0-9a-f]{32})(\+[0-9]+)?((?:\+[B-Z][A-Za-z0-9@_-]*)*)"
    r"(\+A([0-9a-f]{40})@([0-9a-f]{8}))((?:\+[B-Z][A-Za-z0-9@_-]*)*)$"
)
_BLOCK_TOKEN_RE = re.compile(r"(?<![^ \n])[0-9a-f]{32}\+[^ \n]*")
_A_HINT_RE = re.compile(r"\+A[^+ \n]*")
_REMOTE_REWRITE_RE = re.compile(r"( [0-9a-f]{32}\+[^ \n]*?)\+A")

EXPIRED = "expired"
INVALID = "invalid"
MISSING = "missing"


def signature(key: bytes, block_hash: str, token: str, expiry_hex: str, ttl: int) -> str:
    msg = f"{block_hash}@{token}@{expiry_hex}@{ttl:x}".encode()
    return hmac.new(key, msg, hashlib.sha1).hexdigest()


def sign_locator(locator: str, token: str, key: bytes, ttl: int, expiry: int | None = None) -> str:
    """`locator` without its +A hints, plus a fresh +A for `token` (unchanged if no token)."""
    bare = _A_HINT_RE.sub("", locator)
    if not token:
        return bare
    exp = f"{(int(time.time()) + ttl if expiry is None else expiry):08x}"
    return f"{bare}+A{signature(key, bare[:32], token, exp, ttl)}@{exp}"


def sign_manifest(manifest: str, token: str, key: bytes, ttl: int, expiry: int | None = None) -> str:
    if expiry is None:
        expiry = int(time.time()) + ttl
    return _BLOCK_TOKEN_RE.sub(lambda m: sign_locator(m.group(0), token, key, ttl, expiry), manifest)


def strip_signatures(manifest: str) -> str:
    """The manifest as the database stores it: +A hints removed, other hints kept."""
    return _BLOCK_TOKEN_RE.sub(lambda m: _A_HINT_RE.sub("", m.group(0)), manifest)


def block_tokens(manifest: str) -> list[str]:
    return _BLOCK_TOKEN_RE.findall(manifest)


def verify_locator(locator: str, token: str, key: bytes, ttl: int, now: float | None = None) -> str | None:
    """None if `locator` carries a valid +A for `token`, else MISSING, EXPIRED or INVALID."""
    m = SIGNED_LOCATOR_RE.match(locator)
    if not m:
        return INVALID if "+A" in locator else MISSING
    expiry = int(m.group(6), 16)
    if expiry < (time.time() if now is None else now):
        return EXPIRED
    want = signature(key, m.group(1), token, m.group(6), ttl)
    return None if hmac.compare_digest(want, m.group(5)) else INVALID


def remote_rewrite(manifest: str, cluster_id: str) -> str:
    """+A<sig>@<exp> -> +R<cluster>-<sig>@<exp> in every block token (controller, remote reads)."""
    return _REMOTE_REWRITE_RE.sub(lambda m: f"{m.group(1)}+R{cluster_id}-", manifest)


def remote_hint_to_local(locator: str) -> tuple[str, str] | None:
    """For a +R locator: (cluster id, the locator with +A hints dropped and +R turned into +A)."""
    parts = locator.split("+")
    remote = [p for p in parts[1:] if p.startswith("R")]
    if len(remote) != 1 or len(remote[0]) < 8 or remote[0][6] != "-":
        return None
    cluster, sig = remote[0][1:6], remote[0][7:]
    kept = [p for p in parts if not p.startswith(("A", "R"))]
    return cluster, "+".join(kept) + "+A" + sig
