"""The --mount-tmp scratch model (fs/scratch.py) without a mount: files on local disk,
directories, renames, truncation, the quota, and `.arvados#collection` uploads."""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pyfuse3
import pytest
from fsworld import UUID_A, world_fixture  # noqa: F401 (a fixture)  # tests/ is on sys.path

from fedmount.arvados.errors import KeepWriteError
from fedmount.arvados.manifest import portable_data_hash
from fedmount.fs.collection import COLLECTION_RECORD_NAME
from fedmount.fs.errors import FsError
from fedmount.fs.inodes import InodeTable
from fedmount.fs.scratch import (
    NUMBERS_PER_RANGE,
    RENAME_NOREPLACE,
    Quota,
    RecordFile,
    ScratchDir,
    ScratchFile,
    ScratchStore,
    open_scratch,
)


class FakeUpload:
    """Records what it was given; fails while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False
        self.seen: list[dict[str, bytes]] = []

    async def __call__(self, root) -> str:
        if self.failing:
            raise KeepWriteError("x+1", "block x+1 to cluster zzzzz: wanted 2 copies, stored 0")
        files: dict[str, bytes] = {}

        def walk(d, prefix):
            for f in d.files:
                files[prefix + f.name] = f.read(0, f.size)
            for name, sub in d.dirs.items():
                walk(sub, f"{prefix}{name}/")

        walk(root, "")
        self.seen.append(files)
        return "".join(f". d41d8cd98f00b204e9800998ecf8427e+0 0:0:{n}\n" for n in sorted(files))


@pytest.fixture
def store(tmp_path):
    table: InodeTable = InodeTable()
    upload = FakeUpload()
    s = ScratchStore("tmp0", backing_dir=str(tmp_path), quota=Quota(1000), allocate=table.allocate,
                     upload=upload, storage_classes=["default"])
    s.table, s.fake = table, upload  # type: ignore[attr-defined]
    return s


async def test_files_hold_their_bytes_in_unnamed_local_files(store, tmp_path):
    f, h = store.root.create("out.txt", 0o100644)
    assert await h.write(0, b"hello ") == 6 and await h.write(6, b"world") == 5
    assert await h.read(0, 100) == b"hello world" and f.attr().size == 11
    assert f.attr().mode & 0o777 == 0o666 and store.quota.used == 11  # anyone may write, as in arv-mount
    assert store.root.attr().mode & 0o777 == 0o777
    assert os.listdir(tmp_path) == []  # the bytes are on local disk, under no name
    assert store.table.get(f.ino) is f  # numbered in the mount's table
    assert await store.root.lookup("out.txt") is f
    h.close()


async def test_directories_renames_and_replacing(store):
    d = store.root.mkdir("a", 0o755)
    sub = d.mkdir("b", 0o700)
    f, h = sub.create("x", 0o100600)
    await h.write(0, b"1234")
    h.close()
    sub.rename("x", store.root, "y")
    assert set(store.root.children) == {"a", "y"} and not sub.children
    g, h2 = store.root.create("z", 0o100644)
    await h2.write(0, b"zz")
    h2.close()
    store.root.rename("y", store.root, "z")  # replaces z, whose space is freed
    assert store.root.children["z"] is f and store.quota.used == 4
    with pytest.raises(FsError) as e:
        store.root.rename("a", sub, "loop")
    assert e.value.errno == errno.EINVAL
    store.root.create("w", 0o100644)[1].close()
    with pytest.raises(FsError) as e:
        store.root.rename("w", store.root, "z", RENAME_NOREPLACE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FsError) as e:
        store.root.rmdir("a")
    assert e.value.errno == errno.ENOTEMPTY
    d.rmdir("b")
    store.root.rmdir("a")
    assert store.table.get(sub.ino) is None


async def test_names_a_collection_cannot_hold_are_refused(store):
    for name, code in ((".", errno.EINVAL), ("..", errno.EINVAL), (COLLECTION_RECORD_NAME, errno.EEXIST),
                       ("x" * 256, errno.ENAMETOOLONG)):
        with pytest.raises(FsError) as e:
            store.root.create(name, 0o100644)
        assert e.value.errno == code, name
    with pytest.raises(FsError) as e:
        store.root.create("fifo", 0o010644)
    assert e.value.errno == errno.EPERM
    store.root.mkdir("sub", 0o755).create(COLLECTION_RECORD_NAME, 0o100644)[1].close()  # fine below the root


async def test_writes_past_the_quota_fail_with_enospc_and_change_nothing(store):
    f, h = store.root.create("big", 0o100644)
    await h.write(0, b"x" * 900)
    with pytest.raises(FsError) as e:
        await h.write(900, b"y" * 200)
    assert e.value.errno == errno.ENOSPC and f.size == 900 and store.quota.used == 900
    with pytest.raises(FsError):
        f.truncate(2000)
    f.truncate(10)
    assert f.size == 10 and store.quota.used == 10 and await h.read(0, 100) == b"x" * 10
    h.close()


async def test_an_unlinked_open_file_stays_usable_until_its_last_close(store):
    f, h = store.root.create("gone", 0o100644)
    await h.write(0, b"abc")
    store.root.unlink("gone")
    assert "gone" not in store.root.children and await h.read(0, 3) == b"abc"
    assert store.table.get(f.ino) is f and store.quota.used == 3
    h.close()
    assert store.table.get(f.ino) is None and store.quota.used == 0 and f.fd == -1


async def test_open_with_o_trunc_empties_and_read_only_handles_refuse_writes(store):
    f, h = store.root.create("t", 0o100644)
    await h.write(0, b"old content")
    h.close()
    ro = await open_scratch(f, os.O_RDONLY)
    with pytest.raises(FsError) as e:
        await ro.write(0, b"x")
    assert e.value.errno == errno.EBADF
    ro.close()
    rw = await open_scratch(f, os.O_WRONLY | os.O_TRUNC)
    assert f.size == 0
    rw.close()


async def test_inode_ranges_are_taken_as_needed(store):
    first = store.root.ino
    for i in range(NUMBERS_PER_RANGE + 5):
        store.root.mkdir(f"d{i}", 0o755)
    last = store.root.children[f"d{NUMBERS_PER_RANGE + 4}"]
    assert isinstance(last, ScratchDir) and last.ino > first + NUMBERS_PER_RANGE
    assert store.table.get(last.ino) is last


async def test_reading_the_record_uploads_what_the_store_holds(store):
    d = store.root.mkdir("sub", 0o755)
    _, h = d.create("r.txt", 0o100644)
    await h.write(0, b"result")
    h.close()
    record_file = await store.root.lookup(COLLECTION_RECORD_NAME)
    assert isinstance(record_file, RecordFile)
    assert COLLECTION_RECORD_NAME not in dict(await store.root.entries())
    handle = await open_scratch(record_file, os.O_RDONLY)
    record = json.loads(await handle.read(0, 1 << 20))
    assert record["uuid"] is None and record["storage_classes_desired"] == ["default"]
    assert record["manifest_text"].endswith("0:0:sub/r.txt\n")
    assert record["portable_data_hash"] == portable_data_hash(record["manifest_text"])
    assert store.fake.seen == [{"sub/r.txt": b"result"}]
    with pytest.raises(FsError) as e:
        await open_scratch(record_file, os.O_WRONLY)
    assert e.value.errno == errno.EACCES


async def test_a_failed_upload_fails_the_read_keeps_the_files_and_the_next_read_retries(store, caplog):
    _, h = store.root.create("keep-me", 0o100644)
    await h.write(0, b"precious")
    h.close()
    store.fake.failing = True
    with pytest.raises(FsError) as e:
        await store.collection_record()
    assert e.value.errno == errno.EIO
    [line] = [r.getMessage() for r in caplog.records if "Keep write error" in r.getMessage()]
    assert line.startswith("tmp0: Keep write error: block x+1") and "\n" not in line
    assert isinstance(store.root.children["keep-me"], ScratchFile)
    store.fake.failing = False
    assert b"keep-me" in await store.collection_record()


class FakeHome:
    default_replication = 2

    async def home_route(self):
        raise AssertionError("no upload in this test")


async def test_the_fuse_adapter_routes_writes_to_the_scratch_directory_and_nowhere_else(world, tmp_path):
    from fedmount.fs.fuse import FuseOperations
    from fedmount.fs.inodes import ROOT_INODE
    from fedmount.fs.scratch_root import ScratchOptions, attach_scratch

    *_, make = world
    tree = make()
    opts = ScratchOptions(["tmp0"], str(tmp_path), 1 << 20)
    attach_scratch(tree, FakeHome(), opts, transport=lambda *a: None, stats=tree.context.stats)
    ops = FuseOperations(tree, tree.context.stats, uid=1234, gid=5678)
    tmp0 = (await ops.lookup(ROOT_INODE, b"tmp0", None)).st_ino
    info, entry = await ops.create(tmp0, b"out.txt", 0o100644, os.O_WRONLY, None)
    assert await ops.write(info.fh, 0, b"written") == 7 and tree.context.stats.get("fuse_write_bytes") == 7
    await ops.release(info.fh)
    sub = (await ops.mkdir(tmp0, b"sub", 0o755, None)).st_ino
    await ops.rename(tmp0, b"out.txt", sub, b"moved.txt", 0, None)
    fields = SimpleNamespace(update_uid=False, update_gid=False, update_size=True, update_mode=True,
                             update_mtime=False)  # pyfuse3's SetattrFields cannot be made outside it
    attr = pyfuse3.EntryAttributes()
    attr.st_size, attr.st_mode = 3, 0o100750
    changed = await ops.setattr(entry.st_ino, attr, fields, None, None)
    assert changed.st_size == 3 and changed.st_mode == 0o100776  # the execute bits stick
    reading = await ops.open(entry.st_ino, os.O_RDONLY, None)
    assert await ops.read(reading.fh, 0, 100) == b"wri"
    await ops.release(reading.fh)
    by_id = (await ops.lookup(ROOT_INODE, b"by_id", None)).st_ino
    collection = (await ops.lookup(by_id, UUID_A.encode(), None)).st_ino
    attempts = (ops.mkdir(collection, b"x", 0o755, None), ops.create(collection, b"x", 0o100644, 1, None),
                ops.rename(tmp0, b"sub", collection, b"sub", 0, None),
                ops.unlink(collection, b"hello.txt", None))
    for attempt in attempts:
        with pytest.raises(pyfuse3.FUSEError) as e:
            await attempt
        assert e.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.symlink(tmp0, b"link", b"target", None)
    assert e.value.errno == errno.EPERM
