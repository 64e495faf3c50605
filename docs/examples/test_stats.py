"""Testing jobs without a stack: a job is a plain function, and its spec checks what the API
checks (docs/jobs.md). Run with `python -m pytest docs/examples/test_stats.py`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from myjobs.stats import describe, pairwise_distances
from numpy.typing import ArrayLike
from pydantic import ValidationError

from forklift import InputError, LimitError, get_job


def read_only(values: ArrayLike) -> np.ndarray:
    """Inputs reach a job as read-only views of shared memory: test with the same."""
    a = np.array(values)
    a.flags.writeable = False
    return a


def test_pairwise_distances_as_a_plain_function() -> None:
    x = read_only([[0.0, 0.0], [3.0, 4.0]])
    seen: list[float] = []
    d = pairwise_distances(x, progress=lambda fraction, note="": seen.append(fraction))
    assert d.tolist() == [[0.0, 5.0], [5.0, 0.0]]
    assert seen[-1] == 1.0
    squared = pairwise_distances(
        x, lambda f, note="": None, y=read_only([[0, 1]]), metric="sqeuclidean"
    )
    assert squared.tolist() == [[1.0], [18.0]]


def test_describe_returns_json_values() -> None:
    assert describe(read_only([1.0, np.nan, 3.0])) == {
        "count": 2,
        "nan": 1,
        "mean": 2.0,
        "std": 1.0,
        "min": 1.0,
        "max": 3.0,
    }
    empty = describe(read_only(np.zeros(0)))
    assert empty["count"] == 0 and math.isnan(empty["mean"])  # stored as "nan"


def test_the_api_checks_params_and_inputs_before_enqueue() -> None:
    spec = get_job("pairwise_distances")
    assert spec is not None
    with pytest.raises(ValidationError, match="metric"):
        spec.validate_params({"metric": "cosine"})
    params = spec.validate_params({})
    x, y = np.zeros((4, 3)), np.zeros((5, 2))  # the API has metadata; arrays stand in
    with pytest.raises(InputError, match="same number of columns"):
        spec.check_inputs({"x": x, "y": y}, params)
    with pytest.raises(InputError, match="dtype complex128"):
        spec.check_inputs({"x": x.astype(complex)}, params)
    with pytest.raises(InputError, match="missing array input"):
        spec.check_inputs({"y": x}, params)
    huge = SimpleNamespace(shape=(100_000, 3), dtype=np.dtype("float64"))  # metadata only
    with pytest.raises(LimitError):  # a (100000, 100000) float64 result: 80 GB
        spec.check_memory({"x": huge}, params, limit=1 << 30, setting="the test's limit")


def test_the_worker_calls_it_with_validated_params() -> None:
    spec = get_job("describe")
    assert spec is not None
    params = spec.validate_params({"ddof": 1})  # what the API forwards, as JSON
    result = spec.call(params, {"a": read_only([1, 2, 3, 4])})
    assert result["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
