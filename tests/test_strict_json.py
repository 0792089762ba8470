"""aenet_fn.io.strict_json: JSON as Python reads it, except that a repeated key is an error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.io.strict_json import strict_json_loads

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_valid_json_reads_as_json_loads_reads_it(value):
    text = json.dumps(value)
    assert strict_json_loads(text) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"a": 1, "a": 2}', "a"),
        ('{"x": [{"b": 1, "c": 2, "b": 3}]}', "b"),
        ('{"o": {"k": {}, "k": 0}}', "k"),
    ],
)
def test_a_repeated_key_is_named_at_any_depth(text, key):
    with pytest.raises(ValueError, match=f"the key '{key}' appears twice in one JSON object"):
        strict_json_loads(text)


def test_malformed_json_still_raises_a_decode_error():
    with pytest.raises(json.JSONDecodeError):
        strict_json_loads('{"a": }')
