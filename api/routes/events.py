"""/jobs/{id}/events: state and progress changes as Server-Sent Events."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/jobs", tags=["jobs"])
