"""forklift's API (api.main:app) under uvicorn, with pyinstrument on its event-loop thread.

For bench/throughput.py --profile: the same app and settings as `uvicorn api.main:app`, plus
SIGUSR1 = start profiling, SIGUSR2 = stop and write the report to $BENCH_PROFILE_OUT (.txt,
and .html beside it). pyinstrument samples the main thread (where the event loop runs every
request) every 0.5 ms with a small overhead; threads started by anyio are not sampled.

Run: BENCH_PORT=8123 BENCH_PROFILE_OUT=/tmp/api.txt python -m bench.api_profiled
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import uvicorn
from pyinstrument import Profiler

from api.main import app

profiler = Profiler(interval=0.0005, async_mode="disabled")


def _start(signum: int, frame: object) -> None:
    if not profiler.is_running:
        profiler.start()


def _stop(signum: int, frame: object) -> None:
    if not profiler.is_running:
        return
    profiler.stop()
    out = Path(os.environ.get("BENCH_PROFILE_OUT", "api-profile.txt"))
    out.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    out.with_suffix(".html").write_text(profiler.output_html())
    out.with_suffix(".json").write_text(json.dumps(summary(profiler)))


def _where(frame: object) -> str:
    path = str(getattr(frame, "file_path", "") or "")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{frame.function} ({path}:{frame.line_no})"  # type: ignore[attr-defined]


def summary(prof: Profiler) -> dict:
    """Seconds sampled; own time per function; inclusive time per function (recursion once)."""
    root = prof.last_session.root_frame() if prof.last_session else None
    own: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    if root is None:
        return {"total": 0.0, "own": own, "inclusive": inclusive}

    def walk(frame: object, above: frozenset[str]) -> None:
        key = _where(frame)
        name = str(frame.function)  # type: ignore[attr-defined]
        if not frame.is_synthetic:  # type: ignore[attr-defined]
            own[key] = own.get(key, 0.0) + frame.total_self_time  # type: ignore[attr-defined]
        if name not in above:
            inclusive[name] = inclusive.get(name, 0.0) + frame.time  # type: ignore[attr-defined]
        for child in frame.children:  # type: ignore[attr-defined]
            walk(child, above | {name})

    walk(root, frozenset())
    return {"total": root.time, "own": own, "inclusive": inclusive}


def main() -> None:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    port = int(os.environ.get("BENCH_PORT", "8123"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
