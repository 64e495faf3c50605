"""/tasks: the registered jobs and their parameter schemas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.errors import not_found
from shared.registry import all_jobs, get_job
from shared.schemas import TaskInfo

router = APIRouter(prefix="/tasks", tags=["tasks"])


@router.get("", summary="List the tasks", response_model=list[TaskInfo])
async def list_tasks() -> Any:
    """Every job this stack runs, with its params' JSON schema and its array inputs."""
    return [spec.describe() for spec in all_jobs()]


@router.get(
    "/{name}",
    summary="Describe a task",
    response_model=TaskInfo,
    responses={404: {"description": "unknown task"}},
)
async def describe_task(name: str) -> Any:
    spec = get_job(name)
    if spec is None:
        raise not_found("task", name)
    return spec.describe()
