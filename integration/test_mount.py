"""fedmount mounted for real (FUSE) on the emulated federation, checked with plain tools.

Every test reads through the kernel with ``ls``, ``cat``, ``md5sum``, ``find``, ``stat``
and ``getfattr`` and compares with what the emulator says it stores (``files`` md5s in
federation.json) or with its request log. Each mount gets its own empty block cache, so
what a test sees is not an earlier test's cache. Tests need /dev/fuse (and fusermount3 or
root) and skip with the reason otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from fedmount.api.federation import parse_timestamp
from fedmount.arvados.tokens import parse_token, salt_for
from integration.mounting import Mount, fedmount_cmd, is_mounted, md5sums, requires_fuse, run, wait_for

REPO = Path(__file__).resolve().parent.parent

pytestmark = requires_fuse


def test_every_demo_file_reads_back_with_its_md5_by_uuid_and_by_pdh(fed, mount):
    m = mount()
    for name, coll in fed.seeded_collections.items():
        ids = [coll["portable_data_hash"]] if name == "many" else [coll["uuid"], coll["portable_data_hash"]]
        for cid in ids:
            root = m / f"by_id/{cid}"
            expected = {path: meta["md5"] for path, meta in coll["files"].items()}
            found = run("find", ".", "-type", "f", cwd=root).stdout.splitlines()
            assert sorted(p.removeprefix("./") for p in found) == sorted(expected), (name, cid)
            assert md5sums(root, sorted(expected)) == expected, (name, cid)


def test_names_with_spaces_colons_backslashes_and_unicode_are_decoded_exactly(fed, mount):
    m = mount()
    nested = fed.collections["nested"]
    root = m / f"by_id/{nested['uuid']}"
    listed = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert listed == set(nested["files"])
    assert (root / "ünïcødé/日本語.txt").stat().st_size == nested["files"]["ünïcødé/日本語.txt"]["size"]


def test_empty_files_and_empty_directories_are_listed(fed, mount):
    coll = fed.add_collection(
        "zbbbb", "empties", {"empty.txt": b"", "d/one.txt": b"1"}, empty_dirs=["void", "d/void2"]
    )
    m = mount()
    root = m / f"by_id/{coll['uuid']}"
    assert sorted(os.listdir(root)) == ["d", "empty.txt", "void"]
    assert os.listdir(root / "void") == [] and sorted(os.listdir(root / "d")) == ["one.txt", "void2"]
    assert run("cat", str(root / "empty.txt")).stdout == ""
    assert run("stat", "-c", "%s %F", str(root / "empty.txt")).stdout.strip() == "0 regular empty file"


def test_stat_shows_manifest_sizes_read_only_modes_and_modified_at(fed, mount, sdk):
    m = mount()
    text = fed.collections["text"]
    record = sdk().collections().get(uuid=text["uuid"]).execute()
    modified = parse_timestamp(record["modified_at"])
    path = m / f"by_id/{text['uuid']}/data/numbers.csv"
    size, mode, mtime, uid = run("stat", "-c", "%s %a %Y %u", str(path)).stdout.split()
    assert int(size) == text["files"]["data/numbers.csv"]["size"]
    assert mode == "555" and uid == str(os.getuid())  # as arv-mount serves collection files
    assert modified is not None and abs(int(mtime) - modified) <= 1
    assert run("stat", "-c", "%a", str(path.parent)).stdout.strip() == "555"
    first = path.stat().st_ino
    assert (m / f"by_id/{text['uuid']}/data/numbers.csv").stat().st_ino == first


def test_getfattr_names_collection_cluster_locators_and_cached_bytes(fed, mount):
    m = mount()
    shared = fed.collections["shared"]
    path = m / f"by_id/{shared['uuid']}/blob.bin"
    run("cat", str(path))
    dump = run("getfattr", "-d", "--absolute-names", str(path)).stdout
    attrs = dict(line.split("=", 1) for line in dump.splitlines() if "=" in line)
    assert attrs["user.arvados.uuid"] == f'"{shared["uuid"]}"'
    assert attrs["user.arvados.portable_data_hash"] == f'"{shared["portable_data_hash"]}"'
    assert attrs["user.arvados.cluster"] == '"zbbbb"'
    locators = attrs["user.arvados.locators"].strip('"').split()
    assert locators and all("+A" not in loc and "+R" not in loc for loc in locators)
    assert attrs["user.arvados.cached_bytes"] == f'"{shared["files"]["blob.bin"]["size"]}"'


def test_writes_of_any_kind_fail_with_erofs(fed, mount):
    m = mount()
    root = m / f"by_id/{fed.collections['text']['portable_data_hash']}"
    attempts = [
        ["touch", str(root / "new")],
        ["mkdir", str(root / "newdir")],
        ["rm", str(root / "hello.txt")],
        ["mv", str(root / "hello.txt"), str(root / "moved.txt")],
        ["ln", "-s", "hello.txt", str(root / "link")],
        ["ln", str(root / "hello.txt"), str(root / "hard")],
        ["chmod", "777", str(root / "hello.txt")],
        ["setfattr", "-n", "user.x", "-v", "1", str(root / "hello.txt")],
        ["sh", "-c", f"echo x >> '{root / 'hello.txt'}'"],
        ["truncate", "-s", "0", str(root / "hello.txt")],
    ]
    for cmd in attempts:
        done = run(*cmd, check=False)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, (cmd, done.stderr)
    with pytest.raises(OSError) as e:
        os.open(root / "hello.txt", os.O_RDWR)
    assert e.value.errno == errno.EROFS
    assert run("cat", str(root / "hello.txt")).stdout == "hello world\n"


def test_impossible_names_never_reach_the_api_and_misses_are_remembered(fed, mount):
    m = mount()
    mark = fed.mark()
    for name in ("not-a-thing", "zzzzz-tpzed-000000000000000", "README.md"):
        for _ in range(2):
            assert run("ls", str(m / f"by_id/{name}"), check=False).returncode != 0
    assert [r for r in fed.requests(since=mark) if r["service"] == "controller"] == []
    missing = "zbbbb-4zz18-000000000000000"
    for _ in range(3):
        assert run("ls", str(m / f"by_id/{missing}"), check=False).returncode != 0
    asked = [r for r in fed.requests(since=mark) if missing in r["path"] and r["cluster"] == "zzzzz"]
    assert len(asked) == 1


def test_second_read_of_a_pdh_file_is_served_by_the_page_cache(fed, mount):
    m = mount()
    path = m / f"by_id/{fed.collections['shared']['portable_data_hash']}/blob.bin"
    r0 = m.reads()
    r1 = m.reads()  # reading the stats file itself costs this many reads
    own = r1 - r0
    first = run("md5sum", str(path)).stdout
    r2 = m.reads()
    assert r2 - r1 > own
    assert run("md5sum", str(path)).stdout == first
    assert m.reads() - r2 == own


def test_home_route_reads_remote_blocks_through_the_home_keepstore(fed, mount):
    m = mount("--route", "home")
    big = fed.collections["shared"]
    mark = fed.mark()
    run("cat", str(m / f"by_id/{big['uuid']}/blob.bin"))
    seen = fed.requests(since=mark)
    keep = [r for r in seen if r["service"].startswith("keep") and r["method"] == "GET"]
    assert [r for r in keep if r["cluster"] == "zzzzz"]  # asked of the home keepstore, which proxies
    assert all(r["token"] != fed.token() for r in seen if r["cluster"] != "zzzzz")


def test_direct_route_reads_remote_blocks_from_the_owner_with_a_salted_token(fed, mount):
    m = mount("--route", "direct")
    nested = fed.collections["nested"]
    mark = fed.mark()
    expected = {p: meta["md5"] for p, meta in nested["files"].items()}
    assert md5sums(m / f"by_id/{nested['uuid']}", sorted(expected)) == expected
    seen = fed.requests(since=mark)
    keep = [r for r in seen if r["service"].startswith("keep") and r["method"] == "GET"]
    assert keep and {r["cluster"] for r in keep} == {"zcccc"}
    assert all(r["token"] != fed.token() for r in seen if r["cluster"] != "zzzzz")


def test_unreachable_remote_cluster_is_eio_and_everything_else_keeps_serving(fed, mount):
    m = mount()
    fed.set_fault("zcccc", "controller", down=True)
    done = run("ls", str(m / f"by_id/{fed.collections['nested']['uuid']}"), check=False)
    assert done.returncode != 0 and "Input/output error" in done.stderr
    assert run("cat", str(m / f"by_id/{fed.collections['text']['uuid']}/hello.txt")).stdout == "hello world\n"
    log = m.log.read_text()
    assert any(fed.collections["nested"]["uuid"] in line and "zcccc" in line for line in log.splitlines())


def test_crunch_run_layout_by_pdh_refuses_uuids_and_by_uuid_takes_them(fed, mount):
    m = mount(
        "--mount-by-pdh",
        "by_id",
        "--mount-by-id",
        "by_uuid",
        "--disable-event-listening",
        "--crunchstat-interval",
        "1",
        "--storage-classes",
        "default",
    )
    text = fed.collections["text"]
    assert sorted(os.listdir(m.path)) == ["by_id", "by_uuid"]
    assert not (m / f"by_id/{text['uuid']}").exists()
    assert (m / f"by_id/{text['portable_data_hash']}/hello.txt").read_text() == "hello world\n"
    assert (m / f"by_uuid/{text['uuid']}/hello.txt").read_text() == "hello world\n"
    time.sleep(1.5)
    assert "crunchstat: keepcalls" in m.log.read_text()


def test_collection_option_mounts_one_collection_at_the_root(fed, mount):
    text = fed.collections["text"]
    m = mount("--collection", text["uuid"], ready="hello.txt")
    assert sorted(os.listdir(m.path)) == sorted({p.split("/")[0] for p in text["files"]})
    record = json.loads((m / ".arvados#collection").read_text())
    assert record["uuid"] == text["uuid"]


def test_sigkilled_daemon_leaves_no_dead_mount_after_unmount(fed, mount):
    m = mount()
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    with pytest.raises(OSError) as e:
        os.listdir(m.path)
    assert e.value.errno == errno.ENOTCONN
    started = time.monotonic()
    run(*fedmount_cmd("--unmount", str(m.path)), cwd=REPO, env={"PATH": os.environ["PATH"]})
    assert time.monotonic() - started < 5
    assert not is_mounted(m.path) and os.listdir(m.path) == []


def test_replace_recovers_a_dead_mount_point(fed, mount):
    m = mount()
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    again = Mount(fed, m.path.parent, "--replace")
    try:
        assert (again / "by_id/README").exists()
    finally:
        again.stop()


def test_sigterm_unmounts_cleanly_and_exits_zero(fed, mount):
    m = mount()
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(10) == 0
    assert not is_mounted(m.path)


def test_daemon_parent_exits_only_once_the_mount_is_ready(fed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**fed.env(), "XDG_STATE_HOME": str(tmp_path / "state")}  # its log file goes there
    done = run(*fedmount_cmd("--disk-cache-dir", str(tmp_path / "cache"), str(mnt)), env=env, cwd=REPO)
    try:
        assert done.returncode == 0
        assert (mnt / "by_id/README").exists()
    finally:
        run(*fedmount_cmd("--unmount", str(mnt)), cwd=REPO)
    assert not is_mounted(mnt)


def test_exec_mounts_runs_the_command_unmounts_and_returns_its_status(fed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    text = fed.collections["text"]
    script = f"cat {mnt}/by_id/{text['uuid']}/hello.txt; exit 7"
    done = run(*fedmount_cmd(str(mnt), "--exec", "sh", "-c", script), env=fed.env(), cwd=REPO, check=False)
    assert done.returncode == 7 and done.stdout == "hello world\n"
    assert not is_mounted(mnt)


def test_wrong_token_stops_before_mounting_with_one_line(fed, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = fed.env()
    env["ARVADOS_API_TOKEN"] = env["ARVADOS_API_TOKEN"].rsplit("/", 1)[0] + "/wrongsecret"
    done = run(*fedmount_cmd("--foreground", str(mnt)), env=env, cwd=REPO, check=False)
    assert done.returncode == 1 and not is_mounted(mnt)
    [line] = done.stderr.strip().splitlines()
    assert "token" in line and "wrongsecret" not in line


def test_expired_signatures_are_refreshed_and_an_open_file_keeps_reading(fed, mount):
    fed.set_blob_ttl(6)
    m = mount("--read-ahead-blocks", "1")
    big = fed.collections["big"]
    path = m / f"by_id/{big['portable_data_hash']}/big.bin"
    digest = hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        digest.update(f.read(4096))
        time.sleep(7)  # every signature the mount was given has expired; most blocks are not read yet
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == big["files"]["big.bin"]["md5"]
    assert m.stats().get("collection_refreshes", 0) >= 1


def test_prometheus_endpoint_serves_the_counters(fed, mount):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = mount("--stats-port", str(port))
    run("cat", str(m / f"by_id/{fed.collections['text']['uuid']}/hello.txt"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'fedmount_fuse_ops{op="read"}' in text and 'fedmount_keep_bytes{cluster="zzzzz"}' in text
    assert "fedmount_process_rss_bytes" in text


def test_debug_log_never_contains_the_token(fed, mount):
    m = mount("--debug", "--route", "direct")
    nested = fed.collections["nested"]
    run("cat", str(m / f"by_id/{nested['uuid']}/empty.txt"))
    run("ls", str(m / "by_id/zbbbb-4zz18-000000000000000"), check=False)
    token = parse_token(fed.token())
    log = m.log.read_text()
    assert "DEBUG" in log and token.secret not in log
    assert all(salt_for(token, cluster).secret not in log for cluster in fed.clusters)


def test_uuid_collection_rereads_from_the_page_cache_and_an_update_shows_after_refresh(fed, mount):
    name = f"mutable-{time.monotonic_ns()}"
    first, second = b"first version\n" * 80_000, b"second, longer version\n" * 80_000
    coll = fed.add_collection(fed.home, name, {"a.txt": first, "b.txt": b"unchanged\n"})
    newer = fed.add_collection(fed.home, f"{name}-v2", {"a.txt": second, "b.txt": b"unchanged\n"})
    m = mount("--refresh-time", "2")
    path = m / f"by_id/{coll['uuid']}/a.txt"
    assert path.read_bytes() == first
    before = m.stats()["fuse_read_bytes"]
    assert path.read_bytes() == first
    assert m.stats()["fuse_read_bytes"] - before < 64 << 10  # only stats.json itself: not 1 MiB again
    give_content(fed, fed.home, coll["uuid"], newer["uuid"])
    wait_for(lambda: path.read_bytes() == second, 15, "the updated content")
    assert (m / f"by_id/{coll['uuid']}/b.txt").read_bytes() == b"unchanged\n"
    # a.txt changed: its name now names another inode, and the kernel was told to forget the
    # old entry (from a worker thread: it may land just after). The kernel answers ENOENT when
    # it had already dropped the entry itself (its 2 s entry timeout ran out and a lookup
    # replaced it), which the mount counts apart.
    def entry_invalidations() -> int:
        stats = m.stats()
        kinds = ("fuse_invalidations", "fuse_invalidations_unneeded")
        return sum(stats.get(key, {}).get("kind=entry", 0) for key in kinds)

    wait_for(lambda: entry_invalidations() >= 1, 10, "the entry invalidation")


@pytest.mark.parametrize(("owner", "route"), [("home", "home"), ("remote", "home"), ("remote", "direct")])
def test_a_recheck_of_an_unchanged_uuid_collection_transfers_no_manifest_and_an_update_shows(
    fed, mount, owner, route
):
    owner = fed.home if owner == "home" else sorted(c for c in fed.clusters if c != fed.home)[0]
    name = f"rechecked-{time.monotonic_ns()}"
    files = {f"file-{i:04}.txt": b"the same\n" for i in range(3000)}  # a manifest of some 40 kB
    coll = fed.add_collection(owner, name, {**files, "a.txt": b"first\n"})
    newer = fed.add_collection(owner, f"{name}-v2", {**files, "a.txt": b"second\n"})
    m = mount("--refresh-time", "1", "--route", route)
    path = m / f"by_id/{coll['uuid']}/a.txt"

    def asked(since: int) -> list[tuple[dict, list[str] | None]]:
        """(log line, select) of every controller request for the collection since `since`:
        its get, or a list with a ``uuid in`` filter naming it (the batched re-check)."""
        out = []
        for r in fed.requests(since, service="controller", method="GET"):
            url = urlsplit(r["path"])
            query = parse_qs(url.query)
            filters = json.loads(query.get("filters", ["[]"])[0])
            listed = url.path.endswith("/collections") and any(
                f[:2] == ["uuid", "in"] and coll["uuid"] in f[2] for f in filters
            )
            if url.path.endswith(f"/collections/{coll['uuid']}") or listed:
                select = query.get("select")
                out.append((r, json.loads(select[0]) if select else None))
        return out

    mark = fed.mark()
    assert path.read_bytes() == b"first\n"
    loads = wait_for_requests(lambda: asked(mark))
    assert all(s is None and r["bytes"] > 30_000 for r, s in loads)  # the whole record, at first
    mark = fed.mark()
    forwarded = owner != fed.home and route == "home"
    # The owner logs the forwarded request before the home, which logs it once it answered.
    expected = {fed.home, owner} if forwarded else {owner}

    def rechecked() -> list:
        found = path.stat() and asked(mark)
        return found if {r["cluster"] for r, _ in found} >= expected else []

    rechecks = wait_for_requests(rechecked)
    # One list of the mounted UUID collections of that cluster (`fs/rechecks.py`), of the freshness fields.
    assert all(urlsplit(r["path"]).path.endswith("/collections") for r, _ in rechecks)
    assert all(s is not None and "portable_data_hash" in s and "manifest_text" not in s for _, s in rechecks)
    assert all(r["status"] == 200 and r["bytes"] < 2_000 for r, _ in rechecks)
    assert {r["cluster"] for r, _ in rechecks} == expected  # with home, the home forwarded the select

    mark = fed.mark()
    give_content(fed, owner, coll["uuid"], newer["uuid"])
    wait_for(lambda: path.read_bytes() == b"second\n", 15, "the updated content")
    whole = [r for r, s in asked(mark) if s is None]
    assert whole and all(r["bytes"] > 30_000 for r in whole)  # fetched once the PDH had changed


def give_content(fed, cluster: str, uuid: str, source_uuid: str) -> None:
    """Update collection `uuid` of `cluster` (with a PUT, as a user would) to the content of `source_uuid`."""
    token = fed.token(cluster)
    got = fed.request(cluster, f"/arvados/v1/collections/{source_uuid}", token=token)
    update = json.dumps({"collection": {"manifest_text": got.json()["manifest_text"]}}).encode()
    put = fed.request(cluster, f"/arvados/v1/collections/{uuid}", method="PUT", token=token,
                      headers={"Content-Type": "application/json"}, body=update)
    assert put.status == 200, put.body


def wait_for_requests(find: Callable[[], list]) -> list:
    """What `find` returns once it is not empty (a service logs a request after answering it)."""
    found: list = []

    def seen() -> list:
        found[:] = find()
        return found

    wait_for(seen, 15, "the request log lines")
    return found
