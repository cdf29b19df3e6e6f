"""Tokens: parsing, salting (reference test vectors, §5) and redaction."""

from __future__ import annotations

import pytest

from fedmount.arvados.tokens import ApiToken, TokenError, parse_token, redact, salt_for, salted_secret

SECRET = "3kg6k6lzmp9kj5cpkcoxie963cmvjahbt2fod9zru30k1jqdmi"
TOKEN = f"v2/zhome-gj3su-077z32aux8dg2s1/{SECRET}"


@pytest.mark.parametrize(
    "cluster, salted",
    [
        ("zmock", "7fd31b61f39c0e82a4155592163218272cedacdc"),
        ("zzzzz", "282d7d172b6cfdce364c5ed12ddf7417b2d00065"),
    ],
)
def test_salting_test_vectors(cluster, salted):
    assert salted_secret(SECRET, cluster) == salted
    token = salt_for(parse_token(TOKEN), cluster)
    assert token.text == f"v2/zhome-gj3su-077z32aux8dg2s1/{salted}"
    assert token.is_salted


def test_token_of_the_target_cluster_is_sent_unchanged():
    token = parse_token(TOKEN)
    assert salt_for(token, "zhome") is token


def test_already_salted_token_is_not_salted_again():
    salted = salt_for(parse_token(TOKEN), "zmock")
    assert salt_for(salted, "zother") is salted


def test_container_token_drops_its_fourth_field_when_salted():
    token = parse_token(f"{TOKEN}/zhome-dz642-0123456789abcde")
    assert token.container_uuid == "zhome-dz642-0123456789abcde"
    assert token.text == f"{TOKEN}/zhome-dz642-0123456789abcde"
    salted = salt_for(token, "zmock")
    assert salted.container_uuid is None and salted.text.endswith("/7fd31b61f39c0e82a4155592163218272cedacdc")


def test_parse_token_fields():
    token = parse_token(f"  {TOKEN}\n")
    assert (token.uuid, token.secret, token.cluster, token.text) == (
        "zhome-gj3su-077z32aux8dg2s1",
        SECRET,
        "zhome",
        TOKEN,
    )
    assert not token.is_salted


@pytest.mark.parametrize(
    "text, words",
    [
        ("Bearer xyz", "not an Arvados token"),
        ("0123456789abcdef" * 2, "not an Arvados token"),  # too short for a v1 secret
        ("v2/zhome-tpzed-077z32aux8dg2s1/abc", "api_client_authorization"),
        ("v2/zhome-gj3su-077z32aux8dg2s1/", "secret"),
        ("v2/zhome-gj3su-077z32aux8dg2s1/ab-c", "secret"),
        ("v2/a/b/c/d", "not an Arvados token"),
    ],
)
def test_bad_tokens(text, words):
    with pytest.raises(TokenError, match=words):
        parse_token(text)


def test_repr_hides_the_secret():
    assert SECRET not in repr(parse_token(TOKEN))
    assert SECRET not in repr(ApiToken("zhome-gj3su-077z32aux8dg2s1", SECRET))


@pytest.mark.parametrize(
    "text",
    [
        f"token {TOKEN} rejected",
        f"Authorization: Bearer {SECRET}",
        f"Authorization: OAuth2 {SECRET}",
        f"GET /x?api_token={SECRET}&y=1",
        f"{TOKEN}/zhome-dz642-0123456789abcde",
    ],
)
def test_redact_masks_tokens(text):
    out = redact(text)
    assert SECRET not in out and "<token>" in out


SIGNATURE = "89118b78732c33104a4d6231e8b5a5fa1e4301e3"


@pytest.mark.parametrize(
    "hint",
    [f"+A{SIGNATURE}@65f1a2b3", f"+Rzbbbb-{SIGNATURE}@65f1a2b3", f"%2BA{SIGNATURE}@65f1a2b3"],
)
def test_redact_masks_locator_signatures_and_keeps_the_rest(hint):
    locator = f"acbd18db4cc2f85cedef654fccc4a4d8+3{hint}+K@zbbbb"
    out = redact(f'http://127.0.0.1:25107 "GET /{locator} HTTP/1.1" 200 3')
    assert SIGNATURE not in out
    assert f"/acbd18db4cc2f85cedef654fccc4a4d8+3{hint.replace(SIGNATURE, '<signature>')}+K@zbbbb " in out


def test_v1_token_is_the_bare_secret_and_cannot_be_salted():
    token = parse_token(f" {SECRET}\n")
    assert token.is_v1 and token.uuid is None and token.cluster is None and token.text == SECRET
    assert SECRET not in repr(token)
    with pytest.raises(TokenError) as info:
        salt_for(token, "zmock")
    message = str(info.value)
    assert "cluster zmock needs a v2 token" in message and "\n" not in message
    assert "arv api_client_authorization current" in message and "v2/<uuid>/<secret>" in message


def test_v2_form_of_a_v1_token_salts_like_the_v2_token():
    v2 = parse_token(SECRET).with_uuid("zhome-gj3su-077z32aux8dg2s1")
    assert v2 == parse_token(TOKEN) and not v2.is_v1
    assert salt_for(v2, "zmock").secret == "7fd31b61f39c0e82a4155592163218272cedacdc"
    with pytest.raises(TokenError, match="api_client_authorization uuid"):
        parse_token(SECRET).with_uuid("zhome-tpzed-077z32aux8dg2s1")


@pytest.mark.parametrize(
    "text",
    [f"token {SECRET} rejected", f"ARVADOS_API_TOKEN={SECRET}", f"'{SECRET}'", f"(v1 {SECRET})"],
)
def test_redact_masks_bare_v1_secrets(text):
    out = redact(text)
    assert SECRET not in out and "<token>" in out


@pytest.mark.parametrize(
    "text",
    [
        "image sha256:" + "0123456789abcdef" * 4,  # hex digests stay readable
        "block acbd18db4cc2f85cedef654fccc4a4d8+3 of zbbbb-4zz18-0123456789abcde",
        "collection " + "acbd18db4cc2f85cedef654fccc4a4d8+3" * 3,
    ],
)
def test_redact_leaves_ids_and_digests_alone(text):
    assert redact(text) == text
