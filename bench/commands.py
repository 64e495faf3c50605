"""Who sends which Redis command: a MONITOR of the bench's private Redis, per process group.

`INFO commandstats` (bench/throughput.py's count) says how many commands Redis ran, those run
inside Lua scripts included; it cannot say who sent them. This reads MONITOR while a run
goes, maps each client's address to its process (the socket inodes of /proc/<pid>/fd against
/proc/net/tcp) and so to its group (api, worker_main, worker_children, client), and counts
per group the commands sent (an EVALSHA is one, named by its script) and those run inside
the scripts they sent. MONITOR slows Redis, so it runs only on a separate, untimed run.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"(?: "([^"]*)")?')


def script_names() -> dict[str, str]:
    """sha1 -> `Class.attr` of every Lua script forklift registers (see `shared/`)."""
    from shared import due, jobs_reaper, jobstore, metrics, schedules
    from shared.arrays import store as arrays_store
    from shared.settings import Settings

    names: dict[str, str] = {}
    client = redis.Redis()  # never connects: register_script only hashes
    settings = Settings()
    for module in (jobstore, due, schedules, jobs_reaper, arrays_store, metrics):
        for attr, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                names[hashlib.sha1(value.encode()).hexdigest()] = f"{module.__name__}.{attr}"
            if isinstance(value, type) and value.__module__ == module.__name__:
                try:
                    obj = value(client, settings)  # type: ignore[call-arg]
                except Exception:
                    continue
                for name, script in getattr(obj, "__dict__", {}).items():
                    sha = getattr(script, "sha", None)
                    if isinstance(sha, str):
                        names[sha] = f"{value.__name__}.{name.lstrip('_')}"
    return names


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _ports_by_inode() -> dict[str, int]:
    """inode -> local port of every IPv4 TCP socket."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        out[cols[9]] = int(cols[1].split(":")[1], 16)
    return out


def port_owners(groups: dict[str, Callable[[], list[int]]]) -> dict[int, str]:
    """Local port -> group, for every socket of every process of `groups`."""
    ports = _ports_by_inode()
    out = {}
    for group, pids in groups.items():
        for pid in pids():
            for inode in _socket_inodes(pid):
                if inode in ports:
                    out[ports[inode]] = group
    return out


class Monitor:
    """MONITOR in a thread; `counts()` gives {(group, sent-as, command): calls}."""

    def __init__(self, redis_url: str, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.url = redis_url
        self.groups = groups
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = redis.Redis.from_url(self.url).connection_pool.get_connection("MONITOR")
        conn.send_command("MONITOR")
        conn.read_response()
        sock = conn._sock  # raw lines: redis-py's parser is too slow to keep up
        assert sock is not None
        sock.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\r\n")
            self.lines.extend(d.decode(errors="replace") for d in done)
        conn.disconnect()

    def __enter__(self) -> Monitor:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(0.3)
        self._stop.set()
        self._thread.join(5)

    def counts(self) -> collections.Counter[tuple[str, str, str]]:
        """(group, what sent it, command) -> calls; a script's commands follow its EVALSHA's
        line (Redis runs a script atomically and logs what it ran after it)."""
        owners = port_owners(self.groups)
        shas = script_names()
        out: collections.Counter[tuple[str, str, str]] = collections.Counter()
        last = ("other", "?")
        for line in self.lines:
            m = _LINE.match(line.lstrip("+"))
            if not m:
                continue
            who, cmd, arg = m.group(1), m.group(2).upper(), m.group(3) or ""
            if who == "lua":
                out[(last[0], f"in {last[1]}", cmd)] += 1
                continue
            port = int(who.rsplit(":", 1)[1]) if ":" in who else 0
            group = owners.get(port, "other")
            if cmd in ("EVALSHA", "EVAL"):
                script = shas.get(arg, arg[:8])
                out[(group, "sent", f"EVALSHA {script}")] += 1
                last = (group, script)
            else:
                out[(group, "sent", cmd)] += 1
        return out


def report(counts: collections.Counter[tuple[str, str, str]], jobs: int, wall: float) -> str:
    """Markdown: per group, commands sent and commands run inside its scripts, per job."""
    from bench.common import md_table

    by_group: dict[str, dict[str, float]] = collections.defaultdict(dict)
    sent: collections.Counter[str] = collections.Counter()
    inner: collections.Counter[str] = collections.Counter()
    for (group, how, cmd), n in counts.items():
        key = cmd if how == "sent" else f"{how}: {cmd}"
        by_group[group][key] = by_group[group].get(key, 0) + n / jobs
        (sent if how == "sent" else inner)[group] += n
    rows = []
    for group in sorted(by_group, key=lambda g: -(sent[g] + inner[g])):
        detail = sorted(by_group[group].items(), key=lambda kv: -kv[1])
        rows.append(
            [
                group,
                f"{sent[group] / jobs:.2f}",
                f"{inner[group] / jobs:.2f}",
                "; ".join(f"{k} {v:.2f}" for k, v in detail if v >= 0.005),
            ]
        )
    total_sent = sum(sent.values()) / jobs
    total_inner = sum(inner.values()) / jobs
    rows.append(["**all**", f"**{total_sent:.2f}**", f"**{total_inner:.2f}**", ""])
    head = f"{jobs} jobs in {wall:.2f} s under MONITOR (slower than the timed runs)."
    table = md_table(
        ["process", "sent per job", "inside scripts per job", "commands per job"],
        rows,
        "lrrl",
    )
    return head + "\n\n" + table
