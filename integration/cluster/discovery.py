"""The discovery document and exported config of one emulated cluster, built in code.

Shape follows Rails' ``services/api/app/controllers/arvados/v1/schema_controller.rb``
(``discovery_doc``) and ``sdk/python/arvados-v1-discovery.json``, limited to the methods
the emulator serves. What the Python SDK reads (``arvados/api.py`` and
googleapiclient): ``rootUrl``, ``servicePath``, ``resources.*.methods.*`` with ``id``,
``path``, ``httpMethod``, ``parameters`` (``location``/``required``; types ``array`` and
``object`` are JSON-encoded by the SDK), ``response`` (a ``$ref`` into ``schemas``) and
``request`` (without it googleapiclient refuses a ``body=`` argument); plus
``uuidPrefix``, ``blobSignatureTtl``, ``defaultCollectionReplication``,
``maxRequestSize``. The exported config is ``lib/config/export.go``'s whitelist.
"""

from __future__ import annotations

from .model import Cluster, World

REVISION = "20250402"
SCOPES = ["https://api.arvados.org/auth/arvados", "https://api.arvados.org/auth/arvados.readonly"]

_COLLECTION_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "created_at": "datetime",
    "modified_at": "datetime",
    "modified_by_user_uuid": "string",
    "name": "string",
    "description": "text",
    "properties": "Hash",
    "portable_data_hash": "string",
    "manifest_text": "text",
    "unsigned_manifest_text": "text",
    "replication_desired": "integer",
    "replication_confirmed": "integer",
    "replication_confirmed_at": "datetime",
    "storage_classes_desired": "Array",
    "storage_classes_confirmed": "Array",
    "storage_classes_confirmed_at": "datetime",
    "delete_at": "datetime",
    "trash_at": "datetime",
    "is_trashed": "boolean",
    "version": "integer",
    "current_version_uuid": "string",
    "preserve_version": "boolean",
    "file_count": "integer",
    "file_size_total": "integer",
}
_USER_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "email": "string",
    "username": "string",
    "first_name": "string",
    "last_name": "string",
    "is_active": "boolean",
    "is_admin": "boolean",
    "prefs": "Hash",
    "created_at": "datetime",
    "modified_at": "datetime",
}
_KEEP_SERVICE_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "service_host": "string",
    "service_port": "integer",
    "service_ssl_flag": "boolean",
    "service_type": "string",
    "read_only": "boolean",
    "created_at": "datetime",
    "modified_at": "datetime",
}
_TOKEN_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "api_token": "string",
    "expires_at": "datetime",
    "scopes": "Array",
    "created_at": "datetime",
    "modified_at": "datetime",
}


def _param(type_: str, location: str = "query", required: bool = False, **extra: object) -> dict:
    return {"type": type_, "required": required, "location": location, **extra}


def _uuid_param(what: str) -> dict:
    return _param("string", "path", True, description=f"The UUID of the {what}.")


_SELECT = _param("array", description="An array of names of attributes to return in the response.")
_LIST_PARAMS = {
    "filters": _param("array"),
    "where": _param("object"),
    "order": _param("array"),
    "select": _SELECT,
    "distinct": _param("boolean", default="false"),
    "limit": _param("integer", default="100"),
    "offset": _param("integer", default="0"),
    "count": _param("string", default="exact"),
    "cluster_id": _param("string"),
    "bypass_federation": _param("boolean", default="false"),
}


def _method(
    resource: str,
    name: str,
    path: str,
    http: str,
    schema: str | None,
    params: dict | None = None,
    request: str | None = None,
) -> dict:
    params = params or {}
    entry = {
        "id": f"arvados.{resource}.{name}",
        "path": path,
        "httpMethod": http,
        "description": f"{name} {resource}",
        "parameters": params,
        "parameterOrder": [k for k, v in params.items() if v["location"] == "path"],
        "response": {"$ref": schema} if schema else {},
        "scopes": SCOPES,
    }
    if request:
        entry["request"] = {"required": True, "properties": {request.lower(): {"$ref": request}}}
    return entry


def _schema(name: str, fields: dict[str, str], prefix: str) -> dict:
    return {
        name: {
            "id": name,
            "description": name,
            "type": "object",
            "uuidPrefix": prefix,
            "properties": {k: {"type": t} for k, t in fields.items()},
        },
        f"{name}List": {
            "id": f"{name}List",
            "description": f"A list of {name} objects",
            "type": "object",
            "properties": {
                "kind": {"type": "string", "default": f"arvados#{name[0].lower()}{name[1:]}List"},
                "etag": {"type": "string"},
                "items": {"type": "array", "items": {"$ref": name}},
                "items_available": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
            },
        },
    }


def _resources() -> dict:
    collection_uuid = {"uuid": _uuid_param("Collection")}
    return {
        "collections": {
            "methods": {
                "get": _method(
                    "collections",
                    "get",
                    "collections/{uuid}",
                    "GET",
                    "Collection",
                    {
                        **collection_uuid,
                        "select": _SELECT,
                        "include_trash": _param("boolean", default="false"),
                    },
                ),
                "list": _method(
                    "collections",
                    "list",
                    "collections",
                    "GET",
                    "CollectionList",
                    {
                        **_LIST_PARAMS,
                        "include_trash": _param("boolean", default="false"),
                        "include_old_versions": _param("boolean", default="false"),
                    },
                ),
                "create": _method(
                    "collections",
                    "create",
                    "collections",
                    "POST",
                    "Collection",
                    {
                        "select": _SELECT,
                        "ensure_unique_name": _param("boolean", default="false"),
                        "cluster_id": _param("string"),
                    },
                    request="Collection",
                ),
                "update": _method(
                    "collections",
                    "update",
                    "collections/{uuid}",
                    "PUT",
                    "Collection",
                    {**collection_uuid, "select": _SELECT},
                    request="Collection",
                ),
            }
        },
        "keep_services": {
            "methods": {
                "accessible": _method(
                    "keep_services", "accessible", "keep_services/accessible", "GET", "KeepServiceList"
                ),
                "list": _method(
                    "keep_services", "list", "keep_services", "GET", "KeepServiceList", _LIST_PARAMS
                ),
            }
        },
        "users": {
            "methods": {
                "current": _method("users", "current", "users/current", "GET", "User"),
                "get": _method(
                    "users",
                    "get",
                    "users/{uuid}",
                    "GET",
                    "User",
                    {"uuid": _uuid_param("User"), "select": _SELECT},
                ),
            }
        },
        "api_client_authorizations": {
            "methods": {
                "current": _method(
                    "api_client_authorizations",
                    "current",
                    "api_client_authorizations/current",
                    "GET",
                    "ApiClientAuthorization",
                ),
            }
        },
        "configs": {"methods": {"get": _method("configs", "get", "config", "GET", None)}},
    }


def discovery_document(world: World, cluster: Cluster) -> dict:
    schemas: dict = {}
    for name, fields, prefix in (
        ("Collection", _COLLECTION_FIELDS, "4zz18"),
        ("User", _USER_FIELDS, "tpzed"),
        ("KeepService", _KEEP_SERVICE_FIELDS, "bi6l4"),
        ("ApiClientAuthorization", _TOKEN_FIELDS, "gj3su"),
    ):
        schemas.update(_schema(name, fields, prefix))
    return {
        "kind": "discovery#restDescription",
        "discoveryVersion": "v1",
        "id": "arvados:v1",
        "name": "arvados",
        "version": "v1",
        "revision": REVISION,
        "title": "Arvados API",
        "description": f"The API to interact with Arvados (emulated cluster {cluster.id}).",
        "documentationLink": "http://doc.arvados.org/api/index.html",
        "protocol": "rest",
        "rootUrl": f"https://{cluster.api_host}/",
        "servicePath": "arvados/v1/",
        "basePath": "/arvados/v1/",
        "batchPath": "batch",
        "uuidPrefix": cluster.id,
        "defaultTrashLifetime": 1209600,
        "blobSignatureTtl": cluster.ttl,
        "maxRequestSize": 134217728,
        "maxItemsPerResponse": 1000,
        "dockerImageFormats": ["v2"],
        "crunchLogUpdateSize": 65536,
        "crunchLogUpdatePeriod": 1800,
        "remoteHosts": {cid: c.api_host for cid, c in world.clusters.items() if cid != cluster.id},
        "remoteHostsViaDNS": False,
        "websocketUrl": "",
        "workbenchUrl": "",
        "workbench2Url": "",
        "keepWebServiceUrl": "",
        "gitUrl": "",
        "defaultCollectionReplication": len(cluster.volumes),
        "parameters": {
            "alt": {
                "type": "string",
                "description": "Data format for the response.",
                "default": "json",
                "enum": ["json"],
                "location": "query",
            },
            "fields": {"type": "string", "location": "query"},
            "key": {"type": "string", "location": "query"},
            "oauth_token": {"type": "string", "location": "query"},
        },
        "auth": {"oauth2": {"scopes": {s: {"description": s} for s in SCOPES}}},
        "schemas": schemas,
        "resources": _resources(),
    }


def exported_config(world: World, cluster: Cluster) -> dict:
    remotes = {
        cid: {"Host": c.api_host, "Proxy": True, "Scheme": "https", "Insecure": False, "ActivateUsers": True}
        for cid, c in world.clusters.items()
        if cid != cluster.id
    }
    remotes["*"] = {"Host": "", "Proxy": False, "Scheme": "https", "Insecure": False, "ActivateUsers": False}
    ttl_h, rem = divmod(cluster.ttl, 3600)
    return {
        "ClusterID": cluster.id,
        "Collections": {
            "BlobSigning": True,
            "BlobSigningTTL": f"{ttl_h}h{rem // 60}m{rem % 60}s",
            "DefaultReplication": len(cluster.volumes),
            "ForwardSlashNameSubstitution": "",
        },
        "RemoteClusters": remotes,
        "Services": {
            "Controller": {"ExternalURL": f"https://{cluster.api_host}/"},
            "Keepstore": {"ExternalURL": ""},
            "Keepproxy": {"ExternalURL": ""},
            "WebDAV": {"ExternalURL": ""},
            "Websocket": {"ExternalURL": ""},
        },
        "StorageClasses": {"default": {"Default": True, "Priority": 0}},
        "Login": {"LoginCluster": ""},
    }
