"""The state of the emulated clusters: users, tokens, groups, links, collections, keep volumes.

One `Cluster` per cluster id holds what its API server's database and keepstores' disks
would: its users and their v2 tokens (a random secret per run; see `accounts` for who they
are), groups (projects, filter groups, roles) and links (permission and tag links), the
collections with their manifests stored as the database stores them (``+A`` hints
stripped, ``services/api/app/models/collection.rb``), a blob signing key, the signature
TTL, its configuration `profiles.Profile`, and the directories of its keepstore volumes
laid out like keepstore's unix volume (``<dir>/<hash[:3]>/<hash>``,
``services/keepstore/unix_volume.go``). ``version`` counts changes to users, groups and
links, the records permissions are computed from (`permissions` caches by it).

`World` ties the clusters together with what every service shares: the CA, the fault
table, the request log and the stop event.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import accounts
from .faults import FaultTable
from .manifests import PDH_ID_RE, portable_data_hash
from .profiles import profile_for
from .records import infix_of, parse_time, rfc3339
from .requestlog import RequestLog
from .signing import strip_signatures
from .tls import Authority

DEFAULT_TTL = 1209600  # 336h, Collections.BlobSigningTTL
_FILE_TOKEN_RE = re.compile(r"^([0-9]+):([0-9]+):(.*)$")
PRESERVE_VERSION_IF_IDLE = 10  # Collections.PreserveVersionIfIdle
_VERSIONABLE = ("manifest_text", "description", "properties", "name")
_SYNCABLE = (
    "owner_uuid",
    "delete_at",
    "trash_at",
    "is_trashed",
    "replication_desired",
    "storage_classes_desired",
)
_TABLES = {"j7d0g": "groups", "o0j2j": "links", "tpzed": "users", "4zz18": "collections"}
__all__ = ["rfc3339", "Cluster", "World", "Account"]


def uuid_for(cluster: str, infix: str, name: str) -> str:
    return f"{cluster}-{infix}-{hashlib.md5(name.encode()).hexdigest()[:15]}"


def manifest_stats(manifest: str) -> tuple[int, int]:
    """(file_count, file_size_total) as Rails computes them from the manifest."""
    files: dict[str, int] = {}
    for line in manifest.splitlines():
        tokens = line.split(" ")
        for tok in tokens[1:]:
            m = _FILE_TOKEN_RE.match(tok)
            if m and m.group(3) != "\\056":
                path = tokens[0] + "/" + m.group(3)
                files[path] = files.get(path, 0) + int(m.group(2))
    return len(files), sum(files.values())


@dataclass
class Account:
    """One v2 token of a local user."""

    token_uuid: str
    secret: str
    user_uuid: str

    @property
    def token(self) -> str:
        return f"v2/{self.token_uuid}/{self.secret}"


@dataclass
class Cluster:
    id: str
    state_dir: Path
    keepstores: int = 2
    ttl: int = DEFAULT_TTL
    signing_key: bytes = field(default_factory=lambda: secrets.token_hex(32).encode())
    api_host: str = ""
    keep_urls: list[str] = field(default_factory=list)
    position: int = 0

    def __post_init__(self) -> None:
        self.profile = profile_for(self.position)
        self.system_user_uuid = f"{self.id}-tpzed-000000000000000"
        # The cluster's user ("the current user" of tests) and the second user who shares with them.
        self.user_uuid = f"{self.id}-tpzed-000000000000001"
        self.token_uuid = f"{self.id}-gj3su-000000000000000"
        self.token_secret = secrets.token_hex(25)
        self.other_user_uuid = f"{self.id}-tpzed-000000000000002"
        self.collections: dict[str, dict] = {}
        self.groups: dict[str, dict] = {}
        self.links: dict[str, dict] = {}
        self.users: dict[str, dict] = {}
        self.accounts: dict[str, Account] = {}
        self.version = 0
        self.access_cache: dict[tuple[str, int], object] = {}  # permissions.access, by (user, version)
        self.lock = threading.RLock()
        self.remote_identities: dict[str, tuple[float, dict]] = {}
        self.volumes = [self.state_dir / self.id / f"keep{i}" for i in range(self.keepstores)]
        for v in self.volumes:
            v.mkdir(parents=True, exist_ok=True)
        accounts.set_up(self)

    @property
    def token(self) -> str:
        return f"v2/{self.token_uuid}/{self.token_secret}"

    @property
    def other_account(self) -> Account:
        return next(a for a in self.accounts.values() if a.user_uuid == self.other_user_uuid)

    @property
    def keep_service_uuids(self) -> list[str]:
        return [f"{self.id}-bi6l4-{i:015d}" for i in range(len(self.volumes))]

    def user_record(self) -> dict:
        return self.users[self.user_uuid]

    # --- users, groups, links ------------------------------------------------------------

    def table(self, uuid: str) -> dict[str, dict] | None:
        name = _TABLES.get(infix_of(uuid))
        return getattr(self, name) if name else None

    def find(self, uuid: object) -> dict | None:
        """The record with this uuid in any table, or None."""
        table = self.table(uuid) if isinstance(uuid, str) else None
        with self.lock:
            return table.get(uuid) if table is not None else None

    def store(self, record: dict) -> dict:
        """Insert or replace a user, group, link or collection record."""
        table = self.table(record["uuid"])
        if table is None:
            raise ValueError(f"no table for {record['uuid']}")
        with self.lock:
            table[record["uuid"]] = record
            if table is not self.collections:
                self.version += 1
        return record

    def remove(self, uuid: str) -> dict | None:
        table = self.table(uuid)
        with self.lock:
            self.version += 1
            return table.pop(uuid, None) if table is not None else None

    def rows(self, table: str) -> list[dict]:
        with self.lock:
            return list(getattr(self, table).values())

    # --- collections -------------------------------------------------------------------

    def add_collection(self, name: str, manifest: str, uuid: str | None = None, **attrs: object) -> dict:
        now = time.time()
        stored = strip_signatures(manifest)
        uuid = uuid or uuid_for(self.id, "4zz18", f"{name}/{now}/{secrets.token_hex(4)}")
        count, total = manifest_stats(stored)
        record = {
            "kind": "arvados#collection",
            "uuid": uuid,
            "etag": secrets.token_hex(12),
            "owner_uuid": self.user_uuid,
            "created_at": rfc3339(now),
            "modified_at": rfc3339(now),
            "modified_by_user_uuid": self.user_uuid,
            "name": name,
            "description": None,
            "properties": {},
            "portable_data_hash": portable_data_hash(stored),
            "manifest_text": stored,
            "replication_desired": None,
            "replication_confirmed": None,
            "replication_confirmed_at": None,
            "storage_classes_desired": ["default"],
            "storage_classes_confirmed": [],
            "storage_classes_confirmed_at": None,
            "delete_at": None,
            "trash_at": None,
            "is_trashed": False,
            "version": 1,
            "current_version_uuid": uuid,
            "preserve_version": False,
            "file_count": count,
            "file_size_total": total,
        }
        record.update(attrs)
        with self.lock:
            self.collections[uuid] = record
        return record

    def update_collection(self, uuid: str, attrs: dict) -> dict:
        """Apply `attrs`, keeping the previous state as an old version when Rails would.

        ``manage_versioning`` (collection.rb): a change to a versionable attribute
        (manifest_text, description, properties, name) of a collection that is not trashed
        saves the previous state under a new uuid (its ``current_version_uuid`` names the
        collection) and increments ``version``, when ``preserve_version`` is set or the
        collection was idle for ``PreserveVersionIfIdle`` (10 s). Ownership and trash
        attributes are copied to every old version.
        """
        with self.lock:
            old = self.collections[uuid]
            record = dict(old)
            if "manifest_text" in attrs:
                stored = strip_signatures(attrs["manifest_text"])
                attrs = {**attrs, "manifest_text": stored, "portable_data_hash": portable_data_hash(stored)}
                attrs["file_count"], attrs["file_size_total"] = manifest_stats(stored)
            versionable = any(k in attrs and attrs[k] != old.get(k) for k in _VERSIONABLE)
            idle = time.time() - parse_time(old["modified_at"] or rfc3339(0)) >= PRESERVE_VERSION_IF_IDLE
            preserve = (
                versionable
                and not old["is_trashed"]
                and (old["preserve_version"] or attrs.get("preserve_version") or idle)
            )
            if preserve:
                snapshot_uuid = uuid_for(self.id, "4zz18", f"{uuid}/v{old['version']}/{secrets.token_hex(4)}")
                self.collections[snapshot_uuid] = {**old, "uuid": snapshot_uuid, "current_version_uuid": uuid}
                record["version"] = old["version"] + 1
            record.update(attrs)
            record["modified_at"] = rfc3339(time.time())
            record["etag"] = secrets.token_hex(12)
            self.collections[uuid] = record
            synced = {k: record[k] for k in _SYNCABLE}
            for past in self.collections.values():
                if past["current_version_uuid"] == uuid and past["uuid"] != uuid:
                    past.update(synced)
            return record

    def find_by_pdh(self, pdh: str) -> dict | None:
        """Any collection with this hash+size, preferring the latest trash_at (none = latest)."""
        key = PDH_ID_RE.match(pdh)
        if not key:
            return None
        with self.lock:
            matches = [c for c in self.collections.values() if c["portable_data_hash"] == key.group(0)]
        matches.sort(key=lambda c: c["trash_at"] or "9999")
        return matches[-1] if matches else None

    def all_collections(self) -> list[dict]:
        with self.lock:
            return list(self.collections.values())

    # --- keep volumes ------------------------------------------------------------------

    def block_path(self, volume: int, block_hash: str) -> Path:
        return self.volumes[volume] / block_hash[:3] / block_hash

    def store_block(self, block_hash: str, data: bytes, volumes: list[int] | None = None) -> None:
        """Write a block to the given volumes (default all: replication = number of keepstores)."""
        targets = list(range(len(self.volumes))) if volumes is None else volumes
        first: Path | None = None
        for v in targets:
            path = self.block_path(v, block_hash)
            if path.exists():
                first = first or path
                continue
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{block_hash}.{secrets.token_hex(4)}")
            if first is not None:
                os.link(first, tmp)
            else:
                tmp.write_bytes(data)
            os.replace(tmp, path)
            first = path


class World:
    """Everything the services of all clusters share."""

    def __init__(self, state_dir: Path, cluster_ids: list[str], ttl: int):
        self.state_dir = state_dir
        self.authority = Authority(state_dir)
        self.client_ssl = self.authority.client_context()
        self.faults = FaultTable()
        self.log = RequestLog(state_dir / "requests.jsonl")
        self.stop = threading.Event()
        self.clusters = {
            cid: Cluster(cid, state_dir, ttl=ttl, position=i) for i, cid in enumerate(cluster_ids)
        }
        self.home = cluster_ids[0]
        self.seeded: dict[str, dict] = {}
        self.tree: dict[str, dict] = {"projects": {}, "links": {}, "hidden": {}}
        for cluster in self.clusters.values():
            for other in self.clusters.values():
                if other is not cluster:
                    for user in (other.users[other.user_uuid], other.users[other.other_user_uuid]):
                        accounts.adopt_remote_user(cluster, user)
