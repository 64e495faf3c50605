"""The seed note's four endpoints, served by uvicorn for bench/cpu.py.

`BENCH_FIB_N` is the Fibonacci number each request computes; `BENCH_CORES` sizes the
process pool (warmed at startup, as forklift's worker children are before the load).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor

from fastapi import FastAPI

from bench.common import fib

N = int(os.environ.get("BENCH_FIB_N", "30"))
CORES = int(os.environ.get("BENCH_CORES", str(len(os.sched_getaffinity(0)))))
pool: ProcessPoolExecutor | None = None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global pool
    pool = ProcessPoolExecutor(CORES)
    list(pool.map(fib, [1] * (2 * CORES)))  # start the children now, not under load
    try:
        yield
    finally:
        pool.shutdown(cancel_futures=True)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.get("/async_inline")
async def async_inline() -> dict:
    return {"fib": fib(N)}  # blocks the event loop


@app.get("/sync_inline")
def sync_inline() -> dict:
    return {"fib": fib(N)}  # thread pool: the GIL serialises it


@app.get("/sync_pool")
def sync_pool() -> dict:
    assert pool is not None
    return {"fib": pool.submit(fib, N).result()}


@app.get("/async_executor")
async def async_executor() -> dict:
    loop = asyncio.get_running_loop()
    return {"fib": await loop.run_in_executor(pool, fib, N)}
