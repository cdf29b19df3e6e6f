"""A detached daemon's log file: where it goes, its mode, its bound; start-up checks and
`--unmount` of a path that is not mounted (no mounts are made here)."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from fedmount import cli
from fedmount.logs import PrivateRotatingFileHandler, detached_log_path, log_dir, open_private
from fedmount.mount_options import MountOptions
from fedmount.startup import StartupError, prepare_mountpoint
from fedmount.unmount import unmount_command


def test_log_dir_follows_xdg_state_home():
    assert log_dir({"XDG_STATE_HOME": "/s"}) == "/s/fedmount/logs"
    assert log_dir({}) == os.path.expanduser("~/.local/state/fedmount/logs")


def test_log_file_is_named_after_the_mount_point_and_never_shared():
    env = {"XDG_STATE_HOME": "/s"}
    path = detached_log_path("/mnt/keep", env)
    assert os.path.dirname(path) == "/s/fedmount/logs"
    assert os.path.basename(path).startswith("mnt-keep-") and path.endswith(".log")
    assert detached_log_path("/mnt/keep", env) == path
    assert detached_log_path("/mnt-keep", env) != path  # same slug, other mount point
    assert os.path.basename(detached_log_path("/", env)).startswith("root-")


def test_mount_options_name_the_log_file_only_when_detached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    detached = MountOptions.from_args(cli.parse_args(["/mnt/keep"]))
    assert detached.detached and detached.log_path == detached_log_path("/mnt/keep")
    assert detached.log_path.startswith(str(tmp_path))
    for argv in (["--foreground", "/mnt/keep"], ["/mnt/keep", "--exec", "true"]):
        assert MountOptions.from_args(cli.parse_args(argv)).log_path is None
    given = MountOptions.from_args(cli.parse_args(["--foreground", "--logfile", "x.log", "/mnt/keep"]))
    assert given.log_path == os.path.abspath("x.log")


def test_log_files_are_created_0600_and_rotated_within_a_bound(tmp_path):
    os.umask(0o022)
    path = tmp_path / "m.log"
    handler = PrivateRotatingFileHandler(str(path), maxBytes=1000, backupCount=2)
    logger = logging.getLogger("fedmount.test-daemon-log")
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.error("line %d of a long-running daemon's log", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.log", "m.log.1", "m.log.2"]  # 2 old files kept, the rest dropped
    assert sum((tmp_path / f).stat().st_size for f in files) <= 3 * 1100
    assert all(stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o600 for f in files)
    assert "line 199" in path.read_text()


def test_open_private_keeps_an_existing_files_mode(tmp_path):
    path = tmp_path / "given.log"
    with open_private(str(path)) as f:
        f.write("a\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    with open_private(str(path)) as f:
        f.write("b\n")
    assert path.read_text() == "a\nb\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_non_empty_mount_point_is_refused_unless_nonempty(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me visible")
    with pytest.raises(StartupError) as info:
        prepare_mountpoint(MountOptions(str(tmp_path)))
    assert str(info.value) == (f"{tmp_path} is not empty (1 entry, which the mount would hide); use an "
                               "empty directory, or --nonempty to mount over it")
    prepare_mountpoint(MountOptions(str(tmp_path), nonempty=True))
    (tmp_path / "empty").mkdir()
    prepare_mountpoint(MountOptions(str(tmp_path / "empty")))


def test_unmount_of_a_path_that_is_not_mounted_exits_1_with_one_line(tmp_path, capsys):
    assert unmount_command(str(tmp_path), 0.5) == 1
    assert capsys.readouterr().err == f"fedmount: {tmp_path} is not mounted\n"
