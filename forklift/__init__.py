"""forklift, the library: the Python client (`Client`, `AsyncClient`) and the job decorator.

    from forklift import Client
    with Client() as fl:                       # FORKLIFT_URL, FORKLIFT_API_KEY, or the local stack
        print(fl.submit("fib", n=30).result())

    from forklift import AsyncClient
    async with AsyncClient() as fl:
        print(await fl.submit("fib", n=30).result())

Jobs are written with `@job` (and `ArraySpec` for array inputs; `InputError`, `LimitError`,
`HasShapeAndDtype`, `ProgressReporter` for checks and progress; `get_job` for the spec a test
checks against), re-exported from the registry the API and the workers share
(shared/registry.py): docs/jobs.md. The client's reference is docs/client.md; `AsyncClient`
is written by hand (forklift/_async/) and `Client` generated from it (forklift/_sync/, by
`python -m forklift._unasync`).
"""

from forklift._async.client import AsyncBatch, AsyncClient, AsyncJob, async_as_completed
from forklift._sync.client import Batch, Client, Job, as_completed
from forklift.errors import (
    ForkliftError,
    InvalidRequest,
    JobCancelled,
    JobError,
    JobFailed,
    NotFound,
    ServerError,
    Timeout,
    Unavailable,
)
from forklift.handles import ArrayHandle, JobOutput
from shared.registry import (
    ArraySpec,
    HasShapeAndDtype,
    InputError,
    JobSpec,
    LimitError,
    ProgressReporter,
    get_job,
    job,
)
from shared.schemas import (
    ArrayInput,
    Health,
    HealthDown,
    JobInput,
    JobStatus,
    JobView,
    Progress,
    ShmInfo,
    TaskInfo,
)

__all__ = [
    "ArrayHandle",
    "ArrayInput",
    "ArraySpec",
    "AsyncBatch",
    "AsyncClient",
    "AsyncJob",
    "Batch",
    "Client",
    "ForkliftError",
    "HasShapeAndDtype",
    "Health",
    "HealthDown",
    "InputError",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobInput",
    "JobOutput",
    "JobSpec",
    "JobStatus",
    "JobView",
    "LimitError",
    "NotFound",
    "Progress",
    "ProgressReporter",
    "ServerError",
    "ShmInfo",
    "TaskInfo",
    "Timeout",
    "Unavailable",
    "as_completed",
    "async_as_completed",
    "get_job",
    "job",
]
