"""Every splittable built-in, run as parts in this process (shared.splits.run_locally), gives
the plain job's result: bit-exact where the operation is, allclose for floating reductions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import worker.jobs.numeric  # noqa: F401  (registers the built-ins)
from shared.registry import JobSpec, get_job
from shared.schemas import ArrayInfo
from shared.splits import NotSplittable, run_locally

# NaN and empty cases make NumPy warn (All-NaN slice, 0/0 in a density) for the plain job and
# the parts alike; the values are what is compared.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PARTS = (1, 2, 3, 7)
rng = np.random.default_rng(16)


def spec_of(name: str) -> JobSpec:
    spec = get_job(name)
    assert spec is not None
    return spec


def same(got: Any, want: Any, exact: bool) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            same(got[k], want[k], exact)
        return
    assert type(got) is type(want) or isinstance(want, np.ndarray), (type(got), type(want))
    g, w = np.asarray(got), np.asarray(want)
    assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
    if exact:
        np.testing.assert_array_equal(g, w)
    else:
        np.testing.assert_allclose(
            g,
            w,
            rtol=1e-5,
            atol=1e-6
            * (np.nanmax(np.abs(w)) if w.size and np.isfinite(np.nanmax(np.abs(w))) else 1),
            equal_nan=True,
        )
    if isinstance(want, np.ndarray) and want.ndim > 1:
        f = lambda x: x.flags.f_contiguous and not x.flags.c_contiguous  # noqa: E731
        assert f(got) == f(want), "stored order differs"


def check(name: str, arrays: dict[str, np.ndarray], params: dict[str, Any], exact: bool) -> None:
    spec = spec_of(name)
    p = spec.validate_params(params)
    spec.check_inputs(arrays, p)
    want = spec.call(p, arrays)
    for meta in (arrays, {k: ArrayInfo(v.shape, v.dtype) for k, v in arrays.items()}):
        split = spec.split_for(meta, p)
        if meta is not arrays:
            continue
        for n in PARTS:
            got = run_locally(split, arrays, p, n)
            same(got, want, exact)


def arr(shape: tuple[int, ...], dtype: str = "float64", order: str = "C") -> np.ndarray:
    if np.dtype(dtype).kind in "iu":
        x = rng.integers(-50 if np.dtype(dtype).kind == "i" else 0, 50, size=shape)
    elif np.dtype(dtype).kind == "c":
        x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    elif np.dtype(dtype).kind == "b":
        x = rng.integers(0, 2, size=shape)
    else:
        x = rng.standard_normal(shape) * 10 + 3
    return np.asarray(x, dtype=dtype, order=order)  # type: ignore[call-overload]


def with_nans(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.reshape(-1, order="A")[:: max(1, x.size // 5)] = np.nan
    return x


SHAPES = [(5,), (13, 4), (2, 3, 11), (0,), (6, 0)]
AXES = [None, 0, -1]


@pytest.mark.parametrize("name", ["sum", "mean", "std", "min", "max"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "int64", "complex128", "bool"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_reductions(name: str, dtype: str, order: str) -> None:
    exact = name in ("min", "max") or (name == "sum" and np.dtype(dtype).kind in "biu")
    for shape in SHAPES:
        for axis in AXES:
            if name in ("min", "max") and (0 in shape):
                continue
            if dtype == "bool" and name in ("mean", "std"):
                continue
            params: dict[str, Any] = {"axis": axis}
            if name == "std":
                for ddof in (0, 1, 20):
                    check(name, {"a": arr(shape, dtype, order)}, {**params, "ddof": ddof}, exact)
            else:
                check(name, {"a": arr(shape, dtype, order)}, params, exact)


@pytest.mark.parametrize("name", ["sum", "mean", "std", "min", "max"])
def test_reductions_nan(name: str) -> None:
    for axis in AXES:
        check(name, {"a": with_nans(arr((9, 5)))}, {"axis": axis}, name in ("min", "max"))


def test_std_large_offset() -> None:
    """Chan's merge keeps precision where naive sum-of-squares would not."""
    x = arr((1000, 3)) + 1e8
    check("std", {"a": x}, {"axis": None}, False)
    check("std", {"a": x}, {"axis": 0, "ddof": 1}, False)


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "uint8"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_histogram(dtype: str, order: str) -> None:
    for shape in [(101,), (17, 9), (1,), (0,)]:
        x = arr(shape, dtype, order)
        for params in [
            {},
            {"bins": 7},
            {"bins": 50, "range": [-5, 5]},
            {"density": True},
            {"bins": 3, "range": [0, 1], "density": True},
        ]:
            check("histogram", {"a": x}, params, True)
    check("histogram", {"a": np.full((10,), 3.0)}, {"bins": 4}, True)
    check("histogram", {"a": with_nans(arr((20,)))}, {"range": [-3, 3]}, True)


@pytest.mark.parametrize("method", ["minmax", "zscore"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_normalize(method: str, order: str) -> None:
    exact = method == "minmax"
    for dtype in ["float64", "float32", "int16", "uint8"]:
        for shape, ch in [
            ((31,), None),
            ((31,), 0),
            ((12, 5), None),
            ((12, 5), 1),
            ((12, 5), 0),
            ((20, 4, 3), -1),
            ((40, 3), 0),
            ((0, 3), None),
        ]:
            x = arr(shape, dtype, order)
            for out in ["auto", "float32", "float64"]:
                params = {"method": method, "channel_axis": ch, "dtype": out}
                result = np.dtype(
                    out if out != "auto" else "float64" if dtype == "float64" else "f4"
                )
                # bit-exact when the working dtype is the result's (else: per-part shifts)
                narrower = not np.can_cast(dtype, result, "safe")
                check("normalize", {"a": x}, params, exact and not narrower)
    # a narrower result than the working dtype, far from 0: the parts' own shifts keep it close
    check("normalize", {"a": arr((50, 4)) + 1e6}, {"method": method, "dtype": "float32"}, False)
    check("normalize", {"a": arr((50, 4), "int64")}, {"method": method, "channel_axis": 1}, False)
    check("normalize", {"a": with_nans(arr((30, 4)))}, {"method": method}, exact)
    check("normalize", {"a": np.ones((9, 3))}, {"method": method, "channel_axis": 1}, exact)


@pytest.mark.parametrize("dtype", ["float64", "int64", "float32"])
def test_matmul(dtype: str) -> None:
    exact = np.dtype(dtype).kind in "iu"
    for sa, sb in [
        ((13, 4), (4, 6)),
        ((13, 4), (4,)),
        ((1, 3), (3, 2)),
        ((0, 3), (3, 2)),
        ((5, 0), (0, 2)),
    ]:
        for order in ("C", "F"):
            check("matmul", {"a": arr(sa, dtype, order), "b": arr(sb, dtype, order)}, {}, exact)


@pytest.mark.parametrize("dtype", ["float64", "int32", "uint8", "float32", "complex128", "bool"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_sort(dtype: str, order: str) -> None:
    for shape in [(1,), (29,), (11, 7), (3, 5, 4), (1, 40), (40, 1), (0,), (4, 0)]:
        for axis in [None, 0, -1]:
            for kind in ["quicksort", "stable"]:
                x = arr(shape, dtype, order)
                check("sort", {"a": x}, {"axis": axis, "kind": kind}, True)
    check("sort", {"a": with_nans(arr((50,)))}, {"axis": None}, True)
    check("sort", {"a": np.full((30,), np.nan)}, {"axis": None}, True)
    check("sort", {"a": arr((300,), "int64") % 3}, {"axis": None}, True)  # few distinct values


@pytest.mark.parametrize("order", ["C", "F"])
def test_fft(order: str) -> None:
    for dtype in ["float64", "float32", "complex128", "int32"]:
        for shape, axis in [((6, 8), -1), ((6, 8), 0), ((3, 4, 5), 1), ((1, 9), 1)]:
            for params in [{}, {"n": 5}, {"mode": "magnitude"}, {"norm": "ortho", "n": 12}]:
                x = arr(shape, dtype, order)
                check("fft", {"a": x}, {**params, "axis": axis}, True)
                if dtype != "complex128":
                    check("fft", {"a": x}, {**params, "axis": axis, "real": True}, True)


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_convolve(mode: str) -> None:
    for na, nv in [(50, 7), (7, 50), (20, 20), (5, 1), (1, 1), (9, 8), (100, 30)]:
        for dtype in ["float64", "int64"]:
            a, v = arr((na,), dtype), arr((nv,), dtype)
            check("convolve", {"a": a, "v": v}, {"mode": mode}, dtype == "int64")


def test_not_splittable() -> None:
    info = ArrayInfo
    cases: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
        ("fft", {"a": info((64,), np.dtype("float64"))}, {}, "1-D"),
        (
            "matmul",
            {"a": info((4,), np.dtype("float64")), "b": info((4, 3), np.dtype("f8"))},
            {},
            "1-D",
        ),
        ("sum", {"a": info((), np.dtype("float64"))}, {}, "0-dimensional"),
        ("sum", {"a": info((2, 1 << 24), np.dtype("float64"))}, {"axis": 0}, "partial"),
        (
            "convolve",
            {"a": info((1 << 26,), np.dtype("f8")), "v": info((1 << 24,), np.dtype("f8"))},
            {},
            "partial",
        ),
        ("percentile", {"a": info((10,), np.dtype("f8"))}, {"q": 50}, "does not declare"),
        ("svd", {"a": info((10, 3), np.dtype("f8"))}, {}, "does not declare"),
        (
            "solve",
            {"a": info((3, 3), np.dtype("f8")), "b": info((3,), np.dtype("f8"))},
            {},
            "does not declare",
        ),
    ]
    for name, meta, params, why in cases:
        spec = spec_of(name)
        with pytest.raises(NotSplittable, match=why):
            spec.split_for(meta, spec.validate_params(params))
