"""result.json figures, image tarball discovery and the local runtime's root filesystem."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from fedmount.arvados.ids import parse_collection_id
from fedmount.runner.image import extract_rootfs, find_image_tarball
from fedmount.runner.results import by_label, mount_figures, read_mount_stats, write_result
from fedmount.runner.spec import SpecError

PDH = "0123456789abcdef0123456789abcdef+123"
TOKEN = "v2/zzzzz-gj3su-0123456789abcde/s3cr3tvalue"


def test_mount_figures_from_a_stats_snapshot():
    snap = {
        "keep_bytes": {"cluster=zzzzz": 100, "cluster=zbbbb": 50},
        "keep_requests": {"cluster=zbbbb": 2},
        "cache_hits": {"tier=ram": 3, "tier=disk": 4},
        "cache_misses": 5,
        "cache_hit_bytes": {"tier=ram": 10},
    }
    assert mount_figures(snap) == {
        "bytes_read_by_cluster": {"zzzzz": 100, "zbbbb": 50},
        "keep_requests_by_cluster": {"zbbbb": 2},
        "cache_hits": 7,
        "cache_misses": 5,
        "cache_hit_bytes": 10,
    }
    assert mount_figures({})["bytes_read_by_cluster"] == {} and mount_figures({})["cache_hits"] == 0
    assert by_label({"cluster=a,service=x": 1, "cluster=a,service=y": 2}, "cluster") == {"a": 3}


def test_stats_file_is_read_from_the_mount_or_empty(tmp_path):
    assert read_mount_stats(str(tmp_path)) == {}
    (tmp_path / ".fedmount").mkdir()
    (tmp_path / ".fedmount" / "stats.json").write_text('{"cache_misses": 2}')
    assert read_mount_stats(str(tmp_path)) == {"cache_misses": 2}


def test_result_json_never_holds_a_token(tmp_path):
    path = tmp_path / "result.json"
    write_result(str(path), {"error": f"failed with {TOKEN}", "exit_code": 0})
    text = path.read_text()
    assert "s3cr3t" not in text and json.loads(text)["exit_code"] == 0


def _tar_bytes(members: dict[str, bytes | None]) -> bytes:
    """A tar of regular files (bytes) and directories (None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_rootfs_is_unpacked_layer_by_layer_with_whiteouts(tmp_path):
    layer1 = _tar_bytes(
        {
            "bin": None,
            "bin/tool": b"v1",
            "etc": None,
            "etc/old": b"x",
            "var": None,
            "var/a": b"a",
            "var/b": b"b",
            "../escape": b"no",
        }
    )
    layer2 = _tar_bytes({"bin/tool": b"v2", "etc/.wh.old": b"", "var/.wh..wh..opq": b"", "var/c": b"c"})
    manifest = json.dumps([{"Config": "c.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode()
    tarball = tmp_path / "sha256:abc.tar"
    tarball.write_bytes(
        _tar_bytes(
            {
                "l1": None,
                "l1/layer.tar": layer1,
                "l2": None,
                "l2/layer.tar": layer2,
                "manifest.json": manifest,
            }
        )
    )
    root = tmp_path / "root"
    root.mkdir()
    extract_rootfs(str(tarball), str(root))
    assert (root / "bin" / "tool").read_bytes() == b"v2"
    assert not (root / "etc" / "old").exists()
    assert sorted(os.listdir(root / "var")) == ["c"]
    assert not (tmp_path / "escape").exists()


def test_image_tarball_is_found_like_crunch_run(tmp_path):
    cid = parse_collection_id(PDH)
    coll = tmp_path / "by_id" / PDH
    coll.mkdir(parents=True)
    with pytest.raises(SpecError, match="^container_image: collection .* holds no <image id>.tar"):
        find_image_tarball(str(tmp_path), cid)
    (coll / "sha256:abc.tar").write_bytes(b"")
    (coll / "notes.txt").write_bytes(b"")
    assert find_image_tarball(str(tmp_path), cid) == ("sha256:abc", str(coll / "sha256:abc.tar"))
    (coll / "sha256:def.tar").write_bytes(b"")
    with pytest.raises(SpecError, match="several image tarballs"):
        find_image_tarball(str(tmp_path), cid)
    with pytest.raises(SpecError, match="does not exist"):
        find_image_tarball(str(tmp_path), parse_collection_id("zbbbb-4zz18-0123456789abcde"))
