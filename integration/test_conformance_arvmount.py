"""The real arv-mount (arvados-fuse 3.2.1) on the emulator: its home/, shared/ and by_tag/
show exactly the project tree the demo seed describes in federation.json.

This proves the emulator serves the project API as the real client expects it
(groups.contents with keyset paging, groups.shared with included owners, links with
select/distinct, ForwardSlashNameSubstitution from the config, filter groups, trash and
old versions hidden). The expectations are built from federation.json with arv-mount's
own rules (``services/fuse/arvados_fuse/fusedir.py``): names sanitized with the cluster's
substitution; in a project, subprojects are listed before collections and the first of two
equal names wins; a filter group inside itself lists nothing; shared/ holds the owners of
projects shared with the user, by "First Last"; by_tag/<tag>/ holds tagged collections by
uuid.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from integration.arvmount import ArvMount, requires_arv_mount, tree_of

pytestmark = requires_arv_mount

Tree = dict[str, tuple[str, int | None]]


@pytest.fixture(scope="module")
def demo(federation_factory):
    """A federation of its own: the shared one collects what other tests create."""
    return federation_factory(seed="demo")


def _sanitize(name: str, fsns: str) -> str:
    if name in ("", "."):
        return "_"
    if name == "..":
        return "__"
    return name.replace("/", fsns or "_").replace("\x00", "_")


class Expected:
    """The tree arv-mount should show for `cluster`'s user, from federation.json."""

    def __init__(self, fed, cluster: str, fsns: str):
        self.fed, self.cluster, self.fsns = fed, cluster, fsns
        state = fed.state
        self.objects = {
            e["uuid"]: {**e, "key": k}
            for section in ("projects", "collections")
            for k, e in state[section].items()
            if e["cluster"] == cluster
        }
        self.children: dict[str, list[dict]] = defaultdict(list)
        for obj in self.objects.values():
            self.children[obj["owner_uuid"]].append(obj)
        self.tree: Tree = {}

    def collection(self, entry: dict, prefix: str) -> None:
        for path in entry.get("empty_dirs", ()):
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                self.tree[prefix + "/".join(parts[:i])] = ("dir", None)
        for path, meta in entry["files"].items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                self.tree[prefix + "/".join(parts[:i])] = ("dir", None)
            self.tree[prefix + path] = ("file", meta["size"])

    def listing(self, uuid: str, prefix: str, ancestors: tuple[str, ...]) -> None:
        obj = self.objects.get(uuid)
        if obj is not None and obj.get("group_class") == "filter":
            members = [
                self.fed.state["collections"].get(k) or self.fed.state["projects"][k] for k in obj["members"]
            ]
            entries = [self.objects[m["uuid"]] for m in members]
        else:
            entries = self.children[uuid]
        groups = sorted((e for e in entries if "group_class" in e), key=lambda e: e["uuid"])
        collections = sorted((e for e in entries if "files" in e), key=lambda e: e["uuid"])
        seen: set[str] = set()
        for entry in groups + collections:
            name = _sanitize(entry["name"], self.fsns)
            if name in seen:
                continue
            seen.add(name)
            self.tree[prefix + name] = ("dir", None)
            if "files" in entry:
                self.collection(entry, prefix + name + "/")
            elif not (entry["group_class"] == "filter" and entry["uuid"] in ancestors):
                self.listing(entry["uuid"], prefix + name + "/", (*ancestors, entry["uuid"]))


def _expected(fed, cluster: str, fsns: str) -> Tree:
    me = fed.clusters[cluster]["user_uuid"]
    want = Expected(fed, cluster, fsns)
    want.tree.update({"home": ("dir", None), "shared": ("dir", None), "by_tag": ("dir", None)})
    want.listing(me, "home/", (me,))
    owners = {
        p["owner_uuid"]
        for p in fed.state["projects"].values()
        if p["cluster"] == cluster and p["owner_uuid"][6:11] == "tpzed" and p["owner_uuid"] != me
    }
    for owner in owners:
        user = fed.request(cluster, f"/arvados/v1/users/{owner}", token=fed.token(cluster)).json()
        top = f"shared/{user['first_name']} {user['last_name']}/"
        want.tree[top[:-1]] = ("dir", None)
        want.listing(owner, top, (owner,))
    by_uuid = {e["uuid"]: e for e in fed.state["collections"].values()}
    for link in fed.state["links"].values():
        if link["cluster"] == cluster and link["link_class"] == "tag":
            want.tree[f"by_tag/{link['name']}"] = ("dir", None)
            want.tree[f"by_tag/{link['name']}/{link['head_uuid']}"] = ("dir", None)
            want.collection(by_uuid[link["head_uuid"]], f"by_tag/{link['name']}/{link['head_uuid']}/")
    return want.tree


def test_real_arv_mount_shows_the_seeded_home_shared_and_by_tag_trees(demo, tmp_path):
    config = demo.request(demo.home, "/arvados/v1/config").json()
    fsns = config["Collections"]["ForwardSlashNameSubstitution"]
    assert fsns, "the home cluster must substitute '/' for this test to see a substituted name"
    mount = ArvMount(demo, tmp_path)
    try:
        seen = tree_of(mount.path)
    finally:
        mount.stop()
    expected = _expected(demo, demo.home, fsns)
    assert seen.pop("README")[0] == "file"
    assert seen == expected
    # the cases the seed exists for, spelled out
    assert seen[f"home/analysis/2024{fsns}03 run/log.txt"] == ("file", 20)
    assert "home/analysis/raw/reads/r1.fastq" in seen  # the subproject wins over the collection "raw"
    assert seen["home/loop/loop"] == ("dir", None) and not [
        p for p in seen if p.startswith("home/loop/loop/")
    ]
    assert not [p for p in seen if "old results" in p or "discarded" in p or "private" in p or "secret" in p]
    assert f"shared/Other User {demo.home}/shared project/inner/inner data/inner.txt" in seen


def test_real_arv_mount_home_on_the_cluster_with_500_items_per_page_and_no_substitution(demo, tmp_path):
    (cluster,) = [
        c
        for c in demo.clusters
        if not demo.request(c, "/arvados/v1/config").json()["Collections"]["ForwardSlashNameSubstitution"]
    ]
    mount = ArvMount(demo, tmp_path, "--home", cluster=cluster, ready="analysis")
    try:
        seen = tree_of(mount.path)
    finally:
        mount.stop()
    expected = {
        p.removeprefix("home/"): v for p, v in _expected(demo, cluster, "").items() if p.startswith("home/")
    }
    assert seen == expected
