"""Installing fedmount for real use, as the README says, brings working commands and man pages.

`make install PREFIX=P` (the README's install command, here into a temporary prefix) makes
a virtualenv of its own from the package registry, so this test needs the network to PyPI
(like ``make test`` itself); `pip install` into any prefix must put the man pages where
``man`` finds them from PATH alone (man-db looks in ``<dir>/../share/man`` for every PATH
entry). Neither needs FUSE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ("fedmount", "fedmount-run")

pytestmark = pytest.mark.skipif(shutil.which("man") is None, reason="man (package man-db) is not installed")


def man_path_of(page: str, prefix: Path) -> str:
    """Where `man` finds `page` for a user whose PATH is prefix/bin and the system's."""
    env = {"PATH": f"{prefix}/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    done = subprocess.run(["man", "-w", page], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"man -w {page}: {done.stderr.strip()}"
    return os.path.realpath(done.stdout.strip())


def test_pip_install_puts_the_man_pages_where_man_finds_them(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--prefix", str(prefix), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for page in PAGES:
        assert man_path_of(page, prefix) == str(prefix / f"share/man/man1/{page}.1")


def test_make_install_gives_commands_and_man_pages_and_uninstall_removes_them(tmp_path):
    prefix = tmp_path / "usr-local"
    done = subprocess.run(["make", "--no-print-directory", "install", f"PREFIX={prefix}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    env = {"PATH": f"{prefix}/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run(["fedmount", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("fedmount "), version.stderr
    usage = subprocess.run(["fedmount-run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--output-dir" in usage.stdout
    for page in PAGES:
        assert man_path_of(page, prefix) == str(prefix / f"lib/fedmount/share/man/man1/{page}.1")
    rendered = subprocess.run(["man", "-P", "cat", "fedmount"], env={**env, "MANWIDTH": "80"},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "fedmount - read-only FUSE mounts of Arvados collections" in " ".join(rendered.stdout.split())
    assert not (prefix / "bin/arv-mount").exists()  # never installed under that name unless asked
    link = ["make", "--no-print-directory", "arv-mount-link", f"PREFIX={prefix}"]
    assert subprocess.run(link, cwd=REPO, capture_output=True, timeout=60).returncode == 0
    standin = subprocess.run(["arv-mount", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert standin.stdout.startswith("arv-mount ") and "fedmount" in standin.stdout, standin.stderr
    (prefix / "bin/arv-mount").unlink()
    (prefix / "bin/arv-mount").write_text("a real arv-mount\n")
    refused = subprocess.run(link, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not replacing it" in refused.stderr
    assert (prefix / "bin/arv-mount").read_text() == "a real arv-mount\n"
    (prefix / "bin/arv-mount").unlink()
    assert subprocess.run(link, cwd=REPO, capture_output=True, timeout=60).returncode == 0
    subprocess.run(["make", "--no-print-directory", "uninstall", f"PREFIX={prefix}"], cwd=REPO,
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir()) == []
