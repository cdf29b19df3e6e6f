"""Never compute the same step twice: ``fedmount-run``'s record of successful runs (what
Arvados calls container reuse).

A run is keyed on what determines its output (`run_key`): the runtime (Docker applies an
image's ENTRYPOINT, bubblewrap does not), the image by content (an image collection's PDH;
a local Docker image's id), the command, cwd, environment and
output_path, and every mount: a collection by the PDH it has *now* (a UUID input is
resolved with the caller's token at run time, so a collection updated since is a new key)
and its path, a tmp mount's capacity, a json/text mount's content, a file mount's path.
The key is the SHA-256 of that description as canonical JSON. There is no key, and so no
reuse, when an input cannot be resolved with the caller's token (a run whose inputs the
caller cannot all read is never reused) or the image is a root directory (the local
runtime), which has no content identity.

`RunRecord` is a `diskcache.Cache` private to the user (records.py; ``--reuse-dir``, default
``$XDG_CACHE_HOME/fedmount/runs``): key -> the results directory of a run that ended
``Complete`` with exit code 0 and no error (`succeeded`: failed, cancelled and interrupted
runs are never recorded, nor used if one was), bounded in
size and evicting the least recently used entry first, as the block cache evicts. An
entry is used only while its results directory still holds that run's result.json, with
the same key and a success, and its ``output/``; `hand_back` then copies ``output/``,
``stdout.txt`` and ``stderr.txt`` into the new results directory and no container starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Mapping
from typing import Any

import trio

from fedmount.arvados.ids import CollectionId
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.locality.federation_view import FederationView
from fedmount.locality.view import LookupFailure
from fedmount.records import private_record
from fedmount.runner.runtimes import Runtime
from fedmount.runner.runtimes.docker import DockerRuntime
from fedmount.runner.spec import CollectionMount, ContainerSpec, ContentMount, FileMount, TmpMount

RECORD_BYTES = 16 << 20  # a few hundred bytes per run


def default_reuse_dir(env: Mapping[str, str] = os.environ) -> str:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedmount", "runs")


def resolve_pdhs(ids: list[CollectionId], env: Mapping[str, str], **connect: Any) -> dict[str, str] | str:
    """Collection ID text -> its PDH now, with the caller's token; or why not (one line).
    `connect`: `Federation.connect` options (tests pass a fake transport)."""
    try:
        settings = Settings.from_environment(env)
    except SettingsError as exc:
        return str(exc)

    async def run() -> dict[str, str]:
        async with FederationView.open(settings, retries=1, **connect) as view:
            return {cid.text: (await view.resolve(cid)).portable_data_hash for cid in ids}

    try:
        return trio.run(run)
    except LookupFailure as exc:
        return str(exc)


def _mount(m: object, pdhs: Mapping[str, str]) -> dict[str, Any]:
    if isinstance(m, CollectionMount):
        return {"kind": "collection", "portable_data_hash": pdhs[m.collection.text], "path": m.path}
    if isinstance(m, TmpMount):
        return {"kind": "tmp", "capacity": m.capacity}
    if isinstance(m, ContentMount):
        return {"kind": "content", "content": m.content}
    assert isinstance(m, FileMount)
    return {"kind": "file", "path": m.path}


def run_key(
    spec: ContainerSpec, runtime: Runtime, env: Mapping[str, str], **connect: Any
) -> tuple[str | None, str]:
    """(the run's key, "") or (None, why it has none); `connect` as for `resolve_pdhs`."""
    ids = [m.collection for m in spec.collection_mounts()]
    if spec.image_collection is not None:
        ids.append(spec.image_collection)
    pdhs = resolve_pdhs(ids, env, **connect) if ids else {}
    if isinstance(pdhs, str):
        return None, f"an input could not be resolved: {pdhs}"
    if spec.image_collection is not None:
        image = pdhs[spec.image_collection.text]
    elif isinstance(runtime, DockerRuntime):
        image_id = runtime.image_id(spec.container_image)
        if image_id is None:
            return None, f"{spec.container_image} is not a local Docker image"
        image = image_id
    else:
        return None, "a root directory image has no content identity"
    described = {
        "runtime": runtime.name, "image": image, "command": spec.command, "cwd": spec.cwd,
        "environment": spec.environment, "output_path": spec.output_path,
        "mounts": {target: _mount(m, pdhs) for target, m in spec.mounts.items()},
    }  # fmt: skip
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest(), ""


class RunRecord:
    def __init__(self, directory: str, size_limit: int = RECORD_BYTES):
        self._cache = private_record(directory, size_limit=size_limit, eviction_policy="least-recently-used")

    def close(self) -> None:
        self._cache.close()

    def remember(self, key: str, results_dir: str) -> None:
        self._cache.set(key, results_dir)

    def find(self, key: str) -> tuple[str, dict] | None:
        """(results directory, its result.json) of a successful run with this key, still there."""
        results = self._cache.get(key)
        if not isinstance(results, str):
            return None
        try:
            with open(os.path.join(results, "result.json"), encoding="utf-8") as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or not _reusable(earlier, key, results):
            self._cache.delete(key)
            return None
        return results, earlier


def succeeded(result: Mapping[str, Any]) -> bool:
    """A run that ended Complete with exit code 0 and no error: not failed, cancelled or
    interrupted (a signal after the container exited still leaves an error)."""
    return result.get("state") == "Complete" and result.get("exit_code") == 0 and not result.get("error")


def _reusable(earlier: dict, key: str, results: str) -> bool:
    """A successful run of this key whose outputs are still there."""
    same = (earlier.get("reuse") or {}).get("key") == key
    outputs = not earlier.get("output_dir") or os.path.isdir(os.path.join(results, "output"))
    return succeeded(earlier) and same and outputs


def try_reuse(
    spec: ContainerSpec, runtime: Runtime, reuse_dir: str | None, results_dir: str, result: dict[str, Any]
) -> str | None:
    """Hand back the outputs of an earlier successful run of this step (its results directory),
    filling ``result["reuse"]``; None when there is none (``note`` says why, if not obvious)."""
    reuse = result["reuse"]
    reuse["key"], why = run_key(spec, runtime, os.environ)
    reuse["note"] = why or None
    if reuse["key"] is None:
        return None
    try:
        record = RunRecord(reuse_dir or default_reuse_dir())
        found = record.find(reuse["key"])
        record.close()
    except (OSError, sqlite3.Error) as exc:
        reuse["note"] = f"the reuse record cannot be read: {exc}"
        return None
    if found is not None:
        hand_back(*found, results_dir, result)
    return found[0] if found else None


def remember(reuse_dir: str | None, results_dir: str, result: dict[str, Any]) -> str | None:
    """Record a successful run (not itself a reuse) under its key; None, or why it could not be."""
    reuse = result["reuse"]
    if reuse["key"] is None or reuse["reused_from"] is not None or not succeeded(result):
        return None
    try:
        record = RunRecord(reuse_dir or default_reuse_dir())
        record.remember(reuse["key"], results_dir)
        record.close()
    except (OSError, sqlite3.Error) as exc:
        return f"cannot record the run for reuse: {exc}"
    return None


def hand_back(earlier_dir: str, earlier: dict, results_dir: str, result: dict[str, Any]) -> None:
    """Copy an earlier run's outputs into `results_dir` and describe them in `result`."""
    if os.path.isdir(os.path.join(earlier_dir, "output")):
        shutil.copytree(os.path.join(earlier_dir, "output"), os.path.join(results_dir, "output"),
                        symlinks=True, dirs_exist_ok=True)  # fmt: skip
    for name in ("stdout.txt", "stderr.txt"):
        src = os.path.join(earlier_dir, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(results_dir, name)):
            shutil.copy2(src, os.path.join(results_dir, name))
    result.update(state="Complete", exit_code=0)
    result["reuse"]["reused_from"] = {
        "results_dir": earlier_dir,
        "container_uuid": earlier.get("container_uuid"),
        "finished_at": earlier.get("finished_at"),
    }
