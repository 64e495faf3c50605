"""Publisher confirms for a batch on a real RabbitMQ (shared/amqp_confirms.py).

A vhost of its own (`rabbitmqctl add_vhost`, deleted afterwards). Skipped when RabbitMQ
(127.0.0.1:5672) or `rabbitmqctl` is not there.
"""

from __future__ import annotations

import socket

import pytest
from kombu import Connection, Exchange, Producer, Queue

from shared.amqp_confirms import confirmed_together
from tests import stack

pytestmark = pytest.mark.skipif(
    not stack.rabbitmq_available(), reason="needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl"
)


def test_a_batch_is_confirmed_whole_and_leaves_no_ack_behind() -> None:
    with (
        stack.amqp_vhost() as (_, url),
        Connection(url, transport_options={"confirm_publish": True}) as conn,
    ):
        queue = Queue("confirms", Exchange("confirms", type="direct"), routing_key="confirms")
        channel = conn.default_channel
        queue(channel).declare()
        producer = Producer(channel, exchange=queue.exchange, routing_key="confirms")
        amqp_conn = channel.connection
        reads = 0
        drain = amqp_conn.drain_events

        def counting_drain(*args: object, **kwargs: object) -> object:
            nonlocal reads
            reads += 1
            return drain(*args, **kwargs)

        amqp_conn.drain_events = counting_drain
        with confirmed_together(channel):
            for i in range(50):
                producer.publish({"i": i}, delivery_mode=2)
        amqp_conn.drain_events = drain
        # Every message is in the queue once the block is left, in order.
        _, ready, _ = channel.queue_declare("confirms", passive=True)
        assert ready == 50
        # The acks were read from the connection (the first message's, then the rest).
        assert reads >= 2, reads
        # Nothing of the batch is left on the channel for the next publish to take for its
        # own ack: the connection has no frame pending.
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.3)
        producer.publish({"i": 50}, delivery_mode=2)  # py-amqp's own confirm, as before
        got = [queue(channel).get(no_ack=True).payload["i"] for _ in range(51)]
        assert got == list(range(51))
        # A channel without confirms is left as it is.
        with Connection(url) as plain:
            bare = plain.default_channel
            publish = bare.basic_publish
            with confirmed_together(bare):
                assert bare.basic_publish == publish
