"""``python -m bench [--full] [--check-json]``: run the benchmarks, print the table, write the JSON.

Steps:

1. Start an emulated federation in a fresh state directory under /tmp
   (`integration.harness.Federation`), or use a running one (``--federation STATE_DIR``).
2. Create the benchmark collections through its add-collection control (generated content):
   a big file on the home cluster and one on a remote cluster, a collection of small
   files, a collection with many entries for the metadata walk, one directory of 10,000
   files for ``ls -l`` and a bigger collection for the memory figure; then, through the
   API (`bench.projects`), two projects in the user's home: one of 10,000 empty collections
   and a tree of projects of a few collections each. Quick mode (the default) uses smaller
   sizes and fewer runs than ``--full``; the JSON says which.
3. Measure the ceilings (`bench.ceilings`), then the workloads (`bench.workloads`) against
   fresh mounts of the filesystem under test (``--target fedmount``, the default, or
   ``nullfs`` to exercise the machinery without the daemon) and, for fedmount, of its peer,
   the real arv-mount (`bench.arvmount`; ``--no-arv-mount`` leaves it out): each run of a
   workload is one run of each of its ceilings, one of fedmount and one of arv-mount, so
   the report gives fedmount/arv-mount beside the ratio to the ceiling, or "n/a" and why
   where arv-mount cannot do the workload (``--route direct``). The remote workloads and
   their Keep ceilings run with the remote cluster shaped (added latency and a
   per-connection bandwidth cap), everything else unshaped. The remote cold read runs
   three times: with ``--route home`` (through the home keepstore, which proxies and verifies
   the remote's blocks; ceiling: raw GETs from the home keepstores), with the default,
   ``--route auto``, and with ``--route direct`` (ceiling for both: raw GETs from the
   remote's keepstores, salted token, which auto reads while they answer). The
   subject mounts with ``--route home`` so that each figure has the ceiling of its route.
   The project workloads (``ls -l`` of the big project, cold and warm, and ``find`` over the
   tree) have for ceiling a bare HTTPS client paging the same listings; the daemon's RSS
   per listed entry is judged against the memory a manifest's file costs (80 B). Last,
   ``fedmount stage --to-cluster`` of the remote collection (ceiling: raw GETs from the
   remote's keepstores) and a fresh mount reading what it saved (ceiling: raw GETs from the
   home keepstores), with the remote shaped; arv-mount has no such command (n/a).
4. Write ``bench/results/latest.json`` (`bench.report`) and print the table.

A workload that fails records its error and the others still run (arv-mount failing
records its own error and fedmount's figure stays). ``--check-json`` reads the JSON back
and exits 1 if it is malformed or a workload (fedmount's or arv-mount's run of it) failed to
run; it never judges a timing, so a missed target does not fail it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fedmount.arvados.tokens import parse_token, salt_for
from integration.arvmount import arv_mount_unusable
from integration.harness import Federation

from . import arvmount, ceilings, projects, report, workloads
from .report import Figure, PeerResult, Result, Target
from .workloads import BenchCollection

RESULTS = os.path.join(workloads.REPO, "bench", "results", "latest.json")
MiB = 1 << 20
# The memory a listed file costs today: the full run's daemon RSS with the 1,000,000-file
# collection listed, 76.3 MiB, per file (README, Performance). Issue 17's target for a listed
# project entry.
MANIFEST_BUDGET = 80.0


@dataclass(frozen=True)
class Config:
    mode: str
    runs: int
    seq_size: int
    small_files: int
    small_file_size: int
    walk_entries: int
    rss_entries: int
    random_4k_count: int
    random_1m_count: int
    tree_projects: int
    tree_per_project: int
    listing_files: int = 10_000
    project_collections: int = 10_000
    read_size: int = MiB
    read_ahead_kb: int = 4096
    keep_threads: int = 4
    remote_latency_ms: int = 20
    remote_bandwidth: int = 100_000_000
    ttfb_slack_s: float = 0.020
    # arv-mount lists a big collection slowly (minutes for 100,000 files on 2 cores): a peer
    # run longer than peer_slow_s is not repeated, and a listing longer than
    # peer_list_timeout_s makes the peer's figure n/a.
    peer_slow_s: float = 60.0
    peer_list_timeout_s: float = 600.0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            "quick",
            runs=3,
            seq_size=256 * MiB,
            small_files=2_000,
            small_file_size=4096,
            walk_entries=10_000,
            rss_entries=100_000,
            random_4k_count=2_000,
            random_1m_count=200,
            tree_projects=100,
            tree_per_project=4,
        )

    @classmethod
    def full(cls) -> Config:
        return cls(
            "full",
            runs=5,
            seq_size=1024 * MiB,
            small_files=10_000,
            small_file_size=4096,
            walk_entries=100_000,
            rss_entries=1_000_000,
            random_4k_count=10_000,
            random_1m_count=1_000,
            tree_projects=1_000,
            tree_per_project=4,
        )


# --- the federation --------------------------------------------------------------------------


def add_collection(
    fed: Federation, cluster: str, name: str, files: dict[str, int], seed: str, block_size: int = 64 * MiB
) -> BenchCollection:
    entry = fed.add_collection(
        cluster, name, {p: (size, seed) for p, size in files.items()}, block_size=block_size
    )
    return BenchCollection(name, entry["uuid"], cluster, files, entry["portable_data_hash"])


@contextmanager
def shaped(fed: Federation, cluster: str, latency_ms: int, bandwidth: int) -> Iterator[None]:
    """Every service of `cluster` answers `latency_ms` late, each connection capped at `bandwidth` B/s."""
    fed.set_fault(cluster, "*", latency_ms=latency_ms, bandwidth=bandwidth)
    try:
        yield
    finally:
        fed.clear_faults(cluster)


@contextmanager
def federation(state_dir: str | None, workdir: str) -> Iterator[Federation]:
    """A running federation (``--federation``), or one started here in a fresh state directory."""
    if state_dir:
        yield Federation.attach(state_dir)
        return
    with Federation.start(os.path.join(workdir, "federation"), seed="none") as fed:
        yield fed


def create_collections(fed: Federation, cfg: Config) -> dict[str, BenchCollection]:
    home = fed.home
    remote = next(c for c in fed.clusters if c != home)
    rss_dirs = max(1, cfg.rss_entries // 1000)
    return {
        "seq_local": add_collection(fed, home, "bench-seq-local", {"data.bin": cfg.seq_size}, "bench-local"),
        "seq_remote": add_collection(
            fed, remote, "bench-seq-remote", {"data.bin": cfg.seq_size}, "bench-remote"
        ),
        "small": add_collection(
            fed,
            home,
            "bench-small",
            {f"d{i // 1000:02d}/f{i:05d}.bin": cfg.small_file_size for i in range(cfg.small_files)},
            "bench-small",
            block_size=4 * MiB,
        ),
        "walk": add_collection(
            fed,
            home,
            "bench-walk",
            {f"d{i // 1000:03d}/file-{i:06d}.dat": 64 for i in range(cfg.walk_entries)},
            "bench-walk",
        ),
        "listing": add_collection(
            fed,
            home,
            "bench-listing",
            {f"file-{i:05d}.dat": 64 for i in range(cfg.listing_files)},
            "bench-listing",
        ),
        "rss": add_collection(
            fed,
            home,
            "bench-rss",
            {f"d{i % rss_dirs:04d}/file-{i:07d}.dat": 16 for i in range(cfg.rss_entries)},
            "bench-rss",
        ),
    }


# --- the run ---------------------------------------------------------------------------------


Measure = Callable[[int], list[float]]
# A workload's measure: `runs` samples of one subject (fedmount, or its peer arv-mount).
SubjectMeasure = Callable[[workloads.Subject, int], list[float]]


@dataclass(frozen=True)
class Ceiling:
    unit: str
    how: str
    measure: Measure


class Run:
    """One benchmark run. Each workload run is preceded by one run of each of its ceilings and
    followed by one run of the peer (arv-mount), so a change of load on this shared machine
    hits figure, ceiling and peer alike (interleaving)."""

    def __init__(
        self,
        cfg: Config,
        subject: workloads.Subject,
        nullfs: ceilings.NullfsSubject,
        fed: Federation,
        colls: dict[str, BenchCollection],
        workdir: str,
        only: str | None = None,
        direct: workloads.Subject | None = None,
        peer: workloads.Subject | None = None,
        auto: workloads.Subject | None = None,
    ) -> None:
        self.cfg = cfg
        self.only = only
        self.subject = subject
        self.direct = direct  # the subject mounted with --route direct, if it has routes
        self.auto = auto  # and with --route auto, the default
        self.peer = peer  # the filesystem fedmount is compared with (arv-mount), if measured
        self.nullfs = nullfs
        self.fed = fed
        self.colls = colls
        self.workdir = workdir
        self.ceilings: dict[str, tuple[Figure, dict[str, Any]]] = {}
        self.results: list[Result] = []
        self.access = ceilings.ClusterAccess(fed.api_host(), fed.token(), fed.ca_cert)
        self.keep: dict[tuple[str, str], ceilings.KeepCeiling] = {}
        mbps = cfg.remote_bandwidth / 1e6
        remote = colls["seq_remote"].cluster
        self.shaping = f"{remote} shaped: +{cfg.remote_latency_ms} ms, {mbps:.0f} MB/s per connection"

    def progress(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def wanted(self, name: str) -> bool:
        """Whether the workload `name` runs (``--only``)."""
        return not self.only or self.only in name

    def workload(
        self,
        name: str,
        description: str,
        target: Target,
        unit: str,
        measure: SubjectMeasure,
        ceils: dict[str, Ceiling] | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
        *,
        subject: workloads.Subject | None = None,
        peer_na: str | None = None,
    ) -> None:
        """Measure `subject` (default: the filesystem under test) and the peer with `measure`,
        interleaved with `ceils`; `peer_na` says why the peer cannot do this workload."""
        if not self.wanted(name):
            return
        self.progress(f"workload {name}")
        result = Result(name, description, target)
        self.results.append(result)
        ceils = ceils or {}
        samples: dict[str, list[float]] = {n: [] for n in ceils}
        figure: list[float] = []
        peer_figure: list[float] = []
        if self.peer is not None:
            result.peer = PeerResult(self.peer.name, na=peer_na)
        try:
            peer_again = True
            for _ in range(self.cfg.runs):
                for n, c in ceils.items():
                    try:
                        samples[n] += c.measure(1)
                    except Exception as exc:
                        raise workloads.BenchError(f"ceiling {n}: {one_line(exc)}") from exc
                figure += measure(subject or self.subject, 1)
                if peer_again:
                    peer_again = self._peer_run(result, measure, peer_figure)
            result.figure = Figure(unit, figure)
            if peer_figure and result.peer is not None and not (result.peer.error or result.peer.na):
                result.peer.figure = Figure(unit, peer_figure)
            if ceils:
                figures = {n: Figure(c.unit, samples[n]) for n, c in ceils.items()}
                result.ceiling_name, result.ceiling = report.lower_ceiling(figures)
                for n, fig in figures.items():
                    self._record_ceiling(n, fig, ceils[n].how)
            if extra:
                result.extra = extra()
        except Exception as exc:  # noqa: BLE001 - one failing workload must not stop the others
            result.error = one_line(exc)

    def _peer_run(self, result: Result, measure: SubjectMeasure, samples: list[float]) -> bool:
        """One run of the peer into `samples`, unless it is n/a; whether to run it again. A
        failure is recorded on `result`, a run over its time limit (`workloads.TooSlow`) makes
        the peer's figure n/a, and a run longer than `Config.peer_slow_s` is the only one."""
        if self.peer is None or result.peer is None or result.peer.na:
            return False
        start = time.monotonic()
        try:
            samples += measure(self.peer, 1)
        except workloads.TooSlow as exc:
            result.peer.na = f"{self.peer.name}: {exc} (time limit)"
            return False
        except Exception as exc:  # noqa: BLE001 - the peer failing must not stop fedmount's runs
            result.peer.error = one_line(exc)
            return False
        return time.monotonic() - start <= self.cfg.peer_slow_s

    def peer_limit(self, subject: workloads.Subject) -> float | None:
        """The time limit of a listing by `subject`: the peer's, or none for fedmount."""
        return self.cfg.peer_list_timeout_s if subject is self.peer else None

    def against_nullfs(
        self,
        name: str,
        description: str,
        target: Target,
        ceiling: tuple[str, str],
        measure: SubjectMeasure,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """A workload in seconds whose ceiling, named and described by `ceiling`, is the same
        measure of the null filesystem."""
        ceiling_name, how = ceiling
        self.workload(
            name, description, target, "s", measure,
            {ceiling_name: Ceiling("s", how, lambda n: measure(self.nullfs, n))}, extra,
        )  # fmt: skip

    def side_ceiling(self, name: str, ceiling: Ceiling) -> Figure:
        """Measure an informative ceiling (listed with the others, judged against nothing)."""
        fig = Figure(ceiling.unit, ceiling.measure(self.cfg.runs))
        self._record_ceiling(name, fig, ceiling.how)
        return fig

    def _record_ceiling(self, name: str, fig: Figure, how: str) -> None:
        """Keep every sample of a ceiling, whichever workload it was measured beside."""
        if name in self.ceilings:
            fig = Figure(fig.unit, self.ceilings[name][0].samples + fig.samples)
        self.ceilings[name] = (fig, {"how": how})

    def _keep(self, c: BenchCollection, *, direct: bool = False) -> ceilings.KeepCeiling:
        """Raw GETs of the collection's blocks: from the home keepstores (which proxy a remote
        collection's blocks), or, `direct`, from the owning cluster's keepstores with the home
        token salted for it, as fedmount --route direct reads them."""
        if (c.name, str(direct)) not in self.keep:
            access = self.access
            if direct:
                salted = salt_for(parse_token(self.fed.token()), c.cluster).text
                access = ceilings.ClusterAccess(self.fed.api_host(c.cluster), salted, self.fed.ca_cert)
            self.keep[(c.name, str(direct))] = ceilings.KeepCeiling(
                access, c.uuid, "data.bin", self.cfg.keep_threads
            )
        return self.keep[(c.name, str(direct))]

    def local_workloads(self, page_cache: ceilings.PageCacheFile) -> None:
        cfg, c, s, nf = self.cfg, self.colls, self.subject, self.nullfs
        rs, seq = cfg.read_size, c["seq_local"]
        size = f"{cfg.seq_size // MiB} MiB"
        fuse = Ceiling(
            "B/s",
            f"nullfs, dd bs={rs}, read_ahead_kb={cfg.read_ahead_kb}, fresh mount per run",
            lambda n: workloads.sequential(nf, seq, "data.bin", rs, n, cold=False),
        )
        keep = Ceiling(
            "B/s",
            f"{cfg.keep_threads} parallel raw GETs from the home keepstores",
            lambda n: self._keep(seq).samples(n),
        )
        md5 = Ceiling(
            "B/s",
            "one core hashing 64 MiB blocks with MD5 (informative: every cold byte is verified)",
            lambda n: ceilings.md5_rate(cfg.seq_size, n),
        )
        self.workload(
            f"cold sequential read {size}, local",
            "dd of a file of the home cluster, fresh disk cache, page cache dropped, fresh mount",
            Target("ratio_at_least", 0.7, ">= 0.7 x min(FUSE, Keep)"),
            "B/s",
            lambda subject, n: workloads.sequential(subject, seq, "data.bin", rs, n, cold=True),
            {"fuse": fuse, "keep": keep},
            extra=lambda: {"md5": self.side_ceiling("md5", md5).to_json()},
        )
        self.workload(
            f"warm sequential read {size}",
            "dd of a file whose blocks are in the disk cache, fresh mount",
            Target("ratio_at_least", 0.8, ">= 0.8 x FUSE"),
            "B/s",
            lambda subject, n: workloads.sequential(subject, seq, "data.bin", rs, n, cold=False),
            {"fuse": fuse},
        )
        page = Ceiling("B/s", f"dd bs={rs} of a page-cached local file of the same size", page_cache.samples)
        kept = ceilings.NullfsSubject(
            [seq],
            os.path.join(self.workdir, "nullfs-kept"),
            cfg.read_ahead_kb,
            sys.executable,
            keep_cache=True,
        )
        fuse_kept = Ceiling(
            "B/s",
            "nullfs with keep_cache, second dd in the same mount (informative: not the target's ceiling)",
            lambda n: workloads.second_read(kept, seq, "data.bin", rs, n),
        )
        for how, by_pdh in (("UUID", False), ("PDH", True)):
            self.workload(
                f"second read {size}, same mount, by {how}",
                f"dd of a file just read in the same mount, collection addressed by {how}",
                Target("ratio_at_least", 0.8, ">= 0.8 x page cache"),
                "B/s",
                lambda subject, n, p=by_pdh: workloads.second_read(subject, seq, "data.bin", rs, n, by_pdh=p),
                {"page_cache": page},
                extra=lambda: {"fuse_keep_cache": self.side_ceiling("fuse_keep_cache", fuse_kept).to_json()},
            )
        for label, read_size, count in (
            ("4 KiB", 4096, cfg.random_4k_count),
            ("1 MiB", MiB, cfg.random_1m_count),
        ):
            self.workload(
                f"random {label} reads, warm",
                f"{count} preads at random aligned offsets, disk cache warm, fresh mount",
                Target("report"),
                "ops/s",
                lambda subject, n, rsz=read_size, k=count: workloads.random_reads(
                    subject, seq, "data.bin", rsz, k, n
                ),
                {
                    f"fuse_random_{label.replace(' ', '').lower()}": Ceiling(
                        "ops/s",
                        f"nullfs, the same random {label} preads",
                        lambda n, rsz=read_size, k=count: workloads.random_reads(
                            nf, seq, "data.bin", rsz, k, n
                        ),
                    )
                },
            )
        walk = c["walk"]
        self.against_nullfs(
            f"find + stat, {walk.entries:,} entries",
            "find -printf of a collection from a mount that just became ready (includes the manifest fetch)",
            Target("at_most", 2.0, "< 2 s"),
            ("fuse_walk", "nullfs, the same find"),
            lambda subject, n: workloads.metadata_walk(subject, walk, n, self.peer_limit(subject)),
            extra=lambda: {"entries": walk.entries},
        )
        listing = c["listing"]
        self.against_nullfs(
            f"ls -l, {len(listing.files):,}-file directory",
            "second ls -l of one directory in a fresh mount (a stat per entry; ls stops asking xattrs "
            "after the first two, which outside user.* are not supported)",
            Target("ratio_at_most", 2.0, "<= 2 x FUSE"),
            ("fuse_ls", "nullfs, the same ls -l"),
            lambda subject, n: workloads.long_listing(subject, listing, n),
        )
        small = c["small"]
        label = f"cat {len(small.files):,} x {cfg.small_file_size // 1024} KiB files"
        self.workload(
            f"{label}, warm",
            "xargs -0 cat, blocks in the disk cache, fresh mount",
            Target("report"),
            "files/s",
            lambda subject, n: workloads.small_files(subject, small, n, cold=False),
            {
                "fuse_cat": Ceiling(
                    "files/s",
                    "nullfs, the same cat",
                    lambda n: workloads.small_files(nf, small, n, cold=False),
                )
            },
        )
        self.workload(
            f"{label}, cold",
            "xargs -0 cat, fresh disk cache, page cache dropped, fresh mount",
            Target("ratio_at_least", 0.5, "within 2x warm"),
            "files/s",
            lambda subject, n: workloads.small_files(subject, small, n, cold=True),
            {
                "cat_warm": Ceiling(
                    "files/s", "the same cat, warm", lambda n: workloads.small_files(s, small, n, cold=False)
                )
            },
        )
        rss = c["rss"]
        manifest_size = float(len(ceilings.Api(self.access).collection(rss.uuid)["manifest_text"].encode()))
        idle: dict[str, list[float]] = {}
        growth: dict[str, list[float]] = {}

        def measure_rss(subject: workloads.Subject, n: int) -> list[float]:
            listed, before = workloads.daemon_rss(subject, rss, n, self.peer_limit(subject))
            idle.setdefault(subject.name, []).extend(before)
            growth.setdefault(subject.name, []).extend(a - b for a, b in zip(listed, before, strict=True))
            return listed

        def rss_extra() -> dict[str, Any]:
            own, peer = s.name, self.peer.name if self.peer else None
            medians = {
                "idle_rss_median": statistics.median(idle[own]),
                "rss_growth_median": statistics.median(growth[own]),
                "rss_growth_per_manifest_byte": statistics.median(growth[own]) / manifest_size,
            }
            if peer in growth:
                medians[f"{peer}_idle_rss_median"] = statistics.median(idle[peer])
                medians[f"{peer}_rss_growth_median"] = statistics.median(growth[peer])
            return medians

        self.workload(
            f"daemon RSS, {len(rss.files):,}-file collection listed",
            "RSS of the daemon after find of every entry",
            Target("ratio_at_most", 4.0, "<= 4 x manifest"),
            "B",
            measure_rss,
            {
                "manifest_text": Ceiling(
                    "B",
                    f"size of the signed manifest of {rss.name}",
                    lambda n: [manifest_size] * n,
                )
            },
            extra=rss_extra,
        )

    def project_workloads(self) -> None:
        """``ls -l`` of a project of many collections (cold and warm), ``find`` over a tree of
        projects, and the daemon's RSS per listed entry; the projects are made here, in the
        user's home, only if one of these workloads runs."""
        cfg = self.cfg
        many_label = f"project of {cfg.project_collections:,} collections"
        tree_label = f"tree of {cfg.tree_projects:,} projects x {cfg.tree_per_project} collections"
        names = {
            "cold": f"ls -l, {many_label}, cold",
            "warm": f"ls -l, {many_label}, warm",
            "tree": f"find, {tree_label}",
            "rss": f"daemon RSS per listed entry, {many_label}",
        }
        if isinstance(self.subject, ceilings.NullfsSubject) or not any(map(self.wanted, names.values())):
            return  # the null filesystem serves no projects
        started = time.monotonic()
        api = projects.ApiClient(self.access)
        home = self.fed.user_uuid()
        many = projects.make_project(api, home, "bench-many", cfg.project_collections)
        tree = projects.make_tree(api, home, "bench-tree", cfg.tree_projects, cfg.tree_per_project)
        self.progress(f"made the benchmark projects in {time.monotonic() - started:.1f} s")
        pager = projects.ContentsPager(api)
        requests: dict[str, list[dict[str, int]]] = {}

        def paged(n: int, count: Callable[[], int], expect: int) -> list[float]:
            samples = []
            for _ in range(n):
                start = time.perf_counter()
                if (seen := count()) != expect:
                    raise workloads.BenchError(f"paging listed {seen:,} entries, expected {expect:,}")
                samples.append(time.perf_counter() - start)
            return samples

        paging = Ceiling(
            "s",
            f"bare HTTPS client paging the project's contents as fedmount asks them (projects,"
            f" then collections; keyset, {projects.PAGE:,} a page, one connection)",
            lambda n: paged(n, lambda: pager.contents(many.uuid)[1], many.collections),
        )
        where = f"home/{many.name}"

        def cold(subject: workloads.Subject, n: int) -> list[float]:
            """The cold listing, counting the API requests each run made (nothing else runs then)."""
            samples = []
            for _ in range(n):
                since = self.fed.mark()
                samples += workloads.project_listing(
                    subject, where, many.collections, 1, warm=False, timeout=self.peer_limit(subject)
                )
                made = self.fed.requests(since=since, cluster=self.fed.home, service="controller")
                requests.setdefault(subject.name, []).append({
                    "contents_requests": sum("/contents" in r["path"] for r in made),
                    "collection_gets": sum("/collections/" in r["path"] for r in made),
                })  # fmt: skip
            return samples

        self.workload(
            names["cold"],
            f"ls -l of home/{many.name} (empty collections) in a fresh mount: its first listing",
            Target("report"),
            "s",
            cold,
            {"contents_paging": paging},
            extra=lambda: {f"{name}_requests_last_run": runs[-1] for name, runs in requests.items()},
        )
        self.workload(
            names["warm"],
            f"second ls -l of home/{many.name} in a fresh mount (the first one listed it)",
            Target("report"),
            "s",
            lambda subject, n: workloads.project_listing(
                subject, where, many.collections, n, warm=True, timeout=self.peer_limit(subject)
            ),
            {"contents_paging": paging},
        )
        self.workload(
            names["tree"],
            f"find -maxdepth 2 -printf of home/{tree.name} (its projects and their collections, not"
            " into the collections) from a fresh mount",
            Target("report"),
            "s",
            lambda subject, n: workloads.tree_walk(
                subject, f"home/{tree.name}", tree.entries, n, self.peer_limit(subject)
            ),
            {
                "tree_paging": Ceiling(
                    "s",
                    "bare HTTPS client paging the contents of the tree's project and of each project"
                    " under it, as fedmount asks them, one request after the other",
                    lambda n: paged(n, lambda: pager.tree(tree.uuid), tree.entries),
                )
            },
            extra=lambda: {"entries": tree.entries, "ceiling_requests": 2 * (1 + tree.projects)},
        )
        self.workload(
            names["rss"],
            f"growth of the daemon's RSS per entry by ls -l of home/{many.name}, in a fresh mount whose"
            " home/ was just listed",
            Target("at_most", MANIFEST_BUDGET, f"<= {MANIFEST_BUDGET:.0f} B (manifest budget per file)"),
            "B",
            lambda subject, n: workloads.listed_rss_per_entry(
                subject, where, many.collections, n, self.peer_limit(subject)
            ),
        )

    def stage_workloads(self) -> None:
        """``fedmount stage --to-cluster HOME`` of the remote collection against raw GETs from the
        remote's keepstores, then a fresh mount (the second host) reading the saved collection
        against raw GETs of it from the home keepstores; the remote cluster is shaped."""
        fedmount = self.direct
        if not isinstance(fedmount, workloads.FedmountSubject):
            return  # no fedmount under test (--target nullfs)
        cfg, remote = self.cfg, self.colls["seq_remote"]
        stager = workloads.Stager(
            fedmount.fedmount, fedmount.env, self.workdir, self.fed.home, cfg.keep_threads
        )
        size = f"{cfg.seq_size // MiB} MiB"
        with shaped(self.fed, remote.cluster, cfg.remote_latency_ms, cfg.remote_bandwidth):
            self.workload(
                f"stage --to-cluster {self.fed.home}, {size} remote",
                f"fedmount stage --to-cluster {self.fed.home} --save-as of a collection of"
                f" {remote.cluster} (the home keepstores copy its blocks), fresh cache directory,"
                f" {self.shaping}",
                Target("report"),
                "B/s",
                lambda subject, n: stager.samples(remote, n),
                {
                    "keep_remote_direct": Ceiling(
                        "B/s",
                        f"{cfg.keep_threads} parallel raw GETs from {remote.cluster}'s keepstores"
                        f" (salted token), {self.shaping}",
                        lambda n: self._keep(remote, direct=True).samples(n),
                    )
                },
                peer_na=arvmount.NO_STAGE,
            )
            crossing: list[int] = []

            def staged() -> BenchCollection:
                if stager.saved is None:
                    raise workloads.BenchError("nothing was staged (the stage workload failed)")
                return stager.saved

            def second_host(subject: workloads.Subject, n: int) -> list[float]:
                since = self.fed.mark()
                samples = workloads.sequential(subject, staged(), "data.bin", cfg.read_size, n, cold=True)
                made = self.fed.requests(since=since, cluster=remote.cluster)
                crossing.append(sum(r["service"].startswith("keep") for r in made))
                return samples

            self.workload(
                f"second host reads the staged {size}, cold",
                "dd of the collection stage saved, from a fresh mount with a fresh disk cache (another"
                " host of the cluster), page cache dropped",
                Target("report"),
                "B/s",
                second_host,
                {
                    "keep_staged": Ceiling(
                        "B/s",
                        f"{cfg.keep_threads} parallel raw GETs of the staged collection's blocks from"
                        " the home keepstores",
                        lambda n: self._keep(staged()).samples(n),
                    )
                },
                extra=lambda: {f"{remote.cluster}_keep_requests_per_run": crossing},
                peer_na=arvmount.NO_STAGE,
            )

    def remote_workloads(self) -> None:
        cfg = self.cfg
        remote = self.colls["seq_remote"]
        with shaped(self.fed, remote.cluster, cfg.remote_latency_ms, cfg.remote_bandwidth):
            self._remote_cold_read(
                self.subject, f"dd of a file of a remote cluster, fresh disk cache, {self.shaping}", "home"
            )
            if self.auto is not None:
                self._remote_cold_read(
                    self.auto,
                    "the same dd with the default route: the remote's blocks from its own keepstores "
                    f"while they answer, else through the home, {self.shaping}",
                    "auto",
                )
            if self.direct is not None:
                self._remote_cold_read(
                    self.direct,
                    "the same dd, fedmount asking the owning cluster for the collection and reading its "
                    f"keepstores itself (salted token) instead of through the home keepstore, {self.shaping}",
                    "direct",
                )
            self.workload(
                "time to first byte, uncached remote block",
                f"open + 1-byte read, file stat'ed first, fresh disk cache, {self.shaping}",
                Target("ceiling_plus", cfg.ttfb_slack_s, "<= one block GET + 20 ms"),
                "s",
                lambda subject, n: workloads.time_to_first_byte(subject, remote, "data.bin", n),
                {
                    "keep_remote_block": Ceiling(
                        "s",
                        f"one raw GET of the file's first block, {self.shaping}",
                        lambda n: self._keep(remote).first_block_samples(n),
                    )
                },
            )

    def _remote_cold_read(self, subject: workloads.Subject, description: str, route: str) -> None:
        """The remote cold sequential read with ``--route`` `route`, against raw GETs along the
        path it takes (`_keep`): the home keepstores for home, the remote's own for direct and
        auto (auto reads a remote whose keepstores answer directly); the caller has the remote
        cluster shaped. arv-mount, which reads through the home, is beside home and auto."""
        cfg, remote = self.cfg, self.colls["seq_remote"]
        direct = route != "home"
        source = f" from {remote.cluster}'s keepstores" if direct else ""
        self.workload(
            f"cold sequential read {cfg.seq_size // MiB} MiB, remote, --route {route}",
            description,
            Target("ratio_at_least", 0.8, ">= 0.8 x Keep (shaped)"),
            "B/s",
            lambda subj, n: workloads.sequential(subj, remote, "data.bin", cfg.read_size, n, cold=True),
            {
                "keep_remote_direct" if direct else "keep_remote": Ceiling(
                    "B/s",
                    f"{cfg.keep_threads} parallel raw GETs{source}, {self.shaping}",
                    lambda n: self._keep(remote, direct=direct).samples(n),
                )
            },
            subject=subject,
            peer_na=arvmount.NO_DIRECT_ROUTE if route == "direct" else None,
        )


def keep_logs(workdir: str) -> str:
    """Copy every ``*.log`` under `workdir` (which is removed after the run) into a new directory
    under /tmp, keeping their relative paths; return that directory."""
    kept = tempfile.mkdtemp(prefix="fedmount-bench-logs-", dir="/tmp")
    for top, _dirs, files in os.walk(workdir):
        for name in files:
            if name.endswith(".log"):
                dest = os.path.join(kept, os.path.relpath(os.path.join(top, name), workdir))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(top, name), dest)
    return kept


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def default_fedmount() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "fedmount")
    found = shutil.which("fedmount") or (beside if os.access(beside, os.X_OK) else None)
    return [found] if found else [sys.executable, "-m", "fedmount"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="fedmount benchmarks against ceilings measured in the same run."
    )
    p.add_argument("--full", action="store_true", help="full sizes and more runs (default: quick mode)")
    p.add_argument(
        "--check-json",
        action="store_true",
        help="after the run, check the JSON written; exit 1 "
        "if it is malformed or a workload could not run (timings are never judged)",
    )
    p.add_argument(
        "--target",
        choices=("fedmount", "nullfs"),
        default="fedmount",
        help="filesystem under test (nullfs: exercise the benchmark without the daemon)",
    )
    p.add_argument(
        "--federation", metavar="STATE_DIR", help="use this running federation instead of starting one"
    )
    p.add_argument(
        "--no-arv-mount",
        action="store_true",
        help="do not measure the real arv-mount beside fedmount (it is measured by default, from "
        "the virtualenv `make arv-mount` installs; never with --target nullfs)",
    )
    p.add_argument(
        "--arv-mount-time-limit",
        type=float,
        metavar="SECONDS",
        help="longest arv-mount may take to list a collection before its figure is n/a (default 600)",
    )
    p.add_argument("--output", default=RESULTS, help=f"JSON results file (default {RESULTS})")
    p.add_argument("--only", metavar="TEXT", help="run only the workloads whose name contains TEXT")
    p.add_argument("--runs", type=int, help="runs per figure (default 3 quick, 5 full)")
    p.add_argument("--read-ahead-kb", type=int, help="read_ahead_kb of every mount (default 4096)")
    p.add_argument(
        "--fedmount",
        type=shlex.split,
        default=default_fedmount(),
        help="the fedmount command (default: fedmount on PATH or beside python, else python -m fedmount)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = Config.full() if args.full else Config.quick()
    given = (
        ("runs", args.runs),
        ("read_ahead_kb", args.read_ahead_kb),
        ("peer_list_timeout_s", args.arv_mount_time_limit),
    )
    overrides = {k: v for k, v in given if v}
    cfg = Config(**{**cfg.__dict__, **overrides})
    started = time.time()
    notes = [
        f"{cfg.mode} mode: {cfg.seq_size // MiB} MiB files, {cfg.walk_entries:,}-entry walk, "
        f"{cfg.rss_entries:,}-file RSS collection, {cfg.small_files:,} small files, "
        f"{cfg.runs} runs per figure"
        + ("" if args.full else " (--full: 1 GiB / 100,000 / 1,000,000 / 10,000 and 5 runs)")
    ]
    with_peer = args.target == "fedmount" and not args.no_arv_mount
    if with_peer and (reason := arv_mount_unusable()) is not None:
        print(f"bench: cannot run arv-mount: {reason} (or pass --no-arv-mount)", file=sys.stderr)
        return 2
    if args.target == "fedmount" and not with_peer:
        notes.append("arv-mount not measured (--no-arv-mount)")
    workdir = tempfile.mkdtemp(prefix="fedmount-bench-", dir="/tmp")
    try:
        if not workloads.drop_page_cache():
            notes.append("could not drop the page cache (not root): cold runs may read cached pages")
        with federation(args.federation, workdir) as fed:
            print(f"[bench] creating collections in {fed.control_url}", file=sys.stderr, flush=True)
            colls = create_collections(fed, cfg)
            # The ceilings' null filesystem holds only what they read: the RSS collection (a million
            # entries, each a Python object in it) slowed its reads by up to 4x in full mode.
            served = [c for name, c in colls.items() if name != "rss" or args.target == "nullfs"]
            nullfs = ceilings.NullfsSubject(
                served, os.path.join(workdir, "nullfs"), cfg.read_ahead_kb, sys.executable
            )
            subject: workloads.Subject = nullfs
            direct: workloads.Subject | None = None
            auto: workloads.Subject | None = None
            if args.target != "nullfs":
                env = fed.env(base=workloads.python_path_env())
                subject = workloads.FedmountSubject(
                    env, os.path.join(workdir, "fedmount"), cfg.read_ahead_kb, args.fedmount,
                    ["--route", "home"],
                )  # fmt: skip
                direct = workloads.FedmountSubject(
                    env, os.path.join(workdir, "fedmount-direct"), cfg.read_ahead_kb, args.fedmount,
                    ["--route", "direct"],
                )  # fmt: skip
                auto = workloads.FedmountSubject(
                    env, os.path.join(workdir, "fedmount-auto"), cfg.read_ahead_kb, args.fedmount,
                    ["--route", "auto"],
                )  # fmt: skip
            peer = arvmount.ArvMountSubject(fed, os.path.join(workdir, "arv-mount")) if with_peer else None
            run = Run(cfg, subject, nullfs, fed, colls, workdir, args.only, direct, peer, auto)
            with ceilings.PageCacheFile(workdir, cfg.seq_size, cfg.read_size) as page_cache:
                run.local_workloads(page_cache)
            run.project_workloads()
            run.remote_workloads()
            run.stage_workloads()
        if any(r.error or (r.peer and r.peer.error) for r in run.results):
            notes.append(
                f"a workload failed: the daemons' and the emulator's logs are in {keep_logs(workdir)}"
            )
        doc = report.document(
            mode=cfg.mode,
            target_fs=args.target,
            settings=cfg.__dict__ | {"remote": colls["seq_remote"].cluster},
            ceilings=run.ceilings,
            results=run.results,
            machine_info=report.machine(),
            started_at=started,
            duration_s=time.time() - started,
            notes=notes,
            peer=arvmount.describe() if with_peer else None,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report.write(doc, args.output)
    print(report.table(doc))
    print(f"\nwritten to {args.output}")
    if args.check_json:
        with open(args.output, encoding="utf-8") as f:
            problems = report.validate(json.load(f))
        for p in problems:
            print(f"check-json: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
