"""Client library for the emulated federation: start it, shape it, read its request log.

Used by integration tests, benchmarks and the demo::

    fed = Federation.start(state_dir, clusters=("zzzzz", "zbbbb", "zcccc"), seed="demo")
    try:
        env = fed.env("zzzzz")                      # ARVADOS_API_HOST/TOKEN + CA for the SDK
        uuid = fed.collections["big"]["uuid"]
        fed.set_fault("zbbbb", "keep0", down=True)  # or status=503, corrupt=True, stall=True,
                                                    #    latency_ms=50, bandwidth=10_000_000, count=1
        mark = fed.mark()
        ...
        fed.requests(since=mark)                    # parsed DIR/requests.jsonl lines
        fed.clear_faults()
    finally:
        fed.stop()

`Federation.start` runs ``python -m integration.cluster up`` as a subprocess (its output
goes to ``DIR/emulator.log``) and returns once ``DIR/federation.json`` exists.

``DIR/federation.json`` is DESIGN.md's state file, extended (every field DESIGN.md lists
keeps its meaning):

- ``clusters.<id>``: ``user_uuid``/``token`` are the cluster's user (the current user of
  tests); ``other_user_uuid``/``other_token`` a second user of that cluster, who shares a
  project with the first (and, on the other clusters, with the home cluster's user). The
  first user's data is readable by every user of the federation; the second user's only
  where shared.
- ``collections.<key>``: also ``name`` and ``owner_uuid`` (a user, or a project), and
  ``empty_dirs`` when there are any; the seed's project-tree collections have keys
  ``<cluster>:home/<path>`` (the first user's), ``<cluster>:other/<path>`` (the
  second's) and ``<cluster>:<home> user/<path>`` (what the home cluster's user owns on
  another cluster). Every collection listed here is readable by the home cluster's user.
- ``projects.<key>``: projects and filter groups (``cluster``, ``uuid``, ``name``,
  ``owner_uuid``, ``group_class``; filter groups also ``members``, the keys they list).
- ``links.<key>``: tag links (``cluster``, ``uuid``, ``link_class``, ``name``,
  ``head_uuid``, ``tail_uuid``).
- ``hidden.<key>``: what the seed made that must not be listed, with ``why``: "trashed",
  "in a trashed project", "old version", "private" (another user's, never shared).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLUSTERS = ("zzzzz", "zbbbb", "zcccc")
SERVICES = ("controller", "keep0", "keep1")


class EmulatorError(RuntimeError):
    pass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class Federation:
    def __init__(self, state_dir: Path, process: subprocess.Popen | None, state: dict):
        self.state_dir = state_dir
        self.process = process
        self.state = state
        # The collections the seed wrote; tests add (and damage) their own beside them.
        self.seeded_names = frozenset(state["collections"])

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        state_dir: str | os.PathLike,
        clusters: Iterable[str] = DEFAULT_CLUSTERS,
        seed: str = "demo",
        blob_ttl: int | None = None,
        base_port: int | None = None,
        timeout: float = 60,
    ) -> Federation:
        state_dir = Path(state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        state_file = state_dir / "federation.json"
        state_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "integration.cluster",
            "up",
            "--state",
            str(state_dir),
            "--clusters",
            ",".join(clusters),
            "--seed",
            seed,
        ]
        if blob_ttl is not None:
            cmd += ["--blob-ttl", str(blob_ttl)]
        if base_port is not None:
            cmd += ["--base-port", str(base_port)]
        log = open(state_dir / "emulator.log", "ab")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while not state_file.exists():
            if process.poll() is not None:
                raise EmulatorError(
                    f"the emulator exited with status {process.returncode}: {_tail(state_dir)}"
                )
            if time.monotonic() > deadline:
                process.terminate()
                process.wait(10)
                raise EmulatorError(f"the emulator did not come up within {timeout:.0f}s: {_tail(state_dir)}")
            time.sleep(0.05)
        return cls(state_dir, process, json.loads(state_file.read_text()))

    @classmethod
    def attach(cls, state_dir: str | os.PathLike) -> Federation:
        """Use a federation someone else started (no process to stop)."""
        state_dir = Path(state_dir).resolve()
        return cls(state_dir, None, json.loads((state_dir / "federation.json").read_text()))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state ---------------------------------------------------------------------------

    @property
    def home(self) -> str:
        return self.state["home"]

    @property
    def ca_cert(self) -> str:
        return self.state["ca_cert"]

    @property
    def clusters(self) -> dict[str, dict]:
        return self.state["clusters"]

    @property
    def collections(self) -> dict[str, dict]:
        return self.state["collections"]

    @property
    def seeded_collections(self) -> dict[str, dict]:
        """The seed's collections only, untouched by what tests added at run time."""
        return {name: c for name, c in self.collections.items() if name in self.seeded_names}

    @property
    def control_url(self) -> str:
        return self.state["control_url"]

    def api_host(self, cluster: str | None = None) -> str:
        return self.clusters[cluster or self.home]["api_host"]

    def token(self, cluster: str | None = None) -> str:
        return self.clusters[cluster or self.home]["token"]

    def user_uuid(self, cluster: str | None = None) -> str:
        return self.clusters[cluster or self.home]["user_uuid"]

    def other_token(self, cluster: str | None = None) -> str:
        """The token of the cluster's second user (who shares projects with the first)."""
        return self.clusters[cluster or self.home]["other_token"]

    def other_user_uuid(self, cluster: str | None = None) -> str:
        return self.clusters[cluster or self.home]["other_user_uuid"]

    @property
    def projects(self) -> dict[str, dict]:
        return self.state.get("projects", {})

    @property
    def links(self) -> dict[str, dict]:
        return self.state.get("links", {})

    @property
    def hidden(self) -> dict[str, dict]:
        return self.state.get("hidden", {})

    def keep_services(self, cluster: str | None = None) -> list[str]:
        return self.clusters[cluster or self.home]["keep_services"]

    def env(self, cluster: str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the Arvados SDK, arv-put/arv-get, arv-mount and fedmount on `cluster`.

        ``SSL_CERT_FILE`` is what the SDK's ``arvados.util.ca_certs_path`` (httplib2 and
        pycurl) reads; ``REQUESTS_CA_BUNDLE`` serves requests-based tools.
        """
        env = dict(os.environ if base is None else base)
        env.pop("ARVADOS_API_HOST_INSECURE", None)
        env.pop("ARVADOS_KEEP_SERVICES", None)
        env.update(
            ARVADOS_API_HOST=self.api_host(cluster),
            ARVADOS_API_TOKEN=self.token(cluster),
            SSL_CERT_FILE=self.ca_cert,
            REQUESTS_CA_BUNDLE=self.ca_cert,
        )
        return env

    # --- control -------------------------------------------------------------------------

    def control(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.control_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise EmulatorError(
                f"control {method} {path}: {exc.code} {exc.read().decode(errors='replace')}"
            ) from None

    def set_fault(self, cluster: str, service: str, **fault: object) -> dict:
        """Fields: down (True/"reset"/"refuse"), status, corrupt, stall, latency_ms, bandwidth,
        uuid_prefix, keep_service_uuid (the controller lies about itself), count."""
        return self.control("POST", "/faults", {"cluster": cluster, "service": service, **fault})

    def clear_faults(self, cluster: str | None = None, service: str | None = None) -> dict:
        query = "&".join(f"{k}={v}" for k, v in (("cluster", cluster), ("service", service)) if v)
        return self.control("DELETE", "/faults" + (f"?{query}" if query else ""))

    def faults(self) -> dict:
        return self.control("GET", "/faults")

    def set_blob_ttl(self, ttl: int, cluster: str | None = None) -> dict:
        return self.control("POST", "/blob-ttl", {"ttl": ttl, **({"cluster": cluster} if cluster else {})})

    def add_collection(
        self,
        cluster: str,
        name: str,
        files: Mapping[str, object],
        empty_dirs: Iterable[str] = (),
        block_size: int | None = None,
        claim_pdh: str | None = None,
    ) -> dict:
        """Add a collection; a file is bytes, str, (size, seed) for generated content, or a SPEC dict."""
        specs = {path: _spec(content) for path, content in files.items()}
        body: dict = {"cluster": cluster, "name": name, "files": specs, "empty_dirs": list(empty_dirs)}
        if block_size:
            body["block_size"] = block_size
        if claim_pdh:
            body["claim_pdh"] = claim_pdh
        entry = self.control("POST", "/collections", body)
        self.state["collections"][name] = entry
        return entry

    def delete_block(self, cluster: str, service: str, locator: str) -> bool:
        return self.control(
            "POST", "/blocks/delete", {"cluster": cluster, "service": service, "locator": locator}
        )["deleted"]

    # --- raw HTTP ------------------------------------------------------------------------

    def request(
        self,
        cluster: str | None,
        path: str,
        *,
        service: str = "controller",
        method: str = "GET",
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        """One request to a service (https with the CA for controllers); `token` as Bearer."""
        cluster = cluster or self.home
        hdrs = {"X-Request-Id": "req-harness", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if service == "controller":
            host, port = self.api_host(cluster).rsplit(":", 1)
            ctx = ssl.create_default_context(cafile=self.ca_cert)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, int(port), timeout=60, context=ctx
            )
        else:
            url = self.keep_services(cluster)[int(service.removeprefix("keep"))]
            host, port = url.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    # --- request log ---------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the request log; pass it to `requests(since=...)`."""
        try:
            return os.path.getsize(self.state["requests_log"])
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0, **match: object) -> list[dict]:
        """Parsed request-log lines after `since`, optionally only those whose fields equal `match`."""
        with open(self.state["requests_log"], "rb") as f:
            f.seek(since)
            lines = f.read().decode().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def wait_requests(
        self,
        since: int = 0,
        count: int = 1,
        timeout: float = 10,
        where: Callable[[dict], bool] | None = None,
        **match: object,
    ) -> list[dict]:
        """Like `requests`, but wait until `count` matching lines exist (a service logs a request
        after answering it, so a client may see the answer before the line)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.requests(since, **match) if where is None or where(r)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def _spec(content: object) -> dict:
    if isinstance(content, dict):
        return content
    if isinstance(content, bytes):
        return {"data": base64.b64encode(content).decode()}
    if isinstance(content, str):
        return {"text": content}
    if isinstance(content, tuple) and len(content) == 2:
        return {"size": int(content[0]), "seed": str(content[1])}
    raise TypeError(
        f"file content must be bytes, str, (size, seed) or a spec dict, not {type(content).__name__}"
    )


def _tail(state_dir: Path) -> str:
    try:
        lines = (state_dir / "emulator.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no emulator.log)"
    return lines[-1] if lines else "(emulator.log is empty)"
