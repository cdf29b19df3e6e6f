"""The discovery document and exported config of one emulated cluster, built in code.

Shape follows Rails' ``services/api/app/controllers/arvados/v1/schema_controller.rb``
(``discovery_doc``) and ``sdk/python/arvados-v1-discovery.json``, limited to the methods
the emulator serves. What the Python SDK reads (``arvados/api.py`` and
googleapiclient): ``rootUrl``, ``servicePath``, ``resources.*.methods.*`` with ``id``,
``path``, ``httpMethod``, ``parameters`` (``location``/``required``; types ``array`` and
``object`` are JSON-encoded by the SDK), ``response`` (a ``$ref`` into ``schemas``) and
``request`` (without it googleapiclient refuses a ``body=`` argument); plus
``uuidPrefix``, ``blobSignatureTtl``, ``defaultCollectionReplication``,
``maxRequestSize``. arv-mount also looks for ``resources.groups.methods.shared`` before
it calls ``groups.shared``. The exported config is ``lib/config/export.go``'s whitelist,
with the cluster's `profiles.Profile` (``ForwardSlashNameSubstitution``,
``MaxItemsPerResponse``, ``InstanceTypes``, storage classes).
"""

from __future__ import annotations

from .model import Cluster, World
from .profiles import STORAGE_CLASSES
from .records import (
    COLLECTION_FIELDS,
    GROUP_FIELDS,
    KEEP_SERVICE_FIELDS,
    LINK_FIELDS,
    TOKEN_FIELDS,
    USER_FIELDS,
)

REVISION = "20250402"
SCOPES = ["https://api.arvados.org/auth/arvados", "https://api.arvados.org/auth/arvados.readonly"]


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


def _crud(resource: str, schema: str, extra_list: dict | None = None, trash: bool = False) -> dict:
    """get/list/create/update/delete methods of a resource, as the Rails schema lists them."""
    uuid = {"uuid": _uuid_param(schema)}
    methods = {
        "get": _method(resource, "get", f"{resource}/{{uuid}}", "GET", schema, {**uuid, "select": _SELECT}),
        "list": _method(
            resource, "list", resource, "GET", f"{schema}List", {**_LIST_PARAMS, **(extra_list or {})}
        ),
        "create": _method(
            resource,
            "create",
            resource,
            "POST",
            schema,
            {
                "select": _SELECT,
                "ensure_unique_name": _param("boolean", default="false"),
                "cluster_id": _param("string"),
            },
            request=schema,
        ),
        "update": _method(
            resource,
            "update",
            f"{resource}/{{uuid}}",
            "PUT",
            schema,
            {**uuid, "select": _SELECT},
            request=schema,
        ),
        "delete": _method(resource, "delete", f"{resource}/{{uuid}}", "DELETE", schema, dict(uuid)),
    }
    if trash:
        for name in ("trash", "untrash"):
            methods[name] = _method(resource, name, f"{resource}/{{uuid}}/{name}", "POST", schema, dict(uuid))
    return methods


def _resources() -> dict:
    trash_params = {"include_trash": _param("boolean", default="false")}
    collections = _crud(
        "collections",
        "Collection",
        {**trash_params, "include_old_versions": _param("boolean", default="false")},
        trash=True,
    )
    collections["get"]["parameters"]["include_trash"] = _param("boolean", default="false")
    groups = _crud("groups", "Group", trash_params, trash=True)
    groups["get"]["parameters"]["include_trash"] = _param("boolean", default="false")
    groups["contents"] = _method(
        "groups",
        "contents",
        "groups/contents",
        "GET",
        "Group",
        {
            **_LIST_PARAMS,
            **trash_params,
            "uuid": _param("string", default=""),
            "recursive": _param("boolean", default="false"),
            "include": _param("array"),
            "include_old_versions": _param("boolean", default="false"),
            "exclude_home_project": _param("boolean", default="false"),
        },
    )
    groups["shared"] = _method(
        "groups",
        "shared",
        "groups/shared",
        "GET",
        "Group",
        {**_LIST_PARAMS, **trash_params, "include": _param("string")},
    )
    users = {
        "current": _method("users", "current", "users/current", "GET", "User"),
        "system": _method("users", "system", "users/system", "GET", "User"),
        "get": _method(
            "users", "get", "users/{uuid}", "GET", "User", {"uuid": _uuid_param("User"), "select": _SELECT}
        ),
        "list": _method("users", "list", "users", "GET", "UserList", _LIST_PARAMS),
    }
    return {
        "collections": {"methods": collections},
        "groups": {"methods": groups},
        "links": {"methods": _crud("links", "Link")},
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
        "users": {"methods": users},
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
        ("Collection", COLLECTION_FIELDS, "4zz18"),
        ("Group", GROUP_FIELDS, "j7d0g"),
        ("Link", LINK_FIELDS, "o0j2j"),
        ("User", USER_FIELDS, "tpzed"),
        ("KeepService", KEEP_SERVICE_FIELDS, "bi6l4"),
        ("ApiClientAuthorization", TOKEN_FIELDS, "gj3su"),
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
        "maxItemsPerResponse": cluster.profile.max_items_per_response,
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
    profile = cluster.profile
    return {
        "ClusterID": cluster.id,
        "API": {
            "MaxItemsPerResponse": profile.max_items_per_response,
            "MaxRequestSize": 134217728,
            "RequestTimeout": "5m0s",
            "SendTimeout": "1m0s",
        },
        "Collections": {
            "BlobSigning": True,
            "BlobSigningTTL": f"{ttl_h}h{rem // 60}m{rem % 60}s",
            "DefaultReplication": len(cluster.volumes),
            "ForwardSlashNameSubstitution": profile.forward_slash_name_substitution,
        },
        "InstanceTypes": {name: dict(spec) for name, spec in profile.instance_types.items()},
        "RemoteClusters": remotes,
        "Services": {
            "Controller": {"ExternalURL": f"https://{cluster.api_host}/"},
            "Keepstore": {"ExternalURL": ""},
            "Keepproxy": {"ExternalURL": ""},
            "WebDAV": {"ExternalURL": ""},
            "Websocket": {"ExternalURL": ""},
        },
        "StorageClasses": {name: dict(spec) for name, spec in STORAGE_CLASSES.items()},
        "Volumes": {
            f"{cluster.id}-nyw5e-{i:015d}": {
                "StorageClasses": dict.fromkeys(profile.volume_storage_classes(i), True)
            }
            for i in range(len(cluster.volumes))
        },
        "Login": {"LoginCluster": ""},
    }
