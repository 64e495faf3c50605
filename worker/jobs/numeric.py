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

from shared.arrays.copying import _pool as _copy_pool
from shared.arrays.copying import copy_into
from shared.arrays.copying import copy_threads as _copy_threads
from shared.registry import (
    ArraySpec,
    HasShapeAndDtype,
    InputError,
    ProgressReporter,
    human_bytes,
    job,
)
from shared.splits import MAX_PARTIAL_BYTES, NotSplittable, Output, PartInfo, Split

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


# --- splits: how each built-in runs as parts (shared/splits.py) ------------------------------
#
# Reductions cut along the reduced axis (axis null: the outer axis), so a part's partial is the
# reduced shape, never the input's. In-place outputs are written with `out=` or block by block,
# so no part holds a private copy of its slice of the result.

# Work on a part's slice in blocks of about this many bytes where a whole-slice call would
# allocate temporaries the size of the slice.
_SPLIT_BLOCK_BYTES = 4 << 20


def _flags_order(arr: HasShapeAndDtype) -> Literal["C", "F"]:
    """The memory order of an input: an ndarray's flags, metadata's `order` (C if unknown)."""
    flags = getattr(arr, "flags", None)
    if flags is not None:
        return "F" if len(arr.shape) > 1 and flags.f_contiguous and not flags.c_contiguous else "C"
    order = getattr(arr, "order", "C")
    return "F" if order == "F" and len(arr.shape) > 1 else "C"


def _outer_axis(arr: HasShapeAndDtype) -> int:
    """The axis whose slices are contiguous blocks: 0 in C order, the last in F order."""
    return len(arr.shape) - 1 if _flags_order(arr) == "F" else 0


def _other_axis(arr: HasShapeAndDtype, axis: int, what: str) -> int:
    """The longest axis other than `axis` (the outer one on ties), to split an operation that
    works along `axis` independently for every other index."""
    shape = _shape(arr)
    others = [d for d in range(len(shape)) if d != axis]
    if not others:
        raise NotSplittable(f"{what} of a 1-D array works along its only axis")
    outer = _outer_axis(arr)
    return max(others, key=lambda d: (shape[d], d == outer))


def _slice(x: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    """A view of x[lo:hi] along `axis`."""
    index: list[slice] = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi)
    return x[tuple(index)]


def _npy_bytes(elements: int, itemsize: int, arrays: int = 1) -> int:
    """Bytes of `arrays` partial arrays of `elements` each, as base64 `.npy` in JSON."""
    return arrays * ((elements * itemsize + 128) * 4 // 3 + 64)


def _bounded(split: Split, what: str) -> Split:
    if split.partial_bytes > MAX_PARTIAL_BYTES:
        raise NotSplittable(
            f"{what}: each part's partial would take about {human_bytes(split.partial_bytes)},"
            f" more than the {human_bytes(MAX_PARTIAL_BYTES)} a partial may; reduce along"
            " another axis or run it as one job"
        )
    return split


def _reduction_axis(arr: HasShapeAndDtype, axis: int | None, what: str) -> int:
    """The split axis of a reduction: the reduced one, or the outer one for axis null."""
    if not arr.shape:
        raise NotSplittable(f"{what} of a 0-dimensional input has nothing to split")
    return _outer_axis(arr) if axis is None else axis % len(arr.shape)


def _scalar_or(value: Any) -> Any:
    """NumPy's look of a reduction's result: a scalar for 0-d, an ndarray otherwise."""
    arr = np.asarray(value)
    return arr[()] if arr.ndim == 0 else arr


def _reduce_split(
    arrays: Arrays, params: _AxisParams, what: str, part: Any, combine: Any, per: int
) -> Split:
    a = arrays["a"]
    split_axis = _reduction_axis(a, params.axis, what)
    left = _reduced(a, params.axis)
    split = Split(
        inputs={"a": split_axis},
        part=part,
        combine=combine,
        partial_bytes=_npy_bytes(left, per),
    )
    return _bounded(split, what)


def _sum_part(arrays: dict[str, np.ndarray], params: Any, out: Any, info: PartInfo) -> Any:
    return np.sum(arrays["a"], axis=params.axis)


def _sum_combine(partials: list[Any], params: Any) -> Any:
    with _quiet():
        total = partials[0]
        for p in partials[1:]:
            total = total + p
    return _scalar_or(total)


def _split_sum(arrays: Arrays, params: _AxisParams) -> Split:
    return _reduce_split(arrays, params, "sum", _sum_part, _sum_combine, 16)


def _mean_acc(dtype: np.dtype) -> np.dtype:
    """np.mean's accumulator: float64 for ints and bools, float32 for float16."""
    kind = np.dtype(dtype)
    if kind.kind in "biu":
        return np.dtype(np.float64)
    return np.dtype(np.float32) if kind == np.float16 else kind


def _mean_part(arrays: dict[str, np.ndarray], params: Any, out: Any, info: PartInfo) -> Any:
    a = arrays["a"]
    count = a.size if params.axis is None else a.shape[params.axis]
    return {"n": int(count), "s": np.sum(a, axis=params.axis, dtype=_mean_acc(a.dtype))}


def _split_mean(arrays: Arrays, params: _AxisParams) -> Split:
    dtype = np.mean(np.zeros(1, dtype=arrays["a"].dtype)).dtype

    def combine(partials: list[Any], p: Any) -> Any:
        n = sum(int(q["n"]) for q in partials)
        with _quiet():
            total = partials[0]["s"]
            for q in partials[1:]:
                total = total + q["s"]
            return _scalar_or((np.asarray(total) / n).astype(dtype))

    return _reduce_split(arrays, params, "mean", _mean_part, combine, 16)


# Moments of a part: count (one number: the split axis is the reduced one), mean and M2 (the
# sum of squared deviations), merged pairwise with Chan et al.'s update.
Moments = tuple[int, np.ndarray, np.ndarray]


def _merge_moments(x: Moments, y: Moments) -> Moments:
    na, ma, qa = x
    nb, mb, qb = y
    if nb == 0:
        return x
    if na == 0:
        return y
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    sq = (delta * np.conj(delta)).real if np.iscomplexobj(delta) else delta * delta
    return n, mean, qa + qb + sq * (na * nb / n)


def _merge_all(moments: list[Moments]) -> Moments:
    """Pairwise (a balanced tree), so rounding grows with log(parts), not parts."""
    while len(moments) > 1:
        pairs = [_merge_moments(*moments[i : i + 2]) for i in range(0, len(moments) - 1, 2)]
        moments = pairs + ([moments[-1]] if len(moments) % 2 else [])
    return moments[0]


def _block_moments(x: np.ndarray, axis: int | None, split_axis: int) -> Moments:
    """(count, mean, M2) of `x` reduced along `axis` (None: all), in float64 (complex128 for
    complex input), block by block along `split_axis` so temporaries stay small."""
    acc = np.complex128 if x.dtype.kind == "c" else np.float64
    count_of = x.size if axis is None else x.shape[axis]
    if count_of == 0 or x.size == 0:
        kept = -1 if axis is None else axis % x.ndim
        shape = tuple(n for d, n in enumerate(x.shape) if axis is not None and d != kept)
        return 0, np.zeros(shape, acc), np.zeros(shape, np.float64)
    row = max(1, x.nbytes // max(1, x.shape[split_axis]))
    step = max(1, _SPLIT_BLOCK_BYTES // row)
    moments: list[Moments] = []
    for start in range(0, x.shape[split_axis], step):
        block = _slice(x, split_axis, start, start + step)
        n = block.size if axis is None else block.shape[axis]
        mean = np.mean(block, axis=axis, dtype=acc)
        dev = block - (mean if axis is None else np.expand_dims(mean, axis))
        sq = (dev * np.conj(dev)).real if dev.dtype.kind == "c" else dev * dev
        moments.append((int(n), np.asarray(mean), np.asarray(np.sum(sq, axis=axis))))
    return _merge_all(moments)


def _split_std(arrays: Arrays, params: Any) -> Split:
    a = arrays["a"]
    with _quiet():
        dtype = np.std(np.zeros(2, dtype=a.dtype)).dtype
    split_axis = _reduction_axis(a, params.axis, "std")

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
        n, mean, m2 = _block_moments(arrs["a"], p.axis, split_axis)
        return {"n": n, "mean": mean, "m2": m2}

    def combine(partials: list[Any], p: Any) -> Any:
        n, _, m2 = _merge_all([(int(q["n"]), q["mean"], q["m2"]) for q in partials])
        with _quiet():
            var = np.asarray(m2) / max(n - p.ddof, 0)
            return _scalar_or(np.sqrt(var).astype(dtype))

    split = Split(
        inputs={"a": split_axis},
        part=part,
        combine=combine,
        partial_bytes=_npy_bytes(_reduced(a, params.axis), 16, 2),
    )
    return _bounded(split, "std")


def _split_extreme(ufunc: np.ufunc, what: str) -> Callable[[Arrays, Any], Split]:
    def split(arrays: Arrays, params: Any) -> Split:
        def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
            return ufunc.reduce(arrs["a"], axis=p.axis)

        def combine(partials: list[Any], p: Any) -> Any:
            result = partials[0]
            for q in partials[1:]:
                result = ufunc(result, q)  # propagates NaN as np.min/np.max do
            return _scalar_or(result)

        item = np.dtype(arrays["a"].dtype).itemsize
        return _reduce_split(arrays, params, what, part, combine, item)

    return split


def _minmax_blocks(x: np.ndarray) -> tuple[Any, Any]:
    """x.min() and x.max() in one pass over memory (each block is read twice from cache)."""
    if not x.flags.forc:
        return x.min(), x.max()
    flat = x.reshape(-1, order="A")
    step = max(1, (1 << 20) // max(1, flat.itemsize))
    lows, highs = [], []
    for start in range(0, flat.size, step):
        block = flat[start : start + step]
        lows.append(block.min())
        highs.append(block.max())
    return np.min(lows), np.max(highs)


def _split_histogram(arrays: Arrays, params: Any) -> Split:
    """Parts count their slice with the same edges, and counts add exactly. Without `range`
    the edges come from the whole array's min and max, which every part computes itself (its
    halo is the whole array): one cheap pass, against refusing to split the expensive one."""
    a = arrays["a"]
    if not a.shape:
        raise NotSplittable("histogram of a 0-dimensional input has nothing to split")
    axis = _outer_axis(a)
    length = _shape(a)[axis]
    halo = {} if params.range is not None else {"a": (length, length)}

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
        x = arrs["a"]
        bounds = p.range
        if bounds is None and x.size:
            bounds = _minmax_blocks(x)  # NumPy's own autodetected range, as a.dtype scalars
        own = _slice(x, axis, info.before, info.before + info.stop - info.start)
        counts, edges = np.histogram(own, bins=p.bins, range=bounds)
        return {"counts": counts, "edges": edges}

    def combine(partials: list[Any], p: Any) -> dict[str, np.ndarray]:
        counts = partials[0]["counts"].copy()
        for q in partials[1:]:
            counts += q["counts"]
        edges = partials[0]["edges"]
        if p.density:  # as np.histogram computes it
            db = np.array(np.diff(edges), float)
            with _quiet():
                return {"counts": counts / db / counts.sum(), "edges": edges}
        return {"counts": counts, "edges": edges}

    split = Split(
        inputs={"a": axis},
        part=part,
        combine=combine,
        halo=halo,
        partial_bytes=_npy_bytes(params.bins + 1, 8, 2),
    )
    return _bounded(split, "histogram")


def _plain_order(
    fn: Callable[[np.ndarray], np.ndarray], arr: HasShapeAndDtype
) -> Literal["C", "F"]:
    """The order the runner stores `fn`'s result in (see worker/runner.py store_ndarray),
    found by running `fn` on a 2x2x... stand-in with the input's dtype and order."""
    ndim = len(arr.shape)
    if ndim < 2 or ndim > 12:
        return "C"
    dummy = np.zeros((2,) * ndim, dtype=arr.dtype, order=_flags_order(arr))
    with _quiet():
        res = fn(dummy)
    return "F" if res.flags.f_contiguous and not res.flags.c_contiguous else "C"


def _split_matmul(arrays: Arrays, params: Any) -> Split:
    a, b = arrays["a"], arrays["b"]
    if len(a.shape) != 2:
        raise NotSplittable("matmul splits the rows of a 2-D 'a'; this 'a' is 1-D")
    rows = _shape(a)[0]
    shape = (rows,) if len(b.shape) == 1 else (rows, _shape(b)[-1])
    dtype = np.result_type(a.dtype, b.dtype)

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
        np.matmul(arrs["a"], arrs["b"], out=out)

    return Split(inputs={"a": 0}, part=part, output=Output(shape, dtype, "C", 0))


def _fft_transform(params: Any) -> Callable[..., np.ndarray]:
    return np.fft.rfft if params.real else np.fft.fft


def _split_fft(arrays: Arrays, params: Any) -> Split:
    a = arrays["a"]
    shape = list(_shape(a))
    axis = params.axis % len(shape)
    split_axis = _other_axis(a, axis, "an FFT")
    transform = _fft_transform(params)
    n = params.n if params.n is not None else shape[axis]
    shape[axis] = n // 2 + 1 if params.real else n

    def plain(x: np.ndarray) -> np.ndarray:
        spectrum = transform(x, n=params.n, axis=params.axis, norm=params.norm)
        return np.abs(spectrum) if params.mode == "magnitude" else spectrum

    order = _plain_order(plain, a)
    spectrum_dtype = transform(np.zeros(1, dtype=a.dtype), n=1).dtype
    dtype = np.abs(np.zeros(1, spectrum_dtype)).dtype if params.mode == "magnitude" else None

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
        x = arrs["a"]
        if p.mode == "complex":
            transform(x, n=p.n, axis=p.axis, norm=p.norm, out=out)
            return
        # the magnitude: one block's spectrum at a time, never the slice's
        row = max(1, (out.nbytes * 2) // max(1, x.shape[split_axis]))
        step = max(1, _SPLIT_BLOCK_BYTES // row)
        for start in range(0, x.shape[split_axis], step):
            cut = _slice(x, split_axis, start, start + step)
            spectrum = transform(cut, n=p.n, axis=p.axis, norm=p.norm)
            np.abs(spectrum, out=_slice(out, split_axis, start, start + step))

    out_dtype = np.dtype(dtype if dtype is not None else spectrum_dtype)
    return Split(
        inputs={"a": split_axis},
        part=part,
        output=Output(tuple(shape), out_dtype, order, split_axis),
    )


def _merge_runs(flat: np.ndarray, bounds: list[tuple[int, int]]) -> None:
    """Merge the sorted runs flat[lo:hi] (adjacent, covering `flat`) in place: a stable sort
    finds the runs (timsort) and merges them in linear time."""
    if len(bounds) > 1:
        flat.sort(kind="stable")


def _flat_view(x: np.ndarray) -> np.ndarray:
    """The values of `x` as 1-D, a view in memory order when `x` is contiguous."""
    return x.reshape(-1, order="A") if x.flags.forc else x.ravel()


def _sort_bucket(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
    x = _flat_view(arrs["a"])
    flat = out.reshape(-1, order="A")
    parts = info.total
    if parts == 1:  # one job: the copy into the result segment on every core
        copy_into(flat, x)
        flat.sort(kind=p.kind)
        return
    # the same sample in every part: evenly spaced values, NaNs left out (they sort last)
    sample = np.sort(x[:: max(1, x.size // (1024 * parts))])
    if sample.dtype.kind == "f":
        sample = sample[~np.isnan(sample)]
    if sample.size == 0:
        lo = hi = None
    else:
        picks = [sample[min(sample.size - 1, sample.size * i // parts)] for i in range(parts + 1)]
        lo = picks[info.index] if info.index > 0 else None
        hi = picks[info.index + 1] if info.index < parts - 1 else None
    if lo is None and hi is None and info.index > 0:
        return  # no splitters (all NaN, or nothing): the first part takes everything
    step = max(1, (1 << 20) // max(1, x.itemsize))
    if hi is None and lo is not None:
        # The last bucket ends where the output ends: filled backwards in one pass (the order
        # inside a bucket does not matter before its sort), no count of what comes before.
        end = x.size
        for start in range(0, x.size, step):
            block = x[start : start + step]
            mask = ~(block < lo)
            k = int(np.count_nonzero(mask))
            if k:
                np.compress(mask, block, out=flat[end - k : end])
                end -= k
        flat[end:].sort(kind=p.kind)
        return
    pos = 0
    if lo is not None:  # values below this bucket come first
        for start in range(0, x.size, step):
            pos += int(np.count_nonzero(x[start : start + step] < lo))
    begin = pos
    for start in range(0, x.size, step):
        block = x[start : start + step]
        if hi is None:
            mask = ~(block < lo) if lo is not None else np.ones(block.shape, bool)
        elif lo is None:
            mask = block < hi
        else:
            mask = (block >= lo) & (block < hi)
        k = int(np.count_nonzero(mask))
        if k:
            np.compress(mask, block, out=flat[pos : pos + k])
            pos += k
    flat[begin:pos].sort(kind=p.kind)


def _split_sort(arrays: Arrays, params: Any) -> Split:
    a = arrays["a"]
    shape = _shape(a)
    if not shape:
        raise NotSplittable("sort of a 0-dimensional input has nothing to split")
    order = _flags_order(a)
    size = math.prod(shape)
    if params.axis is not None:
        axis = params.axis % len(shape)
        rest = size // shape[axis] if shape[axis] else 0
        if len(shape) > 1 and rest > 1:
            # rows along `axis` are independent: each part sorts its own rows in place
            split_axis = _other_axis(a, axis, "sort")

            def rows(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
                np.copyto(out, arrs["a"])
                out.sort(axis=axis, kind=p.kind)

            output = Output(shape, np.dtype(a.dtype), order, split_axis)
            return Split(inputs={"a": split_axis}, part=rows, output=output)
    split_axis = _outer_axis(a)
    out_shape = (size,) if params.axis is None else shape
    out_order = "C" if params.axis is None else order
    if np.dtype(a.dtype).kind in "iuf":
        # The flattened sort (or one row only), as a sample sort: every part sees the whole
        # input (its halo), picks the same splitters from the same sample, counts the values
        # below its own splitter, copies the values of its bucket to that place in the output
        # and sorts them there. No merge, no buffer; two passes over the input per part.
        length = shape[split_axis]
        return Split(
            inputs={"a": split_axis},
            part=_sort_bucket,
            output=Output(out_shape, np.dtype(a.dtype), out_order, 0, lambda lo, hi: (0, 1 << 62)),
            halo={"a": (length, length)},
        )
    # Other dtypes: each part sorts its share of the values into its own range of the output,
    # and the combine merges the sorted runs in place.
    per = size // shape[split_axis] if shape[split_axis] else 0

    def runs(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> list[int]:
        x = arrs["a"]
        flat = out.reshape(-1)
        if params.axis is None:
            np.copyto(flat.reshape(x.shape, order="F" if order == "F" else "C"), x)
        else:
            np.copyto(flat.reshape(x.shape), x)
        flat.sort(kind=p.kind)
        return [info.start * per, info.stop * per]

    def merge(out: np.ndarray, partials: list[Any], p: Any) -> None:
        _merge_runs(out.reshape(-1, order="A"), [(int(lo), int(hi)) for lo, hi in partials])

    if params.axis is None:
        output = Output(out_shape, np.dtype(a.dtype), "C", 0, lambda lo, hi: (lo * per, hi * per))
    else:
        output = Output(out_shape, np.dtype(a.dtype), order, split_axis)
    return Split(inputs={"a": split_axis}, part=runs, output=output, combine=merge)


def _split_convolve(arrays: Arrays, params: Any) -> Split:
    """Overlap-add: parts own ranges of the longer input; each writes the full convolution's
    range it owns and returns the tail that spills into the next parts' ranges, which the
    combine adds."""
    a, v = arrays["a"], arrays["v"]
    n_a, n_v = _shape(a)[0], _shape(v)[0]
    longer, shorter = ("v", "a") if n_v > n_a else ("a", "v")
    n, m = max(n_a, n_v), min(n_a, n_v)
    dtype = np.convolve(np.zeros(1, a.dtype), np.zeros(1, v.dtype)).dtype
    full = n + m - 1
    offset, length = {"full": (0, full), "same": ((m - 1) // 2, n), "valid": (m - 1, n - m + 1)}[
        params.mode
    ]

    def owned(lo: int, hi: int) -> tuple[int, int]:
        return lo - offset, (full if hi >= n else hi) - offset

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
        x, k = arrs[longer], arrs[shorter]
        own_hi = full if info.stop >= n else info.stop
        # full-convolution indices: this part writes [w_lo, w_hi) of them into `out`
        w_lo = max(info.start, offset)
        w_hi = max(w_lo, min(own_hi, offset + length))
        out[...] = 0
        tail = np.zeros(m - 1 if own_hi < full else 0, dtype)
        block = max(1024, CONVOLVE_BLOCK_WORK // max(1, m))
        for bs in range(0, x.shape[0], block):
            c = np.convolve(x[bs : bs + block], k)
            lo = info.start + bs  # the full index of c[0]
            # into `out`
            s, e = max(lo, w_lo), min(lo + len(c), w_hi)
            if e > s:
                out[s - w_lo : e - w_lo] += c[s - lo : e - lo]
            # into the tail (indices from own_hi on)
            s, e = max(lo, own_hi), min(lo + len(c), own_hi + len(tail))
            if e > s:
                tail[s - own_hi : e - own_hi] += c[s - lo : e - lo]
        return {"at": own_hi - offset, "tail": tail}

    def combine(out: np.ndarray, partials: list[Any], p: Any) -> None:
        for q in partials:
            at, tail = int(q["at"]), q["tail"]
            s, e = max(at, 0), min(at + len(tail), len(out))
            if e > s:
                out[s:e] += tail[s - at : e - at]

    split = Split(
        inputs={longer: 0},
        part=part,
        output=Output((length,), dtype, "C", 0, owned),
        combine=combine,
        partial_bytes=_npy_bytes(m, dtype.itemsize),
    )
    return _bounded(split, "convolve (the shorter input sets the overlap-add tails)")


def _normalize_dtypes(a: HasShapeAndDtype, dtype: str) -> tuple[np.dtype, np.dtype]:
    """(result dtype, working dtype), as the plain job chooses them."""
    out = np.dtype(
        dtype if dtype != "auto" else ("float64" if a.dtype == np.float64 else "float32")
    )
    work = out if np.can_cast(a.dtype, out, "safe") else np.dtype(np.float64)
    return out, work


def _scale_in_place(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> None:
    x -= shift.astype(x.dtype)
    x /= scale.astype(x.dtype)


def _minmax_stats(x: np.ndarray, over: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    with _quiet():
        return {
            "min": np.nanmin(x, axis=over, keepdims=True),
            "max": np.nanmax(x, axis=over, keepdims=True),
        }


def _zscore_stats(x: np.ndarray, over: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    with _quiet():
        n = np.sum(~np.isnan(x), axis=over, keepdims=True)
        mean = np.nanmean(x, axis=over, keepdims=True, dtype=np.float64)
        m2 = np.nanvar(x, axis=over, keepdims=True, dtype=np.float64) * n
    return {"n": n, "mean": np.where(n > 0, mean, 0.0), "m2": np.where(n > 0, m2, 0.0)}


def _merge_stats(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "min" in x:
        return {"min": np.fmin(x["min"], y["min"]), "max": np.fmax(x["max"], y["max"])}
    na, nb = x["n"], y["n"]
    n = na + nb
    safe = np.where(n > 0, n, 1)
    delta = y["mean"] - x["mean"]
    mean = x["mean"] + delta * (nb / safe)
    return {"n": n, "mean": mean, "m2": x["m2"] + y["m2"] + delta * delta * (na * nb / safe)}


def _shift_scale(stats: dict[str, np.ndarray], work: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The plain job's shift and scale from merged stats (a constant channel maps to 0)."""
    with _quiet():
        if "min" in stats:
            shift = stats["min"].astype(work)
            scale = stats["max"].astype(work) - shift
        else:
            n = stats["n"]
            shift = np.where(n > 0, stats["mean"], np.nan)
            scale = np.sqrt(stats["m2"] / n)
        return shift, np.where(scale == 0, 1, scale)


def _threaded(tasks: list[Callable[[], None]]) -> None:
    """Run `tasks` on the copy pool's threads and this one (NumPy releases the GIL)."""
    if len(tasks) <= 1:
        for t in tasks:
            t()
        return
    futures = [_copy_pool().submit(t) for t in tasks[1:]]
    try:
        tasks[0]()
    finally:
        for f in futures:
            f.result()


def _split_normalize(arrays: Arrays, params: Any) -> Split:
    a = arrays["a"]
    shape = _shape(a)
    if not shape:
        raise NotSplittable("normalize of a 0-dimensional input has nothing to split")
    ndim = len(shape)
    out_dtype, work = _normalize_dtypes(a, params.dtype)
    order = _flags_order(a)
    ch = None if params.channel_axis is None else params.channel_axis % ndim
    over = None if ch is None else tuple(d for d in range(ndim) if d != ch)
    outer = _outer_axis(a)
    output_of = Output(shape, out_dtype, order, outer)
    stats_of = _minmax_stats if params.method == "minmax" else _zscore_stats
    if math.prod(shape) == 0:
        return Split(inputs={"a": outer}, part=lambda *_: None, output=output_of)

    def blocks(x: np.ndarray, axis: int) -> Iterator[tuple[int, int]]:
        row = max(1, x.nbytes // max(1, x.shape[axis]) * 2)
        step = max(1, _SPLIT_BLOCK_BYTES // row)
        for start in range(0, x.shape[axis], step):
            yield start, min(start + step, x.shape[axis])

    if ch is not None and ch == outer and (shape[ch] >= 16 or ndim == 1):
        # Each part owns whole channels: it finishes them itself, block by block.
        def channels(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> None:
            x = arrs["a"]
            for lo, hi in blocks(x, ch):
                o = _slice(out, ch, lo, hi)
                w = o if work == out_dtype else _slice(x, ch, lo, hi).astype(work)
                if work == out_dtype:
                    np.copyto(o, _slice(x, ch, lo, hi), casting="unsafe")
                shift, scale = _shift_scale(stats_of(w, over), work)
                with _quiet():
                    _scale_in_place(w, shift, scale)
                if w is not o:
                    np.copyto(o, w, casting="unsafe")

        return Split(inputs={"a": ch}, part=channels, output=Output(shape, out_dtype, order, ch))

    split_axis = _other_axis(a, ch, "normalize") if ch == outer else outer
    assert split_axis is not None

    def part(arrs: dict[str, np.ndarray], p: Any, out: Any, info: PartInfo) -> Any:
        x = arrs["a"]
        stats: dict[str, np.ndarray] | None = None
        for lo, hi in blocks(x, split_axis):
            o = _slice(out, split_axis, lo, hi)
            if work == out_dtype:  # the plain job's astype, into the output
                np.copyto(o, _slice(x, split_axis, lo, hi), casting="unsafe")
                w = o
            else:
                w = _slice(x, split_axis, lo, hi).astype(work)
            s = stats_of(w, over)
            s = {k: v if ch is None else _collapse(v, ch) for k, v in s.items()}
            stats = s if stats is None else _merge_stats(stats, s)
        assert stats is not None
        shift = None
        if work != out_dtype:
            # the result dtype is narrower: write x - (this part's own shift), computed in the
            # working dtype, so the combine's rounding is relative to the part's spread
            shift, _ = _shift_scale(stats, work)
            shift = np.where(np.isnan(shift), 0, shift).astype(work)
            for lo, hi in blocks(x, split_axis):
                w = _slice(x, split_axis, lo, hi).astype(work)
                w -= _expand(shift, ch, ndim)
                np.copyto(_slice(out, split_axis, lo, hi), w, casting="unsafe")
        return {"start": info.start, "stop": info.stop, "stats": stats, "shift": shift}

    def combine(out: np.ndarray, partials: list[Any], p: Any) -> None:
        merged = partials[0]["stats"]
        for q in partials[1:]:
            merged = _merge_stats(merged, q["stats"])
        shift, scale = _shift_scale(merged, work)
        shift, scale = _expand(shift, ch, ndim), _expand(scale, ch, ndim)
        tasks: list[Callable[[], None]] = []
        for q in partials:
            lo, hi = int(q["start"]), int(q["stop"])
            delta = None if q["shift"] is None else _expand(q["shift"], ch, ndim) - shift
            for blo, bhi in _chunks(lo, hi, _copy_threads() * 4 if len(partials) == 1 else 4):
                tasks.append(_finisher(out, split_axis, blo, bhi, shift, scale, delta, work))
        _threaded(tasks)

    split = Split(
        inputs={"a": split_axis},
        part=part,
        output=Output(shape, out_dtype, order, split_axis),
        combine=combine,
        partial_bytes=_npy_bytes(1 if ch is None else shape[ch], 8, 4),
    )
    return _bounded(split, "normalize")


def _collapse(v: np.ndarray, ch: int) -> np.ndarray:
    """Per-channel stats (keepdims) as a 1-D array along the channel axis."""
    return np.asarray(v).reshape(-1) if np.ndim(v) else np.asarray(v).reshape(1)


def _expand(v: np.ndarray | None, ch: int | None, ndim: int) -> np.ndarray:
    """Stats back in the broadcastable keepdims shape of the plain job."""
    arr = np.asarray(v)
    shape = [1] * ndim
    if ch is not None:
        shape[ch] = arr.size
    return arr.reshape(shape)


def _chunks(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    n = max(1, min(n, hi - lo))
    return [(lo + (hi - lo) * i // n, lo + (hi - lo) * (i + 1) // n) for i in range(n)]


def _finisher(
    out: np.ndarray,
    axis: int,
    lo: int,
    hi: int,
    shift: np.ndarray,
    scale: np.ndarray,
    delta: np.ndarray | None,
    work: np.dtype,
) -> Callable[[], None]:
    def run() -> None:
        region = _slice(out, axis, lo, hi)
        row = max(1, region.nbytes // max(1, region.shape[axis]))
        step = max(1, (2 << 20) // row)  # two passes over a block that stays in cache
        with _quiet():
            for start in range(0, region.shape[axis], step):
                o = _slice(region, axis, start, start + step)
                if delta is None:
                    _scale_in_place(o, shift, scale)
                else:
                    w = o.astype(work)
                    w += delta
                    w /= scale
                    np.copyto(o, w, casting="unsafe")

    return run


# --- reductions and statistics ---------------------------------------------------------------


@job(name="sum", check=_axis_check(), memory=_mem_reduction, split=_split_sum)
def sum_(a: Numeric, axis: Axis = None) -> Any:
    """Sum of the elements, over all of them or along `axis`."""
    return np.sum(a, axis=axis)


@job(check=_axis_check(), memory=_mem_reduction, split=_split_mean)
def mean(a: Numeric, axis: Axis = None) -> Any:
    """Arithmetic mean, over all elements or along `axis` (nan for an empty array)."""
    with _quiet():
        return np.mean(a, axis=axis)


@job(check=_axis_check(), memory=_mem_std, split=_split_std)
def std(
    a: Numeric,
    axis: Axis = None,
    ddof: Annotated[int, Field(ge=0, description="delta degrees of freedom (1: sample)")] = 0,
) -> Any:
    """Standard deviation, over all elements or along `axis`, with `ddof` degrees of freedom."""
    with _quiet():
        return np.std(a, axis=axis, ddof=ddof)


@job(
    name="min",
    check=_checks(_axis_check(), _nonempty_reduction("min")),
    memory=_mem_reduction,
    split=_split_extreme(np.minimum, "min"),
)
def min_(a: Numeric, axis: Axis = None) -> Any:
    """Smallest element, over all elements or along `axis` (NaN if any is NaN)."""
    return np.min(a, axis=axis)


@job(
    name="max",
    check=_checks(_axis_check(), _nonempty_reduction("max")),
    memory=_mem_reduction,
    split=_split_extreme(np.maximum, "max"),
)
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


@job(memory=_mem_histogram, split=_split_histogram)
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


@job(check=_matmul_check, memory=_mem_matmul, split=_split_matmul)
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


@job(check=_fft_check, memory=_mem_fft, split=_split_fft)
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


@job(check=_convolve_check, memory=_mem_convolve, split=_split_convolve)
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


@job(check=_axis_check(), memory=_mem_sort, split=_split_sort)
def sort(
    a: Numeric,
    axis: Annotated[int | None, Field(description="axis to sort along; null: flatten")] = -1,
    kind: Literal["quicksort", "stable"] = "quicksort",
) -> np.ndarray:
    """A sorted copy of the array, along `axis` (default the last; null sorts it flattened)."""
    return np.sort(a, axis=axis, kind=kind)


@job(check=_axis_check("channel_axis"), memory=_mem_normalize, split=_split_normalize)
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
