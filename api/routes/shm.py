"""/arrays/register: adopt a segment a same-host client filled itself (no HTTP upload)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/arrays", tags=["arrays"])
