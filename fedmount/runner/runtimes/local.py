"""The local runtime: bubblewrap (`bwrap`) for hosts without a Docker daemon.

Root filesystem, from `container_image`:
- an absolute path to a directory (the host's `/` included) is used read-only as is;
- an image collection's `docker save` tarball is unpacked, layer by layer straight from the
  mount, into a private directory (`image.extract_rootfs`);
- a Docker image name is refused: without a daemon there is nothing to resolve it.

The sandbox starts from an empty tmpfs `/` and read-only binds each top-level entry of
the root filesystem into it (symlinks are recreated), so mount targets that do not exist in
the image (`/keep/in`, `/out`) can still be created. `/dev`, `/proc` and `/tmp` are fresh
(bwrap's `--dev`, `--proc`, `--tmpfs`), never the root's. Then come the mounts' binds in
order, outermost first. Every namespace is unshared; the network only when
`runtime_constraints.API` is true. `--die-with-parent` and a session of its own make the
sandbox end with the wrapper; `stop` kills the session.

The environment is not cleared with `--clearenv` + `--setenv` (values would be visible in
`ps`): bwrap is started with exactly the container's environment, which it passes on.
`ram` and `vcpus` are not enforced by this runtime; resource use is still measured.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from fedmount.runner.image import extract_rootfs, find_image_tarball
from fedmount.runner.runtimes import Bind, Launch, RunError
from fedmount.runner.spec import ContainerSpec, SpecError

# Never taken from the root filesystem: bwrap makes these fresh.
FRESH = {"dev": "--dev", "proc": "--proc", "tmp": "--tmpfs"}
SKIPPED = {"sys", "run", "lost+found"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def bwrap_args(spec: ContainerSpec, rootfs: str, binds: list[Bind], *, bwrap: str = "bwrap") -> list[str]:
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
    if spec.constraints.api:
        args.append("--share-net")
    args += ["--tmpfs", "/"]
    for entry in sorted(os.listdir(rootfs)):
        host = os.path.join(rootfs, entry)
        if entry in FRESH or entry in SKIPPED:
            continue
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), f"/{entry}"]
        else:
            args += ["--ro-bind", host, f"/{entry}"]
    for entry, option in FRESH.items():
        args += [option, f"/{entry}"]
    for b in binds:
        args += ["--ro-bind" if b.read_only else "--bind", b.host, b.target]
    args += ["--chdir", spec.cwd or "/", "--", *spec.command]
    return args


class LocalRuntime:
    name = "local"
    needs_allow_other = False

    def __init__(self, bwrap: str = "bwrap") -> None:
        self.bwrap = bwrap
        self.proc: subprocess.Popen[bytes] | None = None
        self.rootfs: str | None = None

    @classmethod
    def available(cls, bwrap: str = "bwrap") -> bool:
        return shutil.which(bwrap) is not None

    def prepare_image(self, spec: ContainerSpec, mountpoint: str, workdir: str) -> str:
        cid = spec.image_collection
        if cid is not None:
            _, tarball = find_image_tarball(mountpoint, cid)
            rootfs = os.path.join(workdir, "rootfs")
            os.mkdir(rootfs)
            extract_rootfs(tarball, rootfs)
        elif os.path.isabs(spec.container_image) and os.path.isdir(spec.container_image):
            rootfs = spec.container_image
        else:
            raise SpecError(
                "container_image",
                f"{spec.container_image!r}: the local runtime needs an image collection "
                "or a root directory such as /",
            )
        self.rootfs = rootfs
        return rootfs

    def start(self, launch: Launch) -> subprocess.Popen[bytes]:
        try:
            self.proc = subprocess.Popen(
                bwrap_args(launch.spec, launch.image, launch.binds, bwrap=self.bwrap),
                stdin=launch.stdin or subprocess.DEVNULL,
                stdout=launch.stdout,
                stderr=launch.stderr,
                env={"PATH": DEFAULT_PATH, **launch.env},
                start_new_session=True,
            )
        except OSError as exc:
            raise RunError(f"cannot run {self.bwrap}: {exc.strerror}; install bubblewrap") from None
        return self.proc

    def exit_code(self, proc: subprocess.Popen[bytes]) -> int:
        code = proc.returncode or 0
        return 128 - code if code < 0 else code

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
