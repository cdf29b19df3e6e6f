"""fedmount/records.py: a record's directory and every file in it are private to the user."""

from __future__ import annotations

import os
import stat

import pytest

from fedmount.records import RecordDirError, private_record


def modes(directory) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def test_a_new_record_is_a_0700_directory_of_0600_files_whatever_the_umask(tmp_path):
    where = tmp_path / "cluster-copies"
    old = os.umask(0o022)
    try:
        record = private_record(str(where), size_limit=1 << 20)
        record.set("zbbbb/key", "locator")
        assert record.get("zbbbb/key") == "locator"
        record.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    files = modes(where)
    assert "cache.db" in files and set(files.values()) == {0o600}, files


def test_a_record_an_earlier_version_left_readable_is_made_private(tmp_path):
    where = tmp_path / "runs"
    where.mkdir(mode=0o755)
    os.chmod(where, 0o755)
    (where / "cache.db").touch(mode=0o644)
    os.chmod(where / "cache.db", 0o644)
    private_record(str(where)).close()
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert set(modes(where).values()) == {0o600}


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "runs").symlink_to(target)
    with pytest.raises(RecordDirError, match="not a directory of this user"):
        private_record(str(tmp_path / "runs"))
    assert list(target.iterdir()) == []
