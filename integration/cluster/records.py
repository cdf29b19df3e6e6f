"""The shape of the emulated API's records: fields and their types, kinds, new uuids.

Fields follow the schemas of ``sdk/python/arvados-v1-discovery.json`` and the models'
``api_accessible`` lists (``services/api/app/models/{user,group,link,collection}.rb``).
Types are the discovery document's (``string``, ``text``, ``datetime``, ``boolean``,
``integer``, ``Hash``, ``Array``); the list filters (`filters`) use them to decide what an
operator means for a field. Fields computed per caller (``can_write``, ``can_manage``,
``writable_by``, ``head_kind``...) are added when a record is returned, never stored.
"""

from __future__ import annotations

import calendar
import secrets
import string
import time

_COMMON_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "created_at": "datetime",
    "modified_at": "datetime",
    "modified_by_user_uuid": "string",
}
COLLECTION_FIELDS = {
    **_COMMON_FIELDS,
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
GROUP_FIELDS = {
    **_COMMON_FIELDS,
    "name": "string",
    "description": "text",
    "group_class": "string",
    "trash_at": "datetime",
    "is_trashed": "boolean",
    "delete_at": "datetime",
    "properties": "Hash",
    "frozen_by_uuid": "string",
    "writable_by": "Array",
    "can_write": "boolean",
    "can_manage": "boolean",
}
LINK_FIELDS = {
    **_COMMON_FIELDS,
    "tail_uuid": "string",
    "link_class": "string",
    "name": "string",
    "head_uuid": "string",
    "properties": "Hash",
    "head_kind": "string",
    "tail_kind": "string",
}
USER_FIELDS = {
    **_COMMON_FIELDS,
    "email": "string",
    "first_name": "string",
    "last_name": "string",
    "full_name": "string",
    "identity_url": "string",
    "is_admin": "boolean",
    "is_active": "boolean",
    "is_invited": "boolean",
    "prefs": "Hash",
    "username": "string",
    "can_write": "boolean",
    "can_manage": "boolean",
    "writable_by": "Array",
}
KEEP_SERVICE_FIELDS = {
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
TOKEN_FIELDS = {
    "uuid": "string",
    "etag": "string",
    "owner_uuid": "string",
    "api_token": "string",
    "expires_at": "datetime",
    "scopes": "Array",
    "created_at": "datetime",
    "modified_at": "datetime",
}

# uuid infix -> (kind, table); services/api/app/models/*.rb uuid_prefix
INFIXES = {
    "4zz18": ("arvados#collection", "collections"),
    "j7d0g": ("arvados#group", "groups"),
    "o0j2j": ("arvados#link", "links"),
    "tpzed": ("arvados#user", "users"),
    "gj3su": ("arvados#apiClientAuthorization", "api_client_authorizations"),
    "bi6l4": ("arvados#keepService", "keep_services"),
    "xvhdp": ("arvados#containerRequest", "container_requests"),
    "7fd4e": ("arvados#workflow", "workflows"),
}
KIND_INFIX = {kind: infix for infix, (kind, _) in INFIXES.items()}
TABLE_FIELDS = {
    "collections": COLLECTION_FIELDS,
    "groups": GROUP_FIELDS,
    "links": LINK_FIELDS,
    "users": USER_FIELDS,
}
_UUID_CHARS = string.ascii_lowercase + string.digits


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def parse_time(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC time (``2024-01-02T03:04:05.123Z``, or a date)."""
    text = stamp.strip().removesuffix("Z").removesuffix("+00:00")
    head, _, fraction = text.partition(".")
    if "T" not in head and " " not in head:
        head += "T00:00:00"
    head = head.replace(" ", "T")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + (
        float("0." + fraction) if fraction else 0.0
    )


def new_uuid(cluster_id: str, infix: str) -> str:
    return f"{cluster_id}-{infix}-" + "".join(secrets.choice(_UUID_CHARS) for _ in range(15))


def infix_of(uuid: object) -> str:
    return uuid[6:11] if isinstance(uuid, str) and len(uuid) == 27 else ""


def kind_of(uuid: object) -> str | None:
    entry = INFIXES.get(infix_of(uuid))
    return entry[0] if entry else None


def _common(uuid: str, owner_uuid: str, by: str, now: float | None) -> dict:
    stamp = rfc3339(time.time() if now is None else now)
    return {
        "uuid": uuid,
        "etag": secrets.token_hex(12),
        "owner_uuid": owner_uuid,
        "created_at": stamp,
        "modified_at": stamp,
        "modified_by_user_uuid": by,
    }


def user_record(
    uuid: str, first_name: str, last_name: str, owner_uuid: str, is_admin: bool = False, now: float = 0
) -> dict:
    username = (first_name + last_name).lower().replace(" ", "")
    return {
        "kind": "arvados#user",
        **_common(uuid, owner_uuid, owner_uuid, now),
        "etag": "",
        "email": f"{username}@{uuid[:5]}.example",
        "username": username,
        "first_name": first_name,
        "last_name": last_name,
        "full_name": f"{first_name} {last_name}",
        "identity_url": "",
        "is_active": True,
        "is_admin": is_admin,
        "is_invited": True,
        "prefs": {},
    }


def group_record(
    uuid: str,
    owner_uuid: str,
    name: str,
    group_class: str,
    by: str,
    properties: dict | None = None,
    description: str | None = None,
    now: float | None = None,
) -> dict:
    return {
        "kind": "arvados#group",
        **_common(uuid, owner_uuid, by, now),
        "name": name,
        "group_class": group_class,
        "description": description,
        "trash_at": None,
        "is_trashed": False,
        "delete_at": None,
        "properties": dict(properties or {}),
        "frozen_by_uuid": None,
    }


def link_record(
    uuid: str,
    owner_uuid: str,
    link_class: str,
    name: str,
    head_uuid: str,
    tail_uuid: str | None,
    by: str,
    properties: dict | None = None,
    now: float | None = None,
) -> dict:
    return {
        "kind": "arvados#link",
        **_common(uuid, owner_uuid, by, now),
        "tail_uuid": tail_uuid,
        "link_class": link_class,
        "name": name,
        "head_uuid": head_uuid,
        "properties": dict(properties or {}),
    }
