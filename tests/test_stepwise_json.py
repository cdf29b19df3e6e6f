"""stepwise_json.loads gives what json.loads gives, whatever the step."""

from __future__ import annotations

import codecs
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmount.api import stepwise_json

texts = st.text(st.characters(codec="utf-8") | st.sampled_from(' \\"/\n\t\x00\ud800\U0001f600'), max_size=40)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(texts, values, max_size=6), st.integers(1, 12), st.booleans(), st.booleans())
def test_an_object_decodes_as_json_loads_decodes_it(obj, step, ascii_only, spaced):
    separators = (", ", ": ") if spaced else (",", ":")
    body = json.dumps(obj, ensure_ascii=ascii_only, separators=separators).encode("utf-8", "surrogatepass")
    expected = json.loads(body)
    buffer = bytearray(body)
    assert stepwise_json.loads(buffer, step) == expected
    assert buffer == b""  # consumed


@pytest.mark.parametrize("body", [
    b'[1, 2]', b'"a b"', b'  {"a": "x y z", "b": [1, {"c": "d e"}]}  ', b"{}", b'{"a":"\\\\"}',
    codecs.BOM_UTF8 + b'{"a": "b c"}', '{"é": "ü ö"}'.encode("utf-16"),
])  # fmt: skip
@pytest.mark.parametrize("step", [1, 2, 1 << 20])
def test_other_documents_and_encodings(body, step):
    assert stepwise_json.loads(bytearray(body), step) == json.loads(body)


@pytest.mark.parametrize("body", [
    b'{"a": "b c', b'{"a" "b"}', b'{"a": 1,}', b'{"a": 1} x', b'{a: 1}', b'{"a": "\\x"}', b'{"a": "b\x01c"}',
    b'{"a": 1 "b": 2}', b"", b"\xff\xfe\xfd",
])  # fmt: skip
@pytest.mark.parametrize("step", [1, 1 << 20])
def test_invalid_json_is_a_value_error_as_for_json_loads(body, step):
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        stepwise_json.loads(bytearray(body), step)
