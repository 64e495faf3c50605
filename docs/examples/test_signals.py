"""Testing a split without a stack: `shared.splits.run_locally` runs the parts one after the
other in this process (partials through their JSON encoding, as between workers), and the
result must be the plain function's (docs/jobs.md, "Running a job as parts (parallel)").
Run with `python -m pytest docs/examples/test_signals.py`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from myjobs.signals import moving_mean, weighted_mean
from numpy.typing import ArrayLike

from forklift import get_job
from shared.splits import NotSplittable, finish, plan, run_locally, run_part

PARTS = (1, 2, 3, 7, 50)  # 50: more parts than the shorter signals have samples
LENGTHS = (0, 1, 5, 101, 70_001)  # odd ones, and longer than a block (65536)
rng = np.random.default_rng(7)


def read_only(values: ArrayLike) -> np.ndarray:
    a = np.array(values)
    a.flags.writeable = False
    return a


def test_moving_mean_as_a_plain_function() -> None:
    x = read_only([1.0, 2.0, 3.0, 4.0])
    assert moving_mean(x).tolist() == [1.5, 2.0, 3.0, 3.5]  # the ends average two samples
    assert moving_mean(x, radius=1, edges="wrap").tolist() == [7 / 3, 2.0, 3.0, 8 / 3]
    assert moving_mean(x, radius=0).tolist() == x.tolist()


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("radius", [0, 1, 4, 30])
def test_moving_mean_in_parts_is_the_plain_function(n: int, radius: int) -> None:
    spec = get_job("moving_mean")
    assert spec is not None
    params = spec.validate_params({"radius": radius})
    x = read_only(rng.standard_normal(n) * 100)
    want = spec.call(params, {"x": x})
    # The API plans on metadata only: the split must not need the values.
    meta = {"x": SimpleNamespace(shape=x.shape, dtype=x.dtype)}
    split = spec.split_for(meta, params)
    assert split.halo == {"x": (radius, radius)}
    for parts in PARTS:
        got = run_locally(split, {"x": x}, params, parts)
        np.testing.assert_array_equal(got, want)  # the same sums in the same order: exact


def test_moving_mean_parts_write_every_element() -> None:
    """A pooled output segment may hold another array's bytes: fill it with garbage first."""
    spec = get_job("moving_mean")
    assert spec is not None
    params = spec.validate_params({"radius": 3})
    x = read_only(rng.integers(-9, 9, 1001))  # ints in, float64 out
    split = spec.split_for({"x": x}, params)
    assert split.output is not None
    out = np.full(split.output.shape, np.nan)
    partials = [run_part(split, {"x": x}, params, out, info) for info in plan(len(x), 4)]
    np.testing.assert_array_equal(finish(split, partials, params, out), moving_mean(x, 3))


def test_wrapped_edges_do_not_split() -> None:
    spec = get_job("moving_mean")
    assert spec is not None
    params = spec.validate_params({"edges": "wrap"})
    with pytest.raises(NotSplittable, match="one job"):  # the API answers 422 not_splittable
        spec.split_for({"x": np.zeros(10)}, params)


@pytest.mark.parametrize("n", LENGTHS)
def test_weighted_mean_in_parts_is_the_plain_function(n: int) -> None:
    spec = get_job("weighted_mean")
    assert spec is not None
    params = spec.validate_params({})
    arrays = {"x": read_only(rng.standard_normal(n)), "w": read_only(rng.integers(0, 5, n))}
    want = spec.call(params, arrays)
    split = spec.split_for(arrays, params)
    for parts in PARTS:
        got = run_locally(split, arrays, params, parts)
        assert isinstance(got, float)
        if math.isnan(want):  # no weight at all (n = 0, or every weight 0)
            assert math.isnan(got)
        else:  # partial sums added in another order: equal to rounding, not bit for bit
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_weighted_mean_as_a_plain_function() -> None:
    assert weighted_mean(read_only([1.0, 2.0, 4.0]), read_only([1, 0, 3])) == 3.25
    assert math.isnan(weighted_mean(read_only([1.0]), read_only([0])))
