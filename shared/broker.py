"""What forklift asks RabbitMQ directly, when it is the broker (FORKLIFT_BROKER_URL=amqp://).

On Redis, queue depth is the length of kombu's lists (shared/keys.py `queue_keys`); on AMQP
it is the `message_count` of a passive `queue.declare`: the messages ready in the queue, not
those delivered and unacked (those are the jobs workers hold). A passive declare creates
nothing and checks no arguments, so it never conflicts with the queues' x-max-priority.

One connection per broker URL is kept for the process (a scrape or a dashboard poll costs one
round trip per queue, not an AMQP handshake); it is dropped on any error and made again on
the next call, so a broker restart is followed without a restart of the API.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable

from kombu import Connection
from kombu.exceptions import OperationalError

from shared.settings import Settings

log = logging.getLogger("forklift.broker")

CONNECT_TIMEOUT_S = 3.0
_NOT_FOUND = 404  # AMQP reply code: no such queue (it was never declared)

_lock = threading.Lock()
_connections: dict[str, Connection] = {}


def _connection(url: str) -> Connection:
    conn = _connections.get(url)
    if conn is None:
        conn = Connection(url, connect_timeout=CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
        _connections[url] = conn
    conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
    return conn


def _drop(url: str) -> None:
    conn = _connections.pop(url, None)
    if conn is not None:
        with contextlib.suppress(Exception):  # already broken: nothing to close cleanly
            conn.release()  # type: ignore[no-untyped-call]


def amqp_queue_depths(settings: Settings, queues: Iterable[str]) -> dict[str, int]:
    """Messages ready in each queue (0 for a queue not declared yet). Blocking: call it in a
    thread. Raises kombu's OperationalError when the broker cannot be reached."""
    url = settings.broker
    depths: dict[str, int] = {}
    with _lock:
        try:
            conn = _connection(url)
            for queue in queues:
                channel = conn.channel()  # type: ignore[no-untyped-call]
                try:
                    ok = channel.queue_declare(queue=queue, passive=True)
                    depths[queue] = int(ok.message_count)
                except conn.channel_errors as exc:
                    if getattr(exc, "reply_code", None) != _NOT_FOUND:
                        raise
                    depths[queue] = 0  # the broker closed this channel: open another
                    continue
                channel.close()
        except Exception as exc:
            _drop(url)
            if isinstance(exc, OperationalError):
                raise
            raise OperationalError(str(exc)) from exc
    return depths
