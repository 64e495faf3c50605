"""Publisher confirms for a batch of messages on RabbitMQ: send them all, then wait once.

With `confirm_publish`, py-amqp's channel waits for the broker's ack after every
`basic_publish` (`Channel.basic_publish_confirm`), so a trip of k messages costs k round trips
to the broker, each one its disk write of a persistent message. `confirmed_together(channel)`
sends the first message as py-amqp would, learning its delivery tag from its ack (py-amqp does
not count them), then sends the rest without waiting and, when the block ends, waits until the
broker has acked every one of them (one ack may cover many: `multiple`). A nack fails the whole
batch (`MessageNacked`), as a failed publish of any of its messages would; the caller undoes the
batch's records. The channel never keeps an ack outstanding for its next, unbatched publish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from amqp.exceptions import MessageNacked


class _Batch:
    """A batch's acks, recorded by py-amqp's `basic_ack` / `basic_nack` events: every ack frame
    is seen however it is read (by this batch's waits, or by a wait of kombu's for something
    else, such as a queue declaration's answer, which would otherwise swallow it)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.first = 0  # the delivery tag of the batch's first message, once acked
        self.sent = 0
        self.timeout: float | None = None
        self.upto = 0  # every tag up to this one is acked
        self.singles: set[int] = set()
        self.nacked = False

    def on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.upto = max(self.upto, int(delivery_tag))
        else:
            self.singles.add(int(delivery_tag))
        if not self.first:  # only the first message is out when its ack comes
            self.first = int(delivery_tag)
            self.upto = max(self.upto, self.first - 1)  # the tags before it were acked before
        while self.upto + 1 in self.singles:
            self.upto += 1

    def on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked = True

    def _until(self, done: Callable[[], object]) -> None:
        while not done():
            if self.nacked:
                raise MessageNacked()
            self.channel.connection.drain_events(timeout=self.timeout)
        if self.nacked:
            raise MessageNacked()

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        confirm_timeout = kwargs.pop("confirm_timeout", None)
        self.timeout = confirm_timeout or kwargs.get("timeout")
        if not self.channel._confirm_selected:
            self.channel._confirm_selected = True
            self.channel.confirm_select()
        sent = self.channel._basic_publish(*args, **kwargs)
        self.sent += 1
        if self.sent == 1:  # its ack names the batch's first tag
            self._until(lambda: self.first)
        return sent

    def wait_for_all(self) -> None:
        """Until every message is acked: tags first .. first+sent-1."""
        last = self.first + self.sent - 1
        self._until(lambda: self.upto >= last)


@contextlib.contextmanager
def confirmed_together(channel: Any) -> Iterator[None]:
    """Within the block, `channel.basic_publish` sends without waiting (after the first);
    leaving it waits for every ack. A channel without confirms is left as it is."""
    original = channel.basic_publish
    if getattr(original, "__func__", None) is not type(channel).basic_publish_confirm:
        yield
        return
    batch = _Batch(channel)
    channel.basic_publish = batch.publish
    channel.events["basic_ack"].add(batch.on_ack)
    channel.events["basic_nack"].add(batch.on_nack)
    try:
        yield
    except BaseException:
        # No ack of this batch may be left for a later publish on this (pooled) channel to
        # take for its own; what the block raised is the error either way.
        if batch.sent > 1:
            with contextlib.suppress(Exception):
                batch.wait_for_all()
        raise
    else:
        if batch.sent > 1:
            batch.wait_for_all()
    finally:
        channel.basic_publish = original
        channel.events["basic_ack"].discard(batch.on_ack)
        channel.events["basic_nack"].discard(batch.on_nack)
