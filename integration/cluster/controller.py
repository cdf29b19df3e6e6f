"""An emulated Arvados controller (the API server a client talks to), over TLS.

Serves what the Python SDK, arv-put/arv-get, arv-mount and fedmount use, following
``lib/controller`` (router, federation, localdb/collection.go) and the Rails API server
(``services/api/app/controllers/arvados/v1/*``, ``middlewares/arvados_api_token.rb``):

- ``GET /discovery/v1/apis/arvados/v1/rest`` and ``GET /arvados/v1/config`` (no token);
- ``users/current``, ``users/{uuid}``, ``api_client_authorizations/current`` (with
  ``?remote=<cluster>`` accepting the token salted for that cluster; the answer has
  ``api_token: null``);
- ``collections``: get by UUID (remote prefixes forwarded, see `federation`), get by PDH
  (local first, then fan-out; the answer's ``uuid`` is the PDH), list (``filters``,
  ``where``, ``select``, ``order``, ``limit``, ``offset``, ``count``, ``cluster_id``; a list
  filtered only by ``uuid =``/``in`` is federated), create and update (JSON body, flat or
  under ``collection``, or form field ``collection=<json>``; every block must carry a
  ``+A`` valid for the caller or the answer is 403, as Rails ``check_signatures``; ``+A``
  is stripped before storing);
- ``keep_services/accessible`` and ``keep_services`` (no token needed).

Every manifest returned is signed for the request's token exactly as received
(``signCollection``). Requests: ``Authorization: Bearer|OAuth2``, ``api_token`` in the
query or form, ``_method`` and ``X-Http-Method-Override``, percent-encoded path
parameters, ``alt=json`` ignored. Errors: ``{"errors": [...], "error_token": ...}`` with
Rails' statuses (401 not logged in, 403 permission, 404 not found, 422 bad parameters).
Every valid user may read every collection (the emulator has no permission links).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from urllib.parse import parse_qsl, unquote

from . import federation, signing
from .discovery import discovery_document, exported_config
from .httpbase import Handler, Response
from .manifests import PDH_ID_RE
from .model import Cluster, rfc3339

API = "/arvados/v1/"
DISCOVERY = "/discovery/v1/apis/arvados/v1/rest"
_IDENTITY_PATHS = ("api_client_authorizations/current", "users/current")


class ApiFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
        if resource == "collections":
            if len(parts) == 1 and m == "GET":
                return self.list_collections()
            if len(parts) == 1 and m == "POST":
                return self.create_collection()
            if len(parts) == 2 and m == "GET":
                return self.get_collection(parts[1])
            if len(parts) == 2 and m in ("PUT", "PATCH"):
                return self.update_collection(parts[1])
        if resource == "users" and m == "GET" and len(parts) == 2:
            identity = self.identity()
            if parts[1] == "current":
                return Response.json(200, self.user_of(identity))
            if parts[1] == self.cluster.user_uuid:
                return Response.json(200, self.select(self.cluster.user_record()))
            if parts[1] == identity["user_uuid"]:
                return Response.json(200, self.select(self.user_of(identity)))
            raise ApiFailure(404, "Path not found")
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
                return {**identity, "foreign": True}
            if uuid == cluster.token_uuid:
                if secrets.compare_digest(secret, cluster.token_secret) or secrets.compare_digest(
                    secret, federation.salted_token(cluster, cluster.token, cluster.id).split("/")[2]
                ):
                    return self._local_identity()
                remote = self.params.get("remote")
                rel = self.url_path[len(API) :].strip("/")
                if (
                    remote
                    and rel in _IDENTITY_PATHS
                    and self.method == "GET"
                    and secrets.compare_digest(
                        secret, federation.salted_token(cluster, cluster.token, remote).split("/")[2]
                    )
                ):
                    return {**self._local_identity(), "salted_for": remote}
        elif len(parts) == 1 and secrets.compare_digest(token, cluster.token_secret):
            return self._local_identity()
        raise ApiFailure(401, "Not logged in")

    def _local_identity(self) -> dict:
        c = self.cluster
        return {
            "token_uuid": c.token_uuid,
            "user_uuid": c.user_uuid,
            "scopes": ["all"],
            "user": c.user_record(),
        }

    def user_of(self, identity: dict) -> dict:
        return identity["user"]

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
                    "owner_uuid": c.user_uuid,
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

    def get_collection(self, cid: str) -> Response:
        world, cluster = self.server.world, self.cluster
        if len(cid) == 27:
            if cid[:5] != cluster.id and cid[:5] in world.clusters and "forwarded_for" not in self.params:
                status, obj = federation.forward(
                    world,
                    cluster,
                    cid[:5],
                    "GET",
                    self.url_path,
                    self.token_received or "",
                    self.forward_params(),
                )
                return Response.json(status, obj)
            self.identity()
            record = cluster.collections.get(cid)
            if record is None or (record["is_trashed"] and self.params.get("include_trash") != "true"):
                raise ApiFailure(404, f"Object not found: {cid}")
            return Response.json(200, self.select(self.signed(record)))
        if len(cid) < 34 or cid[32] != "+" or not PDH_ID_RE.match(cid):
            raise ApiFailure(404, f"Object not found: {cid}")
        try:
            return Response.json(200, self.select(self.signed(self.local_pdh(cid))))
        except ApiFailure as failure:
            if failure.status != 404 or "forwarded_for" in self.params:
                raise
        status, obj = federation.fan_out_pdh(
            world, cluster, cid, self.token_received or "", self.forward_params()
        )
        return Response.json(status, obj)

    def local_pdh(self, pdh: str) -> dict:
        self.identity()
        record = self.cluster.find_by_pdh(pdh)
        if record is None:
            raise ApiFailure(404, f"Object not found: {pdh}")
        key = record["portable_data_hash"]
        return {
            "kind": "arvados#collection",
            "uuid": key,
            "etag": "",
            "owner_uuid": "",
            "created_at": None,
            "modified_at": None,
            "modified_by_user_uuid": "",
            "name": "",
            "description": "",
            "properties": None,
            "portable_data_hash": key,
            "manifest_text": record["manifest_text"],
            "replication_desired": None,
            "replication_confirmed": None,
            "replication_confirmed_at": None,
            "storage_classes_desired": None,
            "storage_classes_confirmed": None,
            "storage_classes_confirmed_at": None,
            "delete_at": None,
            "trash_at": record["trash_at"],
            "is_trashed": False,
            "version": 0,
            "current_version_uuid": "",
            "preserve_version": False,
            "file_count": 0,
            "file_size_total": 0,
        }

    def forward_params(self) -> dict:
        return {
            k: v for k, v in self.params.items() if k not in ("api_token", "_method", "alt", "__bad_json__")
        }

    def list_collections(self) -> Response:
        world, cluster = self.server.world, self.cluster
        target = self.params.get("cluster_id")
        if target and target != cluster.id:
            if target not in world.clusters:
                raise ApiFailure(422, f"cluster_id {target} is not a known cluster")
            params = {k: v for k, v in self.forward_params().items() if k != "cluster_id"}
            status, obj = federation.call(
                world,
                target,
                "GET",
                self.url_path,
                federation.salted_token(cluster, self.token_received or "", target),
                params,
            )
            return Response.json(status, obj)
        filters = self.json_param("filters", [])
        where = self.json_param("where", {})
        if not isinstance(filters, list) or not isinstance(where, dict):
            raise ApiFailure(422, "Invalid filters")
        filters = list(filters) + [[k, "in" if isinstance(v, list) else "=", v] for k, v in where.items()]
        remote_uuids = self.federated_uuids(filters)
        self.identity()
        items = [c for c in cluster.all_collections() if not c["is_trashed"] and _matches(c, filters)]
        for remote, uuids in remote_uuids.items():
            status, obj = federation.call(
                world,
                remote,
                "GET",
                self.url_path,
                federation.salted_token(cluster, self.token_received or "", remote),
                {"filters": json.dumps([["uuid", "in", uuids]]), "count": "none", "limit": str(len(uuids))},
            )
            if status != 200:
                return Response.json(status, obj)
            items += obj["items"]
        for spec in reversed(self.json_param("order", None) or ["modified_at desc", "uuid asc"]):
            attr, _, direction = str(spec).partition(" ")
            items.sort(key=lambda c: (c.get(attr) is None, c.get(attr) or ""), reverse=direction == "desc")
        try:
            limit = min(int(self.params.get("limit", 100)), 1000)
            offset = int(self.params.get("offset", 0))
        except ValueError:
            raise ApiFailure(422, "limit and offset must be integers") from None
        if limit < 0 or offset < 0:
            raise ApiFailure(422, "limit and offset must not be negative")
        page = items[offset : offset + limit]
        default_select = [k for k in (page[0] if page else {}) if k != "manifest_text"] or None
        body = {
            "kind": "arvados#collectionList",
            "etag": "",
            "self_link": "",
            "offset": offset,
            "limit": limit,
            "items": [self.select(self.signed(c), default_select) for c in page],
        }
        count = self.params.get("count", "exact")
        if count not in ("exact", "none"):
            raise ApiFailure(422, "count must be 'exact' or 'none'")
        if count == "exact":
            body["items_available"] = len(items)
        return Response.json(200, body)

    def federated_uuids(self, filters: list) -> dict[str, list[str]]:
        """Remote uuids to ask for, when every filter is `uuid =` or `uuid in` (list.go)."""
        if not filters or not all(
            isinstance(f, list) and len(f) == 3 and f[0] == "uuid" and f[1] in ("=", "in") for f in filters
        ):
            return {}
        out: dict[str, list[str]] = {}
        for f in filters:
            for uuid in f[2] if isinstance(f[2], list) else [f[2]]:
                if (
                    isinstance(uuid, str)
                    and uuid[:5] != self.cluster.id
                    and uuid[:5] in self.server.world.clusters
                ):
                    out.setdefault(uuid[:5], []).append(uuid)
        return out

    def collection_attrs(self) -> dict:
        if "__bad_json__" in self.params:
            raise ApiFailure(400, "request body is not valid JSON")
        if "collection" in self.params:
            attrs = self.json_param("collection")
        elif self.json_body is not None:
            attrs = self.json_body.get("collection", self.json_body)
        else:
            attrs = {}
        if not isinstance(attrs, dict):
            raise ApiFailure(422, "collection must be a JSON object")
        return attrs

    def check_signatures(self, manifest: str) -> None:
        """Rails check_signatures: every non-empty block needs a +A valid for the caller (else 403)."""
        c = self.cluster
        for tok in signing.block_tokens(manifest):
            if tok.startswith("d41d8cd98f00b204e9800998ecf8427e+0") and "+A" not in tok:
                continue
            if signing.verify_locator(tok, self.token_received or "", c.signing_key, c.ttl) is not None:
                raise ApiFailure(
                    403, f"Forbidden: invalid or missing permission signature on locator {tok[:34]}"
                )

    def create_collection(self) -> Response:
        identity = self.identity()
        attrs = self.collection_attrs()
        manifest = attrs.get("manifest_text") or ""
        if not isinstance(manifest, str):
            raise ApiFailure(422, "manifest_text must be a string")
        self.check_signatures(manifest)
        cluster = self.cluster
        name = attrs.get("name") or f"New collection ({rfc3339(time.time())})"
        taken = {c["name"] for c in cluster.all_collections() if c["owner_uuid"] == cluster.user_uuid}
        if name in taken:
            if self.params.get("ensure_unique_name") not in ("true", "1", "True"):
                raise ApiFailure(422, "Name has already been taken")
            name = f"{name} ({rfc3339(time.time())})"
        extra = {
            k: v
            for k, v in attrs.items()
            if k
            in (
                "properties",
                "description",
                "replication_desired",
                "storage_classes_desired",
                "trash_at",
                "preserve_version",
            )
        }
        record = cluster.add_collection(name, manifest, modified_by_user_uuid=identity["user_uuid"], **extra)
        return Response.json(200, self.select(self.signed(record)))

    def update_collection(self, uuid: str) -> Response:
        self.identity()
        cluster = self.cluster
        if uuid not in cluster.collections:
            raise ApiFailure(404, f"Object not found: {uuid}")
        attrs = self.collection_attrs()
        if "manifest_text" in attrs:
            self.check_signatures(attrs["manifest_text"] or "")
        allowed = {
            k: v
            for k, v in attrs.items()
            if k
            in (
                "name",
                "manifest_text",
                "properties",
                "description",
                "replication_desired",
                "storage_classes_desired",
                "trash_at",
                "preserve_version",
            )
        }
        return Response.json(200, self.select(self.signed(cluster.update_collection(uuid, allowed))))


def _matches(record: dict, filters: list) -> bool:
    for f in filters:
        if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and isinstance(f[1], str)):
            raise ApiFailure(422, f"Invalid filter {json.dumps(f)}")
        attr, op, value = f
        if attr not in record:
            raise ApiFailure(422, f"Invalid attribute '{attr}' in filter")
        have, op = record[attr], op.lower()
        if op == "=":
            ok = have == value
        elif op == "!=":
            ok = have != value
        elif op in ("in", "not in"):
            if not isinstance(value, list):
                raise ApiFailure(422, f"Invalid filter: '{op}' needs an array")
            ok = (have in value) == (op == "in")
        elif op in ("<", "<=", ">", ">="):
            ok = (
                have is not None
                and {"<": have < value, "<=": have <= value, ">": have > value, ">=": have >= value}[op]
            )
        elif op in ("like", "ilike"):
            pattern = "^" + re.escape(str(value)).replace("%", ".*").replace("_", ".") + "$"
            ok = have is not None and re.match(pattern, str(have), re.I if op == "ilike" else 0) is not None
        elif op == "exists":
            ok = have is not None
        else:
            raise ApiFailure(422, f"Invalid operator '{op}' in filter")
        if not ok:
            return False
    return True
