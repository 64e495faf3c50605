"""How one job runs as parts over the same segments: the contract a job author declares.

A splittable job says, from its inputs' metadata and its params, how it splits (`Split`):
which inputs are cut along which axis (each part sees a zero-copy slice, with `halo`
neighbours where it needs them; other inputs whole), and how the parts make one result:

- **in place** (`output` given): the whole output is one segment reserved before the parts
  run; each part writes its own slice of it (`out`, a writable view) and returns a small
  partial or None; `combine(out, partials, params)` then finishes the output in place if it
  must (a merge of sorted runs, the tails of an overlap-add, a global scaling);
- **combined** (`output` None): each part returns a partial (a scalar, small arrays, a dict
  of them) and `combine(partials, params)` makes the result (a sum of sums, moments into a
  standard deviation).

An output segment may be recycled (the pool hands out any owner's freed pages, on the rule
that a writer overwrites every byte before anyone can see it): the parts and the combine
together must write every element of the output.

The same declaration runs a one-part job: the API plans one part covering everything, so a
job with an in-place output writes its result straight into its segment, no copy.

`plan` cuts the range; `run_locally` runs a whole split in this process (the unit tests of
every built-in compare it with the plain job). Partials travel between processes as JSON
(`encode_partial`): ndarrays as base64 `.npy` without pickle, bounded by `MAX_PARTIAL_BYTES`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from shared.registry import HasShapeAndDtype

    Arrays = Mapping[str, HasShapeAndDtype]

# A part's partial as stored in its record, at most (the API refuses a split whose partials
# would be larger: `Split.partial_bytes`).
MAX_PARTIAL_BYTES = 16 << 20


class NotSplittable(ValueError):
    """This job cannot run as parts for these inputs or params; the message says why."""


@dataclass(frozen=True)
class PartInfo:
    """Which part this is and which slice of the split axis it owns.

    `start`/`stop` index the split inputs along `axis` (the owned range, halo excluded);
    `before`/`after` are the halo elements the part's slices really include on each side
    (fewer at the ends of the array).
    """

    index: int
    total: int
    axis: int
    start: int
    stop: int
    length: int
    before: int = 0
    after: int = 0


@dataclass(frozen=True)
class Output:
    """An array output written in place: its whole metadata, and the axis along which the
    parts own slices (`owned(start, stop)` maps a part's input range to its output range;
    the default is the same range)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    order: Literal["C", "F"] = "C"
    axis: int = 0
    owned: Callable[[int, int], tuple[int, int]] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def range_of(self, start: int, stop: int) -> tuple[int, int]:
        lo, hi = (start, stop) if self.owned is None else self.owned(start, stop)
        n = self.shape[self.axis] if self.shape else 0
        lo, hi = max(0, min(n, lo)), max(0, min(n, hi))
        return lo, max(lo, hi)


# part(arrays, params, out, info) -> partial: arrays are the part's slices (split inputs
# cut, the rest whole), out the part's writable slice of the output (None without one).
PartFunc = Callable[[dict[str, np.ndarray], Any, "np.ndarray | None", PartInfo], Any]
Combine = Callable[..., Any]


@dataclass(frozen=True)
class Split:
    """A job's split for given inputs and params (returned by its `@job(split=...)`)."""

    inputs: Mapping[str, int]
    part: PartFunc
    output: Output | None = None
    combine: Combine | None = None
    halo: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Bytes one part's partial takes at most (estimated from metadata), checked against
    # MAX_PARTIAL_BYTES before anything is queued.
    partial_bytes: int = 0

    def length(self, arrays: Arrays) -> int:
        """The split axis's length, the same for every split input."""
        lengths = {int(arrays[n].shape[axis]) for n, axis in self.inputs.items()}
        if len(lengths) != 1:
            raise NotSplittable(f"split inputs differ in length along their axes: {lengths}")
        return lengths.pop()

    def axis(self) -> int:
        return next(iter(self.inputs.values()))


SplitFunc = Callable[["Arrays", Any], Split]


def plan(length: int, parts: int, axis: int = 0) -> list[PartInfo]:
    """`parts` near-equal ranges of `length` (fewer when the length is shorter; one for 0)."""
    n = max(1, min(parts, length))
    bounds = [length * i // n for i in range(n + 1)]
    return [
        PartInfo(index=i, total=n, axis=axis, start=bounds[i], stop=bounds[i + 1], length=length)
        for i in range(n)
    ]


def with_halo(info: PartInfo, halo: tuple[int, int]) -> PartInfo:
    before = min(halo[0], info.start)
    after = min(halo[1], info.length - info.stop)
    return PartInfo(**{**info.__dict__, "before": before, "after": after})


def cut(arr: np.ndarray, axis: int, info: PartInfo) -> np.ndarray:
    """The part's zero-copy view of a split input (halo included)."""
    index: list[slice] = [slice(None)] * arr.ndim
    index[axis] = slice(info.start - info.before, info.stop + info.after)
    return arr[tuple(index)]


def out_slice(out: np.ndarray, output: Output, info: PartInfo) -> np.ndarray:
    """The part's writable view of the output: the range it owns along `output.axis`."""
    lo, hi = output.range_of(info.start, info.stop)
    index: list[slice] = [slice(None)] * out.ndim
    index[output.axis] = slice(lo, hi)
    return out[tuple(index)]


def part_arrays(
    split: Split, arrays: Mapping[str, np.ndarray], info: PartInfo
) -> tuple[dict[str, np.ndarray], PartInfo]:
    """The part's inputs (split ones cut, with their halo) and its info with the halo."""
    sliced: dict[str, np.ndarray] = {}
    seen = info
    for name, arr in arrays.items():
        axis = split.inputs.get(name)
        if axis is None:
            sliced[name] = arr
            continue
        seen = with_halo(info, split.halo.get(name, (0, 0)))
        sliced[name] = cut(arr, axis, seen)
    return sliced, seen


def run_part(
    split: Split,
    arrays: Mapping[str, np.ndarray],
    params: Any,
    out: np.ndarray | None,
    info: PartInfo,
) -> Any:
    """One part, in this process: its slices, its slice of `out`, the author's function."""
    sliced, seen = part_arrays(split, arrays, info)
    target = None
    if split.output is not None and out is not None:
        target = out_slice(out, split.output, info)
    return split.part(sliced, params, target, seen)


def finish(split: Split, partials: Sequence[Any], params: Any, out: np.ndarray | None) -> Any:
    """The job's result from its parts: `out` itself (after an in-place combine), or the
    combination of the partials."""
    if split.output is not None:
        if split.combine is not None:
            split.combine(out, list(partials), params)
        return out
    if split.combine is None:
        if len(partials) != 1:
            raise TypeError("a split without an output needs a combine function")
        return partials[0]
    return split.combine(list(partials), params)


def run_whole(
    split: Split, arrays: Mapping[str, np.ndarray], params: Any, out: np.ndarray | None
) -> Any:
    """The job as its one part (the whole range) and its combine: what a job that is not
    parallel runs, writing into `out` when the split has an in-place output."""
    (info,) = plan(split.length(arrays), 1, split.axis())
    return finish(split, [run_part(split, arrays, params, out, info)], params, out)


def run_locally(split: Split, arrays: Mapping[str, np.ndarray], params: Any, parts: int) -> Any:
    """The whole split in this process, part after part: what the workers compute together."""
    infos = plan(split.length(arrays), parts, split.axis())
    out = None
    if split.output is not None:
        out = np.empty(split.output.shape, dtype=split.output.dtype, order=split.output.order)
    partials = [
        decode_partial(encode_partial(run_part(split, arrays, params, out, info))) for info in infos
    ]
    return finish(split, partials, params, out)


# --- partials on the wire --------------------------------------------------------------------


def encode_partial(value: Any) -> Any:
    """JSON for a partial: ndarrays and NumPy scalars as tagged base64 `.npy` (no pickle)."""
    if isinstance(value, (np.ndarray, np.generic)):
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return {"__npy__": data, "scalar": isinstance(value, np.generic)}
    if isinstance(value, dict):
        return {"__dict__": {str(k): encode_partial(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [encode_partial(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"a part returned a {type(value).__name__}: partials are arrays, numbers, lists, dicts"
    )


def decode_partial(value: Any) -> Any:
    if isinstance(value, dict):
        if "__npy__" in value:
            arr = np.load(io.BytesIO(base64.b64decode(value["__npy__"])), allow_pickle=False)
            return arr[()] if value.get("scalar") else arr
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_partial(v) for k, v in value["__dict__"].items()}
    if isinstance(value, list):
        return [decode_partial(v) for v in value]
    return value
