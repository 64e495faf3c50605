"""ArrayHandle: an array that lives on the server (an upload, a registration or a result);
JobOutput: one array of a job's dict result, as another job's input."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.schemas import ArrayInput, ArrayMeta


class ArrayHandle(ArrayMeta):
    """A server-side array: its `ArrayMeta` (id, shape, dtype, ...). Pass it to `submit` to
    reuse the array; `str(handle)` is its id. An array known only by its id is passed as
    `ArrayInput(array=id)`."""

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ArrayHandle:
        """From the server's array metadata (`ArrayMeta`, or a job's `{"array": meta}`)."""
        return cls.model_validate(meta)

    def __str__(self) -> str:
        return self.id


def array_id(ref: ArrayHandle | ArrayInput | str) -> str:
    if isinstance(ref, ArrayHandle):
        return ref.id
    if isinstance(ref, ArrayInput):
        return ref.array
    return str(ref)


@dataclass(frozen=True)
class JobOutput:
    """`job.output("counts")`: the array `counts` of a job's dict result, passed to `submit`
    as an input (sent as `{"job": id, "key": "counts"}`; the job itself, passed as an input,
    stands for its one array result). `job` is a `Job` or `AsyncJob` of the submitting
    client; it need not have finished, the server waits for it."""

    job: Any
    key: str
