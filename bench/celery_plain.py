"""Plain Celery, the way many users would write it: arrays pickled into the task payload.

A separate, minimal app on the bench's private Redis (its own database and queue), with the
pickle serializer and Celery's defaults otherwise. The worker runs as
`celery -A bench.celery_plain worker` with `C_FORCE_ROOT=1` (Celery refuses a
pickle-accepting worker as root otherwise) and `BENCH_CELERY_URL` set.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # same as forklift's workers: one BLAS thread per child

from celery import Celery  # noqa: E402

URL = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/1")
# The broker: the same Redis, or RabbitMQ (bench/throughput.py --broker amqp); results in Redis.
BROKER = os.environ.get("BENCH_CELERY_BROKER") or URL
QUEUE = "bench-plain"

app = Celery("bench_plain", broker=BROKER, backend=URL)
app.conf.update(
    task_serializer="pickle",
    result_serializer="pickle",
    accept_content=["pickle", "json"],
    result_accept_content=["pickle", "json"],
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def _fib(n: int) -> int:
    if n == 1 or n == 2:
        return 1
    return _fib(n - 1) + _fib(n - 2)


@app.task(name="bench.noop")
def noop() -> int:
    return 1


@app.task(name="bench.total")
def total(arr) -> float:  # an ndarray, unpickled from the message
    return float(arr.sum())


@app.task(name="bench.fib")
def fib(n: int) -> int:
    return _fib(n)
