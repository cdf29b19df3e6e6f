"""``arvados/v1/groups``: projects, filter groups and roles; ``contents`` and ``shared``.

Follows ``services/api/app/controllers/arvados/v1/groups_controller.rb``,
``models/group.rb`` and ``lib/controller/localdb/group.go``:

- get / list / create / update / delete (= trash) / trash / untrash, routed as `routing`
  says. A project or filter group is owned by a user or a project the caller can write;
  its name is unique among the projects and filter groups of its owner, never ``.`` or
  ``..``, and has no ``/`` unless ``ForwardSlashNameSubstitution`` is set. A filter group
  needs ``properties.filters``: 3-element filters whose attribute is ``uuid`` or
  ``table.column``. A role is owned by the system user and its creator can manage it.
  Answers carry the caller's ``can_write``, ``can_manage`` and ``writable_by``.
- ``contents`` (``groups/contents?uuid=X`` or ``groups/X/contents``): X is a project, a
  filter group or a user (the "home project": what the user owns here). The searched
  tables are groups (only projects and filter groups) then collections, each ordered and
  filtered separately and concatenated in that order, as ``load_searchable_objects``
  does: a filter or order on ``table.column`` applies to that table only, an unqualified
  one to every table (an attribute a table lacks is 422); ``uuid is_a`` filters choose
  the tables; ``limit`` is shared (``count=none`` stops as soon as it is reached),
  ``offset`` carries over from table to table. Collections come without
  ``manifest_text``; trashed objects and old versions are left out unless asked. A filter
  group's contents are everything readable that its ``properties.filters`` (added to the
  request's) select, with no owner restriction, so a filter group can contain itself.
  ``include=["owner_uuid"]`` adds the readable owners of the page as ``included``.
- ``shared``: readable groups not reachable by ownership from the caller (the owner is
  another user, or a group the caller cannot read, or a group that is not a project,
  ``exclude_home``), with ``include=owner_uuid`` for their owners.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from . import users
from .collections import readable_rows as readable_collections
from .collections import unique_name
from .errors import ApiFailure
from .filters import (
    ListOptions,
    effective_limit,
    list_body,
    list_page,
    matcher,
    order_specs,
    selected,
    sort_records,
)
from .httpbase import Response
from .permissions import MANAGE, READ, WRITE, is_user
from .records import COLLECTION_FIELDS, GROUP_FIELDS, INFIXES, KIND_INFIX, group_record, new_uuid, rfc3339
from .routing import dispatch, elsewhere, listing, trash_routes

if TYPE_CHECKING:
    from .controller import ControllerHandler

_USER_UUID_RE = re.compile(r"^[0-9a-z]{5}-tpzed-[0-9a-z]{15}$")
_SKIPPABLE = re.compile(
    r"Invalid attribute '.+' for operator '.+' in filter|Invalid attribute '.+' for subproperty filter"
)
_CONTENTS_TABLES = ("groups", "collections")
_FILTER_TABLES = ("groups", "collections", "container_requests", "workflows", "container", "collection")
_FILTER_OPERATORS = (
    "=",
    "<",
    "<=",
    ">",
    ">=",
    "!=",
    "like",
    "ilike",
    "in",
    "not in",
    "is_a",
    "exists",
    "contains",
)
_ATTRS = ("name", "group_class", "owner_uuid", "description", "properties", "trash_at", "delete_at")
_FIELDS = {"groups": GROUP_FIELDS, "collections": COLLECTION_FIELDS}


def route(req: ControllerHandler, parts: list[str]) -> Response | None:
    return dispatch(
        req,
        parts,
        {
            ("GET", ""): listing(local_list, "arvados#groupList"),
            ("POST", ""): create,
            ("GET", "contents"): lambda req: contents(req, req.params.get("uuid") or ""),
            ("GET", "shared"): shared,
            ("GET", "{uuid}/contents"): contents,
            ("GET", "{uuid}"): get,
            ("PUT", "{uuid}"): update,
            **trash_routes(trash),
        },
    )


def present(req: ControllerHandler, group: dict) -> dict:
    access = req.access()
    level = access.level(group)
    out = dict(group)
    out["can_write"] = level >= (MANAGE if group["group_class"] == "role" else WRITE)
    out["can_manage"] = level >= MANAGE
    out["writable_by"] = [group["owner_uuid"]] + ([access.user_uuid] if out["can_write"] else [])
    return out


def _readable(req: ControllerHandler, uuid: str, include_trash: bool = False) -> dict:
    group = req.cluster.groups.get(uuid)
    if group is None or not req.access().readable(group, include_trash):
        raise ApiFailure(404, f"Object not found: {uuid}")
    return group


def get(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    group = _readable(req, uuid, req.options().include_trash)
    return Response.json(200, selected(present(req, group), req.options().select))


def local_list(req: ControllerHandler, opts: ListOptions) -> dict:
    access = req.access()
    rows = [g for g in req.cluster.rows("groups") if access.readable(g, opts.include_trash)]
    return _group_page(req, rows, opts)


def _group_page(req: ControllerHandler, rows: list[dict], opts: ListOptions) -> dict:
    max_items = req.cluster.profile.max_items_per_response
    return list_page(rows, "groups", GROUP_FIELDS, opts, max_items, lambda g: present(req, g), "Group")


# --- create, update, trash ------------------------------------------------------------------


def _check_filters(properties: object) -> None:
    filters = properties.get("filters") if isinstance(properties, dict) else None
    if not isinstance(filters, list):
        raise ApiFailure(422, "Properties filters property must be an array of arrays, each with 3 elements")
    for f in filters:
        if not isinstance(f, list) or len(f) != 3 or not all(isinstance(x, str) for x in f[:2]):
            raise ApiFailure(
                422, "Properties filters property must be an array of arrays, each with 3 elements"
            )
        if "." not in f[0] and f[0].lower() != "uuid":
            raise ApiFailure(
                422, "Properties filter attribute must be 'uuid' or contain a dot (e.g. groups.name)"
            )
        if f[0].lower() != "uuid" and f[1].lower() == "is_a":
            raise ApiFailure(422, "Properties when filter operator is 'is_a', attribute must be 'uuid'")
        if f[1].lower() not in _FILTER_OPERATORS:
            raise ApiFailure(422, "Properties filter operator is not valid")


def _sibling_names(req: ControllerHandler, owner: str, exclude: str = "") -> set[str]:
    return {
        g["name"]
        for g in req.cluster.rows("groups")
        if g["owner_uuid"] == owner and g["group_class"] in ("project", "filter") and g["uuid"] != exclude
    }


def create(req: ControllerHandler) -> Response:
    if (answer := elsewhere(req, req.params.get("cluster_id"))) is not None:
        return answer
    identity = req.identity()
    cluster = req.cluster
    attrs = {k: v for k, v in req.resource_attrs("group").items() if k in _ATTRS}
    group_class = attrs.get("group_class")
    if group_class not in ("project", "role", "filter"):
        raise ApiFailure(
            422, f"Group class value must be one of 'project', 'role' or 'filter', was '{group_class}'"
        )
    properties = attrs.get("properties") or {}
    if group_class == "filter":
        _check_filters(properties)
    name = attrs.get("name") or f"New {group_class} ({rfc3339(time.time())})"
    if group_class == "role":
        owner = cluster.system_user_uuid
    else:
        owner = attrs.get("owner_uuid") or identity["user_uuid"]
        req.check_owner(owner)
        name = unique_name(req, owner, name, _sibling_names(req, owner))
    record = group_record(
        new_uuid(cluster.id, "j7d0g"),
        owner,
        name,
        group_class,
        identity["user_uuid"],
        properties,
        attrs.get("description"),
    )
    cluster.store(record)
    if group_class == "role":
        from .accounts import permit

        permit(cluster, identity["user_uuid"], "can_manage", record["uuid"])
    return Response.json(200, selected(present(req, record), req.options().select))


def _writable(req: ControllerHandler, uuid: str, include_trash: bool = False) -> dict:
    group = _readable(req, uuid, include_trash)
    needed = MANAGE if group["group_class"] == "role" else WRITE
    if req.access().level(group) < needed:
        raise ApiFailure(403, f"Forbidden: {uuid} is not writable by {req.identity()['user_uuid']}")
    return group


def update(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    group = _writable(req, uuid)
    attrs = {k: v for k, v in req.resource_attrs("group").items() if k in _ATTRS}
    if "group_class" in attrs and attrs["group_class"] != group["group_class"]:
        raise ApiFailure(422, "Group class cannot be modified after record is created")
    owner = attrs.get("owner_uuid", group["owner_uuid"])
    if owner != group["owner_uuid"]:
        req.check_owner(owner)
        if owner == uuid or owner in _descendants(req, uuid):
            raise ApiFailure(422, "Owner uuid cannot be the group itself or a group inside it")
    if group["group_class"] != "role" and ("name" in attrs or owner != group["owner_uuid"]):
        attrs["name"] = unique_name(
            req, owner, attrs.get("name", group["name"]), _sibling_names(req, owner, uuid)
        )
    if group["group_class"] == "filter" and "properties" in attrs:
        _check_filters(attrs["properties"])
    record = {
        **group,
        **attrs,
        "modified_at": rfc3339(time.time()),
        "modified_by_user_uuid": req.identity()["user_uuid"],
    }
    return Response.json(200, selected(present(req, req.cluster.store(record)), req.options().select))


def trash(req: ControllerHandler, uuid: str, untrash: bool) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    group = _writable(req, uuid, include_trash=True)
    if untrash:
        attrs = {"trash_at": None, "delete_at": None, "is_trashed": False}
    else:
        attrs = {"trash_at": group["trash_at"] or rfc3339(time.time()), "is_trashed": True}
    return Response.json(200, present(req, req.cluster.store({**group, **attrs})))


def _descendants(req: ControllerHandler, uuid: str) -> set[str]:
    groups = req.cluster.rows("groups")
    found: set[str] = set()
    frontier = {uuid}
    while frontier:
        frontier = {
            g["uuid"] for g in groups if g["owner_uuid"] in frontier and g["group_class"] == "project"
        } - found
        found |= frontier
    return found


# --- contents and shared --------------------------------------------------------------------


def contents(req: ControllerHandler, uuid: str) -> Response:
    cluster_id = req.params.get("cluster_id")
    if cluster_id or not _USER_UUID_RE.match(uuid):
        if (answer := elsewhere(req, cluster_id or uuid)) is not None:
            return answer
    opts = req.options()
    owner: str | None = None
    filters = list(opts.filters)
    if uuid:
        group = req.cluster.groups.get(uuid)
        if group is not None and req.access().readable(group, opts.include_trash):
            if group["group_class"] == "filter":
                filters += group["properties"].get("filters", [])
            else:
                owner = uuid
        elif uuid in req.cluster.users:
            owner = uuid
        else:
            raise ApiFailure(404, f"Object not found: {uuid}")
        if req.params.get("exclude_home_project") in ("true", "1"):
            raise ApiFailure(422, "Cannot use 'exclude_home_project' with a parent object")
    owners = (
        None
        if owner is None
        else {owner} | (_descendants(req, owner) if req.params.get("recursive") == "true" else set())
    )
    return Response.json(200, _search(req, replace(opts, filters=filters), owners))


def _search(req: ControllerHandler, opts: ListOptions, owners: set[str] | None) -> dict:
    for f in opts.filters:
        if isinstance(f, list) and f and isinstance(f[0], str) and "." in f[0]:
            if f[0].split(".", 1)[0] not in _FILTER_TABLES:
                raise ApiFailure(422, f"Invalid attribute '{f[0]}' in filter")
    wanted = set()
    for f in opts.filters:
        if isinstance(f, list) and len(f) == 3 and f[1] == "is_a":
            wanted |= {
                INFIXES.get(KIND_INFIX.get(k, "") if isinstance(k, str) else "", ("", ""))[1]
                for k in (f[2] if isinstance(f[2], list) else [f[2]])
            }
    if opts.select is not None:
        known = set(GROUP_FIELDS) | set(COLLECTION_FIELDS)
        for name in opts.select:
            if name.split(".", 1)[-1] not in known:
                raise ApiFailure(422, f"Invalid attribute '{name}' in select")
    limit_all = effective_limit(opts, req.cluster.profile.max_items_per_response)
    offset, available = opts.offset, 0
    items: list[dict] = []
    owner_uuids: set[str] = set()
    errors: list[str] = []
    succeeded = False
    for table in _CONTENTS_TABLES:
        if wanted and table not in wanted:
            continue
        if opts.count == "none" and len(items) >= limit_all:
            break
        fields = _FIELDS[table]
        try:
            predicate = matcher(_for_table(opts.filters, table), table, fields)
        except ApiFailure as failure:
            if _SKIPPABLE.search(str(failure)):
                errors.append(f"{failure} on object type {table}")
                continue
            raise
        succeeded = True
        rows = _candidates(req, table, opts, owners)
        orders = [o for o in opts.order if "." not in o.split(" ")[0] or o.startswith(table + ".")]
        matched = sort_records([r for r in rows if predicate(r)], order_specs(orders, table, fields))
        page = matched[offset : offset + limit_all - len(items)]
        offset = max(offset - len(matched), 0)
        available += len(matched)
        select = _select_for(opts.select, table)
        items += [selected(_present(req, table, r), select) for r in page]
        owner_uuids |= {r["owner_uuid"] for r in page}
    if not succeeded and errors:
        raise ApiFailure(422, "\n".join(errors))
    body = list_body("arvados#objectList", items, opts, limit_all, available)
    if opts.include:
        body["included"] = _owners(req, owner_uuids, opts) if "owner_uuid" in opts.include else []
    return body


def _for_table(filters: list, table: str) -> list:
    out = []
    for f in filters:
        if isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and "." in f[0]:
            prefix, rest = f[0].split(".", 1)
            if prefix in _FILTER_TABLES:
                if prefix == table:
                    out.append([rest, f[1], f[2]])
                continue
        out.append(f)
    return out


def _select_for(select: list[str] | None, table: str) -> list[str] | None:
    fields = _FIELDS[table]
    if select is None:
        return (
            [k for k in fields if k not in ("manifest_text", "unsigned_manifest_text")]
            if table == "collections"
            else None
        )
    chosen = []
    for name in select:
        prefix, _, rest = name.rpartition(".")
        column = rest if prefix == table else name
        if column in fields and column != "manifest_text":
            chosen.append(column)
    return chosen


def _candidates(req: ControllerHandler, table: str, opts: ListOptions, owners: set[str] | None) -> list[dict]:
    if table == "collections":
        rows = readable_collections(req, opts)
    else:
        access = req.access()
        rows = [
            g
            for g in req.cluster.rows("groups")
            if g["group_class"] in ("project", "filter") and access.readable(g, opts.include_trash)
        ]
    return rows if owners is None else [r for r in rows if r["owner_uuid"] in owners]


def _present(req: ControllerHandler, table: str, record: dict) -> dict:
    return present(req, record) if table == "groups" else record


def _owners(req: ControllerHandler, uuids: set[str], opts: ListOptions) -> list[dict]:
    access = req.access()
    select = None if opts.select is None else [s for s in opts.select if s != "manifest_text"]
    out = []
    for uuid in sorted(uuids):
        record = req.cluster.find(uuid)
        if record is None or uuid[6:11] not in ("j7d0g", "tpzed") or not access.readable(record):
            continue
        out.append(
            selected(present(req, record) if uuid[6:11] == "j7d0g" else users.present(req, record), select)
        )
    return out


def shared(req: ControllerHandler) -> Response:
    if (answer := elsewhere(req, req.params.get("cluster_id"))) is not None:
        return answer
    opts = req.options()
    access = req.access()
    cluster = req.cluster

    def outside_home(group: dict) -> bool:
        owner = group["owner_uuid"]
        if is_user(owner):
            return owner != access.user_uuid and owner in cluster.users
        parent = cluster.groups.get(owner)
        return access.own.get(owner, 0) < READ or (parent is not None and parent["group_class"] != "project")

    rows = [g for g in cluster.rows("groups") if access.readable(g, opts.include_trash) and outside_home(g)]
    body = _group_page(req, rows, opts)
    items = body["items"]
    owners = {cluster.groups[i["uuid"]]["owner_uuid"] for i in items if i.get("uuid") in cluster.groups}
    body["included"] = _owners(req, owners, opts) if "owner_uuid" in opts.include else []
    return Response.json(200, body)
