"""Build the small container image the runner and CWL tests use, without any registry.

No registry is reachable from the test machines, so the test image is made from the host's
static busybox (/bin/busybox): a root filesystem directory holding `bin/busybox` and one
symlink per applet (`busybox --list`), plus `/tmp`, `/etc/passwd` and `/etc/group`.

- `build_rootfs(dest)` makes that directory (also the local runtime's root filesystem);
- `ensure_image()` `docker import`s it as `fedmount-test/busybox:1` unless the daemon has it;
- `save_image(dir)` writes `docker save` output as `<image id>.tar`, the name and layout
  arv-keepdocker gives it in a collection, so tests can put it into the emulated
  federation and the image travels through Keep and the mount like a real one.

`python -m integration.images [--save DIR]` builds the image and prints its id (and the
tarball path).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

IMAGE = "fedmount-test/busybox:1"
BUSYBOX = "/bin/busybox"


def build_rootfs(dest: str) -> str:
    """A busybox root filesystem in `dest` (created); returns `dest`."""
    os.makedirs(os.path.join(dest, "bin"), exist_ok=True)
    for d in ("tmp", "etc", "root"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    with open(BUSYBOX, "rb") as src, open(os.path.join(dest, "bin", "busybox"), "wb") as dst:
        dst.write(src.read())
    os.chmod(os.path.join(dest, "bin", "busybox"), 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = os.path.join(dest, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    with open(os.path.join(dest, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    with open(os.path.join(dest, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    return dest


def image_id(name: str = IMAGE) -> str | None:
    res = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True
    )
    return res.stdout.strip() if res.returncode == 0 else None


def ensure_image(name: str = IMAGE) -> str:
    """The id of the test image, `docker import`ing it first if the daemon lacks it."""
    existing = image_id(name)
    if existing:
        return existing
    with tempfile.TemporaryDirectory(prefix="fedmount-image-") as tmp:
        rootfs = build_rootfs(os.path.join(tmp, "rootfs"))
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", "ENV PATH=/bin", "--change", 'CMD ["/bin/sh"]', "-", name],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed")
    built = image_id(name)
    if not built:
        raise RuntimeError(f"docker import did not produce {name}")
    return built


def save_image(dest_dir: str, name: str = IMAGE) -> str:
    """`docker save` the image into `dest_dir/<image id>.tar`; returns that path."""
    path = os.path.join(dest_dir, f"{ensure_image(name)}.tar")
    subprocess.run(["docker", "save", "-o", path, name], check=True, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the fedmount test image locally.")
    parser.add_argument("--save", metavar="DIR", help="also write DIR/<image id>.tar as arv-keepdocker would")
    args = parser.parse_args()
    print(ensure_image())
    if args.save:
        print(save_image(args.save))


if __name__ == "__main__":
    main()
