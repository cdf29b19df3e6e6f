"""``arvados/v1/collections``: get, list, create, update, trash, untrash.

Follows ``services/api/app/controllers/arvados/v1/collections_controller.rb``,
``models/collection.rb`` and ``lib/controller/localdb/collection.go``:

- get by UUID: another cluster's uuid is forwarded (`federation`); a local one is
  answered if the caller may read it (old versions too, trashed ones with
  ``include_trash=true``), else 404. Get by PDH: any readable collection with that
  ``hash+size`` (the answer's ``uuid`` is the PDH), then the federation fan-out.
- list: readable collections, trashed ones and old versions (``uuid !=
  current_version_uuid``) left out unless ``include_trash``/``include_old_versions``;
  ``manifest_text`` only when selected; the federated list rules of `routing`.
- create (``cluster_id`` routes it) and update (routed by uuid): attributes flat in the
  JSON body, under ``collection``, or in a form field ``collection=<json>``. Every block
  must carry a ``+A`` valid for the caller (Rails ``check_signatures``, else 403), and
  ``+A`` is stripped before storing. ``owner_uuid`` (default: the caller) must be a user
  or project the caller can write (403). Names are unique per owner (422, or a
  timestamp is appended with ``ensure_unique_name``); ``/`` is refused when the cluster's
  ``ForwardSlashNameSubstitution`` is empty, ``.`` and ``..`` always. Update needs write
  permission (403) and keeps old versions as `model.Cluster.update_collection` says.
- ``DELETE`` and ``POST .../trash`` set ``trash_at`` to now; ``POST .../untrash`` clears it.

Every manifest returned is signed for the request's token exactly as received
(``signCollection``), except a trashed collection's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from . import federation, signing
from .errors import ApiFailure
from .filters import ListOptions, list_page
from .httpbase import Response
from .manifests import PDH_ID_RE
from .permissions import WRITE
from .records import COLLECTION_FIELDS, rfc3339
from .routing import dispatch, elsewhere, listing, trash_routes

if TYPE_CHECKING:
    from .controller import ControllerHandler

_CREATE_ATTRS = (
    "name",
    "owner_uuid",
    "manifest_text",
    "properties",
    "description",
    "replication_desired",
    "storage_classes_desired",
    "trash_at",
    "delete_at",
    "preserve_version",
)


def route(req: ControllerHandler, parts: list[str]) -> Response | None:
    return dispatch(
        req,
        parts,
        {
            ("GET", ""): listing(local_list, "arvados#collectionList"),
            ("POST", ""): create,
            ("GET", "{uuid}"): get,
            ("PUT", "{uuid}"): update,
            **trash_routes(trash),
        },
    )


def get(req: ControllerHandler, cid: str) -> Response:
    world, cluster = req.server.world, req.cluster
    if len(cid) == 27:
        if cid[:5] != cluster.id and cid[:5] in world.clusters and "forwarded_for" not in req.params:
            return req.forward(cid[:5])
        record = cluster.collections.get(cid)
        if record is None or not req.access().readable(record, req.params.get("include_trash") == "true"):
            raise ApiFailure(404, f"Object not found: {cid}")
        return Response.json(200, req.select(req.signed(record)))
    if len(cid) < 34 or cid[32] != "+" or not PDH_ID_RE.match(cid):
        raise ApiFailure(404, f"Object not found: {cid}")
    try:
        return Response.json(200, req.select(req.signed(local_pdh(req, cid))))
    except ApiFailure as failure:
        if failure.status != 404 or "forwarded_for" in req.params:
            raise
    status, obj = federation.fan_out_pdh(world, cluster, cid, req.token_received or "", req.forward_params())
    return Response.json(status, obj)


def local_pdh(req: ControllerHandler, pdh: str) -> dict:
    access = req.access()
    key = PDH_ID_RE.match(pdh)
    matches = [
        c
        for c in req.cluster.all_collections()
        if key and c["portable_data_hash"] == key.group(0) and access.readable(c)
    ]
    if not matches:
        raise ApiFailure(404, f"Object not found: {pdh}")
    record = max(matches, key=lambda c: c["trash_at"] or "9999")
    return {
        "kind": "arvados#collection",
        "uuid": record["portable_data_hash"],
        "etag": "",
        "owner_uuid": "",
        "created_at": None,
        "modified_at": None,
        "modified_by_user_uuid": "",
        "name": "",
        "description": "",
        "properties": None,
        "portable_data_hash": record["portable_data_hash"],
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


def readable_rows(req: ControllerHandler, opts: ListOptions) -> list[dict]:
    access = req.access()
    return [
        c
        for c in req.cluster.all_collections()
        if access.readable(c, opts.include_trash)
        and (opts.include_old_versions or c["current_version_uuid"] == c["uuid"])
    ]


def local_list(req: ControllerHandler, opts: ListOptions) -> dict:
    requested = opts.select
    if requested is None:
        opts = replace(
            opts,
            select=[k for k in COLLECTION_FIELDS if k not in ("manifest_text", "unsigned_manifest_text")],
        )

    def present(record: dict) -> dict:
        out = req.signed(record)
        if "unsigned_manifest_text" in (opts.select or ()):
            out["unsigned_manifest_text"] = signing.strip_signatures(record["manifest_text"] or "")
        return out

    max_items = req.cluster.profile.max_items_per_response
    return list_page(
        readable_rows(req, opts), "collections", COLLECTION_FIELDS, opts, max_items, present, "Collection"
    )


def check_signatures(req: ControllerHandler, manifest: str) -> None:
    """Rails check_signatures: every non-empty block needs a +A valid for the caller (else 403)."""
    c = req.cluster
    for tok in signing.block_tokens(manifest):
        if tok.startswith("d41d8cd98f00b204e9800998ecf8427e+0") and "+A" not in tok:
            continue
        if signing.verify_locator(tok, req.token_received or "", c.signing_key, c.ttl) is not None:
            raise ApiFailure(403, f"Forbidden: invalid or missing permission signature on locator {tok[:34]}")


def create(req: ControllerHandler) -> Response:
    if (answer := elsewhere(req, req.params.get("cluster_id"))) is not None:
        return answer
    identity = req.identity()
    attrs = req.resource_attrs("collection")
    manifest = attrs.get("manifest_text") or ""
    if not isinstance(manifest, str):
        raise ApiFailure(422, "manifest_text must be a string")
    check_signatures(req, manifest)
    cluster = req.cluster
    owner = attrs.get("owner_uuid") or identity["user_uuid"]
    req.check_owner(owner)
    name = attrs.get("name") or f"New collection ({rfc3339(time.time())})"
    name = unique_name(req, owner, name, _taken_names(req, owner))
    extra = {k: v for k, v in attrs.items() if k in _CREATE_ATTRS and k not in ("name", "manifest_text")}
    extra["owner_uuid"] = owner
    record = cluster.add_collection(name, manifest, modified_by_user_uuid=identity["user_uuid"], **extra)
    return Response.json(200, req.select(req.signed(record)))


def _taken_names(req: ControllerHandler, owner: str) -> set[str]:
    return {
        c["name"]
        for c in req.cluster.all_collections()
        if c["owner_uuid"] == owner and c["current_version_uuid"] == c["uuid"] and not c["is_trashed"]
    }


def unique_name(req: ControllerHandler, owner: str, name: object, taken: set[str]) -> str:
    """`name` checked as ensure_filesystem_compatible_name does, made unique if asked."""
    if not isinstance(name, str):
        raise ApiFailure(422, "name must be a string")
    if name in (".", ".."):
        raise ApiFailure(422, "Name cannot be '.' or '..'")
    if "/" in name and not req.cluster.profile.forward_slash_name_substitution:
        raise ApiFailure(422, "Name cannot contain a '/' character")
    if name in taken:
        if req.params.get("ensure_unique_name") not in ("true", "1", "True"):
            raise ApiFailure(422, "Name has already been taken")
        name = f"{name} ({rfc3339(time.time())})"
    return name


def _local_record(req: ControllerHandler, uuid: str, include_trash: bool = False) -> dict:
    record = req.cluster.collections.get(uuid)
    if record is None or not req.access().readable(record, include_trash):
        raise ApiFailure(404, f"Object not found: {uuid}")
    if req.access().level(record) < WRITE:
        raise ApiFailure(403, f"Forbidden: {uuid} is not writable by {req.identity()['user_uuid']}")
    return record


def update(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    record = _local_record(req, uuid)
    attrs = {k: v for k, v in req.resource_attrs("collection").items() if k in _CREATE_ATTRS}
    if "manifest_text" in attrs:
        check_signatures(req, attrs["manifest_text"] or "")
    owner = attrs.get("owner_uuid", record["owner_uuid"])
    if owner != record["owner_uuid"]:
        req.check_owner(owner)
    if "name" in attrs and (attrs["name"] != record["name"] or owner != record["owner_uuid"]):
        attrs["name"] = unique_name(req, owner, attrs["name"], _taken_names(req, owner) - {record["name"]})
    return Response.json(200, req.select(req.signed(req.cluster.update_collection(uuid, attrs))))


def trash(req: ControllerHandler, uuid: str, untrash: bool) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    record = _local_record(req, uuid, include_trash=True)
    if untrash:
        attrs = {"trash_at": None, "delete_at": None, "is_trashed": False}
    elif record["is_trashed"]:
        return Response.json(200, req.select(record))
    else:
        attrs = {"trash_at": rfc3339(time.time()), "is_trashed": True}
    return Response.json(200, req.select(req.signed(req.cluster.update_collection(uuid, attrs))))
