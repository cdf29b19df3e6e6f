"""Container images stored in collections, the way arv-keepdocker stores them.

arv-keepdocker saves an image with `docker save` into one file at the collection root named
`<image id>.tar`, where the image id is Docker's `sha256:<hex>` (`keepdocker.py`:
``outfile_name = '{}.tar'.format(image_hash)``). crunch-run lists `by_id/<image>/`, takes
the only `*.tar` file, derives the image id from its name and loads the tarball from the
mount only when the daemon lacks that id. `find_image_tarball` does the same.

The tarball is never copied: the Docker runtime hands the open FUSE file to `docker load`
as its stdin, and the local runtime (`extract_rootfs`) reads the `docker save` layout in
place — `manifest.json` names the layer tarballs in order; each layer is streamed out of the
outer tar and unpacked over the previous ones, honouring OCI whiteouts (`.wh.NAME` deletes
NAME, `.wh..wh..opq` empties the directory). Device nodes are skipped (bubblewrap provides
/dev) and members are unpacked with tarfile's `tar` filter, so no path escapes the root.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
from typing import IO

from fedmount.arvados.ids import CollectionId
from fedmount.runner.spec import SpecError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def find_image_tarball(mountpoint: str, image: CollectionId) -> tuple[str, str]:
    """`(image id, host path of the tarball)` for an image collection, or SpecError."""
    root = os.path.join(mountpoint, "by_id", image.text)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        raise SpecError(
            "container_image", f"collection {image.text} does not exist in the federation"
        ) from None
    tars = sorted(n for n in names if n.endswith(".tar") and os.path.isfile(os.path.join(root, n)))
    if not tars:
        raise SpecError(
            "container_image",
            f"collection {image.text} holds no <image id>.tar (store images with arv-keepdocker)",
        )
    if len(tars) > 1:
        raise SpecError(
            "container_image", f"collection {image.text} holds several image tarballs: {', '.join(tars)}"
        )
    return tars[0][: -len(".tar")], os.path.join(root, tars[0])


def extract_rootfs(tarball: str, rootfs: str) -> None:
    """Unpack the layers of a `docker save` tarball into the directory `rootfs`."""
    with tarfile.open(tarball, "r:") as outer:
        manifest = json.load(_member(outer, "manifest.json"))
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise SpecError("container_image", f"{os.path.basename(tarball)} must hold exactly one image")
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=_member(outer, layer), mode="r|*") as lt:
                for member in lt:
                    _apply(lt, member, rootfs)


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    f = tar.extractfile(name)
    if f is None:
        raise SpecError("container_image", f"image tarball has no file {name}")
    return f


def _apply(layer: tarfile.TarFile, member: tarfile.TarInfo, rootfs: str) -> None:
    name = posixpath.normpath(member.name.lstrip("/"))
    if name == "." or name.startswith(".."):
        return
    parent, base = posixpath.split(name)
    host_parent = os.path.join(rootfs, parent)
    if base == OPAQUE:
        if os.path.isdir(host_parent):
            for entry in os.listdir(host_parent):
                _remove(os.path.join(host_parent, entry))
        return
    if base.startswith(WHITEOUT):
        _remove(os.path.join(host_parent, base[len(WHITEOUT) :]))
        return
    if member.isdev():
        return
    host = os.path.join(rootfs, name)
    if not member.isdir() and (os.path.lexists(host) and not os.path.isdir(host) or os.path.islink(host)):
        os.unlink(host)
    layer.extract(member, rootfs, filter="tar")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
