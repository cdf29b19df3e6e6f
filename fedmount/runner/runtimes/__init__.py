"""Container runtimes for fedmount-run: what every runtime is given and the rules they share.

A runtime turns a validated `ContainerSpec` plus a list of `Bind`s (host path -> container
path, read-only or not) into a running process whose exit status is the container's:

- `docker` (`runtimes/docker.py`): `docker create` + `docker start -a`, image loaded from a
  collection tarball or used by local name;
- `local` (`runtimes/local.py`): bubblewrap over a root filesystem directory, for hosts
  without a Docker daemon.

Both are a `Runtime`, driven the same way by the runner (`cli.py`): `prepare_image`,
`start` with a `Launch` (returns the attached `subprocess.Popen`), poll it while watching
the mount, `exit_code`, `stop`.
Environment values never appear on a command line (where `ps` would show them): both
runtimes hand them over through the environment of the process they start.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Protocol

from fedmount.runner.spec import ContainerSpec

API_VARIABLES = ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN", "ARVADOS_API_HOST_INSECURE")


class RunError(RuntimeError):
    """The run could not go on for a reason outside the record (daemon down, mount died)."""


@dataclass(frozen=True)
class Bind:
    host: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class Launch:
    """What a runtime starts: the record, its binds and image, and where its streams go."""

    spec: ContainerSpec
    binds: list[Bind]
    image: str  # what `prepare_image` returned
    env: dict[str, str]  # the container's variables (`container_environment`)
    stdin: IO[bytes] | None
    stdout: IO[bytes]
    stderr: IO[bytes]
    client_env: dict[str, str]  # the environment of the runtime's own tools (the docker client)


class Runtime(Protocol):
    name: str
    needs_allow_other: bool  # the mount must be --allow-other (another process opens the binds)

    def prepare_image(self, spec: ContainerSpec, mountpoint: str, workdir: str) -> str:
        """Make the image usable; what to give `Launch.image`."""
        ...

    def start(self, launch: Launch) -> subprocess.Popen[bytes]:
        """Start the container, attached: the process whose exit is the container's."""
        ...

    def exit_code(self, proc: subprocess.Popen[bytes]) -> int: ...

    def pid(self) -> int | None:
        """The host pid of the container's first process, None once it has exited."""
        ...

    def stop(self) -> None:
        """Kill and remove whatever `start` made; safe to call at any time."""
        ...


def container_environment(spec: ContainerSpec, host_env: Mapping[str, str]) -> dict[str, str]:
    """The container's variables: the record's `environment`, plus the API settings of the
    wrapper's own environment only when `runtime_constraints.API` is true."""
    env = dict(spec.environment)
    if spec.constraints.api:
        env.update({name: host_env[name] for name in API_VARIABLES if name in host_env})
    return env
