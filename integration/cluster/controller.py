"""An emulated Arvados controller (the API server a client talks to), over TLS.

Serves what the Python SDK, arv-put/arv-get, arv-mount and fedmount use, following
``lib/controller`` (router, federation, localdb) and the Rails API server
(``services/api/app/controllers/arvados/v1/*``, ``middlewares/arvados_api_token.rb``).
This module parses requests, authenticates them and hands each resource to its module:

- ``GET /discovery/v1/apis/arvados/v1/rest`` and ``GET /arvados/v1/config`` (no token,
  `discovery`); ``keep_services/accessible`` and ``keep_services`` (no token needed);
- ``api_client_authorizations/current`` (with ``?remote=<cluster>`` accepting the token
  salted for that cluster; the answer has ``api_token: null``);
- ``users`` (`users`), ``groups`` with ``contents`` and ``shared`` (`groups`), ``links``
  (`links`), ``collections`` (`collections`); who may read what is `permissions`, list
  parameters are `filters`, and which cluster answers is `routing`.

Requests: ``Authorization: Bearer|OAuth2``, ``api_token`` in the query or form,
``_method`` and ``X-Http-Method-Override``, percent-encoded path parameters, ``alt=json``
ignored, bodies as JSON or form fields. Tokens: the v2 tokens of the cluster's users
(`accounts`), their bare v1 secrets, a token of this cluster salted for it, and tokens of
other clusters (validated by their issuer, `federation`). Errors: ``{"errors": [...],
"error_token": ...}`` with Rails' statuses (`errors`).
"""

from __future__ import annotations

import json
import secrets
import time
from urllib.parse import parse_qsl, unquote

from . import accounts, collections, federation, groups, links, permissions, signing, users
from .discovery import discovery_document, exported_config
from .errors import ApiFailure
from .filters import ListOptions, list_options
from .httpbase import Handler, Response
from .model import Account, Cluster, rfc3339

API = "/arvados/v1/"
DISCOVERY = "/discovery/v1/apis/arvados/v1/rest"
_IDENTITY_PATHS = ("api_client_authorizations/current", "users/current")
_RESOURCES = {"collections": collections, "groups": groups, "links": links, "users": users}
__all__ = ["ApiFailure", "ControllerHandler"]


class ControllerHandler(Handler):
    @property
    def cluster(self) -> Cluster:
        return self.server.world.clusters[self.server.cluster_id]

    def error(self, status: int, message: str) -> Response:
        return Response.json(
            status, {"errors": [message], "error_token": f"{int(time.time())}+{secrets.token_hex(4)}"}
        )

    def setup_request(self) -> None:
        super().setup_request()
        self.params = dict(self.query)
        self.json_body: dict | None = None
        if self.command in ("POST", "PUT", "PATCH"):
            raw = self.read_body()
            ctype = self.headers.get("Content-Type", "")
            if "application/x-www-form-urlencoded" in ctype:
                self.params.update(parse_qsl(raw.decode(), keep_blank_values=True))
            elif raw.strip():
                try:
                    self.json_body = json.loads(raw)
                except ValueError:
                    self.json_body = None
                    self.params["__bad_json__"] = "1"
        self.token_received = self.header_token() or self.params.get("api_token")
        self._identity: dict | None = None
        self._options: ListOptions | None = None
        self.method = (
            self.headers.get("X-Http-Method-Override") or self.params.get("_method") or self.command
        ).upper()

    # --- routing -----------------------------------------------------------------------

    def route(self) -> Response:
        path = self.url_path
        try:
            if path == DISCOVERY and self.method == "GET":
                doc = discovery_document(self.server.world, self.cluster)
                if self.fault and self.fault.uuid_prefix:
                    doc["uuidPrefix"] = self.fault.uuid_prefix
                return Response.json(200, doc, **{"Cache-Control": "no-cache"})
            if not path.startswith(API):
                raise ApiFailure(404, "Path not found")
            parts = [unquote(p) for p in path[len(API) :].strip("/").split("/")]
            return self.api(parts)
        except ApiFailure as failure:
            return self.error(failure.status, str(failure))

    def api(self, parts: list[str]) -> Response:
        m, resource = self.method, parts[0]
        if resource == "config" and m == "GET" and len(parts) == 1:
            return Response.json(200, exported_config(self.server.world, self.cluster))
        if resource == "keep_services" and m == "GET" and parts[1:] in ([], ["accessible"]):
            return self.keep_services()
        if resource in _RESOURCES:
            response = _RESOURCES[resource].route(self, parts)
            if response is not None:
                return response
        if resource == "api_client_authorizations" and parts[1:] == ["current"] and m == "GET":
            identity = self.identity()
            return Response.json(
                200,
                {
                    "kind": "arvados#apiClientAuthorization",
                    "uuid": identity["token_uuid"],
                    "etag": "",
                    "owner_uuid": identity["user_uuid"],
                    "scopes": identity["scopes"],
                    "expires_at": None,
                    "api_token": None
                    if identity.get("salted_for") or identity.get("foreign")
                    else self.token_received,
                    "created_at": rfc3339(0),
                    "modified_at": rfc3339(0),
                },
            )
        raise ApiFailure(404, "Path not found")

    # --- authentication ----------------------------------------------------------------

    def identity(self) -> dict:
        """Who the request's token belongs to; ApiFailure(401) if nobody."""
        if self._identity is None:
            self._identity = self._authenticate()
        return self._identity

    def _authenticate(self) -> dict:
        token, cluster = self.token_received, self.cluster
        if not token:
            raise ApiFailure(401, "Not logged in")
        parts = token.split("/")
        if parts[0] == "v2" and len(parts) in (3, 4):
            uuid, secret = parts[1], parts[2]
            if uuid[:5] != cluster.id:
                identity = federation.validate_foreign_token(self.server.world, cluster, token)
                if identity is None:
                    raise ApiFailure(401, "Not logged in")
                user = accounts.adopt_remote_user(cluster, identity["user"])
                return {**identity, "user": user, "foreign": True}
            account = cluster.accounts.get(uuid)
            if account is not None:
                if secrets.compare_digest(secret, account.secret) or secrets.compare_digest(
                    secret, federation.salted_token(cluster, account.token, cluster.id).split("/")[2]
                ):
                    return self._local_identity(account)
                remote = self.params.get("remote")
                rel = self.url_path[len(API) :].strip("/")
                if (
                    remote
                    and rel in _IDENTITY_PATHS
                    and self.method == "GET"
                    and secrets.compare_digest(
                        secret, federation.salted_token(cluster, account.token, remote).split("/")[2]
                    )
                ):
                    return {**self._local_identity(account), "salted_for": remote}
        elif len(parts) == 1:
            for account in list(cluster.accounts.values()):
                if secrets.compare_digest(token, account.secret):
                    return self._local_identity(account)
        raise ApiFailure(401, "Not logged in")

    def _local_identity(self, account: Account) -> dict:
        return {
            "token_uuid": account.token_uuid,
            "user_uuid": account.user_uuid,
            "scopes": ["all"],
            "user": self.cluster.users[account.user_uuid],
        }

    def access(self) -> permissions.Access:
        """What the request's user may read and write on this cluster."""
        return permissions.access(self.cluster, self.identity()["user_uuid"])

    def options(self) -> ListOptions:
        if self._options is None:
            self._options = list_options(self.params)
        return self._options

    def check_owner(self, owner: object) -> None:
        """A new or moved object's owner must be a user or project the caller can write."""
        record = self.cluster.find(owner)
        if record is None or owner[6:11] not in ("tpzed", "j7d0g"):
            raise ApiFailure(422, f"Owner uuid {owner} does not exist or cannot own objects")
        if owner[6:11] == "j7d0g" and record.get("group_class") != "project":
            raise ApiFailure(422, f"Owner uuid {owner} is a {record.get('group_class')} group, not a project")
        if self.access().level(record) < permissions.WRITE:
            raise ApiFailure(403, f"Forbidden: {self.identity()['user_uuid']} cannot write to {owner}")

    def resource_attrs(self, name: str) -> dict:
        """The attributes of a create or update: under `name`, flat in the JSON body, or a form field."""
        if "__bad_json__" in self.params:
            raise ApiFailure(400, "request body is not valid JSON")
        if name in self.params:
            attrs = self.json_param(name)
        elif self.json_body is not None:
            attrs = self.json_body.get(name, self.json_body)
        else:
            attrs = {}
        if not isinstance(attrs, dict):
            raise ApiFailure(422, f"{name} must be a JSON object")
        return attrs

    def forward(self, target: str) -> Response:
        """This request, as received, to cluster `target` with the token salted for it."""
        body = json.dumps(self.json_body).encode() if self.json_body is not None else None
        status, obj = federation.forward(
            self.server.world,
            self.cluster,
            target,
            self.method,
            self.url_path,
            self.token_received or "",
            self.forward_params(),
            body,
        )
        return Response.json(status, obj)

    def call(self, target: str, method: str, path: str, params: dict) -> tuple[int, dict]:
        token = federation.salted_token(self.cluster, self.token_received or "", target)
        return federation.call(self.server.world, target, method, path, token, params)

    # --- keep services -----------------------------------------------------------------

    def keep_services(self) -> Response:
        c = self.cluster
        items = []
        for uuid, url in zip(c.keep_service_uuids, c.keep_urls, strict=True):
            uuid = self.fault.keep_service_uuid if self.fault and self.fault.keep_service_uuid else uuid
            port = int(url.rsplit(":", 1)[1])
            items.append(
                {
                    "kind": "arvados#keepService",
                    "uuid": uuid,
                    "etag": "",
                    "owner_uuid": c.system_user_uuid,
                    "service_host": "127.0.0.1",
                    "service_port": port,
                    "service_ssl_flag": False,
                    "service_type": "disk",
                    "read_only": False,
                    "created_at": rfc3339(0),
                    "modified_at": rfc3339(0),
                }
            )
        if self.headers.get("X-External-Client") == "1":
            items = []  # only proxies are returned to external clients, and there are none
        return Response.json(
            200,
            {
                "kind": "arvados#keepServiceList",
                "etag": "",
                "self_link": "",
                "offset": 0,
                "limit": len(items),
                "items_available": len(items),
                "items": items,
            },
        )

    # --- collections -------------------------------------------------------------------

    def signed(self, record: dict) -> dict:
        out = dict(record)
        if isinstance(out.get("manifest_text"), str) and self.token_received and not out.get("is_trashed"):
            c = self.cluster
            out["manifest_text"] = signing.sign_manifest(
                out["manifest_text"], self.token_received, c.signing_key, c.ttl
            )
        return out

    def select(self, record: dict, default: list[str] | None = None) -> dict:
        select = self.json_param("select", default)
        if select is None:
            return record
        if not isinstance(select, list) or not all(isinstance(s, str) for s in select):
            raise ApiFailure(422, "select must be an array of attribute names")
        bad = [s for s in select if s not in record and s != "unsigned_manifest_text"]
        if bad:
            raise ApiFailure(422, f"Invalid attribute '{bad[0]}' for select parameter")
        out = {k: record.get(k) for k in select}
        if "unsigned_manifest_text" in select:
            out["unsigned_manifest_text"] = signing.strip_signatures(record.get("manifest_text") or "")
        out.setdefault("kind", record.get("kind"))
        out.setdefault("etag", record.get("etag"))
        return out

    def json_param(self, name: str, default=None):
        if name not in self.params:
            return default
        value = self.params[name]
        try:
            return json.loads(value)
        except ValueError:
            raise ApiFailure(422, f"{name} is not valid JSON") from None

    def forward_params(self) -> dict:
        return {
            k: v for k, v in self.params.items() if k not in ("api_token", "_method", "alt", "__bad_json__")
        }
