"""``arvados/v1/links``: permission and tag links; get, list, create, update, delete.

Follows ``services/api/app/controllers/arvados/v1/links_controller.rb`` and
``models/link.rb``:

- a permission link (``can_read``, ``can_write``, ``can_manage``, ``can_login``) needs an
  existing head the caller can read (else 422, "not found") and manage (else 403), and a
  user or role as tail; it is owned by the system user. Creating one where a link
  already joins the same tail and head upgrades it when the new level is higher, and
  returns the existing one otherwise.
  Its effect on what everyone may read is `permissions`.
- any other link (``tag``, ...) is owned by its creator, and its head must be readable
  by the caller (422 otherwise). arv-mount's ``by_tag/`` reads tag links:
  ``link_class=tag``, ``name`` the tag, ``head_uuid`` the collection.
- list: readable links, with every list feature (``select`` + ``distinct`` is how
  ``by_tag/`` gets the tag names); old-style ``head_kind``/``tail_kind`` filters become
  ``is_a``. Answers carry ``head_kind`` and ``tail_kind``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import accounts
from .errors import ApiFailure
from .filters import ListOptions, list_page, selected
from .httpbase import Response
from .permissions import LEVELS, MANAGE, WRITE
from .records import LINK_FIELDS, infix_of, kind_of, link_record, new_uuid, rfc3339
from .routing import dispatch, elsewhere, listing

if TYPE_CHECKING:
    from .controller import ControllerHandler

_ATTRS = ("link_class", "name", "head_uuid", "tail_uuid", "properties", "owner_uuid")


def route(req: ControllerHandler, parts: list[str]) -> Response | None:
    return dispatch(
        req,
        parts,
        {
            ("GET", ""): listing(local_list, "arvados#linkList"),
            ("POST", ""): create,
            ("GET", "{uuid}"): get,
            ("PUT", "{uuid}"): update,
            ("DELETE", "{uuid}"): delete,
        },
    )


def present(link: dict) -> dict:
    return {**link, "head_kind": kind_of(link["head_uuid"]), "tail_kind": kind_of(link["tail_uuid"])}


def local_list(req: ControllerHandler, opts: ListOptions) -> dict:
    filters = []
    for f in opts.filters:
        if isinstance(f, list) and len(f) == 3 and f[0] in ("head_kind", "tail_kind") and f[1] == "=":
            f = [f[0].replace("_kind", "_uuid"), "is_a", f[2]]
        filters.append(f)
    opts.filters = filters
    access = req.access()
    rows = [link for link in req.cluster.rows("links") if access.readable(link)]
    return list_page(
        rows, "links", LINK_FIELDS, opts, req.cluster.profile.max_items_per_response, present, "Link"
    )


def _readable(req: ControllerHandler, uuid: str) -> dict:
    link = req.cluster.links.get(uuid)
    if link is None or not req.access().readable(link):
        raise ApiFailure(404, f"Object not found: {uuid}")
    return link


def get(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    return Response.json(200, selected(present(_readable(req, uuid)), req.options().select))


def create(req: ControllerHandler) -> Response:
    if (answer := elsewhere(req, req.params.get("cluster_id"))) is not None:
        return answer
    identity = req.identity()
    cluster, access = req.cluster, req.access()
    attrs = {k: v for k, v in req.resource_attrs("link").items() if k in _ATTRS}
    link_class, name = attrs.get("link_class"), attrs.get("name")
    head, tail = attrs.get("head_uuid"), attrs.get("tail_uuid")
    if not isinstance(link_class, str) or not link_class:
        raise ApiFailure(422, "Link class can't be blank")
    head_record = cluster.find(head)
    if link_class == "permission":
        if name not in LEVELS:
            raise ApiFailure(
                422, f"Name '{name}' is not a permission: can_read, can_write, can_manage or can_login"
            )
        if head_record is None or not access.readable(head_record):
            raise ApiFailure(422, f"Head uuid {head} does not exist or is not readable")
        if access.level(head_record) < MANAGE:
            raise ApiFailure(403, f"Forbidden: {identity['user_uuid']} cannot manage {head}")
        if infix_of(tail) not in ("tpzed", "j7d0g") or (
            infix_of(tail) == "j7d0g" and cluster.groups.get(tail, {}).get("group_class") != "role"
        ):
            raise ApiFailure(422, "Tail uuid must be a user or a role")
        for existing in cluster.rows("links"):
            if (existing["link_class"], existing["tail_uuid"], existing["head_uuid"]) == (
                "permission",
                tail,
                head,
            ) and existing["name"] in LEVELS:
                if LEVELS[name] > LEVELS[existing["name"]]:
                    existing = cluster.store({**existing, "name": name, "modified_at": rfc3339(time.time())})
                return Response.json(200, selected(present(existing), req.options().select))
        record = accounts.permit(cluster, tail, name, head)
        return Response.json(200, selected(present(record), req.options().select))
    if head_record is None or not access.readable(head_record):
        raise ApiFailure(422, f"Head uuid {head} not found or not readable")
    owner = attrs.get("owner_uuid") or identity["user_uuid"]
    req.check_owner(owner)
    record = link_record(
        new_uuid(cluster.id, "o0j2j"),
        owner,
        link_class,
        name or "",
        head,
        tail,
        identity["user_uuid"],
        attrs.get("properties"),
    )
    return Response.json(200, selected(present(cluster.store(record)), req.options().select))


def _writable(req: ControllerHandler, uuid: str) -> dict:
    link = _readable(req, uuid)
    access = req.access()
    if link["link_class"] == "permission":
        head = req.cluster.find(link["head_uuid"])
        allowed = head is not None and access.level(head) >= MANAGE
    else:
        allowed = access.level(link) >= WRITE
    if not allowed:
        raise ApiFailure(403, f"Forbidden: {uuid} is not writable by {req.identity()['user_uuid']}")
    return link


def update(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    link = _writable(req, uuid)
    attrs = {
        k: v
        for k, v in req.resource_attrs("link").items()
        if k in ("name", "properties", "head_uuid", "tail_uuid")
    }
    if link["link_class"] == "permission" and "name" in attrs and attrs["name"] not in LEVELS:
        raise ApiFailure(422, f"Name '{attrs['name']}' is not a permission")
    record = {
        **link,
        **attrs,
        "modified_at": rfc3339(time.time()),
        "modified_by_user_uuid": req.identity()["user_uuid"],
    }
    return Response.json(200, selected(present(req.cluster.store(record)), req.options().select))


def delete(req: ControllerHandler, uuid: str) -> Response:
    if (answer := elsewhere(req, uuid)) is not None:
        return answer
    link = _writable(req, uuid)
    req.cluster.remove(uuid)
    return Response.json(200, present(link))
