"""forklift's Python client: sync (`Client`) and asyncio (`AsyncClient`), on httpx.

    from shared.client import Client
    with Client("http://127.0.0.1:8000") as fl:
        print(fl.submit("fib", n=30).result())

See docs/client.md for the reference and the `forklift` command line.
"""

from shared.client.aio import AsyncClient, AsyncJob
from shared.client.errors import (
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
from shared.client.handles import ArrayHandle
from shared.client.sync import Client, Job

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
