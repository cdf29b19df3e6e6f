"""The control endpoint (plain HTTP on 127.0.0.1): shape the federation while it runs.

JSON in, JSON out; errors are ``{"error": "..."}`` with status 400 (bad request) or 404.

``GET /state``
    the current federation.json content (including collections added at run time).
``GET /faults``
    the faults in force, ``{"<cluster>/<service>": {...}}``.
``POST /faults`` ``{"cluster": "zbbbb", "service": "keep0", <fault fields>}``
    set (replace) the fault of one service; ``cluster``/``service`` may be ``"*"`` for all.
    Services: ``controller``, ``keep0``, ``keep1``. Fault fields (see `faults`):
    ``down`` (true/"reset" or "refuse"), ``status`` (int), ``corrupt`` (bool), ``stall``
    (bool), ``latency_ms`` (int), ``bandwidth`` (bytes/s per connection), ``uuid_prefix``
    and ``keep_service_uuid`` (str, controller: what it says about itself), ``count`` (apply
    to the next N requests only). Answers the new fault table.
``DELETE /faults[?cluster=X&service=Y]``
    clear all faults (or those of one cluster/service); stalled responses are released.
``POST /blob-ttl`` ``{"ttl": SECONDS[, "cluster": "zzzzz"]}``
    change the blob signature TTL (all clusters by default); signatures made under the old
    TTL stop verifying, as on a real cluster whose config changed.
``POST /collections`` ``{"cluster": "zbbbb", "name": "x", "files": {PATH: SPEC},
"empty_dirs": [...], "block_size": N, "claim_pdh": PDH}``
    add a collection; SPEC is ``{"data": "<base64>"}``, ``{"text": "..."}`` or
    ``{"size": N, "seed": "s"}`` (generated content, see `content`). Answers its
    federation.json entry (cluster, uuid, portable_data_hash, files) and rewrites
    federation.json. ``claim_pdh`` (tests only) makes the record claim a PDH its manifest
    does not hash to: a lying remote for the PDH fan-out check.
``POST /blocks/delete`` ``{"cluster": "zbbbb", "service": "keep0", "locator": "hash+size..."}``
    remove a block from one keepstore's volume; answers ``{"deleted": true|false}``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

from .content import Generated
from .faults import Fault
from .httpbase import Handler, Response
from .seed import add_collection


class ControlHandler(Handler):
    logged = False
    write_state: Callable[[], dict]

    def error(self, status: int, message: str) -> Response:
        return Response.json(status, {"error": message})

    def route(self) -> Response:
        try:
            body = json.loads(self.read_body() or b"{}") if self.command in ("POST", "PUT") else {}
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            return self.dispatch_control(self.command, self.url_path.rstrip("/"), body)
        except (ValueError, KeyError, TypeError) as exc:
            return self.error(400, str(exc).strip("'\""))

    def dispatch_control(self, method: str, path: str, body: dict) -> Response:
        world = self.server.world
        if path in ("/state", "/health") and method == "GET":
            return Response.json(200, self.server.state())
        if path == "/faults" and method == "GET":
            return Response.json(200, world.faults.snapshot())
        if path == "/faults" and method in ("POST", "PUT"):
            cluster, service = body.pop("cluster"), body.pop("service")
            fault = Fault.from_json(body)
            for c in list(world.clusters) if cluster == "*" else [cluster]:
                if c not in world.clusters:
                    raise KeyError(f"unknown cluster {c!r}")
                for s in self.server.services_of(c) if service == "*" else [service]:
                    if s not in self.server.services_of(c):
                        raise KeyError(f"unknown service {s!r}; known: {self.server.services_of(c)}")
                    world.faults.set(c, s, Fault.from_json(fault.to_json()))
            return Response.json(200, world.faults.snapshot())
        if path == "/faults" and method == "DELETE":
            world.faults.clear(self.query.get("cluster"), self.query.get("service"))
            return Response.json(200, world.faults.snapshot())
        if path == "/blob-ttl" and method == "POST":
            ttl = int(body["ttl"])
            if ttl <= 0:
                raise ValueError("ttl must be a positive number of seconds")
            targets = [body["cluster"]] if body.get("cluster") else list(world.clusters)
            for c in targets:
                world.clusters[c].ttl = ttl
            return Response.json(200, {c: world.clusters[c].ttl for c in world.clusters})
        if path == "/collections" and method == "POST":
            files = {p: _content(spec) for p, spec in body.get("files", {}).items()}
            entry = add_collection(
                world,
                body["cluster"],
                body["name"],
                files,
                body.get("empty_dirs", ()),
                int(body.get("block_size", 1 << 26)),
                body.get("claim_pdh"),
            )
            self.server.write_state()
            return Response.json(200, entry)
        if path == "/blocks/delete" and method == "POST":
            cluster = world.clusters[body["cluster"]]
            volume = int(str(body["service"]).removeprefix("keep"))
            path_ = cluster.block_path(volume, str(body["locator"])[:32])
            deleted = path_.exists()
            path_.unlink(missing_ok=True)
            return Response.json(200, {"deleted": deleted})
        return self.error(404, f"no control endpoint {method} {path}")


def _content(spec: object) -> bytes | Generated:
    if not isinstance(spec, dict):
        raise ValueError('each file is {"data": base64}, {"text": str} or {"size": n, "seed": s}')
    if "data" in spec:
        return base64.b64decode(spec["data"])
    if "text" in spec:
        return str(spec["text"]).encode()
    return Generated(int(spec["size"]), str(spec.get("seed", "fedmount")))
