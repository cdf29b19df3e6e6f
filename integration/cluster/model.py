"""The state of the emulated clusters: users, tokens, collections, keep volumes, config.

One `Cluster` per cluster id holds what its API server's database and keepstores' disks
would: one user and one v2 token (``<id>-tpzed-000000000000000`` and
``<id>-gj3su-000000000000000`` with a random secret per run), the collections with their
manifests stored as the database stores them (``+A`` hints stripped,
``services/api/app/models/collection.rb``), a blob signing key, the signature TTL, and the
directories of its keepstore volumes laid out like keepstore's unix volume
(``<dir>/<hash[:3]>/<hash>``, ``services/keepstore/unix_volume.go``).

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

from .faults import FaultTable
from .manifests import PDH_ID_RE, portable_data_hash
from .requestlog import RequestLog
from .signing import strip_signatures
from .tls import Authority

DEFAULT_TTL = 1209600  # 336h, Collections.BlobSigningTTL
_FILE_TOKEN_RE = re.compile(r"^([0-9]+):([0-9]+):(.*)$")


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


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
class Cluster:
    id: str
    state_dir: Path
    keepstores: int = 2
    ttl: int = DEFAULT_TTL
    signing_key: bytes = field(default_factory=lambda: secrets.token_hex(32).encode())
    api_host: str = ""
    keep_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.user_uuid = f"{self.id}-tpzed-000000000000000"
        self.token_uuid = f"{self.id}-gj3su-000000000000000"
        self.token_secret = secrets.token_hex(25)
        self.collections: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.remote_identities: dict[str, tuple[float, dict]] = {}
        self.volumes = [self.state_dir / self.id / f"keep{i}" for i in range(self.keepstores)]
        for v in self.volumes:
            v.mkdir(parents=True, exist_ok=True)

    @property
    def token(self) -> str:
        return f"v2/{self.token_uuid}/{self.token_secret}"

    @property
    def keep_service_uuids(self) -> list[str]:
        return [f"{self.id}-bi6l4-{i:015d}" for i in range(len(self.volumes))]

    def user_record(self) -> dict:
        return {
            "kind": "arvados#user",
            "uuid": self.user_uuid,
            "etag": "",
            "owner_uuid": f"{self.id}-tpzed-000000000000000",
            "email": f"user@{self.id}.example",
            "username": f"user{self.id}",
            "first_name": "Emulated",
            "last_name": f"User {self.id}",
            "full_name": f"Emulated User {self.id}",
            "is_active": True,
            "is_admin": False,
            "is_invited": True,
            "prefs": {},
            "created_at": rfc3339(0),
            "modified_at": rfc3339(0),
        }

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
        with self.lock:
            record = dict(self.collections[uuid])
            if "manifest_text" in attrs:
                stored = strip_signatures(attrs["manifest_text"])
                attrs = {**attrs, "manifest_text": stored, "portable_data_hash": portable_data_hash(stored)}
                attrs["file_count"], attrs["file_size_total"] = manifest_stats(stored)
            record.update(attrs)
            record["modified_at"] = rfc3339(time.time())
            record["etag"] = secrets.token_hex(12)
            record["version"] += 1
            self.collections[uuid] = record
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
        self.clusters = {cid: Cluster(cid, state_dir, ttl=ttl) for cid in cluster_ids}
        self.home = cluster_ids[0]
        self.seeded: dict[str, dict] = {}
