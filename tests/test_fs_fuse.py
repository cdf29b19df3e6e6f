"""The pyfuse3 adapter without a mount: handlers called directly on a `Tree` of fakes."""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
import pytest
from fsworld import FILES_A, UUID_A, world_fixture  # noqa: F401 (a fixture)  # tests/ is on sys.path

from fedmount.fs.fuse import FuseOperations
from fedmount.fs.inodes import ROOT_INODE
from fedmount.fs.nodes import FOREVER


@pytest.fixture
def ops(world):
    fed, reader, stats, *_, make = world
    return FuseOperations(make(), stats, uid=1234, gid=5678)


async def walk(ops: FuseOperations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    entry = None
    for part in path.split("/"):
        entry = await ops.lookup(ino, part.encode(), None)
        ino = entry.st_ino
    assert entry is not None
    return entry


async def test_lookup_gives_read_only_attributes_of_the_mounting_user(ops):
    entry = await walk(ops, f"by_id/{UUID_A}/dir/sub/deep.bin")
    assert stat.S_ISREG(entry.st_mode) and stat.S_IMODE(entry.st_mode) == 0o555
    assert (entry.st_uid, entry.st_gid) == (1234, 5678)
    assert entry.st_size == len(FILES_A["dir/sub/deep.bin"]) and entry.st_blocks == 5
    d = await walk(ops, f"by_id/{UUID_A}/dir")
    assert stat.S_IMODE(d.st_mode) == 0o555 and stat.S_ISDIR(d.st_mode)
    again = await ops.getattr(entry.st_ino, None)
    assert again.st_ino == entry.st_ino and again.st_mtime_ns == entry.st_mtime_ns


async def test_missing_names_get_a_negative_entry_the_kernel_can_cache(ops):
    entry = await walk(ops, "by_id/not-a-collection")
    assert entry.st_ino == 0 and entry.entry_timeout == 15.0


async def test_readme_before_ready_is_a_plain_enoent(ops):
    by_id = await walk(ops, "by_id")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(by_id.st_ino, b"README", None)
    assert e.value.errno == errno.ENOENT


async def test_open_read_release_and_keep_cache_for_pdh(ops, world):
    fed = world[0]
    pdh = fed.collections[UUID_A].portable_data_hash
    entry = await walk(ops, f"by_id/{pdh}/hello.txt")
    assert entry.attr_timeout == FOREVER
    info = await ops.open(entry.st_ino, os.O_RDONLY, None)
    assert info.keep_cache and not info.direct_io
    assert await ops.read(info.fh, 6, 100) == b"world\n"
    await ops.release(info.fh)
    assert ops.stats.get("fuse_ops", op="read") == 1 and ops.stats.get("fuse_read_bytes") == 6


WRITE_OPENS = [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND]


@pytest.mark.parametrize("flags", WRITE_OPENS)
async def test_opening_for_writing_is_erofs(ops, flags):
    entry = await walk(ops, f"by_id/{UUID_A}/hello.txt")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(entry.st_ino, flags, None)
    assert e.value.errno == errno.EROFS


@pytest.mark.parametrize(
    "op", ["setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "write", "create",
           "setxattr", "removexattr"],
)
async def test_every_modifying_operation_is_erofs(ops, op):
    with pytest.raises(pyfuse3.FUSEError) as e:
        await getattr(ops, op)(ROOT_INODE, b"x", None)
    assert e.value.errno == errno.EROFS


async def test_xattrs_through_the_adapter(ops):
    entry = await walk(ops, f"by_id/{UUID_A}/hello.txt")
    names = await ops.listxattr(entry.st_ino, None)
    assert b"user.arvados.locators" in names
    assert await ops.getxattr(entry.st_ino, b"user.arvados.cluster", None) == b"zzzzz"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getxattr(entry.st_ino, b"user.other", None)
    assert e.value.errno == pyfuse3.ENOATTR  # the user namespace is supported: absent


NOT_USER = [b"security.selinux", b"system.posix_acl_access", b"system.posix_acl_default",
            b"security.capability", b"trusted.x"]  # fmt: skip


@pytest.mark.parametrize("name", NOT_USER)
async def test_xattrs_outside_the_user_namespace_are_not_supported(ops, name):
    # EOPNOTSUPP, not ENODATA: ls -l then stops asking for every file of the device
    entry = await walk(ops, f"by_id/{UUID_A}/hello.txt")
    for ino in (entry.st_ino, ROOT_INODE):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getxattr(ino, name, None)
        assert e.value.errno == errno.EOPNOTSUPP


async def test_statfs_fields(ops):
    s = await ops.statfs(None)
    assert s.f_namemax == 255 and s.f_bsize == 4096


async def test_unexpected_exception_is_eio_with_one_error_line_and_a_debug_traceback(ops, world, caplog):
    world[0].fail[UUID_A] = RuntimeError("surprise")  # the layer below breaks its contract
    by_id = await walk(ops, "by_id")
    with caplog.at_level(logging.DEBUG, "fedmount.fuse"), pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(by_id.st_ino, UUID_A.encode(), None)
    assert e.value.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    (line,) = [r.getMessage() for r in errors]
    assert "\n" not in line  # the phrase crunch-run scans for (arv-mount's), then the op
    assert line == "Unhandled exception during FUSE operation lookup: RuntimeError: surprise"
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
    assert ops.stats.get("fuse_unexpected_errors", op="lookup") == 1
    del world[0].fail[UUID_A]
    assert (await walk(ops, f"by_id/{UUID_A}/hello.txt")).st_size == 12  # and it keeps serving
