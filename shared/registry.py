"""Jobs are plain functions; `@job` registers them and derives their parameter schema.

The API imports the same job modules as the workers, so params and array inputs are
validated before anything is enqueued, from one source of truth: the function's signature.

    @job
    def fib(n: Annotated[int, Field(ge=1, le=40)]) -> int: ...

    @job(check=same_inner_dimension)
    def matmul(a: Annotated[np.ndarray, ArraySpec(kinds="fiuc", ndim=2)], b: ...) -> np.ndarray:

Array parameters (annotated `np.ndarray`) are inputs; a parameter annotated `ProgressReporter`
receives a callable to report progress; every other parameter is a validated param.

A job whose memory grows with its params or its inputs' shapes (an outer product, a padded
FFT) says so with `memory=`: a function of the same metadata that returns the bytes the job
allocates in its worker child (result and working arrays). The API refuses, before anything
is queued, a job whose estimate passes the child's memory limit (`check_memory`).
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypedDict, TypeVar, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, create_model

from shared.schemas import MAX_RETRIES
from shared.splits import NotSplittable, Split, SplitFunc

_DTYPE_KIND_NAMES = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex"}


class ProgressReporter(Protocol):
    def __call__(self, fraction: float, note: str = "") -> None: ...


class HasShapeAndDtype(Protocol):
    """An ndarray or an array's metadata: what input checks may look at."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...


class InputError(ValueError):
    """Array inputs that the job cannot take (wrong dtype, ndim or shapes)."""


class LimitError(InputError):
    """A job that would allocate more than its worker child may (estimated from metadata)."""

    def __init__(self, message: str, estimate: int, limit: int, setting: str) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.limit = limit
        self.setting = setting


@dataclass(frozen=True)
class ArraySpec:
    """Constraints on one array input, checked from metadata before the job is enqueued."""

    kinds: str = "biufc"
    ndim: int | tuple[int, ...] | None = None
    description: str = ""

    def check(self, name: str, arr: HasShapeAndDtype) -> None:
        kind = np.dtype(arr.dtype).kind
        if kind not in self.kinds:
            wanted = ", ".join(_DTYPE_KIND_NAMES[k] for k in self.kinds)
            raise InputError(f"input '{name}' has dtype {arr.dtype}; this job takes {wanted}")
        if self.ndim is not None:
            allowed = (self.ndim,) if isinstance(self.ndim, int) else self.ndim
            if len(arr.shape) not in allowed:
                raise InputError(
                    f"input '{name}' has {len(arr.shape)} dimension(s) (shape {tuple(arr.shape)});"
                    f" this job takes ndim {' or '.join(map(str, allowed))}"
                )

    def describe(self) -> dict[str, Any]:
        return {
            "dtype_kinds": [_DTYPE_KIND_NAMES[k] for k in self.kinds],
            "ndim": self.ndim,
            "description": self.description,
        }


# A check or estimate takes the arrays' metadata and the job's validated params: an instance of
# the model `@job` builds from the function's signature, so its fields have no static type here
# (a check declares the fields it reads, e.g. with a Protocol).
InputCheck = Callable[[Mapping[str, HasShapeAndDtype], Any], None]
MemoryEstimate = Callable[[Mapping[str, HasShapeAndDtype], Any], int]


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


@dataclass
class JobSpec:
    name: str
    func: Callable[..., Any]
    params_model: type[BaseModel]
    arrays: dict[str, ArraySpec]
    optional_arrays: frozenset[str]
    progress_param: str | None
    check: InputCheck | None
    doc: str
    idempotent: bool = False
    memory: MemoryEstimate | None = None
    split: SplitFunc | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A job that raises is run again up to `retries` times (a submission may only lower it),
    # the n-th retry `backoff * 2**n` seconds later (at most `backoff_max`, with jitter), if
    # the exception is one of `retry_on` (worker/retrying.py).
    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 300.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def validate_params(self, params: Mapping[str, Any]) -> BaseModel:
        """Raises pydantic.ValidationError for wrong, missing or unknown params."""
        return self.params_model.model_validate(dict(params))

    def check_inputs(self, arrays: Mapping[str, HasShapeAndDtype], params: BaseModel) -> None:
        """Raises InputError; runs on metadata in the API and on the real arrays in the worker."""
        missing = [n for n in self.arrays if n not in arrays and n not in self.optional_arrays]
        if missing:
            raise InputError(f"missing array input(s): {', '.join(sorted(missing))}")
        unknown = [n for n in arrays if n not in self.arrays]
        if unknown:
            expected = ", ".join(sorted(self.arrays)) or "none"
            raise InputError(
                f"unknown array input(s): {', '.join(sorted(unknown))} (expected: {expected})"
            )
        for name, arr in arrays.items():
            self.arrays[name].check(name, arr)
        if self.check is not None:
            try:
                self.check(arrays, params)
            except InputError:
                raise
            except ValueError as exc:
                raise InputError(str(exc)) from exc

    def check_memory(
        self, arrays: Mapping[str, HasShapeAndDtype], params: BaseModel, limit: int, setting: str
    ) -> None:
        """Raises LimitError when the job's `memory` estimate passes `limit` (0: no limit).

        Run after `check_inputs`, on the same metadata: the estimate may assume valid inputs.
        """
        if self.memory is None or limit <= 0:
            return
        need = int(self.memory(arrays, params))
        if need > limit:
            raise LimitError(
                f"the job would allocate about {human_bytes(need)} ({need} bytes) for its"
                f" result and working arrays; the limit is {human_bytes(limit)} ({limit} bytes,"
                f" {setting})",
                need,
                limit,
                setting,
            )

    def split_for(self, arrays: Mapping[str, HasShapeAndDtype], params: BaseModel) -> Split:
        """How this job runs as parts for these inputs and params; NotSplittable if it
        cannot (no `split=` declared, or these shapes or params do not split)."""
        if self.split is None:
            raise NotSplittable(
                f"job '{self.name}' does not declare how it splits (@job(split=...))"
            )
        return self.split(arrays, params)

    def call(
        self,
        params: BaseModel,
        arrays: Mapping[str, Any],
        progress: ProgressReporter | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = dict(params)
        kwargs.update(arrays)
        if self.progress_param is not None:
            kwargs[self.progress_param] = progress or _no_progress
        return self.func(**kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "params_schema": self.params_model.model_json_schema(),
            "inputs": {name: spec.describe() for name, spec in self.arrays.items()},
            "splittable": self.split is not None,
            "retries": self.retries,
        }


def _no_progress(fraction: float, note: str = "") -> None:
    return None


_JOBS: dict[str, JobSpec] = {}


def _is_ndarray(annotation: Any) -> tuple[bool, ArraySpec | None]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        ok, _ = _is_ndarray(base)
        spec = next((m for m in meta if isinstance(m, ArraySpec)), None)
        return ok, spec
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _is_ndarray(args[0])
    return annotation is np.ndarray or origin is np.ndarray, None


def _build_spec(
    func: Callable[..., Any],
    name: str,
    check: InputCheck | None,
    idempotent: bool,
    memory: MemoryEstimate | None = None,
    split: SplitFunc | None = None,
    retry: RetryPolicy | None = None,
) -> JobSpec:
    hints = typing.get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    arrays: dict[str, ArraySpec] = {}
    optional: set[str] = set()
    progress_param: str | None = None
    for pname, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"job {name}: *args/**kwargs are not supported")
        annotation = hints.get(pname, Any)
        if annotation is ProgressReporter:
            progress_param = pname
            continue
        is_array, spec = _is_ndarray(annotation)
        if is_array:
            arrays[pname] = spec or ArraySpec()
            if param.default is not inspect.Parameter.empty:
                optional.add(pname)
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    model = create_model(
        f"{name}_params",
        __config__=ConfigDict(extra="forbid"),
        **fields,
    )
    return JobSpec(
        name=name,
        func=func,
        params_model=model,
        arrays=arrays,
        optional_arrays=frozenset(optional),
        progress_param=progress_param,
        check=check,
        doc=inspect.cleandoc(func.__doc__ or ""),
        idempotent=idempotent,
        memory=memory,
        split=split,
        **(retry or _NO_RETRY),
    )


JobFunc = TypeVar("JobFunc", bound=Callable[..., Any])


class RetryPolicy(TypedDict):
    """`@job`'s retry arguments, as JobSpec holds them."""

    retries: int
    backoff: float
    backoff_max: float
    retry_on: tuple[type[BaseException], ...]


_NO_RETRY: RetryPolicy = {
    "retries": 0,
    "backoff": 1.0,
    "backoff_max": 300.0,
    "retry_on": (Exception,),
}


@overload
def job(func: JobFunc, /) -> JobFunc: ...


@overload
def job(
    *,
    name: str | None = None,
    check: InputCheck | None = None,
    idempotent: bool = False,
    memory: MemoryEstimate | None = None,
    split: SplitFunc | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    backoff_max: float = 300.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> Callable[[JobFunc], JobFunc]: ...


def job(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    check: InputCheck | None = None,
    idempotent: bool = False,
    memory: MemoryEstimate | None = None,
    split: SplitFunc | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    backoff_max: float = 300.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> Any:
    """Register a plain function as a job (usable bare or with arguments); the function is
    returned unchanged, so a job is called and typed like the function it is."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries: 0 to {MAX_RETRIES}")
    if backoff < 0 or backoff_max < backoff:
        raise ValueError("backoff: 0 <= backoff <= backoff_max")
    retry: RetryPolicy = {
        "retries": retries,
        "backoff": backoff,
        "backoff_max": backoff_max,
        "retry_on": tuple(retry_on),
    }

    def register(f: JobFunc) -> JobFunc:
        job_name = name or f.__name__
        existing = _JOBS.get(job_name)
        if existing is not None and existing.func is not f:
            same_origin = (existing.func.__module__, existing.func.__qualname__) == (
                f.__module__,
                f.__qualname__,
            )
            if not same_origin:
                raise ValueError(f"job name '{job_name}' is already taken by {existing.func}")
        _JOBS[job_name] = _build_spec(f, job_name, check, idempotent, memory, split, retry)
        return f

    return register(func) if func is not None else register


def get_job(name: str) -> JobSpec | None:
    return _JOBS.get(name)


def all_jobs() -> list[JobSpec]:
    return [_JOBS[n] for n in sorted(_JOBS)]


def load_job_modules(modules: Iterable[str]) -> None:
    """Import job modules by dotted name; an import error names the module and the setting."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"cannot import job module '{module}' (from FORKLIFT_JOB_MODULES): {exc}"
            ) from exc
