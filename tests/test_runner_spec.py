"""Container record parsing and the refusals fedmount-run makes before anything starts."""

from __future__ import annotations

import json

import pytest

from fedmount.runner.spec import (
    CollectionMount,
    ContentMount,
    FileMount,
    SpecError,
    TmpMount,
    load_record,
    parse_record,
)

PDH = "0123456789abcdef0123456789abcdef+123"
UUID = "zbbbb-4zz18-0123456789abcde"
IMAGE_PDH = "fedcba9876543210fedcba9876543210+456"


def record(**over):
    base = {
        "command": ["sh", "-c", "true"],
        "container_image": IMAGE_PDH,
        "cwd": "/out",
        "environment": {"FOO": "bar"},
        "mounts": {
            "/out": {"kind": "tmp", "capacity": 1000},
            "/in": {"kind": "collection", "portable_data_hash": PDH, "path": "dir/sub"},
            "/remote": {"kind": "collection", "uuid": UUID},
            "/etc/params.json": {"kind": "json", "content": {"a": [1, 2]}},
            "/etc/motd": {"kind": "text", "content": "hello\n"},
            "stdin": {"kind": "collection", "portable_data_hash": PDH, "path": "./dir/in.txt"},
            "stdout": {"kind": "file", "path": "/out/logs/stdout.txt"},
        },
        "output_path": "/out",
        "runtime_constraints": {"API": True, "ram": 1 << 30, "vcpus": 2, "keep_cache_disk": 1 << 31},
        "uuid": "zzzzz-dz642-0123456789abcde",
        "state": "Queued",
    }
    base.update(over)
    return base


def refusal(rec) -> str:
    with pytest.raises(SpecError) as info:
        parse_record(rec)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def with_mount(target, mount):
    rec = record()
    rec["mounts"] = {**rec["mounts"], target: mount}
    return rec


def test_full_record_parses_every_mount_kind():
    spec = parse_record(record())
    assert spec.command == ["sh", "-c", "true"]
    assert spec.cwd == "/out" and spec.output_path == "/out" and spec.uuid == "zzzzz-dz642-0123456789abcde"
    assert spec.mounts["/out"] == TmpMount("/out", 1000)
    assert spec.mounts["/in"] == CollectionMount("/in", spec.mounts["/in"].collection, "dir/sub")
    assert spec.mounts["/in"].collection.text == PDH
    assert not spec.mounts["/remote"].collection.is_pdh
    assert spec.mounts["/etc/params.json"] == ContentMount("/etc/params.json", json.dumps({"a": [1, 2]}))
    assert spec.mounts["/etc/motd"] == ContentMount("/etc/motd", "hello\n")
    assert spec.mounts["stdin"].path == "dir/in.txt"
    assert spec.mounts["stdout"] == FileMount("stdout", "/out/logs/stdout.txt")
    assert (
        spec.constraints.api and spec.constraints.vcpus == 2 and spec.constraints.keep_cache_disk == 1 << 31
    )
    assert spec.image_collection.text == IMAGE_PDH
    # binds: container paths only, outermost first
    assert [m.target for m in spec.binds()] == ["/in", "/out", "/remote", "/etc/motd", "/etc/params.json"]
    assert {c.text for c in spec.collections()} == {PDH, UUID, IMAGE_PDH}


def test_local_image_name_and_defaults():
    spec = parse_record({"command": ["true"], "container_image": "fedmount-test/busybox:1"})
    assert spec.image_collection is None
    assert spec.cwd == "" and spec.environment == {} and spec.mounts == {} and spec.output_path is None
    assert not spec.constraints.api


def test_invalid_json_is_refused_naming_the_source():
    with pytest.raises(SpecError) as info:
        load_record('{"command": [', "job.json")
    assert str(info.value).startswith("job.json: not valid JSON")


@pytest.mark.parametrize(
    ("rec", "field"),
    [
        ([1, 2], "record:"),
        ({k: v for k, v in record().items() if k != "command"}, "command: missing"),
        (record(command=[]), "command:"),
        (record(command="echo hi"), "command:"),
        (record(command=["echo", 3]), "command:"),
        (record(container_image=""), "container_image:"),
        (record(cwd="relative"), "cwd:"),
        (record(environment={"A": 1}), "environment:"),
        (record(environment={"A=B": "x"}), "environment['A=B']:"),
        (record(mounts=[]), "mounts:"),
        (record(output_path="/nowhere"), "output_path: /nowhere must be the target of a tmp mount"),
        (record(output_path="/in"), "output_path:"),
        (record(runtime_constraints={"API": "yes"}), "runtime_constraints.API:"),
        (record(runtime_constraints={"ram": -1}), "runtime_constraints.ram:"),
        (record(runtime_constraints={"vcpus": "2"}), "runtime_constraints.vcpus:"),
        (record(runtime_constraints={"keep_cache_ram": 1.5}), "runtime_constraints.keep_cache_ram:"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(rec, field):
    assert refusal(rec).startswith(field)


@pytest.mark.parametrize(
    ("target", "mount", "prefix"),
    [
        ("/k", {"kind": "keep"}, "mounts[\"/k\"].kind: 'keep' mounts are not supported"),
        ("/w", {"kind": "collection", "portable_data_hash": PDH, "writable": True}, 'mounts["/w"].writable:'),
        ("/x", {"kind": "nfs"}, 'mounts["/x"].kind:'),
        ("/x", {"kind": "collection"}, 'mounts["/x"]: a collection mount needs'),
        ("/x", {"kind": "collection", "portable_data_hash": PDH, "uuid": UUID}, 'mounts["/x"]: give'),
        ("/x", {"kind": "collection", "portable_data_hash": "0123+4"}, 'mounts["/x"].portable_data_hash:'),
        ("/x", {"kind": "collection", "uuid": "zbbbb-j7d0g-0123456789abcde"}, 'mounts["/x"].uuid:'),
        ("/x", {"kind": "collection", "portable_data_hash": UUID}, 'mounts["/x"].portable_data_hash:'),
        ("/x", {"kind": "collection", "uuid": PDH}, 'mounts["/x"].uuid:'),
        (
            "/x",
            {"kind": "collection", "uuid": UUID, "path": "../etc"},
            "mounts[\"/x\"].path: '../etc' is outside",
        ),
        ("/x", {"kind": "collection", "uuid": UUID, "path": "a/../../b"}, 'mounts["/x"].path:'),
        ("/x", {"kind": "file", "path": "/out/f"}, 'mounts["/x"].kind: file mounts are only'),
        ("/x", {"kind": "json"}, 'mounts["/x"].content: missing'),
        ("/x", {"kind": "text", "content": 3}, 'mounts["/x"].content:'),
        ("/x", {"kind": "tmp", "capacity": -5}, 'mounts["/x"].capacity:'),
        ("relative", {"kind": "tmp"}, 'mounts["relative"]:'),
        ("/", {"kind": "tmp"}, 'mounts["/"]:'),
        ("/in/deeper", {"kind": "tmp"}, 'mounts["/in/deeper"]: is inside the read-only mount /in'),
        ("stdin", {"kind": "collection", "uuid": UUID}, 'mounts["stdin"].path: stdin must name a file'),
        ("stdin", {"kind": "json", "content": {}}, 'mounts["stdin"].kind:'),
        ("stdout", {"kind": "file", "path": "/elsewhere/o.txt"}, 'mounts["stdout"].path:'),
        ("stdout", {"kind": "file", "path": "/out"}, 'mounts["stdout"].path:'),
        ("stdout", {"kind": "tmp"}, 'mounts["stdout"]: stdout must be a file mount'),
    ],
)
def test_unsupported_or_bad_mounts_are_refused_naming_the_field(target, mount, prefix):
    assert refusal(with_mount(target, mount)).startswith(prefix)


@pytest.mark.parametrize(
    ("path", "norm"),
    [("", ""), (".", ""), ("/", ""), ("./a/b", "a/b"), ("/a//b/", "a/b"), ("a/./c/../b", "a/b")],
)
def test_collection_paths_are_normalised_like_crunch_run(path, norm):
    spec = parse_record(with_mount("/x", {"kind": "collection", "uuid": UUID, "path": path}))
    assert spec.mounts["/x"].path == norm


def test_pdh_hints_are_dropped_from_collection_ids():
    spec = parse_record(with_mount("/x", {"kind": "collection", "portable_data_hash": PDH + "+Kzzzzz"}))
    assert spec.mounts["/x"].collection.text == PDH
