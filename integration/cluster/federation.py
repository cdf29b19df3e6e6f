"""Controller-to-controller traffic: forwarding, PDH fan-out and foreign token validation.

Follows ``lib/controller/federation/conn.go`` (chooseBackend, CollectionGet,
tryLocalThenRemotes, rewriteManifest, saltedTokenProvider), ``lib/controller/federation/
list.go`` and ``services/api/app/models/api_client_authorization.rb`` (validate):

- Every cluster knows every other with ``Proxy: true``; a 27-character id whose first 5
  characters name another cluster is forwarded there over https (the run's CA) with the
  caller's token salted for that cluster and ``Via: HTTP/1.1 arvados-controller``. Remote
  answers, errors included, pass through; in a successful collection, every ``+A`` becomes
  ``+R<remote>-``.
- A PDH the local cluster does not have is asked of every remote at once with
  ``forwarded_for=<self>-<incoming forwarded_for>``; a request that already carries
  ``forwarded_for`` is answered locally only. The first remote whose manifest hashes to
  the requested ``hash+size`` wins; a remote that answers with another PDH counts as a 502.
  When all fail: all 404 -> 404, any 5xx/429 (or unreachable) -> 502, else 422.
- A token issued by another cluster is validated by calling the issuer's
  ``api_client_authorizations/current?remote=<self>`` and ``users/current?remote=<self>``
  with the token as received; 2xx with a uuid of the issuer's prefix is accepted, and the
  answer cached for 5 minutes (``Login.RemoteTokenRefresh``).

Token salting: ``sdk/go/auth/salt.go`` (via ``fedmount.arvados.tokens``): v2 tokens are
salted, tokens of the target cluster and already-salted (40-hex) ones go as they are, a
bare v1 secret of a local token is first turned into its v2 form.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from urllib.parse import quote, urlencode

from fedmount.arvados.tokens import TokenError, parse_token, salt_for

from .manifests import PDH_ID_RE, portable_data_hash
from .model import Cluster, World
from .signing import remote_rewrite

REMOTE_TOKEN_REFRESH = 300
VIA = "HTTP/1.1 arvados-controller"


def call(
    world: World,
    cluster_id: str,
    method: str,
    path: str,
    token: str | None,
    params: dict | None = None,
    body: bytes | None = None,
    via: bool = True,
) -> tuple[int, dict]:
    """One https request to a cluster's controller; (status, JSON body). Unreachable -> 502."""
    host = world.clusters[cluster_id].api_host
    url = path + ("?" + urlencode(params) if params else "")
    headers = {"X-Request-Id": "req-" + secrets.token_hex(10), "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if via:
        headers["Via"] = VIA
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPSConnection(host, timeout=60, context=world.client_ssl)
    try:
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return 502, {"errors": [f"{cluster_id}: cannot reach controller {host}: {exc}"]}
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return 502, {"errors": [f"{cluster_id}: controller answered {resp.status} with a non-JSON body"]}


def salted_token(cluster: Cluster, token: str, target: str) -> str:
    """The token to send to `target` for a request `cluster` received with `token`."""
    text = token
    if "/" not in token:
        text = next((a.token for a in cluster.accounts.values() if a.secret == token), token)
    try:
        return salt_for(parse_token(text), target).text
    except TokenError:
        return token  # neither v1 nor v2 (e.g. OIDC): passed through unchanged


def forward(
    world: World,
    cluster: Cluster,
    target: str,
    method: str,
    path: str,
    token: str,
    params: dict,
    body: bytes | None = None,
) -> tuple[int, dict]:
    status, obj = call(world, target, method, path, salted_token(cluster, token, target), params, body)
    if status == 200 and isinstance(obj.get("manifest_text"), str):
        obj["manifest_text"] = remote_rewrite(obj["manifest_text"], target)
    return status, obj


def fan_out_pdh(world: World, cluster: Cluster, pdh: str, token: str, params: dict) -> tuple[int, dict]:
    """Ask every remote for `pdh` concurrently; the first verified answer wins."""
    want = PDH_ID_RE.match(pdh)
    forwarded_for = f"{cluster.id}-{params.get('forwarded_for', '')}"
    remote_params = {k: v for k, v in params.items() if k not in ("api_token", "_method")}
    remote_params["forwarded_for"] = forwarded_for
    path = f"/arvados/v1/collections/{quote(pdh, safe='')}"
    remotes = [cid for cid in world.clusters if cid != cluster.id]

    def ask(remote: str) -> tuple[str, int, dict]:
        status, obj = call(world, remote, "GET", path, salted_token(cluster, token, remote), remote_params)
        if status == 200 and isinstance(obj.get("manifest_text"), str):
            got = portable_data_hash(obj["manifest_text"])
            if want is None or got != want.group(0):
                return remote, 502, {"errors": [f"{remote}: PDH {got} does not match the requested {pdh}"]}
            obj["manifest_text"] = remote_rewrite(obj["manifest_text"], remote)
        return remote, status, obj

    failures: list[tuple[str, int, dict]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, len(remotes)))
    try:
        pending = {pool.submit(ask, r) for r in remotes}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                remote, status, obj = future.result()
                if 200 <= status < 300:
                    return status, obj
                failures.append((remote, status, obj))
    finally:
        pool.shutdown(wait=False)
    statuses = [s for _, s, _ in failures]
    if all(s == 404 for s in statuses):
        combined = 404
    elif any(s >= 500 or s == 429 for s in statuses):
        combined = 502
    else:
        combined = 422
    errors = [f"{r}: {s} {'; '.join(map(str, o.get('errors', [])))}" for r, s, o in failures]
    return combined, {"errors": errors or [f"{pdh} not found"]}


def validate_foreign_token(world: World, cluster: Cluster, token: str) -> dict | None:
    """Identity {token_uuid, user_uuid, scopes} of a token issued by another cluster, or None."""
    now = time.time()
    with cluster.lock:
        cached = cluster.remote_identities.get(token)
    if cached and cached[0] > now:
        return cached[1]
    issuer = token.split("/")[1][:5]
    if issuer not in world.clusters or issuer == cluster.id:
        return None
    params = {"remote": cluster.id}
    status, auth = call(
        world, issuer, "GET", "/arvados/v1/api_client_authorizations/current", token, params, via=False
    )
    if status != 200 or not str(auth.get("uuid", "")).startswith(issuer):
        return None
    status, user = call(world, issuer, "GET", "/arvados/v1/users/current", token, params, via=False)
    if status != 200 or not str(user.get("uuid", "")).startswith(issuer):
        return None
    identity = {
        "token_uuid": auth["uuid"],
        "user_uuid": user["uuid"],
        "scopes": auth.get("scopes", ["all"]),
        "user": user,
    }
    with cluster.lock:
        cluster.remote_identities[token] = (now + REMOTE_TOKEN_REFRESH, identity)
    return identity
