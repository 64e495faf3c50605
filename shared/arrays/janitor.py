"""Reconciles the registry with /dev/shm for this shm domain; run periodically by the API.

- arrays past their expiry and pinned by no job are freed;
- `forklift_` segments with no record are unlinked (crashes, killed uploads, lost records);
- records whose segment vanished are dropped;
- the domain's byte counter is recounted from the ledger of reservations (store.py), in one
  script, so reservations without a segment yet count and concurrent reserves and drops
  are never lost.

Only names of the exact form `<prefix><32 hex>` are touched, so a stack with a longer prefix
(a test session's, say) on the same host is never swept by this one. A file of such a name
that is not ours (another user's, a symlink, a FIFO, one we may not unlink) is logged once and
left alone; nothing about one file stops a pass.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import redis

from shared.arrays import lifecycle, pool
from shared.arrays.replicas import sweep_replicas
from shared.arrays.segments import list_segments, unlink_own
from shared.arrays.store import ArrayStore
from shared.joblist import trim_owner_indexes
from shared.jobstore import JobStore
from shared.settings import Settings

log = logging.getLogger("forklift.janitor")

POOL_IDLE_S = 60.0  # pooled segments unused this long go back to the OS

# Expired and unpinned; or a drop deferred for a reader (store.drop decides again).
_CLAIM_EXPIRED = """
-- KEYS: array   ARGV: now
local a = redis.call('HMGET', KEYS[1], 'state', 'pins', 'expires_at', 'deferred')
if a[4] == '1' and tonumber(a[2] or '0') <= 0 then return 1 end
if a[1] ~= 'ready' or tonumber(a[2]) > 0 or tonumber(a[3]) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'deleting')
return 1
"""


@dataclass
class SweepReport:
    expired: list[str] = field(default_factory=list)
    orphan_segments: list[str] = field(default_factory=list)
    orphan_records: list[str] = field(default_factory=list)
    bytes_in_use: int = 0
    pool_trimmed: int = 0


def sweep(client: redis.Redis, settings: Settings, *, force: bool = False) -> SweepReport | None:
    """One pass; None when another process of this domain holds the janitor lock."""
    lock = settings.keys.janitor(settings.shm_domain)
    ttl = max(1, int(settings.janitor_interval))
    if not force and not client.set(lock, "1", nx=True, ex=ttl):
        return None
    store = ArrayStore(client, settings)
    report = SweepReport()
    now = time.time()
    claim = client.register_script(_CLAIM_EXPIRED)
    for array_id in store.due_for_expiry(now):
        if claim(keys=[store.key(array_id)], args=[repr(now)]):
            dropped = store.drop(array_id)
            if dropped:
                lifecycle.release(dropped, settings)
                report.expired.append(array_id)
        elif not client.exists(store.key(array_id)):
            client.zrem(store.expiry_key, array_id)

    pattern = re.compile(re.escape(settings.shm_prefix) + r"([0-9a-f]{32})")
    present: dict[str, str] = {}
    for name in list_segments(settings.shm_prefix):
        match = pattern.fullmatch(name)
        if match:
            present[match.group(1)] = name
    ids = list(present)
    pipe = client.pipeline(transaction=False)
    for array_id in ids:
        pipe.hmget(store.key(array_id), "nbytes", "domain")
        pipe.hexists(store.ledger_key(), array_id)
    replies = pipe.execute()
    unledgered = []  # records made before the ledger existed: the recount adds them
    for array_id, (nbytes, _domain), ledgered in zip(ids, replies[::2], replies[1::2], strict=True):
        if nbytes is None:
            if unlink_own(present[array_id]):
                report.orphan_segments.append(present[array_id])
        elif not ledgered:
            unledgered.append(array_id)

    expiring = [str(i) for i in client.zrange(store.expiry_key, 0, -1)]
    for array_id in expiring:
        if array_id in present:
            continue
        domain, created_at = client.hmget(store.key(array_id), "domain", "created_at")
        # Only records older than the listing above: a newer one's segment was not listed.
        if domain == settings.shm_domain and float(created_at or now) < now:
            store.drop(array_id)
            report.orphan_records.append(array_id)
    sweep_replicas(client, settings)  # copies of other domains' arrays
    report.bytes_in_use = store.recount(unledgered)
    report.pool_trimmed = pool.trim(settings, idle_s=max(POOL_IDLE_S, settings.janitor_interval))
    JobStore(client, settings).trim_index(now - settings.job_ttl)
    trim_owner_indexes(client, settings, now - settings.job_ttl)
    if report.expired or report.orphan_segments or report.orphan_records:
        log.info(
            "janitor: freed %d expired, unlinked %d orphan segments, dropped %d orphan records",
            len(report.expired),
            len(report.orphan_segments),
            len(report.orphan_records),
        )
    return report
