"""The project tree on real mounts: home/, shared/, by_tag/, clusters/<id>/, projects by name.

On the home cluster fedmount shows what the real arv-mount (arvados-fuse 3.2.1) shows, name
for name, kind for kind, size for size; beyond it, every cluster's home and shared trees
(``clusters/<id>/``), remote projects under ``by_id/``, and name lookups in remote projects
never listed, with the token salted for each cluster.
"""

from __future__ import annotations

import errno
import json
import os
import time
from urllib.parse import unquote

import pytest

from integration.arvmount import ArvMount, arv_mount_unusable, tree_of
from integration.mounting import fuse_unusable

pytestmark = pytest.mark.skipif(fuse_unusable() is not None, reason=str(fuse_unusable()))

PROJECT_MODES = ("home", "shared", "by_tag")


@pytest.fixture(scope="module")
def demo(federation_factory):
    """A federation of its own, as seeded: the shared one collects what other tests create."""
    return federation_factory(seed="demo")


def _project(fed, cluster: str, name: str, owner: str | None = None) -> dict:
    """The seeded project `name` of `cluster` (owned by `owner`, if given)."""
    (found,) = [
        p
        for p in fed.state["projects"].values()
        if p["cluster"] == cluster and p["name"] == name and owner in (None, p["owner_uuid"])
    ]
    return found


def _other_cluster(fed) -> str:
    return next(c for c in fed.clusters if c != fed.home)


def _slash_substitution(fed, cluster: str) -> str:
    return fed.request(cluster, "/arvados/v1/config").json()["Collections"]["ForwardSlashNameSubstitution"]


@pytest.mark.skipif(arv_mount_unusable() is not None, reason=str(arv_mount_unusable()))
def test_home_shared_and_by_tag_are_the_trees_the_real_arv_mount_shows(demo, mount, tmp_path):
    arv = ArvMount(demo, tmp_path / "arv")
    try:
        theirs = tree_of(arv.path)
    finally:
        arv.stop()
    ours = tree_of(mount(federation=demo).path, skip=("by_id", "clusters"))
    assert ours.pop("README")[0] == theirs.pop("README")[0] == "file"
    assert ours == theirs
    for top in PROJECT_MODES:  # the comparison is of something
        assert any(path.startswith(top + "/") for path in ours), top


@pytest.mark.skipif(arv_mount_unusable() is not None, reason=str(arv_mount_unusable()))
@pytest.mark.parametrize("mode", PROJECT_MODES)
def test_a_single_directory_mode_mounts_what_the_real_arv_mount_mounts(demo, mount, tmp_path, mode):
    ready = {"home": "analysis", "shared": f"Other User {demo.home}", "by_tag": "demo"}[mode]
    arv = ArvMount(demo, tmp_path / "arv", f"--{mode.replace('_', '-')}", ready=ready)
    try:
        theirs = tree_of(arv.path, skip=())
    finally:
        arv.stop()
    ours = tree_of(mount(f"--{mode.replace('_', '-')}", federation=demo, ready=ready).path, skip=())
    assert ours == theirs and ours


def test_every_cluster_lists_the_users_own_and_shared_projects_with_its_own_slash_rule(demo, mount):
    m = mount(federation=demo)
    assert sorted(os.listdir(m / "clusters")) == sorted(demo.clusters)
    remote = _other_cluster(demo)
    assert (m / f"clusters/{remote}/home/work on {remote}/made remotely/notes.txt").read_bytes()
    substitution = _slash_substitution(demo, remote)
    assert substitution and substitution != _slash_substitution(demo, demo.home)
    owner = demo.user_uuid(remote)
    run = m / f"clusters/{remote}/shared/Emulated User {remote}/analysis/2024{substitution}03 run"
    assert sorted(os.listdir(run)) == ["log.txt"], f"{remote}'s {substitution!r} replaces '/'"
    assert (
        _project(demo, remote, "analysis", owner)["uuid"]
        == json.loads((run.parent / ".arvados#project").read_text())["uuid"]
    )
    assert os.listdir(m / f"clusters/{remote}/shared/Other User {remote}/shared project")
    assert sorted(os.listdir(m / "home")) == sorted(os.listdir(m / f"clusters/{demo.home}/home"))


def test_a_remote_project_by_uuid_under_by_id_lists_as_it_does_under_its_owner(demo, mount):
    m = mount(federation=demo)
    remote = _other_cluster(demo)
    project = _project(demo, remote, "analysis", demo.user_uuid(remote))
    by_id = m / f"by_id/{project['uuid']}"
    owner_dir = m / f"clusters/{remote}/shared/Emulated User {remote}/analysis"
    assert tree_of(by_id, skip=()) == tree_of(owner_dir, skip=()) != {}
    assert project["uuid"] in os.listdir(m / "by_id")


def test_a_name_in_a_never_listed_remote_project_is_asked_of_its_own_cluster(demo, mount):
    m = mount(federation=demo)
    remote = _other_cluster(demo)
    project = _project(demo, remote, "analysis", demo.user_uuid(remote))
    since = demo.mark()
    assert sorted(os.listdir(m / f"by_id/{project['uuid']}/results")) == ["plot.svg", "summary.txt"]
    contents = [r for r in demo.requests(since=since, service="controller") if "contents" in r["path"]]
    asked = [unquote(r["path"]) for r in contents]
    assert asked and all(r.startswith(f"/arvados/v1/groups/{project['uuid']}/contents") for r in asked[:2])
    assert all('"name"' in r for r in asked[:2]), asked  # a lookup by name, not a listing
    assert {r["cluster"] for r in contents} == {remote}


def test_listing_a_project_fetches_no_manifest_until_someone_looks_inside(demo, mount):
    m = mount(federation=demo)
    since = demo.mark()
    assert sorted(os.listdir(m / "home/analysis")) == sorted(["2024%2f03 run", "raw", "results"])
    os.stat(m / "home/analysis/results")
    gets = [r for r in demo.requests(since=since, service="controller") if "/collections/" in r["path"]]
    assert gets == []
    assert "summary.txt" in os.listdir(m / "home/analysis/results")
    gets = [r for r in demo.requests(since=since, service="controller") if "/collections/" in r["path"]]
    assert len(gets) == 1


def test_a_filter_group_inside_itself_lists_nothing_so_find_ends(demo, mount):
    m = mount(federation=demo)
    assert os.listdir(m / "home/loop/loop") == []
    assert os.listdir(m / "home/loop")  # it lists what it selects, itself included, once


def test_a_new_and_a_renamed_collection_show_after_refresh_time(fed, sdk, mount):
    api = sdk()
    project = (
        api.groups()
        .create(body={"group": {"name": "refreshed", "group_class": "project"}}, ensure_unique_name=True)
        .execute()
    )
    first = (
        api.collections()
        .create(body={"collection": {"name": "first", "owner_uuid": project["uuid"], "manifest_text": ""}})
        .execute()
    )
    m = mount("--refresh-time", "1", federation=fed)
    where = m / f"home/{project['name']}"
    assert os.listdir(where) == ["first"]
    api.collections().update(uuid=first["uuid"], body={"collection": {"name": "renamed"}}).execute()
    api.collections().create(
        body={"collection": {"name": "second", "owner_uuid": project["uuid"], "manifest_text": ""}}
    ).execute()
    deadline = time.monotonic() + 20
    while sorted(os.listdir(where)) != ["renamed", "second"]:
        assert time.monotonic() < deadline, os.listdir(where)
        time.sleep(0.3)
    assert not (where / "first").exists()


def test_a_shared_tree_whose_cluster_is_down_fails_with_eio_alone(fed, mount):
    remote = _other_cluster(fed)
    m = mount("--api-wait", "20", federation=fed)
    fed.set_fault(remote, "controller", down="refuse")
    try:
        with pytest.raises(OSError) as e:
            os.listdir(m / f"clusters/{remote}/shared")
        assert e.value.errno == errno.EIO
        assert os.listdir(m / "home") and os.listdir(m / f"clusters/{fed.home}/shared")
    finally:
        fed.clear_faults(remote)
    assert os.listdir(m / f"clusters/{remote}/shared")  # asked again, once it is back


def test_no_remote_cluster_sees_the_home_token_unsalted_while_walking_every_tree(fed, mount):
    since = fed.mark()
    m = mount(federation=fed)
    walked = []
    for top, dirs, _ in os.walk(m.path, onerror=lambda e: None):  # other tests' broken collections: EIO
        walked.append(os.path.relpath(top, m.path))
        if top == str(m.path):
            dirs.remove("by_id")
    assert any(p.startswith("clusters/") and "/shared/" in p for p in walked)
    home_token = fed.token(fed.home)
    remote_requests = [r for r in fed.requests(since=since) if r["cluster"] != fed.home]
    assert remote_requests, "the walk asked every cluster"
    assert not [r for r in remote_requests if home_token in (r.get("token") or "")]


def test_mount_options_put_project_directories_where_asked(demo, mount):
    remote = _other_cluster(demo)
    project = _project(demo, remote, "analysis", demo.user_uuid(remote))
    m = mount("--project", project["uuid"], federation=demo, ready="results")
    assert "results" in os.listdir(m.path)
    assert json.loads((m / ".arvados#project").read_text())["uuid"] == project["uuid"]
    custom = mount("--mount-home", "mine", "--mount-by-tag", "tags", "--mount-by-id", "ids",
                   federation=demo, ready="ids/README")  # fmt: skip
    assert sorted(os.listdir(custom.path)) == ["ids", "mine", "tags"]
    assert "analysis" in os.listdir(custom / "mine") and "demo" in os.listdir(custom / "tags")
