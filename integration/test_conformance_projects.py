"""The real arvados-python-client against the emulator's projects, users, links and Keep writes.

What the coming features (the project tree, the crunch-run stand-in, placement) need from
the emulated federation, checked with the real SDK as arv-mount and arv-put use it
(reference/federation-crunch-run-and-users.md §1, §4; issues 15, 17, 18).
"""

from __future__ import annotations

import hashlib
import json

import arvados
import arvados.collection
import arvados.errors
import arvados.keep
import arvados.util
import pytest

from integration.cluster.signing import SIGNED_LOCATOR_RE

GROUP_FILTERS = [["uuid", "is_a", "arvados#group"], ["groups.group_class", "in", ["project", "filter"]]]


def _names(items) -> set[str]:
    return {i["name"] for i in items}


def _contents(api, uuid, **kwargs) -> list[dict]:
    """What arv-mount's ProjectDirectory lists: two keyset passes, old versions dropped client-side."""
    groups = list(
        arvados.util.keyset_list_all(
            api.groups().contents, order_key="uuid", uuid=uuid, filters=GROUP_FILTERS, **kwargs
        )
    )
    colls = arvados.util.keyset_list_all(
        api.groups().contents,
        order_key="uuid",
        uuid=uuid,
        filters=[["uuid", "is_a", "arvados#collection"]],
        **kwargs,
    )
    return groups + [c for c in colls if c["current_version_uuid"] == c["uuid"]]


def _status(call) -> int:
    with pytest.raises(arvados.errors.ApiError) as info:
        call.execute(num_retries=0)
    return info.value.resp.status


# --- creating trees through the SDK ---------------------------------------------------------


def test_sdk_builds_a_project_tree_on_every_cluster_through_home_with_cluster_id(fed, sdk):
    home = sdk()
    me = home.users().current().execute()["uuid"]
    for cluster in fed.clusters:
        project = (
            home.groups()
            .create(
                body={"group": {"name": f"made via home for {cluster}", "group_class": "project"}},
                cluster_id=cluster,
                ensure_unique_name=True,
            )
            .execute()
        )
        assert project["uuid"][:5] == cluster and project["owner_uuid"] == me
        sub = (
            home.groups()
            .create(
                body={"group": {"name": "sub", "group_class": "project", "owner_uuid": project["uuid"]}},
                cluster_id=cluster,
            )
            .execute()
        )
        coll = (
            home.collections()
            .create(
                body={"collection": {"name": "empty", "owner_uuid": sub["uuid"], "manifest_text": ""}},
                cluster_id=cluster,
            )
            .execute()
        )
        tag = (
            home.links()
            .create(
                body={"link": {"link_class": "tag", "name": f"made-{cluster}", "head_uuid": coll["uuid"]}},
                cluster_id=cluster,
            )
            .execute()
        )
        assert {sub["uuid"][:5], coll["uuid"][:5], tag["uuid"][:5]} == {cluster}
        assert [i["uuid"] for i in home.groups().contents(uuid=sub["uuid"]).execute()["items"]] == [
            coll["uuid"]
        ]
        tagged = (
            home.links()
            .list(filters=[["name", "=", f"made-{cluster}"]], cluster_id=cluster)
            .execute()["items"]
        )
        assert [t["head_uuid"] for t in tagged] == [coll["uuid"]] and tagged[0][
            "head_kind"
        ] == "arvados#collection"


def test_collection_saved_into_a_project_by_the_sdk_lists_with_its_size(fed, sdk):
    api = sdk("zbbbb")
    project = (
        api.groups()
        .create(
            body={"group": {"name": "saved collections", "group_class": "project"}}, ensure_unique_name=True
        )
        .execute()
    )
    coll = arvados.collection.Collection(api_client=api)
    with coll.open("data/numbers.txt", "wb") as f:
        f.write(b"".join(b"%d\n" % i for i in range(10000)))
    coll.save_new(name="numbers", owner_uuid=project["uuid"])
    (listed,) = api.groups().contents(uuid=project["uuid"]).execute()["items"]
    assert listed["name"] == "numbers" and listed["file_count"] == 1 and listed["file_size_total"] == 48890
    assert "manifest_text" not in listed and listed["owner_uuid"] == project["uuid"]
    assert api.collections().get(uuid=coll.manifest_locator()).execute()["owner_uuid"] == project["uuid"]


def test_permission_link_from_the_second_user_shares_one_project_and_nothing_else(fed, sdk):
    mine = sdk("zcccc")
    other = sdk("zcccc", token=fed.clusters["zcccc"]["other_token"])
    me = fed.clusters["zcccc"]["user_uuid"]
    shared = (
        other.groups()
        .create(body={"group": {"name": "to share", "group_class": "project"}}, ensure_unique_name=True)
        .execute()
    )
    private = (
        other.groups()
        .create(body={"group": {"name": "kept", "group_class": "project"}}, ensure_unique_name=True)
        .execute()
    )
    assert _status(mine.groups().get(uuid=shared["uuid"])) == 404
    link = (
        other.links()
        .create(
            body={
                "link": {
                    "link_class": "permission",
                    "name": "can_read",
                    "tail_uuid": me,
                    "head_uuid": shared["uuid"],
                }
            }
        )
        .execute()
    )
    assert link["owner_uuid"] == "zcccc-tpzed-000000000000000"  # permission links belong to the system user
    assert mine.groups().get(uuid=shared["uuid"]).execute()["can_write"] is False
    assert _status(mine.groups().get(uuid=private["uuid"])) == 404
    again = (
        other.links()
        .create(
            body={
                "link": {
                    "link_class": "permission",
                    "name": "can_write",
                    "tail_uuid": me,
                    "head_uuid": shared["uuid"],
                }
            }
        )
        .execute()
    )
    assert again["uuid"] == link["uuid"] and again["name"] == "can_write"  # upgraded in place, as Rails does
    assert mine.groups().get(uuid=shared["uuid"]).execute()["can_write"] is True
    assert (
        _status(
            mine.links().create(
                body={
                    "link": {
                        "link_class": "permission",
                        "name": "can_read",
                        "tail_uuid": me,
                        "head_uuid": private["uuid"],
                    }
                }
            )
        )
        == 422
    )  # cannot even see it


def test_second_users_private_project_is_invisible_and_shared_one_is_under_shared(fed, sdk):
    for cluster in fed.clusters:
        api = sdk(cluster)
        me = fed.clusters[cluster]["user_uuid"]
        private = fed.state["hidden"][f"{cluster}:other/private"]
        shared = fed.state["projects"][f"{cluster}:other/shared project"]
        assert _status(api.groups().get(uuid=private["uuid"])) == 404
        assert (
            _status(
                api.collections().get(uuid=fed.state["hidden"][f"{cluster}:other/private/secret"]["uuid"])
            )
            == 404
        )
        resp = (
            api.groups()
            .shared(
                filters=[["group_class", "in", ["project", "filter"]]],
                order="uuid",
                limit=10000,
                count="none",
                include="owner_uuid",
            )
            .execute()
        )
        uuids = [g["uuid"] for g in resp["items"]]  # other tests may have shared more
        assert shared["uuid"] in uuids and private["uuid"] not in uuids and "items_available" not in resp
        assert uuids == sorted(uuids) and me not in {g["owner_uuid"] for g in resp["items"]}
        owner = next(o for o in resp["included"] if o["uuid"] == shared["owner_uuid"])
        assert f"{owner['first_name']} {owner['last_name']}" == f"Other User {cluster}"
        other = sdk(cluster, token=fed.clusters[cluster]["other_token"])
        assert other.groups().get(uuid=private["uuid"]).execute()["name"] == "private"


def test_remote_shared_view_through_home_lists_what_remote_users_shared_with_home_user(fed, sdk):
    home = sdk()
    for cluster in fed.clusters:
        if cluster == fed.home:
            continue
        mark = fed.mark()
        resp = (
            home.groups()
            .shared(
                filters=[["group_class", "in", ["project", "filter"]]],
                include="owner_uuid",
                cluster_id=cluster,
                count="none",
            )
            .execute()
        )
        uuids = {g["uuid"] for g in resp["items"]}
        assert fed.state["projects"][f"{cluster}:other/shared project"]["uuid"] in uuids
        assert (
            fed.state["projects"][f"{cluster}:home/analysis"]["uuid"] in uuids
        )  # the remote user's, readable by all
        assert fed.state["hidden"][f"{cluster}:other/private"]["uuid"] not in uuids
        forwarded = fed.wait_requests(since=mark, cluster=cluster, service="controller")
        assert forwarded and all(r["token"] != fed.token() for r in forwarded)


# --- groups.contents ------------------------------------------------------------------------


def test_keyset_list_all_pages_contents_under_a_small_MaxItemsPerResponse(fed, sdk):
    api = sdk("zcccc")
    assert api.configs().get().execute()["API"]["MaxItemsPerResponse"] == 500
    project = (
        api.groups()
        .create(body={"group": {"name": "many", "group_class": "project"}}, ensure_unique_name=True)
        .execute()
    )
    made = {
        api.collections()
        .create(body={"collection": {"name": f"c{i:04d}", "owner_uuid": project["uuid"]}})
        .execute()["uuid"]
        for i in range(620)
    }
    subs = {
        api.groups()
        .create(body={"group": {"name": f"p{i}", "group_class": "project", "owner_uuid": project["uuid"]}})
        .execute()["uuid"]
        for i in range(3)
    }
    mark = fed.mark()
    listed = _contents(api, project["uuid"])
    assert {i["uuid"] for i in listed} == made | subs and len(listed) == 623
    pages = fed.wait_requests(
        since=mark, count=5, cluster="zcccc", where=lambda r: "/groups/contents" in r["path"]
    )
    assert len(pages) == 2 + 3  # groups: 1 page + the empty one; collections: 500, 120, empty
    first = (
        api.groups()
        .contents(
            uuid=project["uuid"], limit=1000, count="none", filters=[["uuid", "is_a", "arvados#collection"]]
        )
        .execute()
    )
    assert first["limit"] == 500 and len(first["items"]) == 500


def test_contents_hide_trashed_objects_and_old_versions_unless_asked(fed, sdk):
    for cluster in fed.clusters:
        api = sdk(cluster)
        analysis = fed.state["projects"][f"{cluster}:home/analysis"]["uuid"]
        names = sorted((i["name"], i["uuid"][6:11]) for i in _contents(api, analysis))
        expected = [("raw", "4zz18"), ("raw", "j7d0g"), ("results", "4zz18")]
        if api.configs().get().execute()["Collections"]["ForwardSlashNameSubstitution"]:
            expected.insert(0, ("2024/03 run", "4zz18"))
        assert names == expected, cluster
        everything = (
            api.groups().contents(uuid=analysis, include_trash=True, include_old_versions=True).execute()
        )
        assert _names(everything["items"]) >= {"old results", "discarded"}
        assert sum(1 for i in everything["items"] if i["name"] == "results") == 2
        assert everything["items_available"] == len(everything["items"])


def test_contents_of_user_is_their_home_and_is_always_answered_locally(fed, sdk):
    home = sdk()
    me = fed.clusters[fed.home]["user_uuid"]
    top = _names(home.groups().contents(uuid=me, limit=1000).execute()["items"])
    assert {"analysis", "results everywhere", "loop", "text"} <= top
    remote_user = fed.clusters["zbbbb"]["user_uuid"]
    mark = fed.mark()
    remote_home = home.groups().contents(uuid=remote_user, cluster_id="zbbbb").execute()["items"]
    assert {"analysis", "big", "shared"} <= _names(remote_home)
    assert fed.wait_requests(since=mark, cluster="zbbbb", service="controller")
    assert home.groups().contents(uuid=remote_user).execute()["items"] == []  # local: they own nothing here
    mine_there = home.groups().contents(uuid=me, cluster_id="zbbbb").execute()["items"]
    assert "work on zbbbb" in _names(mine_there)  # the home user's home project on zbbbb


def test_filter_groups_list_their_matches_and_one_contains_itself(fed, sdk):
    api = sdk()
    cluster = fed.home
    for key in (f"{cluster}:home/results everywhere", f"{cluster}:home/loop"):
        group = fed.state["projects"][key]
        members = {
            fed.state["collections"].get(m, fed.state["projects"].get(m))["uuid"] for m in group["members"]
        }
        listed = {i["uuid"] for i in api.groups().contents(uuid=group["uuid"], limit=1000).execute()["items"]}
        assert listed == members, key
    loop = fed.state["projects"][f"{cluster}:home/loop"]
    assert loop["uuid"] in {i["uuid"] for i in api.groups().contents(uuid=loop["uuid"]).execute()["items"]}


def test_contents_reject_unqualified_filters_on_attributes_one_table_lacks(fed, sdk):
    api = sdk()
    me = fed.clusters[fed.home]["user_uuid"]
    assert _status(api.groups().contents(uuid=me, filters=[["group_class", "=", "project"]])) == 422
    assert _status(api.groups().contents(uuid=me, filters=[["nope.name", "=", "x"]])) == 422
    assert _status(api.groups().contents(uuid=me, select=["no_such_field"])) == 422
    ok = (
        api.groups()
        .contents(uuid=me, filters=[["groups.group_class", "=", "project"]], select=["uuid", "name"])
        .execute()
    )
    assert {"analysis", "text"} <= _names(ok["items"])  # the collections table ignores a groups. filter
    assert all(set(i) <= {"uuid", "name", "kind", "etag"} for i in ok["items"])


def test_name_lookups_as_arv_mount_makes_them_before_a_listing(fed, sdk):
    api = sdk()
    analysis = fed.state["projects"][f"{fed.home}:home/analysis"]["uuid"]
    groups = (
        api.groups()
        .list(
            filters=[
                ["owner_uuid", "=", analysis],
                ["group_class", "in", ["project", "filter"]],
                ["name", "in", ["raw", "raw"]],
            ],
            limit=2,
        )
        .execute()["items"]
    )
    colls = (
        api.collections()
        .list(filters=[["owner_uuid", "=", analysis], ["name", "=", "2024/03 run"]], limit=2)
        .execute()["items"]
    )
    assert [g["name"] for g in groups] == ["raw"] and [c["name"] for c in colls] == ["2024/03 run"]
    like = (
        api.collections()
        .list(filters=[["name", "like", "res%"], ["owner_uuid", "=", analysis]])
        .execute()["items"]
    )
    assert [c["name"] for c in like] == ["results"]


# --- federated list rules -------------------------------------------------------------------


def test_federated_list_mixing_a_remote_uuid_with_other_filters_is_400(fed, sdk):
    home = sdk()
    remote = fed.state["projects"]["zbbbb:home/analysis"]["uuid"]
    mixed = home.groups().list(filters=[["group_class", "in", ["project", "filter"]], ["uuid", "=", remote]])
    with pytest.raises(arvados.errors.ApiError) as info:
        mixed.execute(num_retries=0)
    assert info.value.resp.status == 400
    assert (
        "cannot execute federated list query: each filter must be either 'uuid = ...' or 'uuid in [...]'"
        in str(info.value)
    )
    assert _status(home.groups().list(filters=[["uuid", "=", remote]])) == 400  # count must be none
    assert _status(home.groups().list(filters=[["uuid", "=", remote]], count="none", order=["name"])) == 400
    found = home.groups().list(filters=[["uuid", "in", [remote]]], count="none").execute()
    assert [g["uuid"] for g in found["items"]] == [remote] and "items_available" not in found


def test_federated_uuid_list_fans_out_and_merges_every_cluster(fed, sdk):
    home = sdk()
    uuids = [fed.state["projects"][f"{c}:home/analysis"]["uuid"] for c in fed.clusters]
    mark = fed.mark()
    got = (
        home.groups().list(filters=[["uuid", "in", uuids]], count="none", select=["name"]).execute()["items"]
    )
    assert len(got) == 3 and all(set(g) == {"name", "kind", "etag"} for g in got)
    for cluster in fed.clusters:
        if cluster != fed.home:
            (asked,) = fed.wait_requests(
                since=mark, cluster=cluster, service="controller", where=lambda r: "/groups" in r["path"]
            )
            assert "forwarded_for" in asked["path"]
    too_many = [f"zbbbb-j7d0g-{i:015d}" for i in range(1001)]
    assert _status(home.groups().list(filters=[["uuid", "in", too_many]], count="none")) == 400


def test_users_get_is_routed_by_prefix_and_list_knows_remote_users(fed, sdk):
    home = sdk()
    remote_user = fed.clusters["zbbbb"]["other_user_uuid"]
    mark = fed.mark()
    assert home.users().get(uuid=remote_user).execute()["first_name"] == "Other"
    assert fed.wait_requests(
        since=mark, cluster="zbbbb", service="controller", where=lambda r: "/users/" in r["path"]
    )
    listed = {u["uuid"] for u in arvados.util.keyset_list_all(home.users().list, order_key="uuid")}
    assert {fed.clusters[c]["user_uuid"] for c in fed.clusters} <= listed
    assert home.users().current().execute()["uuid"] == fed.clusters[fed.home]["user_uuid"]


def test_links_list_distinct_tag_names_as_by_tag_asks(fed, sdk):
    api = sdk()
    tags = (
        api.links()
        .list(
            filters=[["link_class", "=", "tag"], ["name", "!=", ""]],
            select=["name"],
            distinct=True,
            limit=1000,
        )
        .execute()
    )
    names = [t["name"] for t in tags["items"]]
    assert sorted(names) == sorted(set(names)) and {"demo", "raw"} <= set(names)
    tagged = (
        api.links()
        .list(
            filters=[
                ["link_class", "=", "tag"],
                ["name", "=", "demo"],
                ["head_uuid", "is_a", "arvados#collection"],
            ],
            select=["head_uuid"],
        )
        .execute()["items"]
    )
    assert {t["head_uuid"] for t in tagged} == {
        fed.collections["text"]["uuid"],
        fed.collections[f"{fed.home}:home/analysis/results"]["uuid"],
    }


# --- configuration --------------------------------------------------------------------------


def test_exported_configs_differ_in_slash_substitution_page_size_and_instance_types(fed, sdk):
    configs = {c: sdk(c).configs().get().execute() for c in fed.clusters}
    assert len({c["Collections"]["ForwardSlashNameSubstitution"] for c in configs.values()}) == 3
    assert "" in {c["Collections"]["ForwardSlashNameSubstitution"] for c in configs.values()}
    gpu = [
        c for c, cfg in configs.items() if any(t["GPU"]["DeviceCount"] for t in cfg["InstanceTypes"].values())
    ]
    small = [
        c for c, cfg in configs.items() if all(t["RAM"] <= 2 << 30 for t in cfg["InstanceTypes"].values())
    ]
    assert len(gpu) == 1 and len(small) == 1 and gpu != small
    (gpu_type,) = [t for t in configs[gpu[0]]["InstanceTypes"].values() if t["GPU"]["DeviceCount"]]
    assert gpu_type["GPU"]["Stack"] == "cuda" and gpu_type["GPU"]["VRAM"] > 0
    for cluster, cfg in configs.items():
        assert sdk(cluster)._rootDesc["maxItemsPerResponse"] == cfg["API"]["MaxItemsPerResponse"]
        assert "shared" in sdk(cluster)._rootDesc["resources"]["groups"]["methods"]


def test_slash_in_a_name_is_refused_where_no_substitution_is_configured(fed, sdk):
    for cluster in fed.clusters:
        api = sdk(cluster)
        fsns = api.configs().get().execute()["Collections"]["ForwardSlashNameSubstitution"]
        create = api.groups().create(
            body={"group": {"name": "a/b", "group_class": "project"}}, ensure_unique_name=True
        )
        if fsns:
            assert create.execute()["name"].startswith("a/b")
        else:
            assert _status(create) == 422


# --- keepstore writes and local signatures --------------------------------------------------


def test_keep_put_honours_storage_classes_through_the_sdk(fed, sdk):
    api = sdk()
    kc = arvados.keep.KeepClient(api_client=api, num_retries=1)
    data = b"archive me " * 1000
    locator = kc.put(data, copies=1, classes=["archive"])
    assert SIGNED_LOCATOR_RE.match(locator)
    holders = [
        s
        for s in ("keep0", "keep1")
        if fed.request(fed.home, "/" + locator, service=s, token=fed.token()).status == 200
    ]
    assert holders == ["keep1"]  # only keep1's volume has the archive class
    digest = hashlib.md5(b"default twice").hexdigest()
    reply = fed.request(
        fed.home, f"/{digest}", service="keep1", method="PUT", token=fed.token(), body=b"default twice"
    )
    assert reply.headers["x-keep-storage-classes-confirmed"] == "archive=1, default=1"
    refused = fed.request(
        fed.home,
        f"/{digest}",
        service="keep0",
        method="PUT",
        token=fed.token(),
        body=b"default twice",
        headers={"X-Keep-Storage-Classes": "archive"},
    )
    assert refused.status == 507
    both = kc.put(b"two copies of default", copies=2)
    assert all(
        fed.request(fed.home, "/" + both, service=s, token=fed.token()).status == 200
        for s in ("keep0", "keep1")
    )


def test_refresh_signature_copies_a_remote_block_into_home_keep_once(fed, sdk):
    entry = fed.collections["zbbbb:other/shared project/results from other"]
    api = sdk()
    remote_locator = api.collections().get(uuid=entry["uuid"]).execute()["manifest_text"].split(" ")[1]
    assert "+Rzbbbb-" in remote_locator
    kc = arvados.keep.KeepClient(api_client=api, num_retries=1)
    mark = fed.mark()
    local = kc.refresh_signature(remote_locator)
    assert SIGNED_LOCATOR_RE.match(local) and local.startswith(remote_locator[:32]) and "+R" not in local
    copies = fed.wait_requests(since=mark, cluster="zbbbb", where=lambda r: r["service"].startswith("keep"))
    assert len(copies) == 1 and copies[0]["from_service"].startswith(f"{fed.home}/keep")
    mark = fed.mark()
    assert hashlib.md5(kc.get(local)).hexdigest() == local[:32]
    assert not [r for r in fed.requests(since=mark) if r["cluster"] != fed.home]


def test_collection_save_new_of_a_remote_collection_converts_R_to_A_and_reads_locally(fed, sdk):
    entry = fed.collections["zcccc:home/analysis/raw/reads"]
    api = sdk()
    copy = arvados.collection.Collection(entry["uuid"], api_client=api, num_retries=1)
    copy.save_new(name="reads, staged at home", ensure_unique_name=True)
    saved = api.collections().get(uuid=copy.manifest_locator()).execute()
    assert (
        saved["uuid"][:5] == fed.home
        and "+R" not in saved["manifest_text"]
        and "+A" in saved["manifest_text"]
    )
    assert saved["portable_data_hash"] == entry["portable_data_hash"]
    mark = fed.mark()
    reader = arvados.collection.CollectionReader(saved["uuid"], api_client=api, num_retries=1)
    for path, meta in entry["files"].items():
        with reader.open(path, "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == meta["md5"]
    assert not [r for r in fed.requests(since=mark) if r["cluster"] != fed.home]


def test_federation_json_describes_users_and_the_seeded_tree(fed):
    for cluster, info in fed.clusters.items():
        assert info["other_user_uuid"] != info["user_uuid"] and info["other_token"].startswith(
            f"v2/{cluster}-gj3su-"
        )
        assert (
            fed.request(cluster, "/arvados/v1/users/current", token=info["other_token"]).json()["uuid"]
            == info["other_user_uuid"]
        )
    assert json.dumps(fed.state["projects"]) and all(
        p["uuid"][:5] == p["cluster"] for p in fed.state["projects"].values()
    )
    assert {h["why"] for h in fed.state["hidden"].values()} == {
        "trashed",
        "old version",
        "private",
        "in a trashed project",
    }


def test_list_filter_operators_follow_rails_semantics(fed, sdk):
    api = sdk()
    analysis = fed.projects[f"{fed.home}:home/analysis"]["uuid"]

    def names(filters, **kw):
        found = api.collections().list(filters=[["owner_uuid", "=", analysis], *filters], **kw).execute()
        return sorted(c["name"] for c in found["items"])

    everything = names([])
    assert names([["name", "ilike", "RES%"]]) == ["results"] and names([["name", "like", "RES%"]]) == []
    assert names([["name", "not in", ["raw", "results"]]]) == [
        n for n in everything if n not in ("raw", "results")
    ]
    assert names([["description", "=", None]]) == everything  # = null is IS NULL
    assert names([["description", "!=", "x"]]) == everything  # != also matches null
    assert (
        names([["modified_at", ">=", "2000-01-01T00:00:00Z"], ["modified_at", "<", "2999-01-01"]])
        == everything
    )
    assert names([["file_count", ">", 1]]) == ["results"]
    assert names([["uuid", "is_a", "arvados#group"]]) == []
    assert (
        names([["properties", "exists", "nothing"]]) == []
        and names([["properties.x", "exists", False]]) == everything
    )
    assert names([["is_trashed", "=", "true"]], include_trash=True) == ["old results"]
    tags = (
        api.links()
        .list(filters=[["head_uuid", "is_a", "arvados#collection"], ["link_class", "=", "tag"]])
        .execute()
    )
    assert tags["items"] and all(t["head_kind"] == "arvados#collection" for t in tags["items"])
    for bad in (
        [["file_count", ">", 1.5]],
        [["name", "in", "raw"]],
        [["name", "~", "x"]],
        [["no_such", "=", 1]],
    ):
        assert _status(api.collections().list(filters=bad)) == 422, bad
