"""Identifiers: collection UUIDs, PDHs, locators (reference/arvados-protocol.md §0, §4)."""

from __future__ import annotations

import pytest

from fedmount.arvados.ids import (
    CollectionId,
    IdError,
    Locator,
    check_cluster_id,
    check_uuid,
    looks_like_collection_id,
    parse_collection_id,
    parse_locator,
)

H = "acbd18db4cc2f85cedef654fccc4a4d8"
SIG = "89118b78732c33104a4d6231e8b5a5fa1e4301e3@7fffffff"


def test_collection_uuid():
    cid = parse_collection_id("zbbbb-4zz18-0123456789abcde")
    assert cid == CollectionId("zbbbb-4zz18-0123456789abcde")
    assert not cid.is_pdh and cid.cluster == "zbbbb" and str(cid) == cid.text


def test_pdh_drops_hints():
    cid = parse_collection_id(f"{H}+3+Kzzzzz")
    assert cid.text == f"{H}+3" and cid.is_pdh and cid.cluster is None


@pytest.mark.parametrize(
    "token, position, words",
    [
        ("zbbbb-tpzed-0123456789abcde", 6, "not a 4zz18 object"),
        ("zbbbb-4zz18-0123456789abcd", 26, "27 characters"),
        ("zbbbb_4zz18-0123456789abcde", 5, "expected '-'"),
        ("zbbbB-4zz18-0123456789abcde", 4, "lowercase"),
        (H, 32, "missing '+size'"),
        (f"{H[:-1]}X+3", 31, "32 lowercase hex"),
        (f"{H}+", 33, "decimal size"),
        (f"{H}+3x", 34, "decimal"),
        ("abc+3", 3, "32 lowercase hex"),
    ],
)
def test_bad_collection_ids_name_the_position(token, position, words):
    with pytest.raises(IdError) as info:
        parse_collection_id(token)
    assert info.value.position == position and words in str(info.value)
    assert not looks_like_collection_id(token)


def test_looks_like_collection_id():
    assert looks_like_collection_id(f"{H}+3")
    assert looks_like_collection_id("zbbbb-4zz18-0123456789abcde")
    assert not looks_like_collection_id("README")
    assert not looks_like_collection_id(".Trash")


def test_locator_hints_and_signatures():
    loc = parse_locator(f"{H}+3+K@zbbbb+A{SIG}+Zfoo")
    assert loc == Locator(H, 3, ("K@zbbbb", f"A{SIG}", "Zfoo"))
    assert loc.key == f"{H}+3" and loc.signature == SIG and loc.remote is None
    assert loc.signature_expiry == 0x7FFFFFFF
    assert str(loc) == f"{H}+3+K@zbbbb+A{SIG}+Zfoo"
    assert loc.without_hints() == Locator(H, 3)
    assert loc.with_hints(("Z",)).hints == ("Z",)


def test_remote_locator():
    loc = parse_locator(f"{H}+3+Rzbbbb-{SIG}")
    assert loc.remote == ("zbbbb", SIG) and loc.signature is None
    assert loc.signature_expiry == 0x7FFFFFFF


def test_locator_without_signature_has_no_expiry():
    assert parse_locator(f"{H}+3").signature_expiry is None
    assert parse_locator(f"{H}+3+Azz@nothex").signature_expiry is None


@pytest.mark.parametrize(
    "token, position, words",
    [
        (f"{H}", 32, "'+size'"),
        (f"{H}3", 32, "'+size'"),
        (f"{H}+x", 33, "decimal"),
        (f"{H}+{(1 << 26) + 1}", 33, "64 MiB"),
        (f"{H}+3+a", 35, "bad hint"),
        (f"{H}+3+A sig", 35, "bad hint"),
        (f"{H}+3+", 35, "bad hint"),
    ],
)
def test_bad_locators(token, position, words):
    with pytest.raises(IdError) as info:
        parse_locator(token)
    assert info.value.position == position and words in str(info.value)


def test_max_size_block_is_fine():
    assert parse_locator(f"{H}+{1 << 26}").size == 1 << 26


def test_check_uuid_and_cluster():
    assert check_uuid("zzzzz-tpzed-0123456789abcde") == "zzzzz-tpzed-0123456789abcde"
    assert check_uuid("zzzzz-4zz18-0123456789abcde", "4zz18")
    assert check_cluster_id("zbbbb") == "zbbbb"
    with pytest.raises(IdError):
        check_cluster_id("ZBBBB")
    with pytest.raises(IdError):
        check_cluster_id("zbbb")


@pytest.mark.parametrize(
    "check, token",
    [
        (check_cluster_id, "zbbbb\n"),
        (check_uuid, "zzzzz-bi6l4-000000000000000\n"),
        (parse_collection_id, "zzzzz-4zz18-0123456789abcde\n"),
        (parse_collection_id, f"{H}+3\n"),
        (parse_locator, f"{H}+3+A{SIG}\n"),
    ],
)
def test_a_final_newline_is_not_part_of_an_id(check, token):
    with pytest.raises(IdError):
        check(token)


def test_long_token_is_shortened_in_messages():
    with pytest.raises(IdError) as info:
        parse_locator("x" * 200)
    assert len(str(info.value)) < 200
