"""The emitter's Kafka producer on librdkafka (confluent-kafka), behind kafka-python's interface.

Why: in the request path every decision is one usage event. kafka-python's producer is pure
Python: ``send()`` and its I/O thread cost ~100-200 us of CPU per record, all of it under the
GIL the request handlers need. librdkafka does the batching, compression and I/O in its own
native threads, and ``produce()`` costs a few microseconds. The :class:`metering.emitter.Emitter`
keeps its design (handoff queue, sender thread, disk spool, replay); only the producer object
changes, so it is built to answer the calls the emitter makes of kafka-python's
``KafkaProducer``: ``send(topic, value=, key=)`` returning a future with ``is_done``,
``succeeded()`` and ``exception``; ``flush(timeout)``; ``close(timeout)``; plus ``poll(timeout)``,
which serves delivery reports (librdkafka reports on the thread that polls).

Settings are given in kafka-python's names (see :func:`metering.emitter.producer_config`) and
translated; a name that is neither known nor a librdkafka property (with a dot) is refused.
Keys are partitioned with ``murmur2_random``, the Java client's (and kafka-python's) hash, so a
tenant's events land on the same partition whichever of these clients produced them: the
worker's per-tenant tables rely on that.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Producer
from kafka.errors import (
    CorruptRecordError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)

# kafka-python name -> librdkafka name (None: no equivalent needed; librdkafka never blocks
# the caller and bootstraps in the background, see ``bootstrap_timeout_ms`` below).
_NAMES: dict[str, str | None] = {
    "client_id": "client.id",
    "acks": "acks",
    "enable_idempotence": "enable.idempotence",
    "linger_ms": "linger.ms",
    "compression_type": "compression.type",
    "batch_size": "batch.size",
    "request_timeout_ms": "request.timeout.ms",
    "retry_backoff_ms": "retry.backoff.ms",
    "delivery_timeout_ms": "message.timeout.ms",
    "max_in_flight_requests_per_connection": "max.in.flight.requests.per.connection",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "metrics_enabled": None,
    "max_block_ms": None,
    "bootstrap_timeout_ms": None,
}

_REFUSED = {
    RdKafkaError.MSG_SIZE_TOO_LARGE: MessageSizeTooLargeError,
    RdKafkaError.INVALID_RECORD: CorruptRecordError,
    RdKafkaError.INVALID_MSG: CorruptRecordError,  # CORRUPT_MESSAGE (broker code 2)
    RdKafkaError.INVALID_MSG_SIZE: MessageSizeTooLargeError,
}


#: librdkafka's own log lines (connection failures while Kafka is away, ...) go here rather than
#: to stderr; the emitter's warnings already say when it spools and when it is back.
LIBRDKAFKA_LOG = logging.getLogger("metering.emitter.librdkafka")


def librdkafka_config(config: dict[str, Any]) -> dict[str, Any]:
    """Translate kafka-python producer settings into librdkafka's."""
    out: dict[str, Any] = {
        "partitioner": "murmur2_random",
        "logger": LIBRDKAFKA_LOG,
        "log.connection.close": False,
    }
    for name, value in config.items():
        if name == "bootstrap_servers":
            servers = value if isinstance(value, str) else ",".join(value)
            out["bootstrap.servers"] = servers
        elif name in _NAMES:
            target = _NAMES[name]
            if target is not None:
                out[target] = str(value).lower() if isinstance(value, bool) else value
        elif "." in name:
            out[name] = value  # a librdkafka property, given as such
        else:
            raise ValueError(f"producer setting {name!r} has no librdkafka equivalent")
    if out.get("acks") == "all":
        out["acks"] = -1
    return out


def as_kafka_error(err: RdKafkaError) -> KafkaError:
    """A librdkafka error as the kafka-python exception the emitter classifies."""
    cls = _REFUSED.get(err.code(), KafkaError)
    return cls(f"{err.name()}: {err.str()}")


class DeliveryFuture:
    """One record's delivery report: ``is_done``, ``succeeded()``, ``exception``."""

    __slots__ = ("exception", "is_done")

    def __init__(self) -> None:
        self.is_done = False
        self.exception: KafkaError | None = None

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def __call__(self, err: RdKafkaError | None, _msg: Any) -> None:  # librdkafka's callback
        if err is not None:
            self.exception = as_kafka_error(err)
        self.is_done = True


class ConfluentProducer:
    """librdkafka's producer with the kafka-python calls the emitter makes (module docstring).

    Construction checks that a broker answers within ``bootstrap_timeout_ms`` and raises
    ``KafkaTimeoutError`` otherwise (kafka-python fails to bootstrap likewise), so the emitter's
    replayer backs off instead of queueing into an unreachable cluster."""

    def __init__(self, **config: Any) -> None:
        bootstrap_ms = int(config.get("bootstrap_timeout_ms", 3000))
        self._producer = Producer(librdkafka_config(config))
        try:
            self._producer.list_topics(timeout=bootstrap_ms / 1000)
        except KafkaException as exc:
            self.close(0)
            raise KafkaTimeoutError(f"no broker answered within {bootstrap_ms} ms: {exc}") from exc

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> DeliveryFuture:
        future = DeliveryFuture()
        try:
            self._producer.produce(topic, value, key, on_delivery=future)
        except BufferError as exc:  # librdkafka's own queue is full: Kafka is not keeping up
            raise KafkaTimeoutError(f"producer queue full: {exc}") from exc
        except KafkaException as exc:
            raise as_kafka_error(exc.args[0]) from exc
        return future  # its report comes from poll() (the emitter's sweep) or flush()

    def poll(self, timeout: float = 0) -> None:
        self._producer.poll(timeout)

    def flush(self, timeout: float | None = None) -> None:
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records not delivered within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is pending within ``timeout``; with 0, abandon it at once (its futures
        then fail, and the emitter spools those records)."""
        if timeout == 0:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(0)  # serves the purged records' (failed) reports
            return
        self._producer.flush(-1 if timeout is None else timeout)


__all__ = ["ConfluentProducer", "DeliveryFuture", "as_kafka_error", "librdkafka_config"]
