"""The Docker runtime: crunch-run's Docker executor, driven through the `docker` command.

- Image: an image collection's `<id>.tar` is loaded with `docker load` reading the open
  FUSE file as its stdin (streamed from Keep, never copied) unless the daemon already has
  that id; a local image name is used as is and never pulled (no registry is assumed).
- Run: `docker create` with a name the wrapper owns (`fedmount-run-<uuid>-<random>`, label
  `fedmount-run`), binds `host:ctr:ro` for collections and json/text files (`host:ctr` for
  tmp mounts), `--network none` unless `runtime_constraints.API`, `--workdir` from `cwd`,
  `--memory` / `--cpus` from `ram` / `vcpus`, the command as the image's CMD (its
  ENTRYPOINT, if any, applies, as in crunch-run), each variable passed as `-e NAME` with its
  value in the docker client's environment (so no value is on a command line), then
  `docker start --attach` with the container's stdout/stderr going to files.
- The exit code comes from `docker inspect` (`State.ExitCode`); `stop` is `docker rm -f`,
  which kills a running container and removes it, so nothing outlives the wrapper.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from typing import Any

from fedmount.runner.image import find_image_tarball
from fedmount.runner.runtimes import Bind, Launch, RunError
from fedmount.runner.spec import ContainerSpec, SpecError

LABEL = "fedmount-run"


def container_name(spec: ContainerSpec) -> str:
    middle = f"{spec.uuid}-" if spec.uuid else ""
    return f"fedmount-run-{middle}{secrets.token_hex(4)}"


def create_args(
    spec: ContainerSpec, binds: list[Bind], image: str, name: str, env_names: list[str], *, stdin: bool
) -> list[str]:
    """`docker create` arguments (after `docker`) for `spec`."""
    args = ["create", "--name", name, "--label", f"{LABEL}=1"]
    if not spec.constraints.api:
        args += ["--network", "none"]
    if spec.cwd:
        args += ["--workdir", spec.cwd]
    if spec.constraints.ram > 0:
        args += ["--memory", str(spec.constraints.ram)]
    if spec.constraints.vcpus > 0:
        args += ["--cpus", f"{spec.constraints.vcpus:g}"]
    if stdin:
        args += ["--interactive"]
    for env_name in sorted(env_names):
        args += ["--env", env_name]
    for b in binds:
        args += ["--volume", f"{b.host}:{b.target}:ro" if b.read_only else f"{b.host}:{b.target}"]
    args += [image, *spec.command]
    return args


class DockerRuntime:
    name = "docker"
    needs_allow_other = True

    def __init__(self, docker: str = "docker") -> None:
        self.docker = docker
        self.container: str | None = None
        self.cid: str | None = None

    @classmethod
    def available(cls, docker: str = "docker") -> bool:
        try:
            return (
                subprocess.run(
                    [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=15
                ).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _docker(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.docker, *args], capture_output=True, text=True, **kw)
        except OSError as exc:
            raise RunError(f"cannot run {self.docker}: {exc.strerror}; install docker.io") from None

    def image_id(self, ref: str) -> str | None:
        """The id (content digest) of a local image, or None when the daemon has none by that name."""
        found = self._docker("image", "inspect", "--format", "{{.Id}}", ref)
        return found.stdout.strip() or None if found.returncode == 0 else None

    def has_image(self, ref: str) -> bool:
        return self.image_id(ref) is not None

    def prepare_image(self, spec: ContainerSpec, mountpoint: str, workdir: str) -> str:
        """Make the image available to the daemon; returns the reference to run."""
        cid = spec.image_collection
        if cid is None:
            if not self.has_image(spec.container_image):
                raise SpecError(
                    "container_image",
                    f"{spec.container_image} is not a local Docker image (nothing is pulled); "
                    "give an image collection stored with arv-keepdocker",
                )
            return spec.container_image
        image_id, tarball = find_image_tarball(mountpoint, cid)
        if not self.has_image(image_id):
            with open(tarball, "rb") as f:
                try:
                    load = subprocess.run([self.docker, "load"], stdin=f, capture_output=True, text=True)
                except OSError as exc:
                    raise RunError(f"cannot run {self.docker}: {exc.strerror}") from None
            if load.returncode != 0:
                raise RunError(f"docker load of {cid.text}/{image_id}.tar failed: {_one_line(load.stderr)}")
            if not self.has_image(image_id):
                raise SpecError(
                    "container_image", f"{cid.text}: loading {image_id}.tar did not produce image {image_id}"
                )
        return image_id

    def start(self, launch: Launch) -> subprocess.Popen[bytes]:
        run, stdin = launch, launch.stdin
        self.container = container_name(run.spec)
        args = create_args(
            run.spec, run.binds, run.image, self.container, list(run.env), stdin=stdin is not None
        )
        created = self._docker(*args, env={**run.client_env, **run.env})
        if created.returncode != 0:
            self.container = None
            raise RunError(f"docker create failed: {_one_line(created.stderr)}")
        self.cid = created.stdout.strip()
        argv = [self.docker, "start", "--attach", *(["--interactive"] if stdin else []), self.container]
        return subprocess.Popen(
            argv,
            stdin=stdin or subprocess.DEVNULL,
            stdout=run.stdout,
            stderr=run.stderr,
            env=run.client_env,
            start_new_session=True,
        )

    def inspect(self) -> dict:
        if self.container is None:
            return {}
        res = self._docker("inspect", "--type", "container", self.container)
        return json.loads(res.stdout)[0] if res.returncode == 0 else {}

    def exit_code(self, proc: subprocess.Popen[bytes]) -> int:
        state = self.inspect().get("State") or {}
        code = state.get("ExitCode")
        return int(code) if code is not None else int(proc.returncode or 0)

    def pid(self) -> int | None:
        """Host pid of the container's first process (0 / None once it has exited)."""
        return (self.inspect().get("State") or {}).get("Pid") or None

    def stop(self) -> None:
        if self.container is not None:
            self._docker("rm", "--force", self.container, timeout=60)
            self.container = None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
