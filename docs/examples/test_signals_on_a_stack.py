"""Splittable jobs on a real stack: `parallel=2` runs the job as two parts and gives what one
job gives (docs/jobs.md, "Running a job as parts (parallel)").
Run with `python -m pytest docs/examples/test_signals_on_a_stack.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from forklift import Client, InvalidRequest
from forklift.testing import running_stack

rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def fl() -> Iterator[Client]:
    """A client of a private stack (two worker processes) that loads myjobs.signals."""
    here = str(Path(__file__).resolve().parent)
    with (
        running_stack("myjobs.signals", env={"PYTHONPATH": here}) as stack,
        stack.client(free_on_close=True) as client,
    ):
        yield client
    assert not stack.leaked_segments and not stack.stray_pids


def test_two_parts_give_what_one_job_gives(fl: Client) -> None:
    x = rng.standard_normal(100_001)  # odd: the parts own 50000 and 50001 samples
    w = rng.integers(0, 10, x.size)
    one = fl.submit("moving_mean", x=x, radius=5).result(timeout=60)
    job = fl.submit("moving_mean", x=x, radius=5, parallel=2)
    two = job.result(timeout=60)
    np.testing.assert_array_equal(two, one)  # in place, with the halo: bit for bit
    view = job.status()
    assert view.parts is not None and (view.parts.total, view.parts.done) == (2, 2)
    parts = [fl.job(part_id).status() for part_id in view.parts.ids]
    assert {p.parent for p in parts} == {job.id}
    # Which processes ran the parts is the scheduler's business: a part this small can end
    # before the other is taken, and the same process then takes both.

    single = fl.submit("weighted_mean", x=x, w=w).result(timeout=60)
    split = fl.submit("weighted_mean", x=x, w=w, parallel=2)
    assert split.result(timeout=60) == pytest.approx(single, rel=1e-12)
    assert split.status().parts is not None
    assert single == pytest.approx(np.average(x, weights=w), rel=1e-12)


def test_what_does_not_split(fl: Client) -> None:
    x = np.arange(6.0)
    assert fl.task("moving_mean").splittable  # GET /tasks/moving_mean
    with pytest.raises(InvalidRequest, match="far end of the signal") as refused:
        fl.submit("moving_mean", x=x, edges="wrap", parallel=2)
    assert refused.value.code == "not_splittable" and refused.value.status == 422
    auto = fl.submit("moving_mean", x=x, edges="wrap", parallel="auto")  # one job instead
    assert auto.result(timeout=60).tolist() == [2.0, 1.0, 2.0, 3.0, 4.0, 3.0]  # (5+0+1)/3 ...
    assert auto.status().parts is None
