"""The shared scalar-argument checks: NumPy scalars accepted, bool and NaN refused."""

import numpy as np
import pytest

from two_tower import _arguments


@pytest.mark.parametrize("value", [16, np.int64(16), np.int32(16), np.uint8(16)])
def test_integers_of_any_kind_come_back_as_python_ints(value):
    result = _arguments.integer("k", value)
    assert result == 16 and type(result) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 16.0, np.float32(16), "16", None])
def test_non_integers_are_refused_with_what_was_received(value):
    with pytest.raises(ValueError, match=r"`k` must be an integer >= 1\. Received: k="):
        _arguments.integer("k", value)


def test_integer_bounds_are_checked_and_named():
    with pytest.raises(ValueError, match=r"FaissIndex: `nlist` must be an integer in \[1, 8\]"):
        _arguments.integer("nlist", np.int64(9), maximum=8, owner="FaissIndex")
    assert _arguments.integer("seed", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        _arguments.integer("seed", -1, minimum=0)


@pytest.mark.parametrize("value", [0.9, np.float32(0.9), np.float64(0.9), 1, np.int64(1)])
def test_numbers_of_any_kind_come_back_as_python_floats(value):
    result = _arguments.number("recall", value, minimum=0, maximum=1)
    assert result == pytest.approx(float(value)) and type(result) is float


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, np.float32("nan"), True, "0.5", 1.5])
def test_non_finite_or_out_of_range_numbers_are_refused(value):
    with pytest.raises(ValueError, match=r"`recall` must be a finite number in \[0, 1\]"):
        _arguments.number("recall", value, minimum=0, maximum=1)


def test_an_open_minimum_refuses_the_bound_itself():
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        _arguments.number("temperature", 0.0, minimum=0, open_minimum=True)
    assert _arguments.number("temperature", 1e-9, minimum=0, open_minimum=True) == 1e-9


def test_booleans_choices_and_seeds():
    assert _arguments.boolean("verify", np.bool_(False)) is False
    with pytest.raises(ValueError, match=r"`verify` must be True or False\. Received: verify=1"):
        _arguments.boolean("verify", 1)
    assert _arguments.choice("pooling", "mean", ("mean", "recency")) == "mean"
    with pytest.raises(ValueError, match=r"`pooling` must be one of 'mean', 'recency'"):
        _arguments.choice("pooling", "sum", ("mean", "recency"))
    assert _arguments.seed("seed", None) is None
    assert _arguments.seed("seed", np.int64(3)) == 3
    with pytest.raises(ValueError, match="`seed` must be an integer >= 0"):
        _arguments.seed("seed", 1.0)


def test_an_unbounded_integer_reads_without_a_stray_space():
    with pytest.raises(ValueError, match=r"`start_time` must be an integer\. Received: "):
        _arguments.integer("start_time", 1.5, minimum=None)
