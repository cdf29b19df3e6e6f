"""fedmount-run follows its own mount, and only its own: the kernel reuses a gone mount's
ID and device for the next mount, which may be another job's."""

from __future__ import annotations

import subprocess
import sys

from fedmount import mountinfo
from fedmount.runner.mounts import FedMount

ROOT = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"


def table(*lines: str):
    entries = mountinfo.parse(ROOT + "".join(lines))
    return lambda: entries


def fed_mount(mounts, *, daemon_alive: bool) -> FedMount:
    m = FedMount(["fedmount"], ["fedmount"], "/work/run1/mnt", "/dev/null", mounts=mounts)
    m.mounted = mountinfo.MountEntry(90, "/work/run1/mnt", 0, 57, "fuse.fedmount")
    argv = [sys.executable, "-c", "import time; time.sleep(30)" if daemon_alive else "pass"]
    m.proc = subprocess.Popen(argv)
    if not daemon_alive:
        m.proc.wait()
    return m


def test_its_mount_is_followed_where_it_is_even_after_its_parent_was_renamed():
    renamed = table("90 22 0:57 / /work/run1-renamed/mnt rw - fuse.fedmount fedmount ro\n")
    m = fed_mount(renamed, daemon_alive=True)
    try:
        assert m.mounted_at() == "/work/run1-renamed/mnt"
    finally:
        m.proc.kill()


def test_a_mount_reusing_its_id_and_device_elsewhere_after_it_is_gone_is_not_its_own():
    other = table("90 22 0:57 / /work/run2/mnt rw - fuse.fedmount fedmount ro\n")
    assert fed_mount(other, daemon_alive=False).mounted_at() is None


def test_a_mount_with_its_id_but_another_device_is_not_its_own():
    other = table("90 22 0:58 / /work/run1/mnt rw - fuse.fedmount fedmount ro\n")
    m = fed_mount(other, daemon_alive=True)
    try:
        assert m.mounted_at() is None
    finally:
        m.proc.kill()


def test_its_mount_where_it_made_it_is_its_own_even_with_the_daemon_gone():
    dead = table("90 22 0:57 / /work/run1/mnt rw - fuse.fedmount fedmount ro\n")
    assert fed_mount(dead, daemon_alive=False).mounted_at() == "/work/run1/mnt"
