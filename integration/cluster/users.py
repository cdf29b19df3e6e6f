"""``arvados/v1/users``: current, get, list (and ``system``).

Follows ``services/api/app/controllers/arvados/v1/users_controller.rb`` and
``lib/controller/federation/conn.go``: ``users.current`` is always answered locally (for
a remote user, from the record cached when their token was validated); ``users.get`` is
routed by the uuid's prefix, and a remote answer must be for the uuid asked (else 502) and
is cached locally, as ``batchUpdateUsers`` does; ``users.list`` follows the federated list
rules. A user may read the records of users they have permission on: "All users" gives
every member ``can_read`` on every other (`accounts`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from . import accounts
from .errors import ApiFailure
from .filters import ListOptions, list_page, selected
from .httpbase import Response
from .permissions import MANAGE, WRITE
from .records import USER_FIELDS
from .routing import dispatch, elsewhere, listing

if TYPE_CHECKING:
    from .controller import ControllerHandler


def route(req: ControllerHandler, parts: list[str]) -> Response | None:
    return dispatch(
        req,
        parts,
        {
            ("GET", ""): listing(local_list, "arvados#userList"),
            ("GET", "current"): lambda req: Response.json(
                200, selected(present(req, req.identity()["user"]), req.options().select)
            ),
            ("GET", "system"): system,
            ("GET", "{uuid}"): get,
        },
    )


def system(req: ControllerHandler) -> Response:
    req.identity()
    return Response.json(200, present(req, req.cluster.users[req.cluster.system_user_uuid]))


def present(req: ControllerHandler, user: dict) -> dict:
    access = req.access()
    level = access.level(user)
    out = dict(user)
    out["can_write"] = level >= WRITE
    out["can_manage"] = level >= MANAGE
    out["writable_by"] = [user["owner_uuid"], user["uuid"]]
    return out


def get(req: ControllerHandler, uuid: str) -> Response:
    response = elsewhere(req, uuid)
    if response is not None:
        if response.status == 200:
            record = response_json(response)
            if record.get("uuid") != uuid:
                raise ApiFailure(502, f"Had requested {uuid} but response was for {record.get('uuid')}")
            accounts.adopt_remote_user(req.cluster, record)
        return response
    user = req.cluster.users.get(uuid)
    identity = req.identity()
    if user is None or not (uuid == identity["user_uuid"] or req.access().readable(user)):
        raise ApiFailure(404, f"Object not found: {uuid}")
    return Response.json(200, selected(present(req, user), req.options().select))


def local_list(req: ControllerHandler, opts: ListOptions) -> dict:
    access = req.access()
    rows = [u for u in req.cluster.rows("users") if access.readable(u)]
    max_items = req.cluster.profile.max_items_per_response
    return list_page(rows, "users", USER_FIELDS, opts, max_items, lambda u: present(req, u), "User")


def response_json(response: Response) -> dict:
    return json.loads(response.body) if isinstance(response.body, bytes) else {}
