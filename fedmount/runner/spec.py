"""Parse and validate an Arvados container record before anything starts.

A container record (reference/arvados-protocol.md §7, `sdk/go/arvados/container.go`) says
what to run (`command`, `container_image`, `cwd`, `environment`), what the container sees
(`mounts`, keyed by the path inside the container, or by `stdin` / `stdout` / `stderr`),
where its output goes (`output_path`, which must be the target of a `tmp` mount) and what
it may use (`runtime_constraints`). Other fields of a record (uuid, state, priority, ...)
are ignored.

Everything that can be checked without a mount is checked here, so that a bad record is
refused with one line naming the offending field (`mounts["/in"].kind: ...`) before a
single process is started. What needs the mount (does the collection exist, is the path in
it, is there an image tarball) is checked by the runner right after mounting.

Supported mount kinds, as crunch-run implements them:

- `collection`: `portable_data_hash` or `uuid` (not both, any cluster), optional `path`
  inside the collection; read-only (`writable: true` is refused: fedmount is read-only).
  As the `stdin` mount it must name a file.
- `tmp`: an empty writable directory (`capacity` is accepted, not enforced).
- `json` / `text`: a read-only file holding `content` (JSON-encoded for `json`).
- `file`: only for `stdout` / `stderr`; `path` is a container path under `output_path`.

`keep` (documented by Arvados, never implemented) and unknown kinds are refused.
"""

from __future__ import annotations

import json
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmount.arvados.ids import CollectionId, IdError, looks_like_collection_id, parse_collection_id

STREAM_TARGETS = ("stdin", "stdout", "stderr")


class SpecError(ValueError):
    """A record fedmount-run refuses; `str()` is one line that starts with the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class CollectionMount:
    target: str
    collection: CollectionId
    path: str  # normalised, relative to the collection root; "" for the root


@dataclass(frozen=True)
class TmpMount:
    target: str
    capacity: int


@dataclass(frozen=True)
class ContentMount:
    """A `json` or `text` mount: `content` is the exact text of the file."""

    target: str
    content: str


@dataclass(frozen=True)
class FileMount:
    """`stdout` / `stderr` redirected to `path`, a container path under output_path."""

    target: str
    path: str


Mount = CollectionMount | TmpMount | ContentMount | FileMount


@dataclass(frozen=True)
class Constraints:
    api: bool = False
    ram: int = 0
    vcpus: float = 0
    keep_cache_disk: int = 0
    keep_cache_ram: int = 0


@dataclass(frozen=True)
class ContainerSpec:
    command: list[str]
    container_image: str
    cwd: str
    environment: dict[str, str]
    mounts: dict[str, Mount]
    output_path: str | None
    constraints: Constraints
    uuid: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_collection(self) -> CollectionId | None:
        """The collection holding the image tarball, or None for a local image name."""
        if looks_like_collection_id(self.container_image):
            return parse_collection_id(self.container_image)
        return None

    def collection_mounts(self) -> list[CollectionMount]:
        return [m for m in self.mounts.values() if isinstance(m, CollectionMount)]

    def collections(self) -> list[CollectionId]:
        """Every collection the run reads: mounts, stdin and the image."""
        ids = [m.collection for m in self.collection_mounts()]
        if self.image_collection is not None:
            ids.append(self.image_collection)
        return ids

    def binds(self) -> list[Mount]:
        """Mounts that appear as paths inside the container, shortest target first."""
        return sorted(
            (m for t, m in self.mounts.items() if t not in STREAM_TARGETS),
            key=lambda m: (m.target.count("/"), m.target),
        )


def read_record(path: str) -> ContainerSpec:
    """The record in the file at `path` (``-``: standard input), parsed and validated."""
    if path == "-":
        return load_record(sys.stdin.read(), "record")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(path, f"cannot read the record: {exc.strerror}") from None
    return load_record(text, path)


def load_record(text: str, source: str = "record") -> ContainerSpec:
    """Parse the JSON text of a container record and validate it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            source, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    return parse_record(record)


def parse_record(record: Any) -> ContainerSpec:
    if not isinstance(record, dict):
        raise SpecError("record", "a container record must be a JSON object")
    command = record.get("command")
    if command is None:
        raise SpecError("command", "missing; a container record needs a command (a list of strings)")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise SpecError("command", "must be a non-empty list of strings")

    image = record.get("container_image")
    if not isinstance(image, str) or not image:
        raise SpecError("container_image", "missing; give an image collection (PDH or UUID) or an image name")

    cwd = record.get("cwd", "")
    if not isinstance(cwd, str):
        raise SpecError("cwd", "must be a string")
    if cwd in ("", "."):
        cwd = ""  # the image's working directory
    elif not cwd.startswith("/"):
        raise SpecError("cwd", f"{cwd!r} must be an absolute path inside the container")

    env = _object(record, "environment")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise SpecError("environment", "must be an object of string values")
    for name in env:
        if not name or "=" in name:
            raise SpecError(f"environment[{name!r}]", "is not a valid variable name")

    mounts_in = _object(record, "mounts")
    if not isinstance(mounts_in, dict):
        raise SpecError("mounts", "must be an object keyed by target path")
    mounts = {target: _parse_mount(target, m) for target, m in mounts_in.items()}

    output_path = record.get("output_path")
    if output_path is not None:
        if not isinstance(output_path, str) or not output_path.startswith("/"):
            raise SpecError("output_path", "must be an absolute path inside the container")
        output_path = posixpath.normpath(output_path)
        if not isinstance(mounts.get(output_path), TmpMount):
            raise SpecError("output_path", f"{output_path} must be the target of a tmp mount")
    for stream in ("stdout", "stderr"):
        m = mounts.get(stream)
        if isinstance(m, FileMount) and (m.path == output_path or not _under(m.path, output_path)):
            raise SpecError(f'mounts["{stream}"].path', f"{m.path} must be inside output_path")

    spec = ContainerSpec(
        command=list(command),
        container_image=image,
        cwd=cwd,
        environment=dict(env),
        mounts=mounts,
        output_path=output_path,
        constraints=_parse_constraints(_object(record, "runtime_constraints")),
        uuid=record.get("uuid") if isinstance(record.get("uuid"), str) else None,
        raw=record,
    )
    _check_nesting(spec)
    return spec


def _object(record: dict[str, Any], name: str) -> Any:
    """An optional object field: absent or null is empty; anything else is checked by the caller."""
    value = record.get(name)
    return {} if value is None else value


def _parse_mount(target: Any, m: Any) -> Mount:
    where = f"mounts[{json.dumps(target)}]"
    if not isinstance(target, str) or not (target in STREAM_TARGETS or target.startswith("/")):
        raise SpecError(where, "a mount target must be an absolute path or stdin/stdout/stderr")
    if not isinstance(m, dict):
        raise SpecError(where, "must be an object with a kind")
    if target not in STREAM_TARGETS:
        target = posixpath.normpath(target)
        if target == "/":
            raise SpecError(where, "cannot mount over the container's root directory")
    kind = m.get("kind")
    if kind == "collection":
        if m.get("writable"):
            raise SpecError(
                f"{where}.writable", "writable collection mounts are not supported (fedmount is read-only)"
            )
        pdh, uuid = m.get("portable_data_hash"), m.get("uuid")
        if pdh and uuid:
            raise SpecError(where, "give portable_data_hash or uuid, not both")
        if not pdh and not uuid:
            raise SpecError(
                where,
                "a collection mount needs portable_data_hash or uuid (tmp collections are not supported)",
            )
        key = "portable_data_hash" if pdh else "uuid"
        cid = _collection_id(f"{where}.{key}", pdh or uuid)
        if cid.is_pdh != (key == "portable_data_hash"):
            raise SpecError(f"{where}.{key}", f"{cid.text} is not a {'PDH' if pdh else 'collection UUID'}")
        path = _collection_path(f"{where}.path", m.get("path", ""))
        if target in ("stdout", "stderr"):
            raise SpecError(where, f"{target} must be a file mount")
        if target == "stdin" and not path:
            raise SpecError(f"{where}.path", "stdin must name a file in the collection")
        return CollectionMount(target, cid, path)
    if target == "stdin":
        raise SpecError(f"{where}.kind", f"{kind!r}: stdin can only come from a collection file")
    if kind == "tmp":
        capacity = m.get("capacity", 0)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise SpecError(f"{where}.capacity", "must be a non-negative integer")
        if target in STREAM_TARGETS:
            raise SpecError(where, f"{target} must be a file mount")
        return TmpMount(target, capacity)
    if kind in ("json", "text"):
        if "content" not in m:
            raise SpecError(f"{where}.content", f"missing; a {kind} mount needs content")
        content = m["content"]
        if kind == "text" and not isinstance(content, str):
            raise SpecError(f"{where}.content", "a text mount's content must be a string")
        if target in STREAM_TARGETS:
            raise SpecError(where, f"{target} must be a file mount")
        return ContentMount(target, json.dumps(content) if kind == "json" else content)
    if kind == "file":
        if target not in ("stdout", "stderr"):
            raise SpecError(f"{where}.kind", "file mounts are only supported for stdout and stderr")
        path = m.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise SpecError(f"{where}.path", "must be an absolute path inside output_path")
        return FileMount(target, posixpath.normpath(path))
    if kind == "keep":
        raise SpecError(f"{where}.kind", "'keep' mounts are not supported; mount a collection by PDH or UUID")
    raise SpecError(
        f"{where}.kind", f"{kind!r} is not a supported mount kind (collection, tmp, json, text, file)"
    )


def _collection_id(where: str, text: Any) -> CollectionId:
    if not isinstance(text, str):
        raise SpecError(where, "must be a string")
    try:
        return parse_collection_id(text)
    except IdError as exc:
        raise SpecError(where, str(exc)) from None


def _collection_path(where: str, path: Any) -> str:
    """Normalise `path` the way crunch-run does (strip ./ or /); refuse one that leaves the collection."""
    if not isinstance(path, str):
        raise SpecError(where, "must be a string")
    if path.startswith("./"):
        path = path[2:]
    elif path.startswith("/"):
        path = path[1:]
    if path in ("", "."):
        return ""
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../") or norm.startswith("/"):
        raise SpecError(where, f"{path!r} is outside the collection")
    return "" if norm == "." else norm


def _parse_constraints(rc: Any) -> Constraints:
    if not isinstance(rc, dict):
        raise SpecError("runtime_constraints", "must be an object")
    api = rc.get("API", False)
    if not isinstance(api, bool):
        raise SpecError("runtime_constraints.API", "must be true or false")
    ints = {}
    for name in ("ram", "keep_cache_disk", "keep_cache_ram"):
        v = rc.get(name, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SpecError(f"runtime_constraints.{name}", "must be a non-negative integer (bytes)")
        ints[name] = v
    vcpus = rc.get("vcpus", 0)
    if not isinstance(vcpus, int | float) or isinstance(vcpus, bool) or vcpus < 0:
        raise SpecError("runtime_constraints.vcpus", "must be a non-negative number")
    return Constraints(api=api, vcpus=vcpus, **ints)


def _under(path: str, directory: str | None) -> bool:
    return directory is not None and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def _check_nesting(spec: ContainerSpec) -> None:
    """A bind may not sit inside a collection or content mount: those are read-only."""
    binds = spec.binds()
    for m in binds:
        for outer in binds:
            if (
                outer is not m
                and isinstance(outer, CollectionMount | ContentMount)
                and _under(m.target, outer.target)
            ):
                raise SpecError(
                    f"mounts[{json.dumps(m.target)}]", f"is inside the read-only mount {outer.target}"
                )
