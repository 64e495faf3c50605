"""The NumPy jobs' memory estimates (`@job(memory=...)`) are upper bounds of what they allocate.

The API refuses a job whose estimate passes the child's memory limit, so an estimate below
the truth would let a job through that the limit then kills. Each case runs the real job on
read-only inputs under tracemalloc (NumPy reports its array allocations to it) and compares
the peak with the estimate from the inputs' metadata alone.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import worker.jobs.numeric as numeric
from shared.registry import LimitError, all_jobs, get_job

RNG = np.random.default_rng(0)

CASES: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]] = [
    ("matmul", {}, {"a": RNG.random((3000, 1)), "b": RNG.random((1, 3000))}),
    ("svd", {"full_matrices": True}, {"a": RNG.random((3000, 2))}),
    ("svd", {}, {"a": RNG.random((800, 600))}),
    ("fft", {"n": 1 << 18}, {"a": RNG.random((8, 100))}),
    ("fft", {"real": True, "mode": "magnitude"}, {"a": RNG.random((4, 1 << 16))}),
    ("percentile", {"q": [i / 100 for i in range(10_000)], "axis": 0}, {"a": RNG.random((3, 300))}),
    ("percentile", {"q": [5, 50, 95]}, {"a": RNG.random(1 << 20)}),
    ("std", {}, {"a": RNG.random(1 << 22)}),
    ("std", {"axis": 0}, {"a": RNG.random((1000, 500)) + 1j}),
    ("sort", {"kind": "stable"}, {"a": RNG.random(1 << 21)}),
    ("sort", {"axis": None}, {"a": RNG.random((1000, 1000))}),
    ("normalize", {"method": "zscore"}, {"a": RNG.random((1000, 1000)).astype(np.float32)}),
    ("normalize", {}, {"a": (RNG.random((1000, 1000)) * 255).astype(np.uint8)}),
    ("convolve", {}, {"a": RNG.random(1 << 20), "v": RNG.random(100)}),
    ("solve", {}, {"a": RNG.random((1000, 1000)), "b": RNG.random((1000, 3))}),
    ("sum", {"axis": 1}, {"a": RNG.random((1 << 20, 1))}),
    ("mean", {"axis": 0}, {"a": RNG.integers(0, 9, (1, 1 << 20))}),
    ("min", {"axis": 1}, {"a": RNG.random((1 << 18, 2))}),
    ("max", {}, {"a": RNG.random(1 << 20)}),
    ("histogram", {"bins": 100_000}, {"a": RNG.random(1 << 20)}),
]


def test_every_numeric_job_has_an_estimate() -> None:
    names = {spec.name for spec in all_jobs() if spec.func.__module__ == numeric.__name__}
    assert names and all(get_job(n).memory is not None for n in names), names
    assert names <= {case[0] for case in CASES}, names - {case[0] for case in CASES}


@pytest.mark.parametrize(("task", "params", "arrays"), CASES, ids=[c[0] for c in CASES])
def test_estimate_is_at_least_what_the_job_allocates(
    task: str, params: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    spec = get_job(task)
    assert spec is not None
    model = spec.validate_params(params)
    for arr in arrays.values():
        arr.setflags(write=False)  # as attached from shared memory
    spec.check_inputs(arrays, model)
    estimate = spec.memory(arrays, model)
    tracemalloc.start()
    try:
        spec.call(model, arrays)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= estimate, f"{task}: allocated {peak} bytes, estimated {estimate}"


def test_a_job_over_the_limit_is_refused_with_the_limit_named() -> None:
    spec = get_job("matmul")
    assert spec is not None
    column, row = np.empty((100_000, 1)), np.empty((1, 100_000))
    model = spec.validate_params({})
    with pytest.raises(LimitError) as caught:
        spec.check_memory({"a": column, "b": row}, model, 1 << 30, "FORKLIFT_X")
    assert caught.value.limit == 1 << 30 and caught.value.setting == "FORKLIFT_X"
    assert caught.value.estimate >= 100_000 * 100_000 * 8
    assert "FORKLIFT_X" in str(caught.value) and str(1 << 30) in str(caught.value)
    spec.check_memory({"a": row, "b": column}, model, 1 << 30, "FORKLIFT_X")  # (1,1): fine
    spec.check_memory({"a": column, "b": row}, model, 0, "off")  # 0: no limit
