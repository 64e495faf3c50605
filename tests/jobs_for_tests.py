"""Jobs only the tests load (via FORKLIFT_JOB_MODULES, as a user would add their own)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import Field

from shared.registry import job


@job
def boom(message: Annotated[str, Field(max_length=200)] = "boom") -> None:
    """Always fails with `message`."""
    raise ValueError(message)


@job
def whoami() -> int:
    """The pid of the worker process running the job."""
    return os.getpid()
