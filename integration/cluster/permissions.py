"""Who may read what: the API server's materialized permissions, computed on demand.

Follows ``services/api/db/structure.sql`` (``compute_permission_subgraph``,
``permission_graph_edges``, ``should_traverse_owned``) and ``ArvadosModel.readable_by``:

- Edges: every group and user is reached from its owner with ``can_manage`` (3); every
  permission link ``tail -> head`` with its level (``can_read``/``can_login`` 1,
  ``can_write`` 2, ``can_manage`` 3).
- A user's permission view: walk from the user (level 3); through groups the walk goes on,
  through other users it stops (a user is only traversed when it is the start). A target's
  level is the least level on the path, the greatest over paths. ``traverse_owned`` is
  true for groups, and for users reached with ``can_manage``.
- The users whose views count for a request: the user and every user they reach with
  ``traverse_owned`` ("can_manage on a user grants access to everything it owns";
  ``USER_UUIDS_SUBQUERY_TEMPLATE``). Their levels are narrowed to the level on the
  managed user, so reading through a role never grants more than the role had.
- Readable: a group whose uuid is in the view, or any role group (roles are visible to
  active users); a user in the view; any other record whose uuid is in the view or whose
  owner is in the view with ``traverse_owned``; a permission link whose head or tail is
  one of the users, or whose head the user may manage.
- Trash: a record owned by a trashed group, or by anything inside one, is hidden, and so
  is a trashed group or collection itself, unless ``include_trash`` is asked.

Views are cached on the cluster per (user, ``Cluster.version``): a listing of 10,000
collections costs one walk of the groups and links, then a dict lookup per record.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .records import infix_of, parse_time

if TYPE_CHECKING:
    from .model import Cluster

LEVELS = {"can_read": 1, "can_login": 1, "can_write": 2, "can_manage": 3}
READ, WRITE, MANAGE = 1, 2, 3
_cache_lock = threading.Lock()


def is_group(uuid: str) -> bool:
    return infix_of(uuid) == "j7d0g"


def is_user(uuid: str) -> bool:
    return infix_of(uuid) == "tpzed"


@dataclass
class Access:
    """What one user may do on one cluster."""

    user_uuid: str
    own: dict[str, int]  # the user's own view (exclude_home reads it)
    levels: dict[str, int]  # combined over managed users
    traverse: set[str]
    users: set[str]
    trashed: set[str] = field(default_factory=set)  # trashed groups and every group inside one

    def level(self, record: dict) -> int:
        uuid = record["uuid"]
        best = self.levels.get(uuid, 0)
        if not is_group(uuid) and not is_user(uuid) and record.get("owner_uuid") in self.traverse:
            best = max(best, self.levels.get(record["owner_uuid"], 0))
        return best

    def is_trashed(self, record: dict) -> bool:
        if record.get("owner_uuid") in self.trashed:
            return True
        if infix_of(record["uuid"]) in ("j7d0g", "4zz18"):
            return _trashed_now(record)
        return False

    def readable(self, record: dict, include_trash: bool = False) -> bool:
        if not include_trash and self.is_trashed(record):
            return False
        uuid = record["uuid"]
        if is_group(uuid) and record.get("group_class") == "role":
            return True
        if uuid == self.user_uuid or self.level(record) >= READ:
            return True
        if record.get("link_class") == "permission":
            head, tail = record.get("head_uuid"), record.get("tail_uuid")
            return head in self.users or tail in self.users or self.levels.get(head, 0) >= MANAGE
        return False


def access(cluster: Cluster, user_uuid: str) -> Access:
    key = (user_uuid, cluster.version)
    with _cache_lock:
        cached = cluster.access_cache.get(key)
    if cached is not None:
        return cached
    with cluster.lock:
        edges = _edges(cluster)
        groups = cluster.rows("groups")
    own, traverse = _view(edges, user_uuid)
    managed = {u for u in traverse if is_user(u) and own.get(u, 0) >= READ}
    levels = dict(own)
    for other in managed - {user_uuid}:
        view, other_traverse = _view(edges, other)
        cap = own[other]
        for target, level in view.items():
            levels[target] = max(levels.get(target, 0), min(level, cap))
        traverse |= other_traverse
    result = Access(user_uuid, own, levels, traverse, managed | {user_uuid}, _trashed_groups(groups))
    with _cache_lock:
        if len(cluster.access_cache) > 256:
            cluster.access_cache.clear()
        cluster.access_cache[key] = result
    return result


def _edges(cluster: Cluster) -> dict[str, list[tuple[str, int]]]:
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for table in ("groups", "users"):
        for record in cluster.rows(table):
            edges[record["owner_uuid"]].append((record["uuid"], MANAGE))
    for link in cluster.rows("links"):
        level = LEVELS.get(link["name"]) if link["link_class"] == "permission" else None
        if level and link.get("tail_uuid"):
            edges[link["tail_uuid"]].append((link["head_uuid"], level))
    return edges


def _view(edges: dict[str, list[tuple[str, int]]], start: str) -> tuple[dict[str, int], set[str]]:
    levels = {start: MANAGE}
    traverse = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        if node != start and not is_group(node):
            continue
        for head, value in edges.get(node, ()):
            level = min(levels[node], value)
            through = is_group(head) or (is_user(head) and value >= MANAGE)
            if level > levels.get(head, 0) or (through and head not in traverse):
                levels[head] = max(level, levels.get(head, 0))
                if through:
                    traverse.add(head)
                stack.append(head)
    return levels, traverse


def _trashed_now(record: dict) -> bool:
    if record.get("is_trashed"):
        return True
    trash_at = record.get("trash_at")
    return bool(trash_at) and parse_time(trash_at) <= time.time()


def _trashed_groups(groups: list[dict]) -> set[str]:
    children: dict[str, list[str]] = defaultdict(list)
    for g in groups:
        children[g["owner_uuid"]].append(g["uuid"])
    trashed: set[str] = set()
    stack = [g["uuid"] for g in groups if _trashed_now(g)]
    while stack:
        uuid = stack.pop()
        if uuid not in trashed:
            trashed.add(uuid)
            stack.extend(children.get(uuid, ()))
    return trashed
