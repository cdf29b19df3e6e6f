"""`fedmount-run`: run one Arvados container record with its collections mounted by fedmount.

The run, in the order crunch-run does it (reference/arvados-protocol.md §7):

1. Parse and validate the record (`spec.py`); a bad record is refused before anything
   starts (exit status 2, one line naming the field). ``--check`` stops here and answers
   whether it could run on this host (`check.py`). Unless ``--no-reuse``, a step an
   earlier run already computed gets that run's outputs and nothing starts (`reuse.py`).
2. Make a private temporary directory; with ``--stage``, pull every collection the run
   reads into the disk cache the mount will use (`staging.py`; a collection that cannot
   be staged is the record's fault: exit status 2, nothing mounted yet). Start `fedmount`
   on `<tmp>/mnt` (`mounts.py`), wait for `by_id/README`, stat every collection source (a
   missing collection or path is the record's fault: exit status 2).
3. Make the image available (`runtimes/*.prepare_image`), create the host side of the
   other mounts, open stdin from the mount, start the container (`runtimes/`), sample its
   resource use (`crunchstat.py`) and watch the mount: if fedmount dies the container is
   stopped.
4. Clean up on every path — success, failure, refusal, SIGINT/SIGTERM: stop and remove the
   container, read the mount's stats, unmount (`fedmount --unmount`, then signals, then a
   lazy unmount), remove the temporary directory, write result.json (`results.py`).

Signals: the first SIGINT/SIGTERM raises `Interrupted` in the main thread wherever it is
waiting; later ones, and any arriving during cleanup, are only recorded, so cleanup always
runs to its end. Children run in sessions of their own so that a terminal's Ctrl-C reaches
only the wrapper, which stops them in order.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from fedmount.cliutil import seconds
from fedmount.runner import reuse
from fedmount.runner.check import check_record
from fedmount.runner.crunchstat import Sampler
from fedmount.runner.mounts import (
    FedMount,
    collection_source,
    fedmount_args,
    is_mounted,
    prepare_binds,
    stream_path,
)
from fedmount.runner.results import mount_figures, read_mount_stats, write_result
from fedmount.runner.runtimes import Launch, RunError, Runtime, container_environment
from fedmount.runner.runtimes.choice import choose_runtime
from fedmount.runner.spec import CollectionMount, ContainerSpec, FileMount, SpecError, read_record
from fedmount.runner.staging import stage_for_run

EXIT_FAILED = 1
EXIT_REFUSED = 2

DESCRIPTION = """\
Run one container step described by an Arvados container record (JSON, from a file or -
for standard input) the way crunch-run does: mount the collections it names, from any
cluster of the federation, with fedmount; bind them read-only into a Docker container or a
bubblewrap sandbox; collect its output directory, standard output and error, resource use
and the mount's figures in the results directory; and exit with the container's status.
"""

EPILOG = """\
record fields:
  command, container_image, cwd, environment, mounts, output_path and
  runtime_constraints (API, ram, vcpus, keep_cache_disk, keep_cache_ram) are used;
  other fields are ignored. Mount kinds: collection (portable_data_hash or uuid,
  optional path; read-only), tmp, json, text, file (stdout and stderr only), and
  stdin from a collection file. keep mounts and writable collections are refused.
  output_path must be the target of a tmp mount.

image:
  container_image may name a collection (PDH or UUID, any cluster) holding a
  Docker image tarball as arv-keepdocker stores it (<image id>.tar); it is
  streamed from the mount into docker load. Any other name is a local Docker
  image, never pulled. The local runtime takes an image collection (unpacked into
  a private root) or a root directory such as /.

environment:
  The container gets the record's environment; ARVADOS_API_HOST,
  ARVADOS_API_TOKEN and ARVADOS_API_HOST_INSECURE (from fedmount-run's own
  environment) and network access only when runtime_constraints.API is true.
  fedmount itself is started with fedmount-run's environment.

results (in --output-dir):
  output/ (the output_path mount), stdout.txt, stderr.txt, fedmount.log,
  crunchstat.txt, result.json (state Complete or Cancelled, exit_code, error,
  timings, bytes read per cluster, cache hits, CPU and memory figures; with
  --stage, "stage": collections, blocks, bytes, bytes_staged,
  bytes_already_cached, seconds; "reuse": the step's key, reused_from (the
  results_dir, container_uuid and finished_at of the earlier run whose outputs
  were handed back, or null) and a note when the step has no key). No token is
  written to any of them.

exit status:
  the container's exit status when it ran; 1 when the run failed for another
  reason (no runtime, the mount did not come up or died); 2 when the record was
  refused (invalid JSON, missing command, unsupported mount, missing collection,
  path or image, a collection --stage could not stage); 128+N when interrupted
  by signal N (SIGINT, SIGTERM). Every path stops the container, unmounts and
  removes temporary directories.
"""


class _Reused(Exception):
    """An earlier run's outputs were handed back: nothing is started."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmount-run",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("record", help="the container record: a JSON file, or - for standard input")
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        help="results directory; created if missing, must be empty (default: a new directory in the "
        "current directory named after the record and the time, such as job-20260102T030405Z for "
        "job.json, or the record's uuid for -; its name is printed on stderr)",
    )
    p.add_argument(
        "--runtime",
        choices=("docker", "local"),
        help="docker (the default when the Docker daemon answers) or local (bubblewrap)",
    )
    p.add_argument(
        "--fedmount",
        metavar="CMD",
        help="the fedmount command to run (default: fedmount beside this Python, else on PATH)",
    )
    p.add_argument(
        "--crunchstat-interval",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds between resource lines in crunchstat.txt and fedmount.log; 0 for none (default 10)",
    )
    p.add_argument(
        "--mount-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the mount to be ready (default 60)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="fedmount disk cache directory when keep_cache_disk is set or with --stage "
        "(default: a private one, removed)",
    )
    p.add_argument(
        "--stage",
        action="store_true",
        help="before the container starts, pull every block of every collection the run reads "
        "(collection mounts and the image) into that disk cache, md5-verified, read along the route "
        "the run's fedmount takes (its default, auto: a remote cluster's blocks from its own Keep "
        "while it answers, else through the home keepstore), with progress lines in fedmount.log, "
        "so that the container's reads need no Keep request; a collection that "
        "cannot be staged completely refuses the run (exit status 2)",
    )
    p.add_argument(
        "--tmpdir", metavar="DIR", help="where the private temporary directory goes (default $TMPDIR or /tmp)"
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="run the container even when an earlier run of the same step (same image content, command, "
        "cwd, environment, inputs by their current PDH, mounts and output path) succeeded; by default its "
        "outputs are handed back without starting anything, and result.json names that run",
    )
    p.add_argument(
        "--reuse-dir",
        metavar="DIR",
        help="the record of successful runs that --no-reuse ignores (default $XDG_CACHE_HOME/fedmount/runs "
        "or ~/.cache/fedmount/runs; bounded, least recently used entries go first)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="start nothing: answer YES or NO, with every reason, whether the record could run on this "
        "host now (runtime usable, image available, runtime_constraints within this host's memory, CPUs, "
        "scratch space and GPUs, every input readable with this token) and estimate the transfer of "
        "what is not in the --cache-dir cache; exit status 0 YES, 1 NO, 2 a refused record",
    )
    p.add_argument(
        "--json", action="store_true", help="with --check: print the fedmount-check/1 JSON document"
    )
    return p


def default_fedmount() -> list[str]:
    beside = Path(sys.executable).parent / "fedmount"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fedmount")
    if found:
        return [found]
    return [sys.executable, "-m", "fedmount"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Run:
    def __init__(self, spec: ContainerSpec, args: argparse.Namespace, results_dir: str) -> None:
        self.spec = spec
        self.args = args
        self.results = results_dir
        self.fedmount = shlex.split(args.fedmount) if args.fedmount else default_fedmount()
        self.signals: list[int] = []
        self.cleaning = False
        self.result: dict[str, Any] = {
            "container_uuid": spec.uuid,
            "container_image": spec.container_image,
            "state": "Cancelled",
            "exit_code": None,
            "error": None,
            "runtime": None,
            "started_at": _now(),
            "finished_at": None,
            "timings": {},
            "fedmount": mount_figures({}),
            "stage": None,
            "reuse": {"key": None, "reused_from": None, "note": None},
            "resources": None,
            "output_dir": os.path.join(results_dir, "output") if spec.output_path else None,
            "stdout": os.path.join(results_dir, "stdout.txt"),
            "stderr": os.path.join(results_dir, "stderr.txt"),
            "fedmount_log": os.path.join(results_dir, "fedmount.log"),
        }

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1 and not self.cleaning:
            raise Interrupted(signum)

    def _interrupt(self, signum: int) -> NoReturn:
        """A signal received by someone else (trio, while staging): interrupt as `_on_signal` does."""
        self.signals.append(signum)
        raise Interrupted(signum)

    def execute(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = time.monotonic()
        runtime = mount = sampler = None
        work = None
        files: list[IO[bytes]] = []
        status = EXIT_FAILED
        try:
            runtime = choose_runtime(self.args.runtime)
            self.result["runtime"] = runtime.name
            earlier = None
            if self.args.no_reuse:
                self.result["reuse"]["note"] = "--no-reuse"
            else:
                earlier = reuse.try_reuse(self.spec, runtime, self.args.reuse_dir, self.results, self.result)
            if earlier is not None:
                print(f"fedmount-run: reused the results of the same step in {earlier}", file=sys.stderr)
                raise _Reused()
            work = tempfile.mkdtemp(prefix="fedmount-run-", dir=self.args.tmpdir)
            mnt = os.path.join(work, "mnt")
            os.mkdir(mnt)
            cache_dir = self.args.cache_dir or os.path.join(work, "cache")
            if self.args.stage:
                self.result["stage"] = stage_for_run(
                    self.spec,
                    cache_dir,
                    self.result["fedmount_log"],
                    dict(os.environ),
                    interrupted=self._interrupt,
                )
                self.result["timings"]["stage_seconds"] = self.result["stage"]["seconds"]
            argv = fedmount_args(
                self.fedmount,
                self.spec,
                mnt,
                docker=runtime.needs_allow_other,
                cache_dir=cache_dir,
                crunchstat_interval=self.args.crunchstat_interval,
                staged=self.args.stage,
            )
            mount = FedMount(argv, self.fedmount, mnt, self.result["fedmount_log"])
            self.result["timings"]["mount_seconds"] = round(
                mount.start(dict(os.environ), self.args.mount_timeout), 3
            )
            mount.check_sources(self.spec)

            t = time.monotonic()
            image = runtime.prepare_image(self.spec, mnt, work)
            self.result["timings"]["image_seconds"] = round(time.monotonic() - t, 3)
            binds = prepare_binds(self.spec, mnt, work, self.result["output_dir"])
            stdin_mount = self.spec.mounts.get("stdin")
            stdin = (
                open(collection_source(mnt, stdin_mount), "rb")
                if isinstance(stdin_mount, CollectionMount)
                else None
            )
            out_dir = self.result["output_dir"] or self.results
            stdout = open(stream_path(self.spec, "stdout", out_dir, self.result["stdout"]), "wb")
            stderr = open(stream_path(self.spec, "stderr", out_dir, self.result["stderr"]), "wb")
            files = [f for f in (stdin, stdout, stderr) if f is not None]

            t = time.monotonic()
            env = container_environment(self.spec, os.environ)
            launch = Launch(self.spec, binds, image, env, stdin, stdout, stderr, dict(os.environ))
            proc = runtime.start(launch)
            sampler = Sampler(
                runtime.pid, os.path.join(self.results, "crunchstat.txt"), self.args.crunchstat_interval
            )
            sampler.start()
            while proc.poll() is None:
                if not mount.alive():
                    raise RunError(
                        f"fedmount exited during the run, so the container was stopped; see {mount.log_path}"
                    )
                time.sleep(0.1)
            status = runtime.exit_code(proc)
            self.result["timings"]["run_seconds"] = round(time.monotonic() - t, 3)
            self.result.update(state="Complete", exit_code=status)
        except _Reused:
            status = 0
        except SpecError as exc:
            status, self.result["error"] = EXIT_REFUSED, str(exc)
        except RunError as exc:
            status, self.result["error"] = EXIT_FAILED, str(exc)
        except Interrupted as exc:
            status, self.result["error"] = 128 + exc.signum, str(exc)
        except Exception as exc:  # reported in one line; the traceback goes to the debug log
            with open(os.path.join(self.results, "fedmount-run.log"), "a", encoding="utf-8") as log:
                traceback.print_exc(file=log)
            status, self.result["error"] = (
                EXIT_FAILED,
                f"unexpected {type(exc).__name__}: {exc} (see fedmount-run.log)",
            )
        finally:
            self.cleaning = True
            self._cleanup(runtime, mount, sampler, files, work)
            self.result["timings"]["total_seconds"] = round(time.monotonic() - t0, 3)
            self.result["finished_at"] = _now()
            write_result(os.path.join(self.results, "result.json"), self.result)
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.result["error"]:
            print(f"fedmount-run: {self.result['error']}", file=sys.stderr)
        elif status == 0 and self.result["state"] == "Complete":
            problem = reuse.remember(self.args.reuse_dir, self.results, self.result)
            if problem:
                print(f"fedmount-run: {problem}", file=sys.stderr)
        return status

    def _cleanup(
        self,
        runtime: Runtime | None,
        mount: FedMount | None,
        sampler: Sampler | None,
        files: list[IO[bytes]],
        work: str | None,
    ) -> None:
        """Stop everything execute started, in reverse order; each step runs whatever failed before."""
        steps = []
        if sampler is not None:
            steps.append(lambda: self.result.update(resources=sampler.stop()))
        if runtime is not None:
            steps.append(runtime.stop)
        steps += [f.close for f in files]
        if mount is not None:
            steps.append(
                lambda: (
                    mount.alive()
                    and self.result.update(fedmount=mount_figures(read_mount_stats(mount.mountpoint)))
                )
            )
            steps.append(mount.stop)
        steps.append(self._link_streams)
        if work is not None:
            steps.append(lambda: _remove_workdir(work))
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning; report the first failure
                if not self.result["error"]:
                    self.result["error"] = f"cleanup: {exc}"

    def _link_streams(self) -> None:
        """A stdout/stderr file mount wrote into output/: make stdout.txt/stderr.txt name it too."""
        for stream in ("stdout", "stderr"):
            m = self.spec.mounts.get(stream)
            if isinstance(m, FileMount) and self.result["output_dir"]:
                src = stream_path(self.spec, stream, self.result["output_dir"], "")
                if os.path.exists(src) and not os.path.exists(self.result[stream]):
                    os.link(src, self.result[stream])


def _remove_workdir(work: str) -> None:
    mnt = os.path.join(work, "mnt")
    if os.path.isdir(mnt) and is_mounted(mnt):
        raise RunError(f"{mnt} is still mounted; unmount it with fusermount3 -u -z {mnt}")
    shutil.rmtree(work)


def _prepare_results(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.listdir(path):
        raise SpecError("--output-dir", f"{path} is not empty; give a new or empty directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SpecError("--output-dir", f"cannot create {path}: {exc.strerror}") from None
    return path


def _new_results(record: str, spec: ContainerSpec) -> str:
    """A new directory in the current one, named after the record file (or, for standard
    input, the record's uuid) and the UTC time; -2, -3, ... if that name is taken."""
    stem = (spec.uuid or "fedmount-run") if record == "-" else Path(record).stem
    base = f"{stem}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    for n in range(1, 1000):
        path = os.path.abspath(base if n == 1 else f"{base}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise SpecError("--output-dir", f"cannot create {path}: {exc.strerror}") from None
    raise SpecError("--output-dir", f"{base}: every name is taken; give --output-dir")


def _check(spec: ContainerSpec, args: argparse.Namespace) -> int:
    report = check_record(spec, runtime=args.runtime, cache_dir=args.cache_dir, tmpdir=args.tmpdir,
                          env=dict(os.environ))  # fmt: skip
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stdout.write(report.render())
    return report.exit_status()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = read_record(args.record)
        if args.json and not args.check:
            raise SpecError("--json", "is only for --check")
        if args.check:
            return _check(spec, args)
        if args.output_dir:
            results = _prepare_results(args.output_dir)
        else:
            results = _new_results(args.record, spec)
            print(f"fedmount-run: results in {os.path.relpath(results)}", file=sys.stderr)
    except SpecError as exc:
        print(f"fedmount-run: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return Run(spec, args, results).execute()


if __name__ == "__main__":
    sys.exit(main())
