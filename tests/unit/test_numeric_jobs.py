"""The NumPy jobs: same answers as NumPy, read-only inputs untouched, bad inputs refused early."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import worker.jobs.numeric as numeric
from shared.registry import InputError, JobSpec, get_job

JOBS = [
    "sum",
    "mean",
    "std",
    "min",
    "max",
    "percentile",
    "histogram",
    "matmul",
    "fft",
    "sort",
    "svd",
    "solve",
    "convolve",
    "normalize",
]
RNG = np.random.default_rng(1234)


@dataclass(frozen=True)
class Meta:
    """What the API has before enqueue: an array's shape and dtype, no data."""

    shape: tuple[int, ...]
    dtype: np.dtype


def spec_of(name: str) -> JobSpec:
    spec = get_job(name)
    assert spec is not None, f"job {name} is not registered"
    return spec


def frozen(arr: Any, dtype: Any = None) -> np.ndarray:
    """A read-only copy, as the worker's shared-memory views are."""
    out = np.array(arr, dtype=dtype)
    out.flags.writeable = False
    return out


def run(name: str, arrays: dict[str, np.ndarray], progress: Any = None, **params: Any) -> Any:
    """Validate as the API does (JSON round trip), check metadata, then the arrays, then call."""
    spec = spec_of(name)
    arrays = {k: frozen(v) if v.flags.writeable else v for k, v in arrays.items()}
    before = {k: v.copy() for k, v in arrays.items()}
    in_api = spec.validate_params(params)
    spec.check_inputs({k: Meta(v.shape, v.dtype) for k, v in arrays.items()}, in_api)
    in_worker = spec.validate_params(json.loads(json.dumps(in_api.model_dump(mode="json"))))
    spec.check_inputs(arrays, in_worker)
    result = spec.call(in_worker, arrays, progress)
    for k, v in arrays.items():
        assert not v.flags.writeable
        np.testing.assert_array_equal(v, before[k], err_msg=f"job {name} changed input {k}")
    return result


def refused(name: str, arrays: dict[str, Any], **params: Any) -> str:
    """The InputError message for these inputs, raised from metadata alone."""
    spec = spec_of(name)
    metas = {k: Meta(tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}
    with pytest.raises(InputError) as info:
        spec.check_inputs(metas, spec.validate_params(params))
    return str(info.value)


def close(result: Any, expected: Any) -> None:
    expected = np.asarray(expected)
    result = np.asarray(result)
    assert result.shape == expected.shape
    single = result.dtype in (np.float16, np.float32, np.complex64)
    rtol, atol = (1e-4, 1e-5) if single else (1e-9, 1e-12)
    np.testing.assert_allclose(result, expected, rtol=rtol, atol=atol, equal_nan=True)


# --- registry and schemas --------------------------------------------------------------------


def test_every_job_is_registered_with_a_one_line_doc_and_a_valid_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for name in JOBS:
        spec = spec_of(name)
        described = spec.describe()
        json.dumps(described)
        schema = described["params_schema"]
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert described["doc"] and "\n" not in described["doc"], name
        assert described["inputs"], f"{name} takes no array"
        assert spec.func.__module__ == "worker.jobs.numeric"


def test_numeric_module_imports_no_celery() -> None:
    tree = ast.parse(Path(numeric.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("celery", "billiard", "worker")}


@pytest.mark.parametrize("name", JOBS)
def test_unknown_params_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        spec_of(name).validate_params({"no_such_param": 1, "q": 50})


def test_missing_and_unknown_inputs_are_refused() -> None:
    spec = spec_of("matmul")
    params = spec.validate_params({})
    with pytest.raises(InputError, match="missing array input"):
        spec.check_inputs({"a": Meta((2, 2), np.dtype("f8"))}, params)
    with pytest.raises(InputError, match="unknown array input"):
        spec.check_inputs({"a": np.eye(2), "b": np.eye(2), "c": np.eye(2)}, params)


# --- reductions ------------------------------------------------------------------------------

REDUCTIONS = {"sum": np.sum, "mean": np.mean, "std": np.std, "min": np.min, "max": np.max}
DTYPES = ["bool", "int16", "uint8", "int64", "float32", "float64", "complex128"]


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1, 2])
def test_reductions_match_numpy(name: str, dtype: str, axis: int | None) -> None:
    a = frozen(RNG.integers(0, 50, size=(3, 4, 5)) * 1.5, dtype=dtype)
    params = {} if axis is None else {"axis": axis}
    close(run(name, {"a": a}, **params), REDUCTIONS[name](a, axis=axis))


def test_std_ddof() -> None:
    a = frozen(RNG.normal(size=(6, 7)))
    close(run("std", {"a": a}, ddof=1), np.std(a, ddof=1))
    close(run("std", {"a": a}, axis=0, ddof=2), np.std(a, axis=0, ddof=2))
    with pytest.raises(ValidationError):
        spec_of("std").validate_params({"ddof": -1})


def test_scalar_results_are_numpy_scalars_or_python_numbers() -> None:
    a = frozen(np.arange(10))
    total = run("sum", {"a": a})
    assert np.ndim(total) == 0 and total == 45
    assert math.isclose(run("mean", {"a": a}), 4.5)
    assert run("min", {"a": frozen(np.array(7.0))}) == 7.0  # 0-d input, axis null


def test_reductions_on_empty_arrays_follow_numpy() -> None:
    empty = frozen(np.zeros((0, 3)))
    assert run("sum", {"a": empty}) == 0
    assert math.isnan(run("mean", {"a": empty}))
    assert math.isnan(run("std", {"a": empty}, ddof=1))
    close(run("mean", {"a": empty}, axis=0), [np.nan] * 3)
    close(run("max", {"a": empty}, axis=1), np.zeros(0))  # nothing to reduce per row: fine
    for name in ("min", "max"):
        assert "input 'a' is empty" in refused(name, {"a": empty})
        assert "length 0 along axis 0" in refused(name, {"a": empty}, axis=0)
        with pytest.raises(ValueError):  # what numpy itself would say, so the check is right
            REDUCTIONS[name](empty, axis=0)


@pytest.mark.parametrize("name", [*REDUCTIONS, "percentile", "sort", "normalize"])
def test_axis_out_of_range_is_refused_naming_the_input(name: str) -> None:
    a = np.zeros((3, 4))
    param = "channel_axis" if name == "normalize" else "axis"
    extra = {"q": 50} if name == "percentile" else {}
    for bad in (2, -3, 99):
        message = refused(name, {"a": a}, **{param: bad}, **extra)
        assert f"axis {bad} is out of range" in message
        assert "input 'a'" in message and "(3, 4)" in message and "-2..1" in message
    scalar = refused(name, {"a": np.zeros(())}, **{param: 0}, **extra)
    assert "0-dimensional" in scalar


def test_reductions_refuse_non_numeric_metadata() -> None:
    message = refused("sum", {"a": Meta((3,), np.dtype("datetime64[s]"))})
    assert "input 'a'" in message and "datetime64" in message


# --- percentile and histogram ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", "uint16", "float32", "float64"])
def test_percentile_matches_numpy(dtype: str) -> None:
    a = frozen(RNG.integers(0, 1000, size=(20, 7)), dtype=dtype)
    close(run("percentile", {"a": a}, q=50), np.percentile(a, 50))
    close(run("percentile", {"a": a}, q=[0, 12.5, 100]), np.percentile(a, [0, 12.5, 100]))
    close(run("percentile", {"a": a}, q=[25, 75], axis=0), np.percentile(a, [25, 75], axis=0))
    close(
        run("percentile", {"a": a}, q=90, axis=-1, method="nearest"),
        np.percentile(a, 90, axis=-1, method="nearest"),
    )


def test_percentile_refusals() -> None:
    spec = spec_of("percentile")
    for bad in ({"q": 101}, {"q": -1}, {"q": [50, 100.5]}, {"q": []}, {}, {"q": "nan"}):
        with pytest.raises(ValidationError):
            spec.validate_params(bad)
    assert "complex" in refused("percentile", {"a": np.zeros(3, complex)}, q=50)
    assert "input 'a' is empty" in refused("percentile", {"a": np.zeros(0)}, q=50)
    assert "length 0 along axis 1" in refused("percentile", {"a": np.zeros((3, 0))}, q=5, axis=1)


def test_histogram_matches_numpy() -> None:
    a = frozen(RNG.normal(size=(50, 40)).astype(np.float32))
    result = run("histogram", {"a": a}, bins=17)
    counts, edges = np.histogram(a, bins=17)
    assert set(result) == {"counts", "edges"}
    np.testing.assert_array_equal(result["counts"], counts)
    close(result["edges"], edges)
    result = run("histogram", {"a": a}, bins=4, range=[-1, 1], density=True)
    counts, edges = np.histogram(a, bins=4, range=(-1, 1), density=True)
    close(result["counts"], counts)
    close(result["edges"], edges)
    ints = run("histogram", {"a": frozen(np.arange(10, dtype=np.uint8))})
    assert ints["counts"].sum() == 10 and len(ints["edges"]) == 11
    empty = run("histogram", {"a": frozen(np.zeros(0))}, bins=3)
    np.testing.assert_array_equal(empty["counts"], [0, 0, 0])


def test_histogram_refusals() -> None:
    spec = spec_of("histogram")
    spec.validate_params({"bins": 100_000})
    for bad in (
        {"bins": 0},
        {"bins": 100_001},
        {"range": [2, 1]},
        {"range": [0, "inf"]},
        {"range": [0]},
        {"range": [0, 1, 2]},
    ):
        with pytest.raises(ValidationError):
            spec.validate_params(bad)
    assert "input 'a'" in refused("histogram", {"a": np.zeros(3, complex)})


# --- linear algebra --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_shape", "b_shape"), [((3, 4), (4, 5)), ((3, 4), (4,)), ((4,), (4, 2)), ((4,), (4,))]
)
def test_matmul_matches_numpy(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    a, b = frozen(RNG.normal(size=a_shape)), frozen(RNG.normal(size=b_shape))
    close(run("matmul", {"a": a, "b": b}), a @ b)
    ints = run("matmul", {"a": frozen(a > 0, dtype=np.int32), "b": frozen(b > 0, dtype=np.int8)})
    np.testing.assert_array_equal(ints, (a > 0).astype(np.int32) @ (b > 0).astype(np.int8))


def test_matmul_refusals() -> None:
    message = refused("matmul", {"a": np.zeros((3, 4)), "b": np.zeros((5, 2))})
    assert "input 'a'" in message and "input 'b'" in message and "(3, 4)" in message
    assert "a.shape[-1] (4)" in message and "b.shape[-2] (5)" in message
    assert "b.shape[0] (3)" in refused("matmul", {"a": np.zeros((2, 2)), "b": np.zeros(3)})
    assert "input 'b' has 3 dimension" in refused(
        "matmul", {"a": np.zeros((2, 2)), "b": np.zeros((2, 2, 2))}
    )
    assert "input 'a' has dtype" in refused(
        "matmul", {"a": Meta((2,), np.dtype("U3")), "b": np.zeros(2)}
    )


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (0, 3)])
@pytest.mark.parametrize("full", [False, True])
def test_svd_matches_numpy(shape: tuple[int, int], full: bool) -> None:
    a = frozen(RNG.normal(size=shape))
    result = run("svd", {"a": a}, full_matrices=full)
    assert set(result) == {"u", "s", "vt"}
    u, s, vt = np.linalg.svd(a, full_matrices=full)
    close(result["s"], s)
    assert result["u"].shape == u.shape and result["vt"].shape == vt.shape
    k = len(s)
    close(result["u"][:, :k] * result["s"] @ result["vt"][:k], a)


def test_svd_of_other_dtypes() -> None:
    half = frozen(np.diag([3.0, 2.0, 1.0]), dtype=np.float16)
    close(run("svd", {"a": half})["s"], [3, 2, 1])
    complex_ = frozen(RNG.normal(size=(4, 3)) + 1j * RNG.normal(size=(4, 3)))
    close(run("svd", {"a": complex_})["s"], np.linalg.svd(complex_, compute_uv=False))
    close(run("svd", {"a": frozen(np.eye(3, dtype=np.uint8))})["s"], [1, 1, 1])
    assert "input 'a' has 1 dimension" in refused("svd", {"a": np.zeros(3)})


@pytest.mark.parametrize("b_shape", [(5,), (5, 3)])
def test_solve_matches_numpy(b_shape: tuple[int, ...]) -> None:
    a = frozen(RNG.normal(size=(5, 5)) + 5 * np.eye(5))
    b = frozen(RNG.normal(size=b_shape))
    x = run("solve", {"a": a, "b": b})
    close(x, np.linalg.solve(a, b))
    close(a @ x, b)
    half = run("solve", {"a": frozen(np.eye(2), dtype=np.float16), "b": frozen([1, 2], np.int8)})
    close(half, [1, 2])


def test_solve_refusals() -> None:
    message = refused("solve", {"a": np.zeros((3, 4)), "b": np.zeros(3)})
    assert "input 'a' must be a square matrix" in message and "(3, 4)" in message
    message = refused("solve", {"a": np.zeros((3, 3)), "b": np.zeros((4, 2))})
    assert "input 'b'" in message and "b.shape[0] (4)" in message
    assert "input 'b' has 3 dimension" in refused(
        "solve", {"a": np.zeros((3, 3)), "b": np.zeros((3, 1, 1))}
    )
    with pytest.raises(ValueError, match="singular"):
        run("solve", {"a": frozen(np.ones((2, 2))), "b": frozen(np.ones(2))})


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "complex64", "complex128"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_fft_matches_numpy(dtype: str, axis: int) -> None:
    a = frozen(RNG.normal(size=(6, 8, 5)) * 10, dtype=dtype)
    spectrum = run("fft", {"a": a}, axis=axis)
    assert spectrum.dtype.kind == "c"
    close(spectrum, np.fft.fft(a, axis=axis))
    close(run("fft", {"a": a}, axis=axis, mode="magnitude"), np.abs(np.fft.fft(a, axis=axis)))
    close(run("fft", {"a": a}, axis=axis, n=7, norm="ortho"), np.fft.fft(a, 7, axis, "ortho"))
    if dtype[0] != "c":
        close(run("fft", {"a": a}, axis=axis, real=True), np.fft.rfft(a, axis=axis))
        magnitude = run("fft", {"a": a}, axis=axis, real=True, mode="magnitude")
        assert magnitude.dtype.kind == "f"
        close(magnitude, np.abs(np.fft.rfft(a, axis=axis)))


def test_fft_refusals() -> None:
    message = refused("fft", {"a": np.zeros(4, complex)}, real=True)
    assert "real=true" in message and "input 'a'" in message and "complex128" in message
    assert "axis 1 is out of range for input 'a'" in refused("fft", {"a": np.zeros(4)}, axis=1)
    assert "0-dimensional" in refused("fft", {"a": np.zeros(())})
    assert "length 0 along axis -1" in refused("fft", {"a": np.zeros((3, 0))})
    close(run("fft", {"a": frozen(np.zeros((3, 0)))}, n=2), np.zeros((3, 2)))
    with pytest.raises(ValidationError):
        spec_of("fft").validate_params({"axis": None})
    with pytest.raises(ValidationError):
        spec_of("fft").validate_params({"mode": "phase"})


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize(("n", "m"), [(10, 3), (10, 4), (3, 10), (1, 1), (7, 7)])
def test_convolve_matches_numpy(mode: str, n: int, m: int) -> None:
    a, v = frozen(RNG.normal(size=n)), frozen(RNG.normal(size=m))
    close(run("convolve", {"a": a, "v": v}, mode=mode), np.convolve(a, v, mode))


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize(
    ("dtype", "n", "m"), [("float64", 5000, 37), ("int32", 37, 5000), ("bool", 4000, 3)]
)
def test_convolve_in_blocks_matches_numpy_and_reports_progress(
    monkeypatch: pytest.MonkeyPatch, mode: str, dtype: str, n: int, m: int
) -> None:
    monkeypatch.setattr(numeric, "CONVOLVE_BLOCK_WORK", 1000)
    a = frozen(RNG.integers(-3, 4, size=n), dtype=dtype)
    v = frozen(RNG.integers(-3, 4, size=m), dtype=dtype)
    reports: list[float] = []
    result = run(
        "convolve", {"a": a, "v": v}, progress=lambda f, note="": reports.append(f), mode=mode
    )
    expected = np.convolve(a, v, mode)
    assert result.dtype == expected.dtype
    close(result, expected)
    assert reports and reports == sorted(reports) and reports[-1] == 1.0
    assert all(0 < f <= 1 for f in reports)


def test_small_convolutions_report_no_progress() -> None:
    reports: list[float] = []
    run(
        "convolve",
        {"a": frozen(np.ones(10)), "v": frozen(np.ones(3))},
        progress=lambda f, note="": reports.append(f),
    )
    assert reports == []


def test_convolve_refusals() -> None:
    assert "input 'v' is empty" in refused("convolve", {"a": np.ones(3), "v": np.ones(0)})
    assert "input 'a' is empty" in refused("convolve", {"a": np.ones(0), "v": np.ones(3)})
    assert "input 'a' has 2 dimension" in refused(
        "convolve", {"a": np.ones((3, 1)), "v": np.ones(3)}
    )
    with pytest.raises(ValidationError):
        spec_of("convolve").validate_params({"mode": "circular"})


# --- sort and normalize ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "float32", "complex128", "bool"])
@pytest.mark.parametrize("axis", [-1, 0, None])
@pytest.mark.parametrize("kind", ["quicksort", "stable"])
def test_sort_matches_numpy_without_touching_the_input(
    dtype: str, axis: int | None, kind: str
) -> None:
    a = frozen(RNG.integers(0, 9, size=(5, 6)), dtype=dtype)
    np.testing.assert_array_equal(
        run("sort", {"a": a}, axis=axis, kind=kind), np.sort(a, axis=axis, kind=kind)
    )
    assert spec_of("sort").validate_params({}).axis == -1
    with pytest.raises(ValidationError):
        spec_of("sort").validate_params({"kind": "heapsort"})


def _normalized(a: np.ndarray, method: str, over: Any) -> np.ndarray:
    x = a.astype(np.float64)
    if method == "minmax":
        lo = np.nanmin(x, axis=over, keepdims=True)
        scale = np.nanmax(x, axis=over, keepdims=True) - lo
    else:
        lo = np.nanmean(x, axis=over, keepdims=True)
        scale = np.nanstd(x, axis=over, keepdims=True)
    return (x - lo) / np.where(scale == 0, 1, scale)


@pytest.mark.parametrize("method", ["minmax", "zscore"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int64", "float32", "float64", "bool"])
def test_normalize_whole_and_per_channel(method: str, dtype: str) -> None:
    image = frozen(RNG.integers(0, 256, size=(8, 9, 3)), dtype=dtype)
    out = run("normalize", {"a": image}, method=method)
    assert out.shape == image.shape
    assert out.dtype == (np.float64 if dtype == "float64" else np.float32)
    close(out, _normalized(image, method, None).astype(out.dtype))
    for channel_axis, over in ((-1, (0, 1)), (0, (1, 2))):
        per = run("normalize", {"a": image}, method=method, channel_axis=channel_axis)
        close(per, _normalized(image, method, over).astype(per.dtype))
    if method == "minmax" and dtype != "bool":
        per = run("normalize", {"a": image}, channel_axis=2, dtype="float64")
        assert per.dtype == np.float64
        close(per.min(axis=(0, 1)), [0, 0, 0])
        close(per.max(axis=(0, 1)), [1, 1, 1])


def test_normalize_edge_cases() -> None:
    constant = run("normalize", {"a": frozen(np.full((4, 4), 7, np.uint8))}, method="zscore")
    np.testing.assert_array_equal(constant, np.zeros((4, 4), np.float32))
    with_nan = frozen([0.0, np.nan, 5.0, 10.0])
    close(run("normalize", {"a": with_nan}), [0, np.nan, 0.5, 1])
    empty = run("normalize", {"a": frozen(np.zeros((0, 3), np.uint8))}, channel_axis=1)
    assert empty.shape == (0, 3) and empty.dtype == np.float32
    # int64 values beyond float32's exact range still normalize exactly into float32
    big = frozen(np.array([2**40, 2**40 + 1, 2**40 + 2], dtype=np.int64))
    close(run("normalize", {"a": big}), [0, 0.5, 1])
    assert "complex" in refused("normalize", {"a": np.zeros(3, complex)})
    with pytest.raises(ValidationError):
        spec_of("normalize").validate_params({"method": "l2"})


def test_scalar_results_encode_to_json() -> None:
    from worker.runner import encode_result  # non-array values need no runtime

    cases = [
        ("sum", {"a": frozen([1 + 2j, 3j])}, {}, {"real": 1.0, "imag": 5.0}),
        ("mean", {"a": frozen(np.zeros(0))}, {}, "nan"),
        ("max", {"a": frozen([1, 5, 2], np.uint16)}, {}, 5),
        ("percentile", {"a": frozen([1.0, 2.0, 3.0])}, {"q": 50}, 2.0),
        ("matmul", {"a": frozen([1, 2]), "b": frozen([3, 4])}, {}, 11),
    ]
    for name, arrays, params, expected in cases:
        encoded = encode_result(run(name, arrays, **params), None, None, [])  # type: ignore[arg-type]
        assert json.loads(json.dumps(encoded)) == expected, name
