"""The worker's Celery app. `celery -A worker.app worker --pool=prefork` runs it.

BLAS/OpenMP thread counts are pinned to one *before* NumPy can be imported, so N prefork
children use N cores instead of N x cores threads fighting over them. The configuration is
`shared/celery_app.py`'s; this module adds only the worker's process setup and its tasks
(`worker/tasks.py`: one per registered job).
"""

from __future__ import annotations

import os

for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
):
    os.environ.setdefault(_var, "1")

from shared.celery_app import create_app  # noqa: E402

app = create_app()
app.conf.imports = ("worker.tasks",)
