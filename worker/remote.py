"""Inputs held in another shm domain: pulled over HTTP into this domain once, then shared.

A job lands on a worker whose domain does not hold one of its inputs when its inputs live in
two domains, or when no worker of the inputs' domain was alive at submission. The worker then
streams the array from the owner's API (`GET <api_url>/internal/arrays/{id}`, authenticated by
FORKLIFT_INTERNAL_TOKEN) straight into a new segment of its own domain, chunk by chunk: the
bytes never go through Redis and never exist whole in the child's heap. The replica record
(`shared/arrays/replicas.py`) makes this happen once per domain: sibling children (and the
other workers of the domain) wait for the pull in progress and then attach the same segment.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import httpx
from pydantic import SecretStr

from shared.arrays.replicas import TOKEN_HEADER, ReplicaStore
from shared.arrays.segments import ShmFullError, create_segment, segment_path, unlink_segment
from shared.schemas import ArrayRef
from worker.runtime import Runtime

log = logging.getLogger("forklift.worker")

LOCK_TTL_S = 900.0  # longest a pull may take before another process may try again
WAIT_POLL_S = 0.05
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0


class PullError(Exception):
    """The input could not be brought into this domain; the message is for the client."""


def local_ref(ref: ArrayRef, rt: Runtime) -> ArrayRef:
    """`ref` itself when it lives here, else a reference to this domain's replica of it."""
    if ref.domain == rt.settings.shm_domain:
        return ref
    segment = ensure_replica(ref, rt)
    return ref.model_copy(update={"segment": segment, "domain": rt.settings.shm_domain})


def ensure_replica(ref: ArrayRef, rt: Runtime) -> str:
    """The name of this domain's replica of `ref`, pulling it first if nobody has."""
    store = ReplicaStore(rt.redis, rt.settings)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + LOCK_TTL_S
    while True:
        claim = store.claim(ref.id, ref.nbytes, token, LOCK_TTL_S)
        if claim.state == "ready":
            if segment_path(claim.segment).exists():
                store.count("hits")
                return claim.segment
            # The record outlived its segment (/dev/shm wiped): forget it and pull again.
            store.forget(ref.id, segment=claim.segment)
            continue
        if claim.state == "claimed":
            return _pull(ref, rt, store, token, claim.api_url)
        if claim.state == "gone":
            raise PullError(f"array {ref.id} is gone")
        if claim.state == "full":
            raise PullError(
                f"shared memory full: no room for a {ref.nbytes} byte copy of array {ref.id}"
                f" from shm domain {ref.domain} ({claim.bytes_in_use} of"
                f" {rt.settings.shm_limit_bytes} bytes in use here)"
            )
        if time.monotonic() > deadline:
            raise PullError(f"timed out waiting for another process to pull array {ref.id}")
        time.sleep(WAIT_POLL_S)  # a sibling is pulling it


def _pull(ref: ArrayRef, rt: Runtime, store: ReplicaStore, token: str, api_url: str) -> str:
    name = store.segment_name(ref.id)
    secret = rt.settings.internal_token
    began = time.monotonic()
    try:
        if secret is None:
            raise PullError(
                f"array {ref.id} lives in shm domain {ref.domain}; pulling it into"
                f" {rt.settings.shm_domain} needs FORKLIFT_INTERNAL_TOKEN (the same value on"
                " every API and worker)"
            )
        if not api_url:
            raise PullError(
                f"array {ref.id} lives in shm domain {ref.domain}, whose API did not record"
                " its address: set FORKLIFT_API_INTERNAL_URL on that domain's API and workers"
            )
        unlink_segment(name)  # left by a puller that died: we hold the claim now
        _stream_into(f"{api_url.rstrip('/')}/internal/arrays/{ref.id}", secret, name, ref)
        if not store.mark_ready(ref.id, token):
            unlink_segment(name)
            raise PullError(f"array {ref.id} was freed while it was being pulled")
    except BaseException:
        store.forget(ref.id, token=token)
        unlink_segment(name)
        raise
    elapsed = time.monotonic() - began
    pipe = rt.redis.pipeline(transaction=False)
    pipe.hincrby(store.stats_key, f"pulls:{store.domain}", 1)
    pipe.hincrby(store.stats_key, f"pulled_bytes:{store.domain}", ref.nbytes)
    pipe.execute()
    log.info(
        "pulled array %s (%d bytes) from shm domain %s at %s in %.3f s",
        ref.id,
        ref.nbytes,
        ref.domain,
        api_url,
        elapsed,
    )
    return name


def _stream_into(url: str, secret: SecretStr, name: str, ref: ArrayRef) -> None:
    headers = {TOKEN_HEADER: secret.get_secret_value()}
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    try:
        segment = create_segment(name, ref.nbytes)
    except ShmFullError as exc:
        raise PullError(f"shared memory full: {exc.strerror}") from None
    try:
        with httpx.Client(timeout=timeout) as http, http.stream("GET", url, headers=headers) as r:
            if r.status_code != 200:
                text = r.read()[:300].decode(errors="replace")
                raise PullError(f"the owner's API refused array {ref.id}: {r.status_code} {text}")
            declared = r.headers.get("content-length")
            if declared is not None and int(declared) != ref.nbytes:
                raise PullError(
                    f"the owner's API sent {declared} bytes for array {ref.id},"
                    f" which has {ref.nbytes}"
                )
            buffer = segment.buffer
            written = 0
            for chunk in r.iter_raw():
                end = written + len(chunk)
                if end > ref.nbytes:
                    raise PullError(f"the owner's API sent more than array {ref.id} holds")
                buffer[written:end] = chunk
                written = end
            del buffer
            if written != ref.nbytes:
                raise PullError(
                    f"the owner's API sent {written} of the {ref.nbytes} bytes of array {ref.id}"
                )
    except httpx.HTTPError as exc:
        raise PullError(f"cannot reach the API holding array {ref.id} ({url}): {exc}") from None
    finally:
        with contextlib.suppress(BufferError):
            segment.close()
