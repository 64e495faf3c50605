"""Testing a job module on a real stack: `forklift.testing.running_stack` starts a private
redis-server, a worker and the API that load the module, and stops them when the tests end
(docs/jobs.md). Run with `python -m pytest docs/examples/test_stats_on_a_stack.py`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from forklift import Client, InvalidRequest
from forklift.testing import running_stack


@pytest.fixture(scope="module")
def fl() -> Iterator[Client]:
    """A client of a private stack that loads myjobs.stats."""
    here = str(Path(__file__).resolve().parent)  # where myjobs/ is: on the stack's path
    with (
        running_stack("myjobs.stats", env={"PYTHONPATH": here}) as stack,
        stack.client(free_on_close=True) as client,  # deletes the results it fetched
    ):
        yield client
    assert not stack.leaked_segments and not stack.stray_pids


def test_results_come_back_as_they_were_returned(fl: Client) -> None:
    points = np.array([[0.0, 0.0], [3.0, 4.0]])
    distances = fl.submit("pairwise_distances", x=points).result(timeout=60)
    assert distances.tolist() == [[0.0, 5.0], [5.0, 0.0]]  # an ndarray, from shared memory
    stats = fl.submit("describe", a=np.array([1.0, np.nan, 3.0]), ddof=1).result(timeout=60)
    assert stats == {
        "count": 2,
        "nan": 1,
        "mean": 2.0,
        "std": math.sqrt(2),
        "min": 1.0,
        "max": 3.0,
    }
    empty = fl.submit("describe", a=np.zeros(0)).result(timeout=60)
    assert empty == {"count": 0, "nan": 0, "mean": "nan", "std": "nan", "min": "nan", "max": "nan"}


def test_the_api_refuses_before_anything_runs(fl: Client) -> None:
    points = np.zeros((2, 2))
    with pytest.raises(InvalidRequest, match="same number of columns"):
        fl.submit("pairwise_distances", x=points, y=np.zeros((3, 5)))
    with pytest.raises(InvalidRequest, match="metric"):
        fl.submit("pairwise_distances", x=points, metric="cosine")
    assert fl.task("pairwise_distances").inputs["x"]["ndim"] == 2
