"""forklift's Python client: sync (`Client`) and asyncio (`AsyncClient`), on httpx.

    from forklift import Client
    with Client("http://127.0.0.1:8000") as fl:
        print(fl.submit("fib", n=30).result())

See docs/client.md for the reference and the `forklift` command line.
"""

from forklift._async.client import AsyncClient, AsyncJob
from forklift._sync.client import Client, Job
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
from forklift.handles import ArrayHandle

__all__ = [
    "ArrayHandle",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ForkliftError",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "NotFound",
    "ServerError",
    "Timeout",
    "Unavailable",
]
