"""Collections written straight into the keepstores' volumes, for `--seed demo` and `/collections`.

Seeding writes block files directly into every volume of the owning cluster (hard links,
so each block is on disk once; replication equals the number of keepstores, as the
default ``DefaultReplication`` of 2 would give) and records the collection in the
cluster's table, so a few hundred MiB take a couple of seconds instead of an HTTP upload.

The demo set spreads over the clusters (home = first, r1 = second, r2 = third, wrapping
around when fewer clusters run):

- ``text`` (home): a few small text files, one in a subdirectory;
- ``big`` (r1): ``big.bin``, 300 MiB of generated content in 64 MiB blocks;
- ``nested`` (r2): nested directories and names with spaces, ``:``, unicode and ``\\``, an
  empty file and two empty directories;
- ``many`` (r2): 10,000 small files in one directory, packed into 4 MiB blocks;
- ``shared`` (r1) and ``shared-copy`` (r2): the same content, so the same PDH, on two
  clusters (PDH fan-out finds either).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .content import Generated
from .manifests import MAX_BLOCK, build
from .model import World, uuid_for

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua.\n"
)


def add_collection(
    world: World,
    cluster_id: str,
    name: str,
    files: Mapping[str, bytes | Generated],
    empty_dirs: Iterable[str] = (),
    block_size: int = MAX_BLOCK,
    claim_pdh: str | None = None,
) -> dict:
    """Store the blocks, create the collection, remember it under `name`; its federation.json entry.

    `claim_pdh` makes a lying cluster: the record claims that PDH whatever its manifest hashes to.
    """
    if cluster_id not in world.clusters:
        raise KeyError(f"unknown cluster {cluster_id!r}; known: {sorted(world.clusters)}")
    if not 1 <= block_size <= MAX_BLOCK:
        raise ValueError(f"block_size must be between 1 and {MAX_BLOCK}")
    cluster = world.clusters[cluster_id]
    built = build(files, cluster.store_block, empty_dirs, block_size)
    uuid = uuid_for(cluster_id, "4zz18", name)
    lie = {"portable_data_hash": claim_pdh} if claim_pdh else {}
    record = cluster.add_collection(name, built.manifest, uuid=uuid, **lie)
    entry = {
        "cluster": cluster_id,
        "uuid": uuid,
        "portable_data_hash": record["portable_data_hash"],
        "files": dict(sorted(built.files.items())),
    }
    world.seeded[name] = entry
    return entry


def seed_demo(world: World) -> None:
    ids = list(world.clusters)
    home, r1, r2 = ids[0], ids[1 % len(ids)], ids[2 % len(ids)]
    add_collection(
        world,
        home,
        "text",
        {
            "README.txt": b"fedmount demo collection on the home cluster\n",
            "hello.txt": b"hello world\n",
            "lorem.txt": (LOREM * 40).encode(),
            "data/numbers.csv": "".join(f"{i},{i * i}\n" for i in range(1000)).encode(),
        },
    )
    add_collection(world, r1, "big", {"big.bin": Generated(300 << 20, "big")})
    add_collection(
        world,
        r2,
        "nested",
        {
            "a/b/c/deep.txt": b"deep\n",
            "a/b/sibling.txt": b"sibling\n",
            "with space/file one.txt": b"a name with spaces\n",
            "colon:dir/a:b.txt": b"colons\n",
            "\u00fcn\u00efc\u00f8d\u00e9/\u65e5\u672c\u8a9e.txt": "unicode \u2713\n".encode(),
            "back\\slash/x\\y.txt": b"backslashes\n",
            "empty.txt": b"",
        },
        empty_dirs=["empty dir", "a/empty"],
    )
    add_collection(
        world,
        r2,
        "many",
        {f"file{i:05d}.txt": (f"file {i:05d} line\n" * (i % 200 + 1)).encode() for i in range(10000)},
        block_size=4 << 20,
    )
    shared = {
        "shared.txt": b"this collection lives on two clusters\n",
        "blob.bin": Generated(3 << 20, "shared"),
    }
    add_collection(world, r1, "shared", shared)
    add_collection(world, r2, "shared-copy", shared)
