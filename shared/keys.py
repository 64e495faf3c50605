"""Every Redis key and channel forklift uses, in one place (the data model's table of contents).

All names live under the stack's prefix (`FORKLIFT_KEY_PREFIX`, default `forklift`), so several
stacks can share one Redis database. Each family below has one method; its docstring says the
Redis type and who writes it. The strings are part of the running system (a stack upgraded in
place keeps reading what the old code wrote), so a name changes only on purpose.

Lua scripts take their keys in `KEYS`. A few scripts must derive keys from ids they only learn
while running (a job's input arrays, the running-jobs sweep, the live-worker read, a domain's
replicas); those get the family's prefix in `ARGV` instead: the `*_prefix` properties below
(e.g. `array_prefix` + id == `array(id)`). The job scripts also get `metrics_prefix` rather
than the metrics keys themselves: the throughput slot's name comes from the script's clock, and
one Lua function (`shared/metrics.py:LUA_JOB_ENDED`) bumps them for five scripts whose `KEYS`
differ.

Celery's own keys (the queue lists, kombu's unacked bookkeeping) are named by Celery and kombu
from the queue names in `shared/settings.py`; `queue_keys` spells the lists of one queue.
"""

from __future__ import annotations

from functools import lru_cache

# Redis transport priority steps (kombu): a queue's messages live in `name` and `name\x06\x16N`,
# one list per step, 0 first (kombu's Redis priorities run the other way from forklift's and
# AMQP's: `api/enqueue.py` sends 9 - priority). Ten steps: every forklift priority its own list.
_KOMBU_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = tuple(range(10))
# kombu's Redis transport keeps delivered, unacked messages here (Channel.unacked_key and
# unacked_index_key; forklift sets no global key prefix, so they are not under ours):
UNACKED = "unacked"  # hash: delivery tag -> [message, exchange, routing key]; kombu writes
UNACKED_INDEX = "unacked_index"  # zset: delivery tag -> delivery time; kombu writes


class Keys:
    """The key names of one prefix. Get one with `keys_for(prefix)` or `settings.keys`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- jobs (shared/jobstore.py writes them all, in its Lua scripts) -----------------------

    def job(self, job_id: str) -> str:
        """hash: one job record (fields: `shared/jobstore.py:JobRecord`); JobStore writes."""
        return self._k("job", job_id)

    def dependents(self, job_id: str) -> str:
        """set: ids of waiting jobs with an input from this job (`job(id)` + `:dependents`,
        so scripts derive it from the job key); `shared/dependencies.py` adds, the job's
        release resolves and drops it."""
        return self._k("job", job_id, "dependents")

    @property
    def job_prefix(self) -> str:
        """`job(id)` without the id, for scripts that read records of ids they find."""
        return self._k("job", "")

    @property
    def jobs(self) -> str:
        """zset: every job id by creation time; JobStore adds, the janitor trims old ones."""
        return self._k("jobs")

    @property
    def jobs_live(self) -> str:
        """zset: job ids not yet ended and released, by creation time; JobStore scripts."""
        return self._k("jobs", "live")

    def jobs_by_owner(self, owner: str) -> str:
        """zset: one owner's job ids (not parts) by creation time; JobStore's create scripts
        add, `GET /jobs` pages through it (newest first), the janitor trims old ones."""
        return self._k("jobs", "owner", owner)

    @property
    def jobs_owners(self) -> str:
        """set: owners with a `jobs_by_owner` index (the janitor trims each)."""
        return self._k("jobs", "owners")

    @property
    def jobs_due(self) -> str:
        """zset: queued jobs with no message yet (delayed, or waiting to be retried), id ->
        when due; the create and finish scripts add, `shared/due.py` publishes them."""
        return self._k("jobs", "due")

    @property
    def jobs_due_wake(self) -> str:
        """pub/sub channel: a time was added to `jobs_due` (message: that time); it wakes
        the due movers (`shared/due.py`)."""
        return self._k("jobs", "due", "wake")

    def idempotency(self, owner: str, key: str) -> str:
        """string (with TTL): the job ids an `Idempotency-Key` of an owner created;
        `api/idempotency.py`."""
        return self._k("idempotency", owner, key)

    def schedule(self, schedule_id: str) -> str:
        """hash: one periodic job (`POST /schedules`); `shared/schedules.py`."""
        return self._k("schedule", schedule_id)

    @property
    def schedules(self) -> str:
        """zset: schedule id -> its next run (unix time); `shared/schedules.py`."""
        return self._k("schedules")

    def schedules_by_owner(self, owner: str) -> str:
        """set: one owner's schedule ids (bounds their count, lists them);
        `shared/schedules.py`."""
        return self._k("schedules", "owner", owner)

    @property
    def scheduler(self) -> str:
        """string (with TTL): the lock of the one scheduler firing schedules; whichever API
        holds it (`shared/schedules.py`)."""
        return self._k("scheduler")

    def released(self, job_id: str) -> str:
        """string (with TTL): tombstone, a gone record's inputs were released; JobStore."""
        return self._k("released", job_id)

    @property
    def events(self) -> str:
        """channel: job state changes as JSON; JobStore scripts publish, the API subscribes."""
        return self._k("events")

    @property
    def cancel(self) -> str:
        """channel: ids of running jobs cancelled; JobStore publishes, workers subscribe."""
        return self._k("cancel")

    @property
    def reaper(self) -> str:
        """hash: the job reaper's pass deadline and suspicions; `shared/jobs_reaper.py`."""
        return self._k("reaper")

    # --- arrays (shared/arrays/store.py owns the records) ------------------------------------

    def array(self, array_id: str) -> str:
        """hash: one array record (`shared/arrays/store.py`); ArrayStore and job scripts."""
        return self._k("array", array_id)

    @property
    def array_prefix(self) -> str:
        """`array(id)` without the id (scripts that unpin a job's inputs, the replica sweep)."""
        return self._k("array", "")

    @property
    def arrays_expiry(self) -> str:
        """zset: ready array ids by expiry time; ArrayStore, the janitor reads it."""
        return self._k("arrays", "expiry")

    def readers(self, array_id: str) -> str:
        """zset: an array's read leases, token -> deadline; ArrayStore (downloads)."""
        return self._k("readers", array_id)

    def shm_bytes(self, domain: str) -> str:
        """string: bytes counted against a domain's shm cap; ArrayStore and ReplicaStore."""
        return self._k("shm_bytes", domain)

    @property
    def shm_bytes_prefix(self) -> str:
        """`shm_bytes(domain)` without the domain (the free script learns it from the record)."""
        return self._k("shm_bytes", "")

    def shm_ledger(self, domain: str) -> str:
        """hash: segment -> bytes counted against a domain's cap; ArrayStore, ReplicaStore."""
        return self._k("shm_ledger", domain)

    @property
    def shm_ledger_prefix(self) -> str:
        """`shm_ledger(domain)` without the domain (as `shm_bytes_prefix`)."""
        return self._k("shm_ledger", "")

    def register(self, array_id: str) -> str:
        """string (with TTL): an open `POST /arrays/register` reservation; RegistrationStore."""
        return self._k("register", array_id)

    def registered_bytes(self, owner: str) -> str:
        """hash: an owner's open registrations, id -> bytes; `api/limits.py`."""
        return self._k("registered_bytes", owner)

    def registered_deadlines(self, owner: str) -> str:
        """zset: an owner's open registrations, id -> deadline; `api/limits.py`."""
        return self._k("registered_deadlines", owner)

    def janitor(self, domain: str) -> str:
        """string (with TTL): one janitor pass at a time per domain; `shared/arrays/janitor.py`."""
        return self._k("janitor", domain)

    # --- replicas (shared/arrays/replicas.py) -----------------------------------------------

    def replicas(self, domain: str) -> str:
        """set: ids of other domains' arrays copied into this domain; ReplicaStore."""
        return self._k("replicas", domain)

    def replica(self, domain: str, array_id: str) -> str:
        """hash: one replica record (segment, state, token); ReplicaStore."""
        return self._k("replica", domain, array_id)

    def replica_prefix(self, domain: str) -> str:
        """`replica(domain, id)` without the id (the sweep of replicas whose original left)."""
        return self._k("replica", domain, "")

    @property
    def replica_stats(self) -> str:
        """hash: cross-host pull and serve counters; ReplicaStore and `api/routes/internal.py`."""
        return self._k("replicas", "stats")

    # --- presence (shared/workers.py reads; worker/heartbeat.py writes) ----------------------

    @property
    def workers(self) -> str:
        """zset: worker name -> last heartbeat (unix time); `worker/heartbeat.py`."""
        return self._k("workers")

    def worker(self, name: str) -> str:
        """string (JSON, with TTL): a worker's `WorkerPresence` record; `worker/heartbeat.py`."""
        return self._k("worker", name)

    @property
    def worker_prefix(self) -> str:
        """`worker(name)` without the name (the live-worker script reads the names it finds)."""
        return self._k("worker", "")

    def worker_held(self, name: str) -> str:
        """string (JSON, with TTL): the job ids a worker holds, with the time read; heartbeat."""
        return self._k("worker", name, "held")

    @property
    def domains(self) -> str:
        """set: every shm domain an API has served; each API adds its own at startup."""
        return self._k("domains")

    # --- metrics (shared/metrics.py; bumped inside the job scripts) --------------------------

    @property
    def metrics_prefix(self) -> str:
        """Prefix of the metrics keys; scripts get it in ARGV (`m .. 'finished'`)."""
        return self._k("metrics", "")

    @property
    def metrics_submitted(self) -> str:
        """hash: task -> jobs created; JobStore scripts."""
        return self.metrics_prefix + "submitted"

    @property
    def metrics_finished(self) -> str:
        """hash: "task|state" -> jobs that reached a final state; JobStore scripts."""
        return self.metrics_prefix + "finished"

    @property
    def metrics_duration(self) -> str:
        """hash: "task|<bucket>", "task|sum" -> run times (runs: the buckets' sum); JobStore."""
        return self.metrics_prefix + "duration"

    @property
    def metrics_running(self) -> str:
        """hash: job id -> JSON of where it runs; JobStore scripts (start adds, end drops)."""
        return self.metrics_prefix + "running"

    def metrics_throughput(self, slot: int) -> str:
        """string (with TTL): jobs finished in one 10 s slot; JobStore scripts (`tp:<slot>`)."""
        return self.metrics_prefix + f"tp:{slot}"

    @property
    def metrics_array_bytes(self) -> str:
        """hash: "upload"/"download" -> bytes of .npy bodies over HTTP; the API."""
        return self.metrics_prefix + "array_bytes"


def queue_key(queue: str, step: int) -> str:
    """list: the Redis list of one Celery queue's messages of one kombu priority step (kombu
    writes them; the names are kombu's, not under the prefix)."""
    return queue if step == 0 else f"{queue}{_KOMBU_SEP}{step}"


def queue_keys(queue: str) -> list[str]:
    """The lists of one queue, one per priority step, served first to last."""
    return [queue_key(queue, step) for step in KOMBU_PRIORITY_STEPS]


@lru_cache(maxsize=16)
def keys_for(prefix: str) -> Keys:
    """The `Keys` of a prefix (cached: one per stack in a process)."""
    return Keys(prefix)
