"""Which cluster answers a request: the controller's federation rules for every resource.

Follows ``lib/controller/federation/conn.go`` and ``list.go``:

- `choose_backend`: a 27-character uuid picks the cluster of its first 5 characters, a
  5-character id names a cluster; anything else (a PDH, a bogus id, an unknown cluster)
  is local. Gets, updates and deletes go to the object's cluster; creates, and
  ``groups.shared``, to ``cluster_id`` (local without it); ``groups.contents`` to
  ``cluster_id``, else local for a user uuid ("the things they own on the local
  cluster"), else the group's cluster.
- `federated_list` (``splitListRequest``) for ``*.list``: ``bypass_federation`` or
  ``forwarded_for`` -> local; ``cluster_id`` -> that cluster; no ``uuid =``/``uuid in``
  filter, or only local uuids -> local; otherwise the filters must be nothing but
  ``uuid =``/``uuid in`` (else 400 "cannot execute federated list query: each filter must be
  either 'uuid = ...' or 'uuid in [...]'"), with ``count=none`` (else 400), no limit below
  the number of uuids, no offset, no order (else 400) and no more uuids than
  ``MaxItemsPerResponse`` (else 400). Then each cluster is asked for its uuids (``uuid in
  [...]``, ``count=none``, ``select`` with ``uuid`` added, ``forwarded_for=<self>-``), page
  after page until every uuid came back or a page is empty; a remote error is 502. The
  pages are merged and, when more than one cluster answered, sorted by ``modified_at
  desc``; the caller's ``select`` applies to the merged items.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ApiFailure
from .filters import ListOptions, selected
from .httpbase import Response

if TYPE_CHECKING:
    from .controller import ControllerHandler

LocalList = Callable[[ListOptions], dict]
_FEDERATED = "cannot execute federated list query"


def dispatch(
    req: ControllerHandler, parts: list[str], routes: dict[tuple[str, str], Callable]
) -> Response | None:
    """Call the route matching the method and the path after the resource name.

    A route's shape is ``""`` (the resource itself), a fixed name (``"contents"``), or
    ``{uuid}`` with an optional fixed tail (``"{uuid}/trash"``); the uuid is passed to the
    route. ``PATCH`` is ``PUT``. Routes are tried in order, so fixed names go first.
    """
    rest = parts[1:]
    method = "PUT" if req.method == "PATCH" else req.method
    for (want, shape), handler in routes.items():
        pattern = shape.split("/") if shape else []
        if want != method or len(pattern) != len(rest):
            continue
        args = [r for p, r in zip(pattern, rest, strict=True) if p == "{uuid}"]
        if all(p in ("{uuid}", r) for p, r in zip(pattern, rest, strict=True)):
            return handler(req, *args)
    return None


def listing(local: Callable[[ControllerHandler, ListOptions], dict], kind: str) -> Callable:
    """The route of a resource's ``list``: `local` answers for this cluster (`federated_list`)."""
    return lambda req: federated_list(req, lambda opts: local(req, opts), kind)


def trash_routes(trash: Callable[..., Response]) -> dict[tuple[str, str], Callable]:
    """``DELETE``, ``POST .../trash`` and ``POST .../untrash`` of a trashable resource."""
    return {
        ("DELETE", "{uuid}"): lambda req, uuid: trash(req, uuid, untrash=False),
        ("POST", "{uuid}/trash"): lambda req, uuid: trash(req, uuid, untrash=False),
        ("POST", "{uuid}/untrash"): lambda req, uuid: trash(req, uuid, untrash=True),
    }


def elsewhere(req: ControllerHandler, ident: str | None) -> Response | None:
    """The answer of the cluster `ident` routes to, when that is not this one."""
    target = choose_backend(req, ident)
    return None if target == req.cluster.id else req.forward(target)


def choose_backend(req: ControllerHandler, ident: str | None) -> str:
    ident = ident or ""
    cid = ident[:5] if len(ident) == 27 else ident if len(ident) == 5 else req.cluster.id
    return cid if cid in req.server.world.clusters else req.cluster.id


def federated_list(req: ControllerHandler, local: LocalList, kind: str) -> Response:
    opts = req.options()
    cluster = req.cluster
    if opts.bypass_federation or opts.forwarded_for:
        return Response.json(200, local(opts))
    if opts.cluster_id:
        target = choose_backend(req, opts.cluster_id)
        return Response.json(200, local(opts)) if target == cluster.id else req.forward(target)
    todo = _uuids_by_cluster(opts)
    if todo is None or (len(todo) == 1 and cluster.id in todo):
        return Response.json(200, local(opts))
    n_uuids = sum(len(v) for v in todo.values())
    if not todo:
        return Response.json(
            200, {"kind": kind, "etag": "", "self_link": "", "offset": 0, "limit": 0, "items": []}
        )
    if any(not (f[0] == "uuid" and f[1] in ("=", "in")) for f in opts.filters):
        raise ApiFailure(400, f"{_FEDERATED}: each filter must be either 'uuid = ...' or 'uuid in [...]'")
    if opts.count != "none":
        raise ApiFailure(400, f'{_FEDERATED} unless count=="none"')
    limit = -1 if opts.limit is None else opts.limit
    if (0 <= limit < n_uuids) or opts.offset or opts.order:
        raise ApiFailure(
            400,
            f"{_FEDERATED} with limit ({limit}) < nUUIDs ({n_uuids}), offset ({opts.offset}) > 0, "
            f"or order ({opts.order}) parameter",
        )
    maximum = cluster.profile.max_items_per_response
    if n_uuids > maximum:
        raise ApiFailure(
            400, f"{_FEDERATED} because number of UUIDs ({n_uuids}) exceeds page size limit {maximum}"
        )
    merged: dict | None = None
    answered = 0
    for cid, uuids in todo.items():
        for body in _pages(req, local, opts, cid, uuids):
            if merged is None:
                merged = body
            elif body["items"]:
                merged["items"] += body["items"]
            answered += bool(body["items"])
    merged = merged or {"kind": kind, "etag": "", "self_link": "", "offset": 0, "limit": 0, "items": []}
    if answered > 1:
        merged["items"].sort(key=lambda i: i.get("modified_at") or "", reverse=True)
    merged["items"] = [selected(i, opts.select) for i in merged["items"]]
    merged.pop("items_available", None)
    return Response.json(200, merged)


def _uuids_by_cluster(opts: ListOptions) -> dict[str, list[str]] | None:
    """The uuids every uuid filter allows, by cluster; None if there is no uuid filter."""
    allowed: set[str] | None = None
    for f in opts.filters:
        if not (isinstance(f, list) and len(f) == 3 and f[0] == "uuid" and f[1] in ("=", "in")):
            continue
        if f[1] == "=":
            if not isinstance(f[2], str):
                raise ApiFailure(
                    400, f"invalid operand type {type(f[2]).__name__} for filter {json.dumps(f)}"
                )
            these = {f[2]}
        elif isinstance(f[2], list):
            these = {u for u in f[2] if isinstance(u, str)}
        else:
            raise ApiFailure(400, f"invalid operand type {type(f[2]).__name__} in filter {json.dumps(f)}")
        allowed = these if allowed is None else allowed & these
    if allowed is None:
        return None
    todo: dict[str, list[str]] = {}
    for uuid in sorted(allowed):
        if len(uuid) == 27:
            todo.setdefault(uuid[:5], []).append(uuid)
    return todo


def _pages(req: ControllerHandler, local: LocalList, opts: ListOptions, cid: str, uuids: list[str]):
    """Ask cluster `cid` for `uuids` until all came back or a page is empty."""
    world, cluster = req.server.world, req.cluster
    todo = set(uuids)
    select = None if opts.select is None else ["uuid", *opts.select]
    while todo:
        batch = sorted(todo)
        if cid == cluster.id:
            body = local(
                ListOptions(
                    filters=[["uuid", "in", batch]],
                    select=select,
                    limit=opts.limit,
                    count="none",
                    include_trash=opts.include_trash,
                    include_old_versions=opts.include_old_versions,
                )
            )
        elif cid in world.clusters:
            params = {
                k: v
                for k, v in req.forward_params().items()
                if k not in ("filters", "where", "select", "count")
            }
            params.update(
                filters=json.dumps([["uuid", "in", batch]]),
                count="none",
                forwarded_for=f"{cluster.id}-{opts.forwarded_for}",
            )
            if select is not None:
                params["select"] = json.dumps(select)
            status, body = req.call(cid, "GET", req.url_path, params)
            if status != 200:
                raise ApiFailure(502, f"{cid}: {status} {'; '.join(map(str, body.get('errors', [])))}")
        else:
            raise ApiFailure(404, f"{_FEDERATED}: no proxy available for cluster {cid!r}")
        got = {i.get("uuid") for i in body.get("items", [])}
        yield body
        if not got:
            return
        if not got & todo:
            raise ApiFailure(
                502,
                f"cannot make progress in federated list query: cluster {cid!r} returned "
                f"{len(got)} items but none had the requested UUIDs",
            )
        todo -= got
