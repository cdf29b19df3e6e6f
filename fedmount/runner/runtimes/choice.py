"""Which runtime a run uses: ``--runtime``, else Docker when its daemon answers, else bubblewrap."""

from __future__ import annotations

from fedmount.runner.runtimes import RunError, Runtime
from fedmount.runner.runtimes.docker import DockerRuntime
from fedmount.runner.runtimes.local import LocalRuntime


def choose_runtime(name: str | None) -> Runtime:
    if name == "docker" or (name is None and DockerRuntime.available()):
        if name == "docker" and not DockerRuntime.available():
            raise RunError(
                "--runtime docker: the Docker daemon does not answer; start dockerd or use --runtime local"
            )
        return DockerRuntime()
    if not LocalRuntime.available():
        raise RunError("no runtime: the Docker daemon does not answer and bwrap is not installed")
    return LocalRuntime()
