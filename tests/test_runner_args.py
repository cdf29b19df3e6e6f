"""The command lines fedmount-run builds (fedmount, docker, bwrap) and the environment rules."""

from __future__ import annotations

import os

from test_cache import hold_as_much_as_the_filesystem  # tests/ is on sys.path under pytest

from fedmount.blocks.cache.config import default_disk_cache_size
from fedmount.runner.mounts import collection_source, fedmount_args, prepare_binds, stream_path
from fedmount.runner.runtimes import Bind, container_environment
from fedmount.runner.runtimes.docker import container_name, create_args
from fedmount.runner.runtimes.local import bwrap_args
from fedmount.runner.spec import parse_record
from fedmount.runner.staging import stage_disk_limit, staged_fields

PDH = "0123456789abcdef0123456789abcdef+123"
IMAGE_PDH = "fedcba9876543210fedcba9876543210+456"
UUID = "zbbbb-4zz18-0123456789abcde"
TOKEN = "v2/zzzzz-gj3su-0123456789abcde/s3cr3tvalue"
HOST_ENV = {
    "ARVADOS_API_HOST": "127.0.0.1:4430",
    "ARVADOS_API_TOKEN": TOKEN,
    "ARVADOS_API_HOST_INSECURE": "1",
    "HOME": "/root",
}


def spec(mounts=None, image=IMAGE_PDH, **over):
    rec = {
        "command": ["cat", "/in/a.txt"],
        "container_image": image,
        "mounts": mounts
        if mounts is not None
        else {"/in": {"kind": "collection", "portable_data_hash": PDH}},
    }
    rec.update(over)
    return parse_record(rec)


def test_fedmount_args_follow_crunch_run_order_all_pdh():
    s = spec(runtime_constraints={"keep_cache_disk": 2 << 30})
    args = fedmount_args(["fedmount"], s, "/t/mnt", docker=True, cache_dir="/t/cache", crunchstat_interval=10)
    assert args == [
        "fedmount",
        "--foreground",
        "--crunchstat-interval=10",
        "--allow-other",
        "--disk-cache",
        "--disk-cache-dir",
        "/t/cache",
        "--file-cache",
        str(2 << 30),
        "--mount-by-pdh",
        "by_id",
        "--disable-event-listening",
        "/t/mnt",
    ]


def test_fedmount_args_by_id_when_any_collection_is_a_uuid_and_ram_cache():
    s = spec({"/in": {"kind": "collection", "uuid": UUID}}, runtime_constraints={"keep_cache_ram": 1 << 28})
    args = fedmount_args(["fm"], s, "/m", docker=False, cache_dir="/c", crunchstat_interval=0.5)
    assert args == [
        "fm",
        "--foreground",
        "--crunchstat-interval=0.5",
        "--ram-cache",
        "--file-cache",
        str(1 << 28),
        "--mount-by-id",
        "by_id",
        "/m",
    ]


def test_an_image_named_by_uuid_also_needs_mount_by_id():
    s = spec(image="zcccc-4zz18-aaaaaaaaaaaaaaa")
    args = fedmount_args(["fm"], s, "/m", docker=True, cache_dir="/c", crunchstat_interval=10)
    assert "--mount-by-id" in args and "--mount-by-pdh" not in args
    assert "--disk-cache" not in args and "--ram-cache" not in args


def test_a_staged_run_always_mounts_with_the_disk_cache_it_staged_into(tmp_path):
    staged = {"docker": False, "cache_dir": "/c", "crunchstat_interval": 1, "staged": True}
    ram_only = spec(runtime_constraints={"keep_cache_ram": 1 << 28})
    args = fedmount_args(["fm"], ram_only, "/m", **staged)
    assert args[3:8] == ["--disk-cache", "--disk-cache-dir", "/c", "--ram-cache-size", str(1 << 28)]
    assert "--ram-cache" not in args and "--file-cache" not in args  # fedmount's default bound for /c
    sized = spec(runtime_constraints={"keep_cache_disk": 2 << 30})
    args = fedmount_args(["fm"], sized, "/m", **staged)
    assert args[3:8] == ["--disk-cache", "--disk-cache-dir", "/c", "--file-cache", str(2 << 30)]
    hold_as_much_as_the_filesystem(tmp_path)  # makes the default independent of free space
    assert stage_disk_limit(sized, str(tmp_path)) == 2 << 30
    assert stage_disk_limit(ram_only, str(tmp_path)) == default_disk_cache_size(str(tmp_path))


def test_staged_collections_are_named_by_their_record_fields():
    s = spec(
        {
            "/in": {"kind": "collection", "portable_data_hash": PDH, "path": "d"},
            "/again": {"kind": "collection", "portable_data_hash": PDH},
            "/all": {"kind": "collection", "uuid": UUID},
            "stdin": {"kind": "collection", "uuid": UUID, "path": "f.txt"},
        }
    )
    assert staged_fields(s) == {
        PDH: 'mounts["/in"].portable_data_hash',
        UUID: 'mounts["/all"].uuid',
        IMAGE_PDH: "container_image",
    }
    assert IMAGE_PDH not in staged_fields(spec(image="busybox:1"))


def test_collection_sources_live_under_by_id():
    s = spec(
        {
            "/in": {"kind": "collection", "portable_data_hash": PDH, "path": "/d/e"},
            "/all": {"kind": "collection", "uuid": UUID},
        }
    )
    assert collection_source("/m", s.mounts["/in"]) == f"/m/by_id/{PDH}/d/e"
    assert collection_source("/m", s.mounts["/all"]) == f"/m/by_id/{UUID}"


def test_api_variables_reach_the_container_only_when_asked_for():
    plain = spec(environment={"FOO": "bar"})
    assert container_environment(plain, HOST_ENV) == {"FOO": "bar"}
    api = spec(environment={"FOO": "bar"}, runtime_constraints={"API": True})
    assert container_environment(api, HOST_ENV) == {
        "FOO": "bar",
        "ARVADOS_API_HOST": "127.0.0.1:4430",
        "ARVADOS_API_TOKEN": TOKEN,
        "ARVADOS_API_HOST_INSECURE": "1",
    }
    assert "ARVADOS_API_HOST_INSECURE" not in container_environment(api, {"ARVADOS_API_TOKEN": TOKEN})


def test_docker_create_args_without_api():
    s = spec(cwd="/work", runtime_constraints={"ram": 256 << 20, "vcpus": 1.5})
    binds = [Bind("/m/by_id/x", "/in", True), Bind("/t/tmp1", "/out", False)]
    args = create_args(s, binds, "sha256:abc", "fedmount-run-1", ["FOO"], stdin=False)
    assert args == [
        "create",
        "--name",
        "fedmount-run-1",
        "--label",
        "fedmount-run=1",
        "--network",
        "none",
        "--workdir",
        "/work",
        "--memory",
        str(256 << 20),
        "--cpus",
        "1.5",
        "--env",
        "FOO",
        "--volume",
        "/m/by_id/x:/in:ro",
        "--volume",
        "/t/tmp1:/out",
        "sha256:abc",
        "cat",
        "/in/a.txt",
    ]


def test_docker_create_args_with_api_and_stdin_carry_no_values():
    s = spec(runtime_constraints={"API": True})
    env = container_environment(s, HOST_ENV)
    args = create_args(s, [], "img", "n", list(env), stdin=True)
    assert "--network" not in args and "--workdir" not in args and "--memory" not in args
    assert "--interactive" in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--env"] == sorted(env)
    assert not any(TOKEN in a or "s3cr3t" in a for a in args)


def test_container_names_are_ours_and_distinct():
    s = spec(uuid="zzzzz-dz642-0123456789abcde")
    a, b = container_name(s), container_name(s)
    assert a.startswith("fedmount-run-zzzzz-dz642-0123456789abcde-") and a != b


def test_bwrap_args_build_root_from_entries_and_fresh_special_dirs(tmp_path):
    root = tmp_path / "root"
    for d in ("bin", "etc", "proc", "dev", "tmp", "sys"):
        (root / d).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    s = spec(cwd="/out")
    args = bwrap_args(s, str(root), [Bind("/h/in", "/in", True), Bind("/h/out", "/out", False)])
    assert args[:4] == ["bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    assert "--share-net" not in args
    joined = " ".join(args)
    assert f"--ro-bind {root}/bin /bin" in joined and f"--ro-bind {root}/etc /etc" in joined
    assert "--symlink usr/lib /lib" in joined
    assert f"{root}/proc" not in joined and f"{root}/sys" not in joined and f"{root}/tmp" not in joined
    assert "--dev /dev --proc /proc --tmpfs /tmp" in joined
    assert joined.endswith("--ro-bind /h/in /in --bind /h/out /out --chdir /out -- cat /in/a.txt")
    assert "--share-net" in bwrap_args(spec(runtime_constraints={"API": True}), str(root), [])


def test_prepare_binds_makes_tmp_dirs_content_files_and_the_output_dir(tmp_path):
    s = spec(
        {
            "/in": {"kind": "collection", "portable_data_hash": PDH, "path": "sub"},
            "/out": {"kind": "tmp"},
            "/scratch": {"kind": "tmp"},
            "/etc/p.json": {"kind": "json", "content": {"k": "v"}},
            "stdout": {"kind": "file", "path": "/out/log/so.txt"},
        },
        output_path="/out",
    )
    work, out = tmp_path / "work", tmp_path / "results" / "output"
    work.mkdir()
    binds = {b.target: b for b in prepare_binds(s, "/m", str(work), str(out))}
    assert binds["/in"] == Bind(f"/m/by_id/{PDH}/sub", "/in", True)
    assert binds["/out"] == Bind(str(out), "/out", False)
    assert os.stat(out).st_mode & 0o7777 == 0o2777
    assert not binds["/scratch"].read_only and os.path.dirname(binds["/scratch"].host) == str(work)
    assert open(binds["/etc/p.json"].host).read() == '{"k": "v"}' and binds["/etc/p.json"].read_only
    assert os.stat(binds["/etc/p.json"].host).st_mode & 0o777 == 0o444
    assert stream_path(s, "stdout", str(out), "/r/stdout.txt") == str(out / "log" / "so.txt")
    assert stream_path(s, "stderr", str(out), "/r/stderr.txt") == "/r/stderr.txt"


def test_results_default_to_a_new_directory_named_after_the_record(tmp_path, monkeypatch):
    from fedmount.runner.cli import _new_results, build_parser

    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(["job.json"]).output_dir is None  # no longer required
    first = _new_results("records/job.json", spec())
    second = _new_results("records/job.json", spec())
    assert os.path.dirname(first) == str(tmp_path) and os.path.basename(first).startswith("job-")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert os.listdir(first) == []
    from_stdin = _new_results("-", spec(uuid="zzzzz-dz642-0123456789abcde"))
    assert os.path.basename(from_stdin).startswith("zzzzz-dz642-0123456789abcde-")


def test_both_runtimes_start_as_the_runtime_protocol_says():
    import inspect

    from fedmount.runner.runtimes import Runtime
    from fedmount.runner.runtimes.docker import DockerRuntime
    from fedmount.runner.runtimes.local import LocalRuntime

    for cls in (DockerRuntime, LocalRuntime):
        for method in ("prepare_image", "start", "exit_code", "pid", "stop"):
            assert inspect.signature(getattr(cls, method)) == inspect.signature(getattr(Runtime, method)), (
                cls, method)
        assert isinstance(cls.name, str) and isinstance(cls.needs_allow_other, bool)
