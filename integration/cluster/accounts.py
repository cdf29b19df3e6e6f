"""Who exists on an emulated cluster: users, their tokens, and the roles that join them.

Every cluster starts with (uuids fixed, token secrets random per run):

- the system user ``<id>-tpzed-000000000000000`` (admin; owns roles and permission links,
  as on a real cluster), with no token;
- the cluster's user ``<id>-tpzed-000000000000001`` "Emulated User <id>" with the token
  ``v2/<id>-gj3su-000000000000000/...``: the current user of tests, ``user_uuid`` and
  ``token`` in federation.json;
- a second user ``<id>-tpzed-000000000000002`` "Other User <id>" with the token
  ``v2/<id>-gj3su-000000000000002/...`` (``other_user_uuid``/``other_token``), who owns
  projects of their own and shares some of them with the first;
- the "All users" role ``<id>-j7d0g-fffffffffffffff``: every active user ``can_write`` it
  and it ``can_read`` every user, which is what ``User#add_to_all_users_group`` creates
  (users see each other's records, not each other's data);
- the "Federation readers" role ``<id>-j7d0g-readers00000000``: every user of every
  cluster ``can_read`` it and it ``can_manage`` the cluster's (first) user, so, by the
  permission model ("if A can_read role R and R can_manage user B, A can read everything B
  owns"), whatever the first user owns is readable by everyone in the federation, and
  nothing more. This keeps the emulator's old promise that any test token may read the
  seeded and uploaded collections, while the second user's data is visible only where a
  permission link shares it.

The users of the other clusters are known here as a real cluster knows remote users once
they have logged in (``ActivateUsers: true``): a cached user record, membership of "All
users" and "Federation readers". `adopt_remote_user` is also how a cluster records a
remote user met for the first time by token validation.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from .records import group_record, link_record, user_record

if TYPE_CHECKING:
    from .model import Cluster


def all_users_uuid(cluster_id: str) -> str:
    return f"{cluster_id}-j7d0g-fffffffffffffff"


def readers_uuid(cluster_id: str) -> str:
    return f"{cluster_id}-j7d0g-readers00000000"


def set_up(cluster: Cluster) -> None:
    from .model import Account

    cid, system = cluster.id, cluster.system_user_uuid
    cluster.store(user_record(system, "root", "", system, is_admin=True))
    cluster.store(user_record(cluster.user_uuid, "Emulated", f"User {cid}", system))
    cluster.store(user_record(cluster.other_user_uuid, "Other", f"User {cid}", system))
    cluster.accounts[cluster.token_uuid] = Account(
        cluster.token_uuid, cluster.token_secret, cluster.user_uuid
    )
    other_token = f"{cid}-gj3su-000000000000002"
    cluster.accounts[other_token] = Account(other_token, secrets.token_hex(25), cluster.other_user_uuid)
    cluster.store(group_record(all_users_uuid(cid), system, "All users", "role", system, now=0))
    cluster.store(group_record(readers_uuid(cid), system, "Federation readers", "role", system, now=0))
    permit(cluster, readers_uuid(cid), "can_manage", cluster.user_uuid)
    for user in (cluster.user_uuid, cluster.other_user_uuid):
        _join(cluster, user)


def adopt_remote_user(cluster: Cluster, user: dict) -> dict:
    """Cache a remote user's record here and make them a member as activation would."""
    known = cluster.find(user["uuid"])
    if known is not None:
        return known
    cached = {k: v for k, v in user.items() if k not in ("can_write", "can_manage", "writable_by")}
    cached["owner_uuid"] = cluster.system_user_uuid
    cluster.store(cached)
    _join(cluster, user["uuid"])
    return cached


def _join(cluster: Cluster, user_uuid: str) -> None:
    permit(cluster, user_uuid, "can_write", all_users_uuid(cluster.id))
    permit(cluster, all_users_uuid(cluster.id), "can_read", user_uuid)
    permit(cluster, user_uuid, "can_read", readers_uuid(cluster.id))


def permit(cluster: Cluster, tail_uuid: str, name: str, head_uuid: str) -> dict:
    """A permission link, owned by the system user as Rails makes them."""
    from .model import uuid_for

    uuid = uuid_for(cluster.id, "o0j2j", f"permission/{tail_uuid}/{name}/{head_uuid}")
    return cluster.store(
        link_record(
            uuid, cluster.system_user_uuid, "permission", name, head_uuid, tail_uuid, cluster.system_user_uuid
        )
    )
