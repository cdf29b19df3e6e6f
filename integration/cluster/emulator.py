"""Assembling the emulated federation: services per cluster, readiness, the state file.

For each cluster: one TLS controller and two keepstores (``keep0``, ``keep1``), each its
own `Service` on 127.0.0.1; plus one control endpoint for the whole federation. Every
cluster knows every other as a ``Proxy: true`` remote. Once every service answers a real
request (discovery over https; a keepstore's ``GET /``), ``DIR/federation.json`` is
written atomically; it is rewritten when a collection is added at run time.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

from .control import ControlHandler
from .controller import ControllerHandler
from .httpbase import Service
from .keepstore import KeepstoreHandler
from .model import World
from .seed import seed_demo


class ControlService(Service):
    emulator: Emulator

    def state(self) -> dict:
        return self.emulator.state()

    def write_state(self) -> dict:
        return self.emulator.write_state()

    def services_of(self, cluster_id: str) -> list[str]:
        return ["controller"] + [f"keep{i}" for i in range(len(self.world.clusters[cluster_id].volumes))]


class Emulator:
    def __init__(self, state_dir: Path, cluster_ids: list[str], ttl: int, base_port: int = 0):
        self.state_dir = state_dir
        self.world = World(state_dir, cluster_ids, ttl)
        port = iter(range(base_port, base_port + 1000)) if base_port else None
        self.services: list[Service] = []
        self.control = ControlService(self.world, "control", "control", ControlHandler, port=_next(port))
        self.control.emulator = self
        server_ssl = self.world.authority.server_context()
        for cid, cluster in self.world.clusters.items():
            ctrl = Service(self.world, cid, "controller", ControllerHandler, server_ssl, _next(port))
            cluster.api_host = f"127.0.0.1:{ctrl.port}"
            self.services.append(ctrl)
            for i in range(len(cluster.volumes)):
                keep = Service(self.world, cid, f"keep{i}", KeepstoreHandler, port=_next(port))
                cluster.keep_urls.append(keep.url)
                self.services.append(keep)

    def seed(self, kind: str) -> None:
        if kind == "demo":
            seed_demo(self.world)

    def start(self) -> None:
        for service in [self.control, *self.services]:
            service.start()
        self.wait_ready()
        self.write_state()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        for service in [self.control, *self.services]:
            while True:
                try:
                    _probe(service, self.world)
                    break
                except (OSError, http.client.HTTPException):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)

    def state(self) -> dict:
        w = self.world
        return {
            "ca_cert": str(w.authority.ca_path),
            "home": w.home,
            "control_url": self.control.url,
            "requests_log": str(w.log.path),
            "clusters": {
                cid: {
                    "api_host": c.api_host,
                    "keep_services": list(c.keep_urls),
                    "token": c.token,
                    "user_uuid": c.user_uuid,
                    "other_user_uuid": c.other_user_uuid,
                    "other_token": c.other_account.token,
                }
                for cid, c in w.clusters.items()
            },
            "collections": dict(w.seeded),
            "projects": dict(w.tree["projects"]),
            "links": dict(w.tree["links"]),
            "hidden": dict(w.tree["hidden"]),
        }

    def write_state(self) -> dict:
        state = self.state()
        path = self.state_dir / "federation.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False))
        os.replace(tmp, path)
        return state

    def stop(self) -> None:
        self.world.stop.set()
        for service in [self.control, *self.services]:
            service.close()
        self.world.log.close()


def _next(ports) -> int:
    return next(ports) if ports else 0


def _probe(service: Service, world: World) -> None:
    if service.ssl_context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", service.port, timeout=5, context=world.client_ssl
        )
        path = "/discovery/v1/apis/arvados/v1/rest"
    else:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
        path = "/health" if service is not None and service.name == "control" else "/"
    try:
        conn.request("GET", path, headers={"X-Request-Id": "req-readiness-probe"})
        conn.getresponse().read()
    finally:
        conn.close()
