"""bench/common.parse_config: the --config syntax of the benchmark scripts (CPU only)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from common import parse_config, parse_shape  # noqa: E402


def test_key_value_pairs_convert_integers_and_none():
    assert parse_config("intra_impl=split2,intra_a_BK=32,intra_a_stages=None") == {
        "intra_impl": "split2", "intra_a_BK": 32, "intra_a_stages": None}


def test_json_and_empty():
    assert parse_config('{"intra_impl": "rows", "intra_BK": 64}') == {"intra_impl": "rows", "intra_BK": 64}
    assert parse_config("") == {}


def test_item_without_equals_sign_is_an_error():
    with pytest.raises(ValueError, match="intra_impl"):
        parse_config("intra_impl")


def test_shapes_are_three_positive_integers():
    assert parse_shape("8,4096,32") == (8, 4096, 32)
    for bad in ("8,4096", "8,4096,x", "0,4096,32"):
        with pytest.raises(ValueError, match="B,T,H|positive"):
            parse_shape(bad)
