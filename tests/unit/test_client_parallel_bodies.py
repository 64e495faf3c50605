"""The request bodies both clients build for `parallel`, job inputs and batch pipelines.

The server is an httpx `MockTransport` that records each request and answers with a job
view; what the real API does with the bodies is tests/integration/test_client_parallel.py's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import InvalidStateError
from pathlib import Path
from typing import Any

import click
import httpx
import pytest

from forklift import ArrayInput, Client, InvalidRequest, JobInput, cli, common
from shared.schemas import is_id
from tests.clients import Recorded, posted, recording_client


def _view(entry: dict[str, Any], status: str = "queued") -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "task": entry["task"],
        "status": status,
        "params": entry.get("params", {}),
        "inputs": {},
        "created_at": 1.0,
    }


def _server(
    recorded: Recorded, refuse_batch: int | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    """Answers POST /jobs and /jobs/batch with queued views, POST /jobs/cancel with every id
    cancelled; the `refuse_batch`-th batch request (from 0) with a 422."""
    batches = [0]

    def handle(request: httpx.Request) -> httpx.Response:
        body: Any = json.loads(request.content) if request.content else None
        recorded.append((request.method, request.url.path, body))
        if request.url.path == "/jobs" and request.method == "POST":
            return httpx.Response(202, json=_view(body))
        if request.url.path == "/jobs/batch":
            index, batches[0] = batches[0], batches[0] + 1
            if index == refuse_batch:
                error = {"code": "invalid", "message": "jobs.1: a cycle", "detail": None}
                return httpx.Response(422, json={"error": error})
            return httpx.Response(202, json={"jobs": [_view(e) for e in body["jobs"]]})
        if request.url.path == "/jobs/cancel":
            return httpx.Response(200, json={"cancelled": body["ids"], "skipped": []})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    return handle


@pytest.fixture
def fl(kind: str, recorded: Recorded) -> Iterator[Client]:
    with recording_client(kind, _server(recorded)) as client:
        yield client


A = ArrayInput(array="a" * 32)


def test_parallel_is_sent_as_given_and_one_part_is_not_sent(fl: Client, recorded: Recorded) -> None:
    fl.submit("matmul", a=A, b=A, parallel="auto")
    fl.submit("matmul", {"a": A, "b": A}, parallel=4)
    fl.submit_job("sum", {"a": A}, parallel=1, time_limit=5)
    fl.submit("sum", a=A)
    bodies = posted(recorded, "/jobs")
    assert [b.get("parallel") for b in bodies] == ["auto", 4, None, None]
    assert bodies[0]["inputs"] == {"a": {"array": A.array}, "b": {"array": A.array}}
    assert bodies[2]["timeout"] == 5 and "parallel" not in bodies[2]


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "all", common.MAX_PARTS + 1])
def test_a_bad_parallel_is_refused_before_anything_is_sent(
    fl: Client, recorded: Recorded, bad: Any
) -> None:
    with pytest.raises(ValueError, match="parallel"):
        fl.submit("sum", a=A, parallel=bad)
    with pytest.raises(ValueError, match="parallel"), fl.batch() as batch:
        batch.submit("sum", a=A, parallel=bad)
    assert recorded == []


def test_a_job_handle_is_an_input_by_id_and_output_names_one_array(
    fl: Client, recorded: Recorded
) -> None:
    first = fl.submit("svd", a=A)
    second = fl.submit("sort", a=first, axis=0)
    third = fl.submit(
        "matmul", a=first.output("u"), b=JobInput(job=second.id, key=None), parallel=2
    )
    by_id = fl.submit("sum", a=JobInput(job=third.id, key="x"))
    bodies = posted(recorded, "/jobs")
    assert bodies[1] == {
        "task": "sort",
        "params": {"axis": 0},
        "inputs": {"a": {"job": first.id}},
    }
    assert bodies[2]["inputs"] == {"a": {"job": first.id, "key": "u"}, "b": {"job": second.id}}
    assert bodies[2]["parallel"] == 2
    assert bodies[3]["inputs"] == {"a": {"job": third.id, "key": "x"}}
    assert by_id.id != third.id


def test_a_batch_sends_a_pipeline_in_one_request(fl: Client, recorded: Recorded) -> None:
    before = fl.submit("normalize", a=A)
    with fl.batch() as batch:
        normal = batch.submit("normalize", a=A, parallel="auto")
        spectrum = batch.submit("fft", a=normal, axis=-1)
        counts = batch.submit("histogram", {"a": spectrum.output("real"), "bins": 64})
        outside = batch.submit_job("sum", {"a": before}, time_limit=9)
        with pytest.raises(InvalidStateError):
            normal.id  # noqa: B018 (no id until the batch is sent)
    assert posted(recorded, "/jobs/batch") == [
        {
            "jobs": [
                {"task": "normalize", "params": {}, "inputs": {"a": {"array": A.array}}}
                | {"parallel": "auto"},
                {"task": "fft", "params": {"axis": -1}, "inputs": {"a": {"job": "#0"}}},
                {
                    "task": "histogram",
                    "params": {"bins": 64},
                    "inputs": {"a": {"job": "#1", "key": "real"}},
                },
                {
                    "task": "sum",
                    "params": {},
                    "inputs": {"a": {"job": before.id}},
                    "timeout": 9,
                },
            ]
        }
    ]
    ids = [job.id for job in (normal, spectrum, counts, outside)]
    assert len(set(ids)) == 4 and all(is_id(i) for i in ids)
    assert counts.view is not None and counts.view.task == "histogram"
    # a job of a sent batch is an input like any other
    fl.submit("sum", a=counts)
    assert posted(recorded, "/jobs")[-1]["inputs"] == {"a": {"job": counts.id}}
    with pytest.raises(InvalidStateError):
        batch.submit("sum", a=A)


def test_a_batch_whose_block_raises_sends_nothing(fl: Client, recorded: Recorded) -> None:
    with pytest.raises(KeyError), fl.batch() as batch:
        job = batch.submit("sum", a=A)
        raise KeyError("the caller's own error")
    assert recorded == []
    with pytest.raises(InvalidStateError):
        job.id  # noqa: B018


def test_a_long_batch_names_earlier_chunks_by_id_and_cancels_them_when_refused(
    kind: str, recorded: Recorded
) -> None:
    with recording_client(kind, _server(recorded, refuse_batch=1)) as fl:
        with pytest.raises(InvalidRequest, match="cycle"), fl.batch() as batch:
            jobs = [batch.submit("fib", n=1)]
            for _ in range(common.BATCH):
                jobs.append(batch.submit("sum", a=jobs[-1]))
        first, second = posted(recorded, "/jobs/batch")
        assert len(first["jobs"]) == common.BATCH and len(second["jobs"]) == 1
        assert first["jobs"][1]["inputs"] == {"a": {"job": "#0"}}
        assert first["jobs"][-1]["inputs"] == {"a": {"job": f"#{common.BATCH - 2}"}}
        # the first entry of the second chunk follows the last of the first: by its id
        assert second["jobs"][0]["inputs"] == {"a": {"job": jobs[common.BATCH - 1].id}}
        cancelled = [body["ids"] for _, path, body in recorded if path == "/jobs/cancel"]
        assert cancelled == [[job.id for job in jobs[: common.BATCH]]]  # one request


# -- the command's side: its words become the same inputs --------------------------------


def test_the_command_reads_job_inputs_beside_array_ids_and_files(tmp_path: Path) -> None:
    data = tmp_path / "x.npy"
    data.write_bytes(b"")
    job_id, array_id = uuid.uuid4().hex, uuid.uuid4().hex
    params, inputs, files = cli.parse_arguments(
        [f"a=job:{job_id}", f"b=job:{job_id}:counts", f"c={array_id}", f"d=@{data}", "bins=8"],
        {"a", "b", "c", "d"},
    )
    assert params == {"bins": 8} and files == {"d": data}
    assert inputs == {
        "a": JobInput(job=job_id, key=None),
        "b": JobInput(job=job_id, key="counts"),
        "c": ArrayInput(array=array_id),
    }
    for bad in ("job:", "job:xyz", f"job:{job_id}:"):
        with pytest.raises(click.UsageError, match="job:<job-id>"):
            cli.parse_arguments([f"a={bad}"], {"a"})


@pytest.mark.parametrize("bad", ["0", "-2", "many", str(common.MAX_PARTS + 1)])
def test_the_command_refuses_a_bad_parallel_before_it_asks_the_server(bad: str) -> None:
    nowhere = "http://127.0.0.1:9"  # nothing is asked: a request here would exit 4
    assert cli.main(["--url", nowhere, "submit", "sum", "--parallel", bad]) == 2
