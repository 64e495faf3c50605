"""ArrayHandle: an array that lives on the server (an upload, a registration or a result)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArrayHandle:
    """A server-side array by id, with its metadata. Pass it to `submit` to reuse it."""

    id: str
    shape: tuple[int, ...]
    dtype: str
    order: str = "C"
    nbytes: int = 0
    domain: str = ""
    segment: str = ""
    created_at: float = 0.0
    expires_at: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ArrayHandle:
        """From the server's array metadata (`ArrayMeta`, or a job's `{"array": meta}`)."""
        return cls(
            id=str(meta["id"]),
            shape=tuple(int(d) for d in meta.get("shape", ())),
            dtype=str(meta.get("dtype", "")),
            order=str(meta.get("order", "C")),
            nbytes=int(meta.get("nbytes", 0)),
            domain=str(meta.get("domain", "")),
            segment=str(meta.get("segment", "")),
            created_at=float(meta.get("created_at", 0.0)),
            expires_at=float(meta.get("expires_at", 0.0)),
        )

    def __str__(self) -> str:
        return self.id


def array_id(ref: ArrayHandle | str) -> str:
    return ref.id if isinstance(ref, ArrayHandle) else str(ref)
