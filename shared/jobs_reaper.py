"""Ends the jobs that nothing else will: lost messages, lost workers, inputs left pinned.

Late acks make the broker keep a message until its job ends, but three things escape that:
- a queued job's message can vanish (`celery purge`, a Redis that lost it): its record would
  stay `queued` and its inputs pinned for good (the reaper ends it `cancelled`);
- a running job's worker can die whole (SIGKILL, power loss, its host gone) or lose the job
  (its connection to Redis reset): the broker only redelivers the message after the
  visibility timeout (about 70 minutes by default), and not at all if it no longer has it;
- a job cancelled while running is released by its attempt once it stops; if that attempt
  dies, nobody does.

`reap()` runs in each API process every `FORKLIFT_WORKER_LOST_AFTER / 3` seconds, one pass at
a time per stack. It reads the live-job index (`jobs:live`: records not yet ended and
released, oldest first, at most `MAX_EXAMINED` of them), the running-jobs hash, the workers'
heartbeats with the jobs each holds (`worker/heartbeat.py`) and the Redis transport's
`unacked` hash (one entry per message delivered and not acked: at most the workers' prefetch),
and the queue lists only when a queued job's message has to be found (scanned from the
consuming end, where old messages are, and only until every sought job is found).

A job is declared lost only when two passes at least `confirm_after()` apart agree (the
suspicion is kept in `<prefix>:reaper`), so a job between a worker's pop and its start, or a
heartbeat late after a Redis restart, is never touched. A lost running job goes back to
`queued` and its message back to the queue: restored from `unacked` if it is there (kombu's
own `restore_by_tag`, done here with a compare-and-move), else published again from the
record; once its attempts are spent it ends `failed` instead. Every end releases the inputs
in the same script that ends the record (shared/jobstore.py), so a job's inputs are released
once whoever ends it.

On RabbitMQ (FORKLIFT_BROKER_URL=amqp://...) there is no `unacked` hash and no queue list to
read: the broker puts an unacked message back in its queue as soon as its consumer's
connection closes (the worker died, or lost the broker), and a queue cannot be searched for a
message without consuming it. So the reaper reads and restores nothing there and republishes
nothing (that would run the job twice): a lost running job's record goes back to `queued` and
the broker's redelivery runs it (or, its attempts spent, its start ends it `failed`). A queued job
is never declared "message lost" on AMQP: an empty queue cannot tell a purged message from one
still unacked on a connection the broker has not yet seen die (up to two AMQP heartbeats), and
cancelling that job would be wrong; after a `celery purge` on RabbitMQ, cancel its jobs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.arrays import lifecycle
from shared.arrays.store import ArrayStore
from shared.dependencies import CLAIM_LEASE_S
from shared.due import payload_of
from shared.jobstore import JobStore
from shared.keys import KOMBU_PRIORITY_STEPS, UNACKED, UNACKED_INDEX, queue_key, queue_keys
from shared.schemas import JobStatus, TaskPayload
from shared.settings import Settings
from shared.workers import INTERVAL_S as HEARTBEAT_S
from shared.workers import WorkerStore

log = logging.getLogger("forklift.reaper")

MAX_EXAMINED = 1000  # live jobs looked at per pass, oldest first (plus every running one)
SCAN_CHUNK = 500  # queue messages read per LRANGE
SCAN_OVERLAP = 100  # ... of which this many again, in case workers popped meanwhile
MAX_SCANNED = 200_000  # queue messages read per pass at most; past it a job is "unknown"
HELD_SLACK_S = 2.0  # a held-list must be this much newer than a job's start to omit it

Republish = Callable[[list[TaskPayload]], object]

# Compare-and-move: put an unacked message back on its queue (what kombu's restore_by_tag
# does), only if the entry is still the one that was read.
_RESTORE = """
-- KEYS: unacked, unacked-index, queue   ARGV: tag, raw-entry, payload
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""

_DROP = """
-- KEYS: unacked, unacked-index   ARGV: tag, raw-entry
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# One pass at a time per stack: the pass's deadline, kept in the reaper hash (one key that
# always exists, beside the suspicions).
_LOCK = """
-- KEYS: reaper   ARGV: now, until, force
local held = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if ARGV[3] ~= '1' and held > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'until', ARGV[2])
return 1
"""

_FIELDS = (
    "id",
    "status",
    "attempts",
    "attempt_token",
    "node",
    "created_at",
    "started_at",
    "finished_at",
    "requeued_at",
    "not_before",
    "retry_at",
    "released",
    "cancelled_from",
    "input_ids",
    "parts_total",
    "parts_released",
    "combining_at",
    "ready",
    "claimed_at",
)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)  # running -> queued, message back
    republished: list[str] = field(default_factory=list)  # ... message published anew
    failed: list[str] = field(default_factory=list)  # lost with their attempts spent
    lost_messages: list[str] = field(default_factory=list)  # queued, message gone: cancelled
    released: list[str] = field(default_factory=list)  # ended, inputs released here
    dropped_acks: list[str] = field(default_factory=list)  # unacked entries of ended jobs
    announced: list[str] = field(default_factory=list)  # waiting and ready, not launched
    suspects: int = 0


@dataclass
class _Message:
    job_id: str
    tag: str
    raw: str
    payload: dict[str, Any]
    exchange: str
    routing_key: str
    since: float


def interval(settings: Settings) -> float:
    """Seconds between passes."""
    return settings.worker_lost_after / 3


def confirm_after(settings: Settings) -> float:
    """A suspicion must last this long (at least two heartbeats) before it is acted on."""
    return max(interval(settings), 2 * HEARTBEAT_S + 1)


def _num(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class _Pass:
    """One reaping pass: what was read, and the decisions taken from it."""

    def __init__(
        self, client: redis.Redis, settings: Settings, republish: Republish | None
    ) -> None:
        self.client = client
        self.settings = settings
        self.republish = republish
        self.jobs = JobStore(client, settings)
        self.workers = WorkerStore(client, settings)
        self.arrays = ArrayStore(client, settings)
        self.now = time.time()
        self.lost_after = settings.worker_lost_after
        self.report = ReapReport()
        self.old_suspects: dict[str, str] = {}
        self.suspects: dict[str, str] = {}
        self.beats: dict[str, float] = {}
        self.held: dict[str, tuple[float, set[str]]] = {}
        self.unacked: dict[str, _Message] = {}
        # RabbitMQ keeps (and redelivers) what kombu's Redis transport leaves to us.
        self.amqp = settings.broker_is_amqp
        self._restore = client.register_script(_RESTORE)
        self._drop = client.register_script(_DROP)

    # --- reading -------------------------------------------------------------------------

    def read_workers(self) -> None:
        self.beats = self.workers.beats()
        self.held = self.workers.held(self.beats)

    def live_worker(self, name: str) -> bool:
        beat = self.beats.get(name)
        return beat is not None and beat >= self.now - self.lost_after

    def held_by_live_worker(self, job_id: str) -> bool:
        return any(
            job_id in jobs and self.live_worker(name) for name, (_, jobs) in self.held.items()
        )

    def holder_gone(self, job_id: str, node: str, since: float) -> bool | None:
        """Whether the attempt that held the job since `since` is gone: True (its worker
        stopped beating, or its fresh held-list lacks the job), False (held), None (wait)."""
        if not node:  # no name recorded: gone only if no live worker holds it
            if self.held_by_live_worker(job_id):
                return False
            fresh = [at for name, (at, _) in self.held.items() if self.live_worker(name)]
            return True if fresh and min(fresh) > since + HELD_SLACK_S else None
        if not self.live_worker(node):
            return True
        held = self.held.get(node)
        if held is None:
            return None
        at, jobs = held
        if job_id in jobs:
            return False
        return True if at > since + HELD_SLACK_S else None

    def ours(self, routing_key: str) -> bool:
        queue = self.settings.queue
        return routing_key == queue or routing_key.startswith(queue + ".")

    def read_unacked(self) -> None:
        if self.amqp:
            return  # no such hash: the broker holds unacked messages itself
        entries = {str(k): str(v) for k, v in self.client.hgetall(UNACKED).items()}
        if not entries:
            return
        tags = list(entries)
        scores = self.client.zmscore(UNACKED_INDEX, tags)
        for tag, score in zip(tags, scores, strict=True):
            raw = entries[tag]
            try:
                payload, exchange, routing_key = json.loads(raw)
                job_id = str(payload["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a Celery message of ours
            if not self.ours(str(routing_key)):
                continue
            since = float(score) if score is not None else self.now
            self.unacked[job_id] = _Message(
                job_id, tag, raw, payload, str(exchange), str(routing_key), since
            )

    def read_records(self, job_ids: list[str]) -> dict[str, dict[str, str | None]]:
        rows = self.jobs.fields(job_ids, _FIELDS)
        return dict(zip(job_ids, rows, strict=True))

    def queues_for(self, records: list[dict[str, str | None]]) -> list[str]:
        """The common queue and the domain queues of the workers and of the jobs' inputs."""
        domains: set[str] = set()
        ids = [i for r in records for i in (r.get("input_ids") or "").split()]
        if ids:
            domains |= {a.domain for a in self.arrays.get_many(ids) if a is not None}
        domains |= {w.domain for w in self.workers.records(self.beats)}
        queues = [self.settings.queue]
        queues += sorted(self.settings.domain_queue(d) for d in domains if d)
        return queues

    def find_in_queues(self, job_ids: set[str], queues: list[str]) -> tuple[set[str], bool]:
        """Which of `job_ids` have a message in the queue lists; False if the scan stopped
        at MAX_SCANNED before it could tell.

        Every list is read from its right (consuming) end, where old messages are, one chunk
        of each in turn, until all are found: a long backlog in one queue does not cost a
        full read to find a message near the end of another.
        """
        found: set[str] = set()
        scanned = 0
        step = SCAN_CHUNK - SCAN_OVERLAP
        keys = [key for queue in queues for key in queue_keys(queue)]
        lengths = dict(zip(keys, self._llens(keys), strict=True))
        done = {key: 0 for key in keys if lengths[key]}  # messages read from the right end
        while done and found != job_ids:
            for key in list(done):
                if scanned >= MAX_SCANNED:
                    return found, False
                # Counted from the right, a window only moves when workers pop messages
                # meanwhile (towards what was read): the overlap covers that.
                for raw in self.client.lrange(key, -(done[key] + SCAN_CHUNK), -(done[key] + 1)):
                    scanned += 1
                    try:
                        job_id = str(json.loads(raw)["headers"]["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if job_id in job_ids:
                        found.add(job_id)
                done[key] += step
                if done[key] >= lengths[key]:
                    del done[key]
        return found, True

    def _llens(self, keys: list[str]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return [int(n) for n in pipe.execute()]

    # --- suspicion ---------------------------------------------------------------------------

    def confirmed(self, job_id: str, what: str) -> bool:
        """True once the same suspicion about `job_id` has lasted `confirm_after` seconds."""
        field_name = f"s:{job_id}"
        previous = self.old_suspects.get(field_name)
        if previous is not None:
            first, _, seen = previous.partition(" ")
            if seen == what:
                if self.now - float(first) >= confirm_after(self.settings):
                    return True
                self.suspects[field_name] = previous
                return False
        self.suspects[field_name] = f"{self.now!r} {what}"
        return False

    def save_suspects(self) -> None:
        key = self.settings.keys.reaper
        stale = [f for f in self.old_suspects if f not in self.suspects]
        pipe = self.client.pipeline(transaction=False)
        if stale:
            pipe.hdel(key, *stale)
        if self.suspects:
            pipe.hset(key, items=[x for pair in self.suspects.items() for x in pair])
        pipe.execute()
        self.report.suspects = len(self.suspects)

    # --- acting ---------------------------------------------------------------------------

    def free(self, array_ids: list[str]) -> None:
        lifecycle.free(self.arrays, array_ids)

    def queue_list(self, message: _Message) -> str:
        """The list kombu's `_do_restore_message` pushes to: the bound queue's list of the
        message's priority step."""
        queue = message.routing_key
        binding = self.client.smembers(f"_kombu.binding.{message.exchange}")
        for entry in binding:
            parts = str(entry).split("\x06\x16")
            if len(parts) == 3 and parts[0] == message.routing_key and parts[2]:
                queue = parts[2]
                break
        try:
            step = int(message.payload["properties"]["priority"])
        except (KeyError, TypeError, ValueError):
            step = 0
        return queue_key(queue, min(max(step, 0), KOMBU_PRIORITY_STEPS[-1]))

    def restore(self, message: _Message) -> bool:
        payload = dict(message.payload)
        headers = dict(payload.get("headers") or {})
        headers["redelivered"] = True
        payload["headers"] = headers
        keys = [UNACKED, UNACKED_INDEX, self.queue_list(message)]
        args = [message.tag, message.raw, json.dumps(payload)]
        return bool(self._restore(keys=keys, args=args))

    def drop(self, message: _Message) -> bool:
        keys = [UNACKED, UNACKED_INDEX]
        return bool(self._drop(keys=keys, args=[message.tag, message.raw]))

    def rebuild(self, job_id: str) -> TaskPayload | None:
        record = self.jobs.get(job_id)
        return payload_of(record, self.arrays) if record is not None else None

    def lost_running(self, job_id: str, rec: dict[str, str | None], in_queue: bool) -> None:
        token = rec.get("attempt_token") or ""
        attempts = int(rec.get("attempts") or 0)
        message = self.unacked.get(job_id)
        if attempts >= self.settings.job_max_attempts and not in_queue:
            error = (
                f"worker lost: no worker holds this job any more (its worker died or lost it)"
                f" after {attempts} attempt(s); not retried again"
            )
            outcome, due = self.jobs.end_lost(
                job_id, JobStatus.failed, error, expect="running", token=token
            )
            if outcome == "ok":
                self.free(due)
                self.report.failed.append(job_id)
                if message is not None:
                    self.drop(message)
            return
        if not self.jobs.requeue(job_id, token):
            return  # it moved on meanwhile
        # In a queue: its worker put it back itself (a child died, a cold shutdown).
        if in_queue or (message is not None and self.restore(message)):
            self.report.requeued.append(job_id)
        else:
            payload = self.rebuild(job_id)
            if payload is None or self.republish is None:
                log.warning("job %s: lost, and its message cannot be rebuilt", job_id)
                return  # queued with no message: the next passes fail it as lost
            self.republish([payload])
            self.report.republished.append(job_id)
        log.warning("job %s: its worker is gone; delivered again (attempt %d)", job_id, attempts)

    def lost_message(self, job_id: str) -> None:
        """A queued job whose message is gone (`celery purge`, a Redis that lost it): it
        never ran, and nothing will run it, so it ends `cancelled` (not a failure of the
        job), its inputs released in the same script."""
        error = (
            "message lost: the job's Celery message is no longer in the broker (purged or"
            " lost) and no worker holds it; the job was not run"
        )
        outcome, due = self.jobs.end_lost(job_id, JobStatus.cancelled, error, expect="queued")
        if outcome == "ok":
            self.free(due)
            self.report.lost_messages.append(job_id)
            log.warning("job %s: %s", job_id, error)

    def lost_combine(self, job_id: str, rec: dict[str, str | None]) -> None:
        """A parallel job whose parts are all released but whose combine never ended it (the
        child combining died): end it and release it, once the combine's task is past its
        hard time limit (the combine runs inside its last part's task)."""
        if rec["released"] or int(rec["parts_released"] or 0) < int(rec["parts_total"] or 0):
            return
        began = _num(rec["combining_at"])
        if began is None:
            return
        settings = self.settings
        limit = settings.job_time_limit + settings.job_kill_grace + self.lost_after
        if self.now - began < limit or not self.confirmed(job_id, "combine lost"):
            return
        error = "worker lost: the process combining the job's parts died; not retried"
        if rec["status"] in ("queued", "running"):
            _, due = self.jobs.end_lost(job_id, JobStatus.failed, error, force=True)
            self.report.failed.append(job_id)
        else:
            due = self.jobs.release_inputs(job_id, mode="ended", force=True)
            self.report.released.append(job_id)
        self.free(due)
        log.warning("job %s: %s", job_id, error)

    def announce_if_ready(self, job_id: str, rec: dict[str, str | None]) -> None:
        """A waiting job whose inputs are all resolved and that no API holds (its `ready`
        event was lost, or the API launching it died): announced again, an API launches it
        (api/pipelines.py)."""
        claimed = _num(rec["claimed_at"])
        if rec["ready"] != "1" or (claimed is not None and self.now - claimed < CLAIM_LEASE_S):
            return
        event = {"id": job_id, "status": "waiting", "ready": True}
        self.client.publish(self.settings.keys.events, json.dumps(event))
        self.report.announced.append(job_id)

    def release_ended(self, job_id: str) -> None:
        due = self.jobs.release_inputs(job_id, mode="ended")
        self.free(due)
        self.report.released.append(job_id)

    # --- the pass ------------------------------------------------------------------------

    def run(self) -> ReapReport:
        kept = self.client.hgetall(self.settings.keys.reaper)
        self.old_suspects = {str(k): str(v) for k, v in kept.items() if str(k)[:2] == "s:"}
        self.read_workers()
        self.read_unacked()
        old = self.now - self.lost_after
        oldest = self.client.zrangebyscore(
            self.jobs.live_key, "-inf", old, start=0, num=MAX_EXAMINED
        )
        live = {str(job_id) for job_id in oldest}
        running = [str(k) for k in self.client.hkeys(self.settings.keys.metrics_running)]
        job_ids = list(dict.fromkeys([*live, *running, *self.unacked]))
        records = self.read_records(job_ids)

        lost: dict[str, dict[str, str | None]] = {}  # running jobs no worker holds
        queued: dict[str, dict[str, str | None]] = {}  # old queued jobs not in unacked
        for job_id, rec in records.items():
            status = rec["status"]
            if status is None:  # record gone (deleted by hand): nothing left to end
                if job_id in live:
                    self.client.zrem(self.jobs.live_key, job_id)
                continue
            message = self.unacked.get(job_id)
            if rec["parts_total"]:  # a parallel job: its parts are reaped, not the job
                self.lost_combine(job_id, rec)
                continue
            if status == "waiting":  # no message yet: its upstream jobs end it or queue it
                self.announce_if_ready(job_id, rec)
                continue
            if status == "running":
                since = _num(rec["started_at"]) or self.now
                if self.holder_gone(job_id, rec["node"] or "", since) and self.confirmed(
                    job_id, f"running {rec['attempt_token']}"
                ):
                    lost[job_id] = rec
            elif status == "queued":
                # A delayed job or a retry has no message before it is due (shared/due.py).
                times = ("created_at", "requeued_at", "not_before", "retry_at")
                queued_since = max(_num(rec[name]) or 0 for name in times)
                if queued_since > old:
                    continue
                if message is not None:
                    # Delivered to a worker that is gone before it started the job.
                    stranded = message.since < old and not self.held_by_live_worker(job_id)
                    if stranded and self.confirmed(job_id, "stranded") and self.restore(message):
                        self.report.requeued.append(job_id)
                        log.warning("job %s: its worker is gone; message put back", job_id)
                else:
                    queued[job_id] = rec
            else:  # ended
                stale = message is not None and message.since < old
                held = self.held_by_live_worker(job_id)
                if stale and message is not None and not held and self.drop(message):
                    self.report.dropped_acks.append(job_id)
                if rec["released"]:
                    if job_id in live:
                        self.client.zrem(self.jobs.live_key, job_id)
                    continue
                if rec["cancelled_from"] == "running":
                    since = _num(rec["finished_at"]) or self.now
                    gone = self.holder_gone(job_id, rec["node"] or "", since)
                else:
                    gone = True  # ended while queued: no attempt ever held it
                if gone and self.confirmed(job_id, "unreleased"):
                    self.release_ended(job_id)

        wanted = set(lost) | set(queued)
        present: set[str] = set()
        complete = True
        if self.amqp:
            # The broker has every lost running job's message (redelivered once its
            # consumer's connection closed); whether a queued one's is gone cannot be told.
            present, complete, queued = set(lost), False, {}
        elif wanted:
            queues = self.queues_for([*lost.values(), *queued.values()])
            present, complete = self.find_in_queues(wanted, queues)
        for job_id, rec in lost.items():
            self.lost_running(job_id, rec, job_id in present)
        for job_id in queued:
            if complete and job_id not in present and self.confirmed(job_id, "no message"):
                self.lost_message(job_id)
            elif job_id in present:
                self.suspects.pop(f"s:{job_id}", None)
        self.save_suspects()
        return self.report


def reap(
    client: redis.Redis,
    settings: Settings,
    republish: Republish | None = None,
    *,
    force: bool = False,
) -> ReapReport | None:
    """One pass; None when another process ran one less than an interval ago.

    `republish` publishes a message for a payload (the API passes its enqueue function):
    needed only when a lost job's message is nowhere to be restored from.
    """
    now = time.time()
    until = now + interval(settings) * 0.9
    lock = client.register_script(_LOCK)
    if not lock(keys=[settings.keys.reaper], args=[repr(now), repr(until), "1" if force else ""]):
        return None
    report = _Pass(client, settings, republish).run()
    acted = (
        report.requeued
        or report.republished
        or report.failed
        or report.lost_messages
        or report.released
        or report.dropped_acks
    )
    if acted:
        log.info(
            "reaper: requeued %d, republished %d, failed %d lost, cancelled %d without message, "
            "released %d, dropped %d stale acks",
            len(report.requeued),
            len(report.republished),
            len(report.failed),
            len(report.lost_messages),
            len(report.released),
            len(report.dropped_acks),
        )
    return report
