"""Arvados API tokens: parsing, salting for a remote cluster, and redaction.

The security boundary of the federation lives here (reference/arvados-protocol.md §5):
the home token goes only to the home cluster; every other cluster receives the token
*salted* for it, ``v2/<uuid>/<hmac-sha1(secret, cluster_id) hex>``, which that cluster
validates by calling back to the issuer. A salted token is useless anywhere else.

- v2 tokens: ``v2/<cluster>-gj3su-<15>/<secret>`` with an optional 4th field (the container
  UUID of a container token), which salting drops.
- A token issued by the target cluster itself is sent unchanged.
- A 40-hex secret is already salted: it is forwarded as is.
- v1 tokens, a bare secret (``^[0-9a-z]{41,}$``, what the SDK and arv-mount still accept),
  are valid at the cluster that issued them, so they work for everything sent to the home
  cluster. Salting needs the token's uuid, which a bare secret does not carry:
  `salt_for` raises TokenError (saying how to get a v2 token) so the caller never sends
  the raw secret to a remote cluster. The issuing cluster tells its uuid
  (``api_client_authorizations/current``); `ApiToken.with_uuid` then gives the v2 form of
  the same secret, which can be salted (the controller does the same, conn.go
  ``saltedTokenProvider``).

`redact` masks anything token-shaped in text bound for logs, stats or results: v2 tokens,
what follows ``Bearer``/``OAuth2``/``api_token=``, and bare v1 secrets (41 or more
lowercase letters and digits, at least one a letter after ``f``, so that hex digests such
as ``sha256:<64 hex>`` image ids stay readable); and the signature of every signed
locator hint (``+A<sig>@<expiry>``, ``+R<cluster>-<sig>@<expiry>``, also with the ``+``
percent-encoded): a signature lets whoever reads it fetch the block until it expires.
The block's hash, size and the expiry stay, for debugging.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from .ids import UUID_RE

V1_RE = re.compile(r"^[0-9a-z]{41,}$")
SALTED_SECRET_RE = re.compile(r"^[0-9a-f]{40}$")
_TOKEN_IN_TEXT_RE = re.compile(
    r"v2/[a-z0-9]{5}-gj3su-[a-z0-9]{15}/[A-Za-z0-9]+(?:/[a-z0-9-]+)?"
    r"|(?<=Bearer )[^\s\"']+|(?<=OAuth2 )[^\s\"']+|(?<=api_token=)[^\s&\"']+"
    r"|(?<![0-9A-Za-z])(?=[0-9a-f]*[g-z])[0-9a-z]{41,}(?![0-9A-Za-z])"
)
V2_NEEDED = (
    "needs a v2 token: a v1 token (a bare secret) cannot be salted for another cluster; "
    "`arv api_client_authorization current` prints its uuid, and the v2 token is v2/<uuid>/<secret>"
)
_SIGNATURE_IN_TEXT_RE = re.compile(r"((?:\+|%2[Bb])(?:A|R[a-z0-9]{5}-))[0-9a-f]{16,}")


class TokenError(ValueError):
    """A token that cannot be used the way it was asked to be."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A parsed token; `text` is the exact string a client sends. `uuid` is None for a v1
    token (a bare secret)."""

    uuid: str | None
    secret: str
    container_uuid: str | None = None

    @property
    def cluster(self) -> str | None:
        """The issuing cluster; None for a v1 token, which does not say."""
        return self.uuid[:5] if self.uuid else None

    @property
    def is_v1(self) -> bool:
        return self.uuid is None

    @property
    def text(self) -> str:
        if self.uuid is None:
            return self.secret
        parts = ["v2", self.uuid, self.secret]
        if self.container_uuid:
            parts.append(self.container_uuid)
        return "/".join(parts)

    @property
    def is_salted(self) -> bool:
        return SALTED_SECRET_RE.match(self.secret) is not None

    def with_uuid(self, uuid: str) -> ApiToken:
        """The v2 form of this v1 token, given the uuid its cluster gave for it."""
        _check_uuid(uuid)
        return ApiToken(uuid, self.secret)

    def __repr__(self) -> str:  # never print the secret
        return f"ApiToken(uuid={self.uuid!r}, secret=<redacted>)"


def _check_uuid(uuid: str) -> None:
    if not UUID_RE.match(uuid) or uuid[6:11] != "gj3su":
        raise TokenError("the token's uuid is not an api_client_authorization uuid")


def parse_token(text: str) -> ApiToken:
    """Parse a v2 token (3 or 4 parts) or a v1 token (a bare secret); raise TokenError for
    anything else."""
    text = text.strip()
    if V1_RE.match(text):
        return ApiToken(None, text)
    parts = text.split("/")
    if parts[0] != "v2" or len(parts) not in (3, 4):
        raise TokenError("not an Arvados token (expected v2/<uuid>/<secret>, or a v1 bare secret)")
    uuid, secret = parts[1], parts[2]
    _check_uuid(uuid)
    if not secret or not secret.isalnum():
        raise TokenError("the token's secret is empty or has characters other than letters and digits")
    return ApiToken(uuid, secret, parts[3] if len(parts) == 4 else None)


def salted_secret(secret: str, cluster_id: str) -> str:
    return hmac.new(secret.encode(), cluster_id.encode(), hashlib.sha1).hexdigest()


def salt_for(token: ApiToken, cluster_id: str) -> ApiToken:
    """The token to send to `cluster_id` (sdk/go/auth/salt.go SaltToken); TokenError for a
    v1 token, which cannot be salted."""
    if token.uuid is None:
        raise TokenError(f"reading from cluster {cluster_id} {V2_NEEDED}")
    if token.cluster == cluster_id or token.is_salted:
        return token
    return ApiToken(token.uuid, salted_secret(token.secret, cluster_id))


def redact(text: str) -> str:
    """Mask token-shaped substrings and locator signatures so that `text` is safe to log."""
    return _SIGNATURE_IN_TEXT_RE.sub(r"\1<signature>", _TOKEN_IN_TEXT_RE.sub("<token>", text))
