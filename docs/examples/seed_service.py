"""The seed's situation, solved: an existing FastAPI app hands its CPU work to forklift.

In the seed, an `async def` endpoint computed fib(36) itself, and while it did, the event loop
answered nobody: 20 requests at once took 20 times one, on one core. Here the endpoint submits
the work to forklift and awaits the result: the loop stays free while a worker computes, so
`/health` answers meanwhile, and simultaneous requests run on every worker's cores.

    forklift up                                          # the stack, on 127.0.0.1:8000
    uvicorn --app-dir docs/examples seed_service:app --port 8080
    curl localhost:8080/fib/32                           # {"n":32,"fib":2178309}

`FORKLIFT_URL` and `FORKLIFT_API_KEY` say where the stack is and which key to use.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Path, Request

from forklift import AsyncClient


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncClient() as fl:  # one client, one connection pool, for the app's life
        app.state.forklift = fl
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/fib/{n}")
async def fib(n: Annotated[int, Path(ge=1, le=45)], request: Request) -> dict[str, int]:
    """The seed's CPU work, computed by a forklift worker while this loop serves others."""
    fl: AsyncClient = request.app.state.forklift
    return {"n": n, "fib": await fl.submit("fib", n=n).result()}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
