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

Those stay at the top of the cluster user's home project. `seed_projects` then gives every
cluster a small project tree (the keys of federation.json's ``projects``, ``collections``,
``links`` and ``hidden`` are ``<cluster>:<path>``; see `seed_projects`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from .accounts import permit
from .content import Generated
from .manifests import MAX_BLOCK, build
from .model import Cluster, World, uuid_for
from .records import group_record, link_record, rfc3339

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
    owner_uuid: str | None = None,
    key: str | None = None,
    hidden: str | None = None,
    **attrs: object,
) -> dict:
    """Store the blocks, create the collection, remember it under `key` (default `name`).

    Returns its federation.json entry: under ``collections``, or under ``hidden`` with the
    reason `hidden` when the cluster user cannot list it (trashed, an old version, private).
    `claim_pdh` makes a lying cluster: the record claims that PDH whatever its manifest hashes to.
    """
    if cluster_id not in world.clusters:
        raise KeyError(f"unknown cluster {cluster_id!r}; known: {sorted(world.clusters)}")
    if not 1 <= block_size <= MAX_BLOCK:
        raise ValueError(f"block_size must be between 1 and {MAX_BLOCK}")
    cluster = world.clusters[cluster_id]
    built = build(files, cluster.store_block, empty_dirs, block_size)
    key = key or name
    uuid = uuid_for(cluster_id, "4zz18", key)
    lie = {"portable_data_hash": claim_pdh} if claim_pdh else {}
    owner = owner_uuid or cluster.user_uuid
    record = cluster.add_collection(name, built.manifest, uuid=uuid, owner_uuid=owner, **lie, **attrs)
    entry = {
        "cluster": cluster_id,
        "uuid": uuid,
        "name": name,
        "owner_uuid": owner,
        "portable_data_hash": record["portable_data_hash"],
        "files": dict(sorted(built.files.items())),
    }
    if empty_dirs:
        entry["empty_dirs"] = sorted(d.strip("/") for d in empty_dirs)
    if hidden:
        world.tree["hidden"][key] = {**entry, "why": hidden}
    else:
        world.seeded[key] = entry
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
    seed_projects(world)


def seed_projects(world: World) -> None:
    """A small project tree on every cluster X, for its user M and second user O.

    M's home (``X:home/...``): project ``analysis`` holding a subproject ``raw`` (with a
    collection ``reads``), a collection also named ``raw`` (a collection and a subproject
    sharing a name), ``results`` (updated once, so it has an old version, hidden), a
    trashed collection ``old results`` and a trashed subproject ``discarded`` with a
    collection inside (all hidden), and, where ``ForwardSlashNameSubstitution`` is set, a
    collection named ``2024/03 run``. Beside it two filter groups: ``results everywhere``
    (every readable collection whose name starts with "results") and ``loop`` (every group
    named "loop": it contains itself).
    O's home (``X:other/...``): ``shared project`` (with ``results from other`` and a
    subproject ``inner`` holding ``inner data``), shared ``can_read`` with M and, on the
    other clusters, with the home cluster's user; and ``private`` with ``secret``, shared
    with nobody (hidden).
    Tag links (owned by M): ``demo`` on ``results`` (and on ``text`` at home), ``raw`` on
    ``reads``. Filter groups list their ``members`` (keys) in federation.json.
    On every other cluster X the home cluster's user owns ``work on X`` with a collection
    ``made remotely`` (``X:<home> user/...``): their home project on X.
    """
    home_user = world.clusters[world.home].user_uuid
    for cid, cluster in world.clusters.items():
        _seed_cluster_tree(world, cluster, [cluster.user_uuid] + ([home_user] if cid != world.home else []))
        if cid != world.home:
            path = f"{cid}:{world.home} user/work on {cid}"
            work = add_project(world, cluster, path, home_user, f"work on {cid}")
            made = {"notes.txt": f"made on {cid} by the {world.home} user\n".encode()}
            add_collection(world, cid, "made remotely", made, owner_uuid=work, key=path + "/made remotely")


def _seed_cluster_tree(world: World, cluster: Cluster, readers: list[str]) -> None:
    cid, me, other, k = cluster.id, cluster.user_uuid, cluster.other_user_uuid, f"{cluster.id}:"

    def project(path: str, owner: str, **kw) -> str:
        return add_project(world, cluster, k + path, owner, path.rsplit("/", 1)[-1], **kw)

    def collection(path: str, owner: str, name: str, files: dict, **kw) -> dict:
        return add_collection(world, cid, name, files, owner_uuid=owner, key=k + path, **kw)

    analysis = project("home/analysis", me)
    raw = project("home/analysis/raw", analysis)
    reads = collection(
        "home/analysis/raw/reads", raw, "reads", {"r1.fastq": _fastq(cid, 1), "r2.fastq": _fastq(cid, 2)}
    )
    collection(
        "home/analysis/raw (collection)", analysis, "raw", {"README.txt": b"named like its sibling project\n"}
    )
    results = _collection_with_old_version(world, cluster, analysis, k + "home/analysis/results")
    trashed = {"hidden": "trashed", "is_trashed": True, "trash_at": rfc3339(time.time())}
    collection("home/analysis/old results", analysis, "old results", {"summary.txt": b"trashed\n"}, **trashed)
    discarded = project("home/analysis/discarded", analysis, trashed=True)
    inside = {"x.txt": b"in a trashed project\n"}
    collection("home/analysis/discarded/inside", discarded, "inside", inside, hidden="in a trashed project")
    if cluster.profile.forward_slash_name_substitution:
        collection(
            "home/analysis/2024/03 run", analysis, "2024/03 run", {"log.txt": b"a name with a slash\n"}
        )
    shared = project("other/shared project", other)
    for reader in readers:
        permit(cluster, reader, "can_read", shared)
    table = {"table.tsv": b"id\tvalue\n1\t42\n"}
    collection("other/shared project/results from other", shared, "results from other", table)
    inner = project("other/shared project/inner", shared)
    inner_files = {"inner.txt": b"two levels down a shared project\n"}
    collection("other/shared project/inner/inner data", inner, "inner data", inner_files)
    private = project("other/private", other, hidden=True)
    collection(
        "other/private/secret",
        private,
        "secret",
        {"secret.txt": b"nobody else reads this\n"},
        hidden="private",
    )
    results_filter = [["uuid", "is_a", "arvados#collection"], ["collections.name", "like", "results%"]]
    members = [k + "home/analysis/results", k + "other/shared project/results from other"]
    project("home/results everywhere", me, group_class="filter", filters=results_filter, members=members)
    loop_filter = [["uuid", "is_a", "arvados#group"], ["groups.name", "=", "loop"]]
    project("home/loop", me, group_class="filter", filters=loop_filter, members=[k + "home/loop"])
    add_tag(world, cluster, k + "tag/demo/results", "demo", results)
    add_tag(world, cluster, k + "tag/raw/reads", "raw", reads["uuid"])
    if cid == world.home and "text" in world.seeded:
        add_tag(world, cluster, k + "tag/demo/text", "demo", world.seeded["text"]["uuid"])


def add_project(
    world: World,
    cluster: Cluster,
    key: str,
    owner_uuid: str,
    name: str,
    group_class: str = "project",
    filters: list | None = None,
    members: list[str] | None = None,
    trashed: bool = False,
    hidden: bool = False,
) -> str:
    """Create a project or filter group; record it in federation.json's ``projects`` (or ``hidden``)."""
    uuid = uuid_for(cluster.id, "j7d0g", key)
    properties = {"filters": filters} if filters is not None else {}
    record = group_record(uuid, owner_uuid, name, group_class, owner_uuid, properties)
    if trashed:
        record.update(is_trashed=True, trash_at=rfc3339(time.time()))
    cluster.store(record)
    entry = {
        "cluster": cluster.id,
        "uuid": uuid,
        "name": name,
        "owner_uuid": owner_uuid,
        "group_class": group_class,
    }
    if members is not None:
        entry["members"] = members
    if trashed or hidden:
        world.tree["hidden"][key] = {**entry, "why": "trashed" if trashed else "private"}
    else:
        world.tree["projects"][key] = entry
    return uuid


def add_tag(world: World, cluster: Cluster, key: str, tag: str, head_uuid: str) -> None:
    """A tag link owned by the cluster user, as ``arv tag add`` makes it."""
    uuid = uuid_for(cluster.id, "o0j2j", key)
    cluster.store(link_record(uuid, cluster.user_uuid, "tag", tag, head_uuid, None, cluster.user_uuid))
    world.tree["links"][key] = {
        "cluster": cluster.id,
        "uuid": uuid,
        "link_class": "tag",
        "name": tag,
        "head_uuid": head_uuid,
        "tail_uuid": None,
    }


def _collection_with_old_version(world: World, cluster: Cluster, owner: str, key: str) -> str:
    """``results``: created, then updated with preserve_version, so an old version exists."""
    first = add_collection(
        world,
        cluster.id,
        "results",
        {"summary.txt": b"draft\n"},
        owner_uuid=owner,
        key=key,
        preserve_version=True,
    )
    files = {"summary.txt": b"final summary\n", "plot.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>\n"}
    built = build(files, cluster.store_block)
    record = cluster.update_collection(first["uuid"], {"manifest_text": built.manifest})
    world.seeded[key].update(
        portable_data_hash=record["portable_data_hash"], files=dict(sorted(built.files.items()))
    )
    old = next(
        c
        for c in cluster.all_collections()
        if c["current_version_uuid"] == first["uuid"] and c["uuid"] != first["uuid"]
    )
    world.tree["hidden"][key + " (old version)"] = {
        "cluster": cluster.id,
        "uuid": old["uuid"],
        "name": old["name"],
        "owner_uuid": owner,
        "portable_data_hash": old["portable_data_hash"],
        "why": "old version",
    }
    return first["uuid"]


def _fastq(cluster_id: str, n: int) -> bytes:
    return "".join(f"@{cluster_id}:read{n}:{i}\nACGTACGTTGCA\n+\nIIIIIIIIIIII\n" for i in range(50)).encode()
