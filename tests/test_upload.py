"""Keep writes (blocks/upload.py) over a fake PUT transport, and the manifest they make,
checked against the real SDK's parser and normalizer (arvados-python-client)."""

from __future__ import annotations

import hashlib

import pytest

from fedmount.arvados.errors import KeepWriteError
from fedmount.arvados.manifest import parse_manifest, portable_data_hash
from fedmount.arvados.manifest_writer import DirEntry, FileEntry, Piece, escape, manifest_text
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.upload import (
    KeepWriter,
    PutError,
    PutResponse,
    SourceDir,
    SourceFile,
    Uploader,
    plan_blocks,
)
from fedmount.stats import Stats

SIGNATURE = "+A" + "0" * 40 + "@7fffffff"


def sdk_collection(text: str):
    """The real SDK's Collection of `text`, with stand-ins for the API and Keep it never calls."""
    import arvados.collection

    class Offline:
        _rootDesc: dict = {}
        num_prefetch_threads = 0

    return arvados.collection.Collection(text, api_client=Offline(), keep_client=Offline())


class FakeKeep:
    """Keepstores by root URL: each stores one replica in the classes it has, or answers a
    fixed status; records every PUT's headers."""

    def __init__(self, classes: dict[str, tuple[str, ...]], status: dict[str, int] | None = None,
                 confirm: bool = True):
        self.classes = classes
        self.status = status or {}
        self.confirm = confirm
        self.puts: list[tuple[str, dict[str, str]]] = []
        self.blocks: dict[str, bytes] = {}

    def __call__(self, url, headers, body, timeout):
        root = url.rsplit("/", 1)[0] + "/"
        self.puts.append((root, dict(headers)))
        status = self.status.get(root, 200)
        if status == -1:
            raise PutError("connection refused")
        if status != 200:
            return PutResponse(status, {}, b"refused\n")
        wanted = {c.strip() for c in headers.get("X-Keep-Storage-Classes", "").split(",") if c.strip()}
        if self.confirm and wanted and not wanted & set(self.classes[root]):
            return PutResponse(507, {}, b"insufficient storage\n")
        data = bytes(body)
        digest = hashlib.md5(data).hexdigest()
        assert url.endswith("/" + digest) and headers["Content-Length"] == str(len(data))
        self.blocks[digest] = data
        out = {"x-keep-replicas-stored": "1"}
        if self.confirm:
            out["x-keep-storage-classes-confirmed"] = ", ".join(f"{c}=1" for c in self.classes[root])
        return PutResponse(200, out, f"{digest}+{len(data)}{SIGNATURE}\n".encode())


def route(n: int = 2) -> KeepRoute:
    services = tuple(KeepService(f"zzzzz-bi6l4-{i:015d}", f"http://keep{i}/") for i in range(n))
    return KeepRoute("zzzzz", "v2/zzzzz-gj3su-000000000000000/secret", services)


async def test_a_block_is_stored_with_its_copies_and_signed():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("archive", "default")})
    stats = Stats()
    locator = await KeepWriter(route(), keep, copies=2, stats=stats).put(b"hello")
    assert locator == f"{hashlib.md5(b'hello').hexdigest()}+5{SIGNATURE}"
    assert len(keep.puts) == 2 and stats.get("keep_puts") == 1 and stats.get("keep_put_bytes") == 10
    assert all(h["X-Keep-Desired-Replicas"] in ("2", "1") for _, h in keep.puts)
    assert all(h["Authorization"].startswith("Bearer v2/") for _, h in keep.puts)


async def test_storage_classes_go_out_and_a_volume_without_them_is_skipped():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("archive", "default")})
    locator = await KeepWriter(route(), keep, copies=1, classes=["archive"]).put(b"cold")
    assert locator.endswith(SIGNATURE)
    assert {h["X-Keep-Storage-Classes"] for _, h in keep.puts} == {"archive"}
    assert keep.puts[-1][0] == "http://keep1/"


async def test_too_few_copies_in_a_class_is_one_keep_write_error_line():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("archive", "default")})
    with pytest.raises(KeepWriteError) as e:
        await KeepWriter(route(), keep, copies=2, classes=["archive"], backoff=0).put(b"cold")
    text = str(e.value)
    assert text.startswith("Keep write error: block ") and "\n" not in text
    assert "wanted 2 copies in class archive, stored 1" in text and "507" in text
    assert "secret" not in text and SIGNATURE not in text


async def test_a_failing_service_is_retried_then_the_other_replica_serves():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("default",)},
                    status={"http://keep0/": 503})
    with pytest.raises(KeepWriteError):
        await KeepWriter(route(), keep, copies=2, retries=2, backoff=0).put(b"x")
    assert [r for r, _ in keep.puts].count("http://keep0/") == 3  # transient: every round
    assert [r for r, _ in keep.puts].count("http://keep1/") == 1  # stored: done
    assert await KeepWriter(route(), keep, copies=1, backoff=0).put(b"y")


async def test_without_class_confirmations_copies_alone_decide():
    keep = FakeKeep({"http://keep0/": (), "http://keep1/": ()}, confirm=False)
    assert await KeepWriter(route(), keep, copies=2, classes=["archive"]).put(b"z")


async def test_read_only_services_are_never_written():
    services = (KeepService("zzzzz-bi6l4-000000000000000", "http://keep0/", read_only=True),)
    with pytest.raises(KeepWriteError, match="no writable keep service"):
        await KeepWriter(KeepRoute("zzzzz", "t", services), FakeKeep({})).put(b"a")


def test_plan_packs_files_into_full_blocks_and_splits_big_ones():
    pieces, sizes = plan_blocks([3, 0, 5, 10], block_size=8)
    assert sizes == [8, 8, 2]
    assert pieces == [[Piece(0, 0, 3)], [], [Piece(0, 3, 5)], [Piece(1, 0, 8), Piece(2, 0, 2)]]


def test_manifest_is_what_the_sdk_normalizes_to():
    root = DirEntry(
        [FileEntry("b c.txt", [Piece(0, 0, 3)]), FileEntry("a", [Piece(0, 3, 2)]), FileEntry("empty")],
        {"sub dir": DirEntry([FileEntry("x:y", [Piece(0, 5, 1), Piece(1, 0, 4)])]), "void": DirEntry()},
    )
    locators = [f"{'a' * 32}+6", f"{'b' * 32}+4"]
    text = manifest_text(root, locators, [6, 4])
    sdk = sdk_collection(text).manifest_text(normalize=True)
    assert text == sdk
    assert escape("x:y z\\\udcff") == "x\\072y\\040z\\134\\377"
    parsed = parse_manifest(text)
    assert parsed.root.get("sub dir").get("x:y").size == 5


async def test_uploader_makes_a_manifest_the_sdk_reads_back_and_resends_nothing_known():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("default",)})
    contents = {"one": b"1" * 5, "two": b"22", "big": bytes(range(256)) * 5}
    def source(name: str, data: bytes) -> SourceFile:
        return SourceFile(name, len(data), lambda off, size: data[off : off + size])

    deeper = SourceDir([source("three", b"333")])
    tree = SourceDir([source(n, d) for n, d in contents.items()], {"deeper": deeper})
    uploader = Uploader(KeepWriter(route(), keep, copies=2), block_size=1000)
    text = await uploader.upload(tree)
    coll = sdk_collection(text)
    for name, data in contents.items():
        pieces = coll.find(name).segments()
        joined = b"".join(keep.blocks[s.locator[:32]][s.segment_offset : s.segment_offset + s.range_size]
                          for s in pieces)
        assert joined == data, name
    assert portable_data_hash(text) == coll.portable_data_hash()
    sent = len(keep.puts)
    assert await uploader.upload(tree) == text and len(keep.puts) == sent  # nothing sent again


async def test_a_block_that_cannot_be_stored_fails_the_upload_with_its_own_error():
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("default",)},
                    status={"http://keep1/": 507})
    tree = SourceDir([SourceFile(f"f{i}", 10, lambda off, size: b"x" * size) for i in range(3)])
    with pytest.raises(KeepWriteError, match="wanted 2 copies, stored 1"):
        await Uploader(KeepWriter(route(), keep, copies=2, backoff=0), block_size=10).upload(tree)


async def test_a_keepproxy_is_asked_for_every_copy_in_one_request():
    services = tuple(KeepService(f"zzzzz-bi6l4-{i:015d}", f"http://keep{i}/", "proxy") for i in range(2))
    keep = FakeKeep({"http://keep0/": ("default",), "http://keep1/": ("default",)})

    def proxy(url, headers, body, timeout):  # a keepproxy stores what it is asked for
        resp = keep(url, headers, body, timeout)
        return PutResponse(200, {"x-keep-replicas-stored": headers["X-Keep-Desired-Replicas"]}, resp.body)

    await KeepWriter(KeepRoute("zzzzz", "t", services), proxy, copies=2).put(b"via proxy")
    assert len(keep.puts) == 1 and keep.puts[0][1]["X-Keep-Desired-Replicas"] == "2"
