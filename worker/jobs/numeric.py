"""NumPy built-ins: reductions and statistics, linear algebra, FFT, sorting, filters.

Inputs arrive as read-only views of shared memory; results that are arrays are written by
the runner into new segments. Checks that metadata can answer run in the API before enqueue
(and again in the worker on the real arrays), so they look only at `.shape` and `.dtype`.
No job writes into an input: everything that would modify an array works on a copy.

Every job whose memory is not bounded by its inputs' size alone has a `memory=` estimate
(`_mem_*`, metadata only): the bytes it allocates in its child for its result, the copies
NumPy makes and LAPACK or pocketfft workspaces, rounded up. The API refuses (422) a job whose
estimate passes the child's memory limit, so `(n,1) @ (1,n)`, `svd(full_matrices)` of
`(m,1)`, a padded FFT or 10,000 percentiles along a short axis never reach a worker.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import AfterValidator, BaseModel, Field

from shared.registry import ArraySpec, HasShapeAndDtype, InputError, ProgressReporter, job

Arrays = Mapping[str, HasShapeAndDtype]
Check = Callable[[Arrays, BaseModel], None]


# The params a check or estimate reads: fields of the model `@job` builds from each signature.
class _AxisParams(Protocol):
    axis: int | None


class _PercentileParams(Protocol):
    axis: int | None
    q: float | list[float]


class _HistogramParams(Protocol):
    bins: int


class _SvdParams(Protocol):
    full_matrices: bool


class _FftParams(Protocol):
    axis: int
    n: int | None
    real: bool


class _NormalizeParams(Protocol):
    method: str
    dtype: str


Numeric = Annotated[np.ndarray, ArraySpec(kinds="biufc")]
Real = Annotated[np.ndarray, ArraySpec(kinds="iuf", description="int, uint or float values")]
Vector = Annotated[np.ndarray, ArraySpec(kinds="biufc", ndim=1)]
VectorOrMatrix = Annotated[np.ndarray, ArraySpec(kinds="biufc", ndim=(1, 2))]
Matrix = Annotated[np.ndarray, ArraySpec(kinds="biufc", ndim=2)]

Axis = Annotated[int | None, Field(description="axis to work along; null for the whole array")]
Percent = Annotated[float, Field(ge=0, le=100)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# Convolutions bigger than this many multiply-adds run in blocks (overlap-add), so the job
# reports progress and can be cancelled between blocks instead of sitting in one C call.
CONVOLVE_BLOCK_WORK = 1 << 26


# --- input checks (metadata only) ------------------------------------------------------------


def _shape(arr: HasShapeAndDtype) -> tuple[int, ...]:
    return tuple(int(n) for n in arr.shape)


def _axis_index(name: str, arr: HasShapeAndDtype, axis: int, *, none_ok: bool) -> int:
    """`axis` as an index into `arr.shape`, or InputError naming the input."""
    shape = _shape(arr)
    ndim = len(shape)
    if -ndim <= axis < ndim:
        return axis % ndim
    alternative = "; use axis null" if none_ok else ""
    if ndim == 0:
        raise InputError(
            f"axis {axis} is out of range: input '{name}' is 0-dimensional (a scalar){alternative}"
        )
    allowed = f"{-ndim}..{ndim - 1}" + (" or null" if none_ok else "")
    raise InputError(
        f"axis {axis} is out of range for input '{name}' with {ndim} dimension(s)"
        f" (shape {shape}); use {allowed}"
    )


def _checks(*checks: Check) -> Check:
    def run(arrays: Arrays, params: BaseModel) -> None:
        for check in checks:
            check(arrays, params)

    return run


def _axis_check(param: str = "axis", name: str = "a", *, none_ok: bool = True) -> Check:
    def check(arrays: Arrays, params: BaseModel) -> None:
        axis = getattr(params, param)
        if axis is not None:
            _axis_index(name, arrays[name], axis, none_ok=none_ok)

    return check


def _nonempty_reduction(what: str, name: str = "a") -> Check:
    """Reductions without an identity (min, max, percentile) need something to reduce."""

    def check(arrays: Arrays, params: BaseModel) -> None:
        arr = arrays[name]
        shape = _shape(arr)
        axis = getattr(params, "axis", None)
        if axis is None:
            if 0 in shape:
                raise InputError(f"input '{name}' is empty (shape {shape}); {what} needs values")
        elif shape[_axis_index(name, arr, axis, none_ok=True)] == 0:
            raise InputError(
                f"input '{name}' has length 0 along axis {axis} (shape {shape});"
                f" {what} needs values"
            )

    return check


def _matmul_check(arrays: Arrays, params: BaseModel) -> None:
    a, b = _shape(arrays["a"]), _shape(arrays["b"])
    inner_b = b[0] if len(b) == 1 else b[-2]
    if a[-1] != inner_b:
        where = "b.shape[0]" if len(b) == 1 else "b.shape[-2]"
        raise InputError(
            f"inner dimensions differ: input 'a' has shape {a} and input 'b' has shape {b};"
            f" a.shape[-1] ({a[-1]}) must equal {where} ({inner_b})"
        )


def _fft_check(arrays: Arrays, params: _FftParams) -> None:
    arr, axis = arrays["a"], params.axis
    shape = _shape(arr)
    if params.n is None and shape[_axis_index("a", arr, axis, none_ok=False)] == 0:
        raise InputError(
            f"input 'a' has length 0 along axis {axis} (shape {shape});"
            " an FFT needs at least one point (or give n)"
        )
    if params.real and np.dtype(arr.dtype).kind == "c":
        raise InputError(
            f"real=true takes a real input, but input 'a' is {np.dtype(arr.dtype)};"
            " use real=false for complex data"
        )


def _solve_check(arrays: Arrays, params: BaseModel) -> None:
    a, b = _shape(arrays["a"]), _shape(arrays["b"])
    if a[0] != a[1]:
        raise InputError(f"input 'a' must be a square matrix, but has shape {a}")
    if b[0] != a[0]:
        raise InputError(
            f"input 'b' has shape {b}; b.shape[0] ({b[0]}) must equal the size of 'a' ({a[0]})"
        )


def _convolve_check(arrays: Arrays, params: BaseModel) -> None:
    for name in ("a", "v"):
        if _shape(arrays[name])[0] == 0:
            raise InputError(f"input '{name}' is empty; a convolution needs at least one value")


# --- memory estimates (metadata only; run after the checks above) ---------------------------

# Scalars, small temporaries, the interpreter's own allocations during a call.
_SLACK = 1 << 20


def _count(arr: HasShapeAndDtype) -> int:
    return math.prod(_shape(arr))


def _item(dtype: Any, floor: int = 8) -> int:
    """Bytes per element of a result computed from `dtype` (ints and bools widen to 8)."""
    return max(floor, np.dtype(dtype).itemsize)


def _reduced(arr: HasShapeAndDtype, axis: int | None) -> int:
    """Elements left after reducing `arr` along `axis` (1 for the whole array)."""
    shape = _shape(arr)
    if axis is None or not shape:
        return 1
    return math.prod(n for i, n in enumerate(shape) if i != axis % len(shape))


def _mem_reduction(arrays: Arrays, params: _AxisParams) -> int:
    a = arrays["a"]
    return 16 * _reduced(a, params.axis) + _SLACK


def _mem_std(arrays: Arrays, params: _AxisParams) -> int:
    a = arrays["a"]  # np.std: the deviations from the mean, squared in place (.real: complex)
    complex_ = np.dtype(a.dtype).kind == "c"
    per = 16 + 8 if complex_ else 8
    return per * _count(a) + 16 * _reduced(a, params.axis) + _SLACK


def _mem_percentile(arrays: Arrays, params: _PercentileParams) -> int:
    a = arrays["a"]
    nq = len(params.q) if isinstance(params.q, list) else 1
    # A partitioned copy of the input; indices, lower/upper picks, weights and the result.
    copy = np.dtype(a.dtype).itemsize * _count(a)
    return copy + 6 * 8 * nq * _reduced(a, params.axis) + _SLACK


def _mem_histogram(arrays: Arrays, params: _HistogramParams) -> int:
    return 4 * 8 * (params.bins + 1) + 8 * 8 * 65536 + _SLACK  # NumPy bins 65536 at a time


def _mem_matmul(arrays: Arrays, params: BaseModel) -> int:
    a, b = arrays["a"], arrays["b"]
    sa, sb = _shape(a), _shape(b)
    rows = sa[0] if len(sa) == 2 else 1
    cols = sb[-1] if len(sb) == 2 else 1
    kind = np.result_type(a.dtype, b.dtype)
    converted = sum(_count(x) for x in (a, b) if np.dtype(x.dtype) != kind)
    return _item(kind, 1) * (rows * cols + converted) + _SLACK


def _linalg_item(dtype: Any) -> int:
    kind = np.dtype(dtype)
    if kind.kind == "c":
        return kind.itemsize
    return 4 if kind in (np.float16, np.float32) else 8


def _mem_svd(arrays: Arrays, params: _SvdParams) -> int:
    a = arrays["a"]
    m, n = _shape(a)
    k = min(m, n)
    u, vt = (m * m, n * n) if params.full_matrices else (m * k, k * n)
    # NumPy's copies of u and vt, LAPACK's copy of a and gesdd's workspace (~5k^2 + max(m,n)).
    work = m * n + 5 * k * k + 7 * k + max(m, n)
    return _linalg_item(a.dtype) * (2 * (u + vt + k) + work) + _SLACK


def _mem_solve(arrays: Arrays, params: BaseModel) -> int:
    a, b = arrays["a"], arrays["b"]
    kind = np.result_type(_linalg_ready_dtype(a.dtype), _linalg_ready_dtype(b.dtype))
    return _linalg_item(kind) * (2 * _count(a) + 3 * _count(b)) + _SLACK


def _linalg_ready_dtype(dtype: Any) -> np.dtype:
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _mem_fft(arrays: Arrays, params: _FftParams) -> int:
    a = arrays["a"]
    shape = _shape(a)
    axis = params.axis % len(shape)
    length = shape[axis]
    n = params.n if params.n is not None else length
    rows = math.prod(x for i, x in enumerate(shape) if i != axis)
    out = n // 2 + 1 if params.real else n
    # The input cropped or zero-padded to n (as complex), the spectrum, and its magnitude.
    return 16 * rows * max(n, length) + (16 + 8) * rows * out + _SLACK


def _mem_convolve(arrays: Arrays, params: BaseModel) -> int:
    a, v = arrays["a"], arrays["v"]
    n, m = _count(a), _count(v)
    item = _item(np.result_type(a.dtype, v.dtype), 1)
    return item * (2 * (n + m - 1) + n + m) + _SLACK


def _mem_sort(arrays: Arrays, params: BaseModel) -> int:
    a = arrays["a"]  # the sorted copy (flattened for axis null) and a stable sort's buffer
    return 2 * np.dtype(a.dtype).itemsize * _count(a) + _SLACK


def _mem_normalize(arrays: Arrays, params: _NormalizeParams) -> int:
    a = arrays["a"]
    kind = np.dtype(a.dtype)
    auto = "float64" if kind == np.float64 else "float32"
    out = np.dtype(params.dtype if params.dtype != "auto" else auto)
    work = out if np.can_cast(kind, out, "safe") else np.dtype(np.float64)
    # The working copy, then the result if its dtype differs; z-scores: the nan-aware mean
    # and std copy the values and a NaN mask each, plus float64 deviations.
    per = work.itemsize + (out.itemsize if out != work else 0)
    if params.method == "zscore":
        per += (2 * (work.itemsize + 1) if kind.kind == "f" else 0) + 8
    return per * _count(a) + _SLACK


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """NumPy's behaviour on empty or NaN data (nan results) without its RuntimeWarnings."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _linalg_ready(a: np.ndarray) -> np.ndarray:
    """np.linalg refuses float16; everything else it converts (and copies) itself."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _ordered_range(r: tuple[float, float]) -> tuple[float, float]:
    if r[0] > r[1]:
        raise ValueError(f"range must be [lo, hi] with lo <= hi, got [{r[0]}, {r[1]}]")
    return r


HistRange = Annotated[
    tuple[FiniteFloat, FiniteFloat],
    AfterValidator(_ordered_range),
    Field(description="[lo, hi]; values outside are ignored (default: the data's min and max)"),
]


# --- reductions and statistics ---------------------------------------------------------------


@job(name="sum", check=_axis_check(), memory=_mem_reduction)
def sum_(a: Numeric, axis: Axis = None) -> Any:
    """Sum of the elements, over all of them or along `axis`."""
    return np.sum(a, axis=axis)


@job(check=_axis_check(), memory=_mem_reduction)
def mean(a: Numeric, axis: Axis = None) -> Any:
    """Arithmetic mean, over all elements or along `axis` (nan for an empty array)."""
    with _quiet():
        return np.mean(a, axis=axis)


@job(check=_axis_check(), memory=_mem_std)
def std(
    a: Numeric,
    axis: Axis = None,
    ddof: Annotated[int, Field(ge=0, description="delta degrees of freedom (1: sample)")] = 0,
) -> Any:
    """Standard deviation, over all elements or along `axis`, with `ddof` degrees of freedom."""
    with _quiet():
        return np.std(a, axis=axis, ddof=ddof)


@job(name="min", check=_checks(_axis_check(), _nonempty_reduction("min")), memory=_mem_reduction)
def min_(a: Numeric, axis: Axis = None) -> Any:
    """Smallest element, over all elements or along `axis` (NaN if any is NaN)."""
    return np.min(a, axis=axis)


@job(name="max", check=_checks(_axis_check(), _nonempty_reduction("max")), memory=_mem_reduction)
def max_(a: Numeric, axis: Axis = None) -> Any:
    """Largest element, over all elements or along `axis` (NaN if any is NaN)."""
    return np.max(a, axis=axis)


@job(check=_checks(_axis_check(), _nonempty_reduction("percentile")), memory=_mem_percentile)
def percentile(
    a: Real,
    q: Annotated[
        Percent | Annotated[list[Percent], Field(min_length=1, max_length=10_000)],
        Field(description="percentile(s) to compute, 0..100"),
    ],
    axis: Axis = None,
    method: Literal["linear", "lower", "higher", "midpoint", "nearest"] = "linear",
) -> Any:
    """The q-th percentile(s) of the values, over all elements or along `axis`."""
    with _quiet():
        return np.percentile(a, q, axis=axis, method=method)


@job(memory=_mem_histogram)
def histogram(
    a: Real,
    bins: Annotated[int, Field(ge=1, le=100_000, description="number of equal-width bins")] = 10,
    range: HistRange | None = None,
    density: bool = False,
) -> dict[str, np.ndarray]:
    """Histogram of all the values in equal-width bins: {"counts", "edges"} (bins + 1 edges)."""
    counts, edges = np.histogram(a, bins=bins, range=range, density=density)
    return {"counts": counts, "edges": edges}


# --- linear algebra --------------------------------------------------------------------------


@job(check=_matmul_check, memory=_mem_matmul)
def matmul(a: VectorOrMatrix, b: VectorOrMatrix) -> Any:
    """Matrix product a @ b of 1-D or 2-D arrays; a.shape[-1] must equal b's first dimension."""
    return np.matmul(a, b)


@job(memory=_mem_svd)
def svd(
    a: Matrix,
    full_matrices: bool = False,
) -> dict[str, np.ndarray]:
    """Singular value decomposition a = u @ diag(s) @ vt of a 2-D array: {"u", "s", "vt"}."""
    u, s, vt = np.linalg.svd(_linalg_ready(a), full_matrices=full_matrices)
    return {"u": u, "s": s, "vt": vt}


@job(check=_solve_check, memory=_mem_solve)
def solve(a: Matrix, b: VectorOrMatrix) -> np.ndarray:
    """Solve a @ x = b for x; `a` square, b of shape (n,) or (n, k)."""
    try:
        return np.linalg.solve(_linalg_ready(a), _linalg_ready(b))
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"input 'a' is a singular matrix; no unique solution ({exc})") from None


# --- signals ---------------------------------------------------------------------------------


@job(check=_fft_check, memory=_mem_fft)
def fft(
    a: Numeric,
    axis: Annotated[int, Field(description="axis to transform along")] = -1,
    n: Annotated[int, Field(ge=1, le=1 << 28, description="length: crop or zero-pad")]
    | None = None,
    mode: Literal["complex", "magnitude"] = "complex",
    real: Annotated[
        bool, Field(description="real input only: rfft, the n//2 + 1 non-negative frequencies")
    ] = False,
    norm: Literal["backward", "ortho", "forward"] = "backward",
) -> np.ndarray:
    """Discrete Fourier transform along `axis`: complex spectrum, or its magnitude."""
    transform = np.fft.rfft if real else np.fft.fft
    spectrum = transform(a, n=n, axis=axis, norm=norm)
    return np.abs(spectrum) if mode == "magnitude" else spectrum


def _full_convolution(a: np.ndarray, v: np.ndarray, progress: ProgressReporter) -> np.ndarray:
    if len(v) > len(a):
        a, v = v, a
    n, m = len(a), len(v)
    if n * m <= CONVOLVE_BLOCK_WORK:
        return np.convolve(a, v)
    block = max(1024, CONVOLVE_BLOCK_WORK // m)
    out = np.zeros(n + m - 1, dtype=np.convolve(a[:1], v[:1]).dtype)
    starts = range(0, n, block)
    every = max(1, len(starts) // 100)
    for i, start in enumerate(starts):
        part = np.convolve(a[start : start + block], v)
        out[start : start + len(part)] += part
        if (i + 1) % every == 0:
            progress((i + 1) / len(starts), f"{min(n, start + block)} of {n} samples")
    return out


@job(check=_convolve_check, memory=_mem_convolve)
def convolve(
    a: Vector,
    v: Vector,
    progress: ProgressReporter,
    mode: Literal["full", "same", "valid"] = "full",
) -> np.ndarray:
    """Discrete linear convolution of two 1-D arrays, as np.convolve (`mode` full/same/valid)."""
    full = _full_convolution(a, v, progress)
    longer, shorter = max(len(a), len(v)), min(len(a), len(v))
    if mode == "same":
        start = (shorter - 1) // 2
        return full[start : start + longer]
    if mode == "valid":
        return full[shorter - 1 : longer]
    return full


# --- sorting and images ----------------------------------------------------------------------


@job(check=_axis_check(), memory=_mem_sort)
def sort(
    a: Numeric,
    axis: Annotated[int | None, Field(description="axis to sort along; null: flatten")] = -1,
    kind: Literal["quicksort", "stable"] = "quicksort",
) -> np.ndarray:
    """A sorted copy of the array, along `axis` (default the last; null sorts it flattened)."""
    return np.sort(a, axis=axis, kind=kind)


@job(check=_axis_check("channel_axis"), memory=_mem_normalize)
def normalize(
    a: Annotated[np.ndarray, ArraySpec(kinds="biuf", description="e.g. an image")],
    method: Literal["minmax", "zscore"] = "minmax",
    channel_axis: Annotated[
        int | None,
        Field(description="normalize each index along this axis on its own; null: whole array"),
    ] = None,
    dtype: Annotated[
        Literal["auto", "float32", "float64"],
        Field(description="result dtype; auto: float64 for float64 input, else float32"),
    ] = "auto",
) -> np.ndarray:
    """Min-max scaling to [0, 1] or z-scores, over the whole array or per channel; NaNs kept."""
    out_dtype = np.dtype(
        dtype if dtype != "auto" else ("float64" if a.dtype == np.float64 else "float32")
    )
    if a.size == 0:
        return np.zeros(a.shape, dtype=out_dtype)
    reduce_over = (
        None
        if channel_axis is None
        else tuple(d for d in range(a.ndim) if d != channel_axis % a.ndim)
    )
    # Work in float64 unless the values fit float32 exactly; astype copies, `a` stays as is.
    work = out_dtype if np.can_cast(a.dtype, out_dtype, "safe") else np.dtype(np.float64)
    out = a.astype(work)
    with _quiet():
        if method == "minmax":
            shift = np.nanmin(out, axis=reduce_over, keepdims=True)
            scale = np.nanmax(out, axis=reduce_over, keepdims=True) - shift
        else:
            shift = np.nanmean(out, axis=reduce_over, keepdims=True, dtype=np.float64)
            scale = np.nanstd(out, axis=reduce_over, keepdims=True, dtype=np.float64)
        scale = np.where(scale == 0, 1, scale)  # a constant channel maps to 0
        out -= shift.astype(work)
        out /= scale.astype(work)
    return out.astype(out_dtype, copy=False)
