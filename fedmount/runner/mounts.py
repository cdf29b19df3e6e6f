"""The fedmount child process and the host side of every mount, as crunch-run sets them up.

Mounting (reference/arvados-protocol.md §7, crunch-run's `SetupMounts`):

1. `fedmount_args` builds the command line in crunch-run's order: `--foreground
   --crunchstat-interval=S`, `--allow-other` for Docker (the daemon, not us, opens the bind
   sources), the cache flags from `runtime_constraints` (`--disk-cache --disk-cache-dir D
   --file-cache N` when `keep_cache_disk` > 0, else `--ram-cache --file-cache N` when
   `keep_cache_ram` > 0; with `--stage` always a disk cache in D, which holds the staged
   blocks, with `--file-cache` only if `keep_cache_disk` > 0 and `--ram-cache-size` if
   `keep_cache_ram` > 0), then `--mount-by-pdh by_id --disable-event-listening` when every
   collection the run reads (mounts, stdin, image) is named by PDH, else `--mount-by-id
   by_id`, and the mount point. (`--read-write` and `--storage-classes` are left out:
   fedmount is read-only.)
2. `FedMount.start` runs it in its own session (a Ctrl-C reaches only the wrapper, which
   tears things down in order) with its output, token-redacted line by line, in a log file,
   and polls `<mnt>/by_id/README` every 100 ms until it appears, the process dies, or the
   timeout passes.
3. `check_sources` stats every collection source `<mnt>/by_id/<id>[/path]`: a missing
   collection or path is the record's fault (`SpecError`, exit status 2), anything else is
   the run's (`RunError`).

Unmounting (`FedMount.stop`) never trusts one mechanism: `fedmount --unmount-timeout=8
--unmount` killed after 9 s, then SIGTERM / SIGKILL to the child, then, if the mount is
still listed in /proc/self/mountinfo, a lazy unmount (`mountinfo.lazy_unmount`:
`fusermount3 -u -z`, as root `umount -l`). The mount is followed by its mountinfo ID, not
its path, so a renamed parent directory cannot hide it.

`prepare_binds` makes the host side of the other mounts: tmp mounts are fresh directories
(mode 0777 + setgid, as crunch-run), the `output_path` tmp mount is the results' `output/`
directory, json/text mounts are 0444 files.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from fedmount import mountinfo
from fedmount.arvados.tokens import redact
from fedmount.runner.runtimes import Bind, RunError
from fedmount.runner.spec import CollectionMount, ContainerSpec, ContentMount, FileMount, SpecError, TmpMount

README_POLL_SECONDS = 0.1
UNMOUNT_TIMEOUT_SECONDS = 8
KILL_AFTER_SECONDS = 9


def fedmount_args(
    fedmount: list[str],
    spec: ContainerSpec,
    mountpoint: str,
    *,
    docker: bool,
    cache_dir: str,
    crunchstat_interval: float,
    staged: bool = False,
) -> list[str]:
    args = [*fedmount, "--foreground", f"--crunchstat-interval={crunchstat_interval:g}"]
    if docker:
        args.append("--allow-other")
    rc = spec.constraints
    if rc.keep_cache_disk > 0:
        args += ["--disk-cache", "--disk-cache-dir", cache_dir, "--file-cache", str(rc.keep_cache_disk)]
    elif staged:
        args += ["--disk-cache", "--disk-cache-dir", cache_dir]
    elif rc.keep_cache_ram > 0:
        args += ["--ram-cache", "--file-cache", str(rc.keep_cache_ram)]
    if staged and rc.keep_cache_ram > 0:
        args += ["--ram-cache-size", str(rc.keep_cache_ram)]
    if all(c.is_pdh for c in spec.collections()):
        args += ["--mount-by-pdh", "by_id", "--disable-event-listening"]
    else:
        args += ["--mount-by-id", "by_id"]
    args.append(mountpoint)
    return args


def collection_source(mountpoint: str, mount: CollectionMount) -> str:
    """The host path of a collection mount's source inside the fedmount mount."""
    src = os.path.join(mountpoint, "by_id", mount.collection.text)
    return os.path.join(src, mount.path) if mount.path else src


def mount_id(path: str) -> int | None:
    """The ID of the topmost mount at `path` (symlinks resolved), or None when nothing is mounted there."""
    entry = mountinfo.mounted_at(os.path.realpath(path))
    return entry.mount_id if entry is not None else None


def is_mounted(path: str) -> bool:
    return mount_id(path) is not None


class FedMount:
    """One fedmount child process serving `mountpoint`; `stop` is safe to call at any time."""

    def __init__(self, argv: list[str], unmount_argv: list[str], mountpoint: str, log_path: str) -> None:
        self.argv = argv
        self.unmount_argv = unmount_argv
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount_id: int | None = None
        self._logger: threading.Thread | None = None

    def start(self, env: dict[str, str], timeout: float) -> float:
        """Start fedmount and wait for `by_id/README`; returns the seconds it took."""
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise RunError(
                f"cannot start {self.argv[0]}: {exc.strerror}; install fedmount or pass --fedmount"
            ) from None
        log = open(self.log_path, "a", encoding="utf-8")
        self._logger = threading.Thread(target=_copy_redacted, args=(self.proc.stdout, log), daemon=True)
        self._logger.start()
        readme = os.path.join(self.mountpoint, "by_id", "README")
        while True:
            if self.proc.poll() is not None:
                self._logger.join(timeout=2)
                raise RunError(
                    f"fedmount exited with status {self.proc.returncode} before the mount was ready: "
                    f"{_last_line(self.log_path)} (log: {self.log_path})"
                )
            if os.path.exists(readme):
                self.mount_id = mount_id(self.mountpoint)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RunError(f"fedmount did not serve {readme} within {timeout:g} s; see {self.log_path}")
            time.sleep(README_POLL_SECONDS)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_sources(self, spec: ContainerSpec) -> None:
        for m in spec.collection_mounts():
            where = f'mounts["{m.target}"]'
            root = os.path.join(self.mountpoint, "by_id", m.collection.text)
            key = "portable_data_hash" if m.collection.is_pdh else "uuid"
            self.stat_source(
                root, f"{where}.{key}", f"collection {m.collection.text} does not exist in the federation"
            )
            if m.path:
                self.stat_source(
                    collection_source(self.mountpoint, m),
                    f"{where}.path",
                    f"{m.path!r} is not in collection {m.collection.text}",
                )
            if m.target == "stdin" and not os.path.isfile(collection_source(self.mountpoint, m)):
                raise SpecError(
                    f"{where}.path", f"{m.path!r} in {m.collection.text} is a directory, not a file"
                )

    def stat_source(self, path: str, field_name: str, missing: str) -> os.stat_result:
        try:
            return os.stat(path)
        except FileNotFoundError:
            raise SpecError(field_name, missing) from None
        except OSError as exc:
            why = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise RunError(f"{field_name}: reading {path} failed ({why}); see {self.log_path}") from None

    def mounted_at(self) -> str | None:
        """Where our mount is now: followed by mount ID once known, so a renamed parent
        directory cannot hide it; None when it is not mounted."""
        if self.mount_id is not None:
            entry = mountinfo.by_id(self.mount_id)
            return entry.path if entry is not None else None
        return self.mountpoint if is_mounted(self.mountpoint) else None

    def stop(self) -> None:
        """Unmount and end the child, whatever state they are in."""
        point = self.mounted_at()
        if point is not None:
            try:
                subprocess.run(
                    [*self.unmount_argv, f"--unmount-timeout={UNMOUNT_TIMEOUT_SECONDS}", "--unmount", point],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=KILL_AFTER_SECONDS,
                )
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None:
            _end(self.proc, KILL_AFTER_SECONDS)
        point = self.mounted_at()
        if point is not None:
            mountinfo.lazy_unmount(point)
        if self._logger is not None:
            self._logger.join(timeout=2)


def _end(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to `grace` s for `proc` to exit after SIGTERM, then SIGKILL its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _copy_redacted(src: IO[bytes], dst: IO[str]) -> None:
    with src, dst:
        for raw in src:
            dst.write(redact(raw.decode("utf-8", "replace")))
            dst.flush()


def _last_line(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else "no output"


def prepare_binds(spec: ContainerSpec, mountpoint: str, workdir: str, output_dir: str | None) -> list[Bind]:
    """Create the host side of each mount and return the binds, outermost first."""
    binds = []
    for n, m in enumerate(spec.binds()):
        if isinstance(m, CollectionMount):
            binds.append(Bind(collection_source(mountpoint, m), m.target, True))
        elif isinstance(m, TmpMount):
            host = (
                output_dir
                if m.target == spec.output_path and output_dir
                else os.path.join(workdir, f"tmp{n}")
            )
            os.makedirs(host, exist_ok=True)
            os.chmod(host, 0o2777)
            binds.append(Bind(host, m.target, False))
        elif isinstance(m, ContentMount):
            host = os.path.join(workdir, f"file{n}")
            with open(host, "w", encoding="utf-8") as f:
                f.write(m.content)
            os.chmod(host, 0o444)
            binds.append(Bind(host, m.target, True))
    return binds


def stream_path(spec: ContainerSpec, stream: str, output_dir: str, default: str) -> str:
    """Host file for the container's stdout/stderr: its `file` mount inside output/, else `default`."""
    m = spec.mounts.get(stream)
    if isinstance(m, FileMount) and spec.output_path is not None:
        rel = os.path.relpath(m.path, spec.output_path)
        host = os.path.join(output_dir, rel)
        os.makedirs(os.path.dirname(host), exist_ok=True)
        return host
    return default
