"""The command line, the man page, log redaction, mountinfo parsing, cache sizing, crunchstat."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedmount import __version__, cli, cliutil, mountinfo
from fedmount.locality import arguments as locality_arguments
from fedmount.locality.commands import MAINS
from fedmount.logs import RedactingFilter, setup_logging
from fedmount.mount import MountOptions, _cache_config
from fedmount.stats import Stats
from fedmount.stats_export import CrunchStat, crunchstat_groups, prometheus_text

MAN = Path(__file__).resolve().parent.parent / "man" / "fedmount.1"
TOKEN = "v2/zzzzz-gj3su-000000000000001/" + "s3cr3t" * 8


def squash(text: str) -> str:
    return " ".join(text.split())


def man_text() -> str:
    """The man page's words: roff escapes and font changes removed."""
    text = MAN.read_text()
    text = re.sub(r"\\f[BIR]", "", text).replace("\\-", "-").replace("\\e", "\\")
    return squash(text)


def test_every_option_is_in_the_man_page_in_the_same_words():
    page = man_text()
    parser = cli.build_parser()
    assert squash(cli.DESCRIPTION) in page
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or action.dest in ("help", "version"):
            continue
        for flag in action.option_strings:
            assert flag in page, flag
        assert squash(action.help.replace("%%", "%")) in page, action.option_strings


def test_subcommands_are_in_help_and_man_page_in_the_same_words(capsys):
    page = man_text()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = squash(capsys.readouterr().out)
    assert set(cli.SUBCOMMANDS) == set(MAINS)
    for name, command in cli.SUBCOMMANDS.items():
        synopsis, description = command.synopsis, command.description
        for text in (f"fedmount {name} {synopsis}", description):
            assert squash(text) in help_text and squash(text) in page, (name, text)
        parser = getattr(locality_arguments, f"build_{name}_parser")()
        assert parser.description == description
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {f for f in flags - {"-h", "--help", "--debug"} if f not in synopsis} == set(), name


def test_help_mentions_every_arv_mount_read_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--foreground", "--exec", "--unmount", "--unmount-timeout", "--replace", "--allow-other",
                 "--mount-by-id", "--mount-by-pdh", "--collection", "--disk-cache", "--disk-cache-dir",
                 "--file-cache", "--ram-cache", "--crunchstat-interval", "--read-only", "--subtype",
                 "--disable-event-listening", "--storage-classes", "--debug", "--logfile", "--route",
                 "--read-ahead-blocks", "--ram-cache-size", "--disk-cache-size", "--read-ahead-kb",
                 "--refresh-time", "--stats-port"):
        assert flag in out, flag


@pytest.mark.parametrize("argv", [
    ["--mount-tmp", "tmp0", "--collection", "x"],
    ["--mount-tmp", "tmp0", "--project", "zzzzz-j7d0g-000000000000000"],
    ["--mount-tmp", "tmp0", "--home"],
    ["--mount-tmp", "by_id", "--mount-by-id", "by_id"],
    ["--mount-tmp", "a/b"],
])  # fmt: skip
def test_write_flags_that_cannot_be_served_are_refused_with_one_line_and_status_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.parse_args([*argv, "/mnt"])
    assert e.value.code == 2
    [*_, line] = capsys.readouterr().err.strip().splitlines()
    assert "--mount-tmp" in line or "directory name" in line


def test_crunch_run_arguments_parse():
    args = cli.parse_args([
        "--foreground", "--read-write", "--storage-classes", "default,archive", "--crunchstat-interval=10",
        "--allow-other", "--disk-cache", "--disk-cache-dir", "/tmp/c", "--file-cache", "2147483648",
        "--mount-tmp", "tmp0", "--mount-tmp", "tmp1",
        "--mount-by-pdh", "by_id", "--disable-event-listening", "--mount-by-id", "by_uuid", "/tmp/keep1",
    ])  # fmt: skip
    opts = MountOptions.from_args(args)
    assert opts.layout.by_pdh == ["by_id"] and opts.layout.by_id == ["by_uuid"]
    assert opts.file_cache == 2 << 30 and opts.crunchstat_interval == 10 and opts.allow_other
    assert opts.mountpoint == "/tmp/keep1" and opts.foreground
    assert opts.scratch.names == ["tmp0", "tmp1"] and opts.scratch.storage_classes == ["default", "archive"]
    empty = MountOptions.from_args(cli.parse_args(["--storage-classes", "", "--mount-tmp", "tmp0", "/m"]))
    assert empty.scratch.storage_classes == []


def test_arv_mount_entry_point_prints_a_version_line_naming_fedmount(capsys):
    from fedmount import arvmount_cli

    assert arvmount_cli.main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert "fedmount" in line and __version__ in line


def test_exec_takes_the_rest_of_the_line():
    args = cli.parse_args(["/mnt", "--exec", "ls", "-l", "--foreground"])
    assert args.exec_args == ["ls", "-l", "--foreground"] and not args.foreground


@pytest.mark.parametrize(
    "argv",
    [
        ["--collection", "x", "--mount-by-id", "by_id", "/m"],
        ["--mount-by-id", "a/b", "/m"],
        ["--mount-by-id", "by_id", "--mount-by-pdh", "by_id", "/m"],
        ["--ram-cache", "--disk-cache", "/m"],
        ["--file-cache", "lots", "/m"],
        ["/m", "--exec"],
    ],
)
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("text", "value"), [("1048576", 1 << 20), ("64M", 64 << 20), ("2GiB", 2 << 30), ("1.5k", 1536), ("0", 0)]
)
def test_sizes(text, value):
    assert cliutil.parse_size(text) == value


def test_subcommands_dispatch_to_existing_functions():
    for name in cli.SUBCOMMANDS:
        assert callable(MAINS[name]), name


@contextlib.contextmanager
def redacted_log(name: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """Logger `name` (at DEBUG) writing through a RedactingFilter into the yielded stream."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_logs_never_contain_a_token():
    with redacted_log("fedmount.test-redaction") as (logger, stream):
        logger.error("sent Authorization: Bearer %s to %s", TOKEN, "zbbbb")
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            logger.exception("failed")
    out = stream.getvalue()
    assert "s3cr3t" not in out and "<token>" in out and "zbbbb" in out and "ValueError" in out


def test_debug_logs_never_contain_a_locator_signature():
    signature = "89118b78732c33104a4d6231e8b5a5fa1e4301e3"
    path = f"/acbd18db4cc2f85cedef654fccc4a4d8+3+A{signature}@7fffffff"
    with redacted_log("urllib3.test-redaction") as (logger, stream):
        logger.debug('%s "%s %s %s" %s %s', "http://127.0.0.1:25107", "GET", path, "HTTP/1.1", 200, 3)
    assert signature not in stream.getvalue() and "+A<signature>@7fffffff" in stream.getvalue()


def test_a_new_logfile_is_readable_by_its_owner_only(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    path = tmp_path / "fedmount.log"
    try:
        setup_logging(False, str(path))
        logging.getLogger("fedmount.test").info("hello")
        root.handlers[0].flush()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert path.stat().st_mode & 0o777 == 0o600 and "hello" in path.read_text()


def test_an_unwritable_logfile_is_one_line_and_status_1(tmp_path, capsys):
    assert cli.main(["--logfile", str(tmp_path / "no" / "such.log"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the log" in err and "No such file" in err


def test_mountinfo_parsing_unescapes_paths(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "90 22 0:57 / /tmp/with\\040space rw,nosuid,nodev,relatime shared:50 - fuse.fedmount fedmount ro\n"
    )
    root, fuse = mountinfo.read(str(info))
    assert not root.is_fuse and root.path == "/"
    assert fuse.is_fuse and fuse.path == "/tmp/with space" and (fuse.major, fuse.minor) == (0, 57)


def test_cache_configuration_follows_arv_mount_flags(tmp_path):
    ram = MountOptions("/m", cache_kind="ram", file_cache=100 << 20)
    assert _cache_config(ram) == (None, 0, 100 << 20)
    disk = MountOptions("/m", disk_cache_dir=str(tmp_path), file_cache=5 << 30)
    assert _cache_config(disk) == (str(tmp_path), 5 << 30, 256 << 20)
    auto = MountOptions("/m", disk_cache_dir=str(tmp_path / "new"), ram_cache_size=1 << 20)
    directory, size, ram_size = _cache_config(auto)
    assert directory == str(tmp_path / "new") and size >= 64 << 20 and ram_size == 1 << 20


def test_crunchstat_lines_look_like_arv_mount():
    stats = Stats()
    stats.add("keep_requests", 3, cluster="zbbbb")
    stats.add("keep_bytes", 1000, cluster="zbbbb")
    stats.add("cache_hits", 5, tier="ram")
    stats.add("fuse_ops", 7, op="read")
    stats.add("fuse_seconds", 0.5, op="read")
    cs = CrunchStat(10, lambda: crunchstat_groups(stats, psutil.Process()))
    first = {line.split(" -- ")[0].split()[1]: line for line in cs.lines()}
    assert first["keepcalls"] == "crunchstat: keepcalls 0 put 5 get -- interval 10.0000 seconds 0 put 5 get"
    assert first["keepcache"].startswith("crunchstat: keepcache 5 hit 0 miss --")
    assert first["fuseop:read"].startswith("crunchstat: fuseop:read 7 count 0.500000 time --")
    assert first["net:keep:zbbbb"].startswith("crunchstat: net:keep:zbbbb 1000 rx 3 requests 0 errors")
    assert "fedmount:mem" in first and "fedmount:cpu" in first and "cpu" not in first and "mem" not in first
    stats.add("cache_misses", 2)
    stats.add("keep_puts", 1)
    stats.add("keep_put_bytes", 7)
    second = {line.split(" -- ")[0].split()[1]: line for line in cs.lines()}
    assert second["keepcalls"].endswith("seconds 1 put 2 get")
    assert second["net:keep0"] == "crunchstat: net:keep0 7 tx 1000 rx -- interval 10.0000 seconds 7 tx 0 rx"


def test_prometheus_text_has_counters_and_process_gauges():
    stats = Stats()
    stats.add("keep_bytes", 1000, cluster="zbbbb")
    text = prometheus_text(stats, psutil.Process())
    assert 'fedmount_keep_bytes{cluster="zbbbb"} 1000' in text
    assert "fedmount_process_rss_bytes" in text


HEAVY = ("trio", "sqlite3", "xxhash", "urllib3", "httpx", "pyfuse3", "psutil")


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_loads_no_event_loop_database_or_http_client(argv):
    """`fedmount --help` (and a subcommand's) in a fresh interpreter: which modules it loaded."""
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['fedmount', *{argv!r}]\n"
        "try:\n    runpy.run_module('fedmount', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "fedmount" in done.stdout
    assert done.stderr.strip() == "", f"--help imported {done.stderr.strip()}"


def test_a_mount_is_known_by_its_id_and_the_topmost_hides_the_others():
    entries = mountinfo.parse(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "90 22 0:57 / /tmp/m rw,nosuid shared:50 - fuse.fedmount fedmount ro\n"
        "97 90 0:61 / /tmp/m rw,nosuid - fuse fedmount ro\n"
    )
    top = mountinfo.mounted_at("/tmp/m", entries)
    assert top is not None and (top.mount_id, top.minor, top.fstype) == (97, 61, "fuse") and top.is_fuse
    assert top != entries[1] and mountinfo.mounted_at("/tmp", entries) is None


def test_only_octal_escapes_are_decoded():
    assert mountinfo.unescape(r"/a\040b\011c\134d\\9") == "/a b\tc\\d\\\\9"


def test_a_mount_point_with_a_line_separator_in_its_name_is_one_entry():
    [entry] = mountinfo.parse("90 22 0:57 / /tmp/a\u2028b rw - fuse.fedmount fedmount ro\n")
    assert entry.path == "/tmp/a\u2028b" and entry.is_fuse
