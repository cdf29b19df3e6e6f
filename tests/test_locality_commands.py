"""The locate/stage/unpin entry points: exit statuses and one-line errors without a federation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_cache import hold_as_much_as_the_filesystem  # tests/ is on sys.path under pytest

from fedmount.blocks.cache.config import default_disk_cache_size
from fedmount.locality.commands import build_stage_parser, disk_limit, locate_main, stage_main, unpin_main
from fedmount.mount import MountOptions, _cache_config


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


@pytest.mark.parametrize("main", [locate_main, stage_main])
def test_missing_settings_is_one_line_and_status_2(
    main: Callable[[list[str]], int], no_settings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["zzzzz-4zz18-000000000000001", "--disk-cache-dir", str(no_settings / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [err[0]] and "ARVADOS_API_HOST and ARVADOS_API_TOKEN not set" in err[0]


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        locate_main([])
    assert info.value.code == 2 and "ID" in capsys.readouterr().err


def test_unpin_of_an_unrecorded_id_needs_settings_and_says_so(
    no_settings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = unpin_main(["not-an-id", "zzzzz-4zz18-000000000000001", "--disk-cache-dir", str(no_settings)])
    err = capsys.readouterr().err
    assert status == 2
    assert "not-an-id: error: invalid UUID" in err
    assert "zzzzz-4zz18-000000000000001: error: cannot resolve IDs without ARVADOS_API_HOST" in err


ID = "zzzzz-4zz18-000000000000001"


def test_stage_evicts_to_the_bound_a_mount_of_the_same_directory_uses(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    hold_as_much_as_the_filesystem(directory)  # makes the default independent of free space
    stage = build_stage_parser().parse_args([ID, "--disk-cache-dir", str(directory)])
    mount_limit = _cache_config(MountOptions("/m", disk_cache_dir=str(directory)))[1]
    assert disk_limit(stage) == mount_limit == default_disk_cache_size(str(directory))
    sized = build_stage_parser().parse_args([ID, "--disk-cache-size", "1G"])
    assert disk_limit(sized) == 1 << 30
