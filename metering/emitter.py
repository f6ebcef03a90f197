"""The usage-event emitter: ``emit(event)`` never blocks, and nothing emitted is lost silently.

How an event travels::

    emit() ─► bounded in-memory handoff queue ─► sender thread ─┬─► KafkaProducer (key = tenant)
                                                                └─► Spool (disk) ─► replayer thread
                                                                                    ─► KafkaProducer

- ``emit`` appends the event to a bounded deque (µs; no I/O, no lock held by I/O, safe from any
  thread and from an event loop, nothing to await); past ``lazy_limit`` queued events it encodes
  them first, so a backlog costs ~0.4 KiB per event. A full queue drops the event, counted and
  logged: that is the bound on the emitter's memory.
- The sender thread owns the producer while the emitter is ``DIRECT``. When Kafka looks
  unreachable (a send fails, a delivery fails, or nothing is acknowledged for ``down_after``
  seconds) or the queue backs up past half its size, the emitter turns ``SPOOLING``: every
  event not yet acknowledged is appended to the spool, in emit order, followed by everything
  emitted later.
- The replayer thread sends the spool, oldest first, with its own producer, and removes a batch
  only after Kafka acknowledged all of it. When the spool is empty (checked under the same lock
  the sender holds while appending) the emitter turns ``DIRECT`` again and the replayer's
  producer goes to the sender. So per tenant, events reach Kafka in emit order: nothing is sent
  directly while anything older waits on disk.
- A start is ``SPOOLING`` too: the replayer first sends what an earlier run left in the spool.
- A record Kafka refuses for itself (too large for the topic, invalid) can never be sent: the
  replayer drops it, counted and logged, and goes on with the records behind it; only an error
  that may pass (Kafka away, a timeout) keeps the batch for another try. The broker refuses a
  whole record batch for one such record, so records refused at delivery are never dropped by
  the sender: it spools them, and the replayer sends each again in a request of its own. Only
  a record the client refuses at ``send`` (larger than a request may be) is dropped at once.
- Processes sharing a data dir each hold a spool slot (``spool/0``, ``spool/1``, ...). While
  ``DIRECT``, every ``orphan_scan_every`` seconds the replayer also looks for a slot no live
  process holds that still has records (a process killed during an outage left it), locks it,
  and sends it oldest first, as its own: what a dead process spooled does not wait for the
  next process that happens to take its slot. The lock (``flock``) keeps any slot to one
  process at a time.
- A record may be delivered twice (an acknowledgement lost in the outage, a crash between
  delivery and spool commit); it carries the same event id, which is how the pipeline drops it.
- ``close(timeout)`` sends what it can in ``timeout`` and spools the rest; the spool is durable.

Tests: ``tests/integration/test_emitter*.py`` (round trip, outage with a process restart).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import enum
import logging
import os
import shutil
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, get_args

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from prometheus_client import Counter, Gauge, Histogram

from metering.events import MAX_EVENT_BYTES, EventDecodeError, UsageEvent, encode_event
from metering.settings import (
    KafkaClient,
    Settings,
    SettingsError,
    get_settings,
    load_settings,
)
from metering.spool import Record, Spool, SpoolBatch, SpoolLocked
from metering.threads import NamedThread

log = logging.getLogger(__name__)

# --- metrics (prometheus-client default registry; counters exported with ``_total``) -----------
EVENTS_EMITTED = Counter("metering_events_emitted", "Events accepted by Emitter.emit()")
EVENTS_DELIVERED = Counter(
    "metering_events_delivered", "Emitted events acknowledged by Kafka (directly or replayed)"
)
EVENTS_SPOOLED = Counter("metering_events_spooled", "Events written to the on-disk spool")
EVENTS_REPLAYED = Counter(
    "metering_events_replayed", "Spooled events sent to Kafka and acknowledged"
)
EVENTS_DROPPED = Counter(
    "metering_events_dropped",
    "Events lost: queue_full, spool_full, closed, refused (by Kafka), invalid, error, "
    "spool_corrupt (records cut from a damaged spool segment), spool_cut (a torn or damaged "
    "spool tail whose record count cannot be told: one per cut, its bytes logged)",
    ["reason"],
)
#: Why an event was lost: the only values ``metering_events_dropped{reason}`` takes.
DropReason = Literal[
    "queue_full",
    "spool_full",
    "closed",
    "refused",
    "invalid",
    "error",
    "spool_corrupt",
    "spool_cut",
]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
# Each reason's series exists at 0 from the start: a labelled child appears at its first
# increment, already at 1, and increase() sees no increase from a series' first sample, so the
# alert on drops would miss the first drop (or burst) of each reason in each process.
for _reason in DROP_REASONS:
    EVENTS_DROPPED.labels(_reason)
PRODUCER_ERRORS = Counter(
    "metering_emitter_producer_errors", "Kafka producer errors seen by the emitter", ["error"]
)
EMIT_SECONDS = Histogram(
    "metering_emit_seconds",
    "Time Emitter.emit() takes the caller (timed for one call in 64)",
    buckets=(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
)
SPOOL_BYTES = Gauge("metering_emitter_spool_bytes", "Bytes waiting in the emitter's spool")
SPOOL_EVENTS = Gauge("metering_emitter_spool_events", "Events waiting in the emitter's spool")
QUEUE_EVENTS = Gauge("metering_emitter_queue_events", "Events waiting in the handoff queue")
KAFKA_DIRECT = Gauge(
    "metering_emitter_direct", "1 while events go straight to Kafka, 0 while they are spooled"
)


_WAKE_AT = 256  # queued events that make emit() wake the idle sender early
# emit() times one call in this many for metering_emit_seconds: timing and observing every call
# cost about as much as the call itself (~1.2 us of ~2 on a request path of one event per
# request). A power of two (a mask test).
_TIME_EVERY = 64


class EmitterMode(enum.Enum):
    DIRECT = "direct"
    SPOOLING = "spooling"


class _Unacked:
    """A record handed to the producer and not yet known to be acknowledged."""

    __slots__ = ("future", "key", "sent_at", "value")

    def __init__(self, key: bytes, value: bytes, future: Any, sent_at: float) -> None:
        self.key, self.value, self.future, self.sent_at = key, value, future, sent_at


class _Mark:
    """A place in the hand-off queue (:meth:`Emitter.durable_mark`): its future completes when
    every event queued before it is acknowledged by Kafka or in the spool."""

    __slots__ = ("drops_before", "future")

    def __init__(self, drops_before: int) -> None:
        self.drops_before = drops_before
        self.future: Future[bool] = Future()


class _DropLog:
    """Logs drops at most once per ``every`` seconds per reason, with the count since."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._count: collections.Counter[str] = collections.Counter()
        #: events this emitter dropped before Kafka acknowledged or the spool kept them (what
        #: flush() reports); a record lost from the spool was already reported kept
        self.not_kept = 0

    def drop(self, reason: DropReason, n: int = 1, *, from_spool: bool = False) -> None:
        EVENTS_DROPPED.labels(reason).inc(n)
        if not from_spool:
            self.not_kept += n
        self._count[reason] += n
        now = time.monotonic()
        if now - self._last.get(reason, -self.every) >= self.every:
            log.error(
                "usage events dropped (%s): %d since last report", reason, self._count[reason]
            )
            self._last[reason] = now
            self._count[reason] = 0


def default_compression() -> str:
    """lz4 when the codec is installed (a dependency of the project), else gzip."""
    try:
        import lz4.frame  # noqa: F401

        return "lz4"
    except ImportError:  # pragma: no cover - lz4 is a declared dependency
        return "gzip"


# Errors about the record itself: resending it can never succeed, so it is dropped (counted).
# Every other error (unreachable, timeouts, leader moves, authorisation, a closed producer) may
# pass, so the record is kept in the spool and retried.
_RECORD_REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordError,
    InvalidRecordError,
)


def _is_retriable(exc: BaseException | None) -> bool:
    return not isinstance(exc, _RECORD_REFUSED)


def _close_producer_now(producer: KafkaProducer | None) -> None:
    """Abandon a producer: abort what it still holds, without waiting on Kafka.

    kafka-python's ``close(timeout=0)`` first flushes and raises when that times out, so the
    I/O thread is force-closed first (its pending batches then fail at once)."""
    if producer is None:
        return
    sender = getattr(producer, "_sender", None)
    with contextlib.suppress(Exception):
        if sender is not None:
            sender.force_close()
            sender.join(2.0)
    with contextlib.suppress(Exception):
        producer.close(timeout=0)


def producer_config(
    bootstrap: str,
    *,
    linger_ms: int = 5,
    compression: str | None = None,
    client_id: str = "metering-emitter",
    **overrides: Any,
) -> dict[str, Any]:
    """The emitter's KafkaProducer settings: idempotent, acks=all, batched with linger,
    compressed. ``max_block_ms`` bounds how long the sender thread (never the caller) waits
    for metadata."""
    return {
        "bootstrap_servers": bootstrap.split(","),
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": linger_ms,
        "compression_type": compression or default_compression(),
        "batch_size": 64 * 1024,
        "metrics_enabled": False,
        "max_block_ms": 2000,
        "request_timeout_ms": 10_000,
        "retry_backoff_ms": 100,
        "bootstrap_timeout_ms": 3000,
        **overrides,
    }


def _holds_records(slot: Path) -> bool:
    """Whether a spool slot's directory has a non-empty segment: a spool emptied (or never
    used) has none, so the replayer's scan for orphaned slots locks none of those."""
    with contextlib.suppress(OSError), os.scandir(slot) as entries:
        return any(e.name.endswith(".seg") and e.stat().st_size > 0 for e in entries)
    return False


def _spool_slot(root: Path, max_bytes: int, fsync: bool) -> Spool:
    """The first spool slot under ``root`` no other live process holds (``root/0``, ``root/1``,
    ...), so several processes sharing a data dir each get one, and a restarted process takes
    over (and replays) what a dead one left."""
    for slot in range(64):
        try:
            return Spool(root / str(slot), max_bytes=max_bytes, fsync=fsync)
        except SpoolLocked:
            continue
    raise SpoolLocked(f"all 64 spool slots under {root} are in use")


class Emitter:
    """Sends usage events to Kafka without blocking the caller; spools to disk when it must.

    ``Emitter(settings)`` or ``Emitter("host:9092")``; ``emit(event)``; ``flush(timeout)``;
    ``close(timeout)`` (also on interpreter exit). Usable from threads and event loops alike:
    ``emit`` never awaits or blocks; ``aflush``/``aclose`` run the waiting parts in a thread.
    """

    def __init__(
        self,
        settings: Settings | str | None = None,
        *,
        topic: str | None = None,
        spool_dir: Path | str | None = None,
        spool_max_bytes: int | None = None,
        spool_fsync: bool = True,
        max_queue: int = 50_000,
        lazy_limit: int = 8192,
        max_unacked: int = 20_000,
        linger_ms: int = 20,
        compression: str | None = None,
        down_after: float = 5.0,
        replay_batch: int = 5000,
        retry_backoff: tuple[float, float] = (0.2, 2.0),
        client_id: str = "metering-emitter",
        producer_overrides: dict[str, Any] | None = None,
        kafka_client: str | None = None,
        orphan_scan_every: float = 10.0,
    ) -> None:
        if isinstance(settings, str):
            settings = load_settings(kafka_bootstrap_servers=settings)
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.usage_events_topic
        if max_queue < 2:
            raise ValueError("max_queue must be at least 2")
        self.max_queue = max_queue
        self.max_unacked = max_unacked
        self.down_after = down_after
        self.replay_batch = replay_batch
        self.retry_backoff = retry_backoff
        self.orphan_scan_every = orphan_scan_every
        self.kafka_client = kafka_client or self.settings.emitter_kafka_client
        if self.kafka_client not in get_args(KafkaClient):
            raise ValueError(
                f"kafka_client must be one of {', '.join(get_args(KafkaClient))}, "
                f"not {kafka_client!r}"
            )
        self._producer_config = producer_config(
            self.settings.kafka_bootstrap_servers,
            linger_ms=linger_ms,
            compression=compression,
            client_id=client_id,
            **(producer_overrides or {}),
        )
        root = Path(spool_dir) if spool_dir else self.settings.metering_data_dir / "spool"
        try:
            self.spool = _spool_slot(
                root, spool_max_bytes or self.settings.emitter_spool_max_bytes, spool_fsync
            )
        except OSError as exc:
            if spool_dir:
                raise
            # The folder comes from a setting: say which (a read-only or foreign data dir).
            raise SettingsError(
                f"METERING_DATA_DIR={self.settings.metering_data_dir}: the emitter cannot keep "
                f"its spool in {root}: {exc.strerror or exc}"
            ) from exc

        # Events (~2 KiB each) while the queue is short, encoded records (~0.4 KiB) beyond
        # ``lazy_limit``: at most ~16 MiB + ~17 MiB with the defaults.
        self._queue: collections.deque[UsageEvent | Record | _Mark] = collections.deque()
        self.lazy_limit = min(lazy_limit, max_queue)
        self._mode = EmitterMode.SPOOLING  # the replayer decides when Kafka takes events directly
        self._mode_lock = threading.Lock()  # held while appending to the spool or leaving SPOOLING
        self._producer: KafkaProducer | None = None  # the sender's, while DIRECT
        self._handover: KafkaProducer | None = None  # the sender's, passed on to the replayer
        self._unacked: collections.deque[_Unacked] = collections.deque()
        # Records ever handed to the producer: those still in _unacked are its last ones, so
        # everything up to ``_sent_total - len(_unacked)`` is retired (acknowledged, spooled,
        # or dropped). Marks wait on that number (durable_mark).
        self._sent_total = 0
        self._marks: collections.deque[tuple[int, _Mark]] = collections.deque()
        self._taken_marks: list[_Mark] = []
        self._sender_busy = False
        self._sender_idle = False
        # Queued events wait at most ~linger. Each wake-up of the sender costs about as much as
        # the events it carries on this kind of VM (futex and cross-CPU wake-ups, librdkafka's
        # included): 20 ms rather than 5 halved the sender's CPU per event at 2,500 events/s,
        # and a decision event reaching Kafka 20 ms later changes no answer anyone reads.
        self._idle_poll = max(0.001, linger_ms / 1000)
        self._wake_sender = threading.Event()
        self._wake_replayer = threading.Event()
        self._closing = False
        self._stop_sender = False
        self._stop_replayer = False
        self._close_deadline = float("inf")
        # None: not known yet; False: the last attempt failed (close() does not wait on Kafka)
        self._kafka_reachable: bool | None = None
        self._drops = _DropLog()
        self._count_cuts(self.spool)
        self._not_kept_at_flush = 0  # _drops.not_kept when flush() last returned
        self._calls = 0  # emit() calls, for timing one in _TIME_EVERY
        self._update_spool_gauges()
        KAFKA_DIRECT.set(0)

        self._sender = NamedThread(target=self._send_loop, name="emitter-sender", daemon=True)
        self._replayer = NamedThread(target=self._replay_loop, name="emitter-replayer", daemon=True)
        self._sender.start()
        self._replayer.start()
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            if (emitter := ref()) is not None:
                emitter.close(timeout=5.0)

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    # --- the caller's side ---------------------------------------------------------------------
    def emit(self, event: UsageEvent) -> None:
        """Hand ``event`` over for delivery and return at once (never waits on Kafka or disk)."""
        started = self._timed()
        if type(event) is not UsageEvent and not isinstance(event, UsageEvent):
            raise TypeError(f"emit() takes a UsageEvent, not {type(event).__name__}")
        queued = self._room()
        if queued is None:
            return
        if queued < self.lazy_limit:
            self._queue.append(event)  # the sender encodes it
        else:
            # A backlog: encode here, so each queued event takes ~0.4 KiB, not a model's ~2 KiB
            # (and the caller, paying for it, slows down a little: backpressure, not blocking).
            try:
                self._queue.append((event.subject.encode(), encode_event(event)))
            except EventDecodeError as exc:  # over the size bound: a caller's bug, never a 500
                log.error("usage event %s not sent: %s", event.id, exc)
                self._drops.drop("invalid")
                return
        self._queued(queued, started)

    def emit_encoded(self, key: bytes, value: bytes) -> None:
        """:meth:`emit` for an event already encoded (``value``: the event's JSON, as
        :func:`metering.events.encode_event` or :func:`metering.events_fast.encode_wire` write
        it; ``key``: its subject, UTF-8). For a caller on a hot path that builds events from
        validated parts: nothing is encoded or checked here but the size bound."""
        started = self._timed()
        queued = self._room()
        if queued is None:
            return
        if len(value) > MAX_EVENT_BYTES:
            log.error("usage event not sent: %d bytes, at most %d", len(value), MAX_EVENT_BYTES)
            self._drops.drop("invalid")
            return
        self._queue.append((key, value))
        self._queued(queued, started)

    def has_room(self, events: int, nbytes: int = 0) -> bool:
        """Whether ``events`` more (``nbytes`` of JSON as the caller got them) would be taken
        now and none of them dropped: the emitter is open, its queue has room for all of them,
        and while Kafka is away (spooling) the spool has room for them and for what the queue
        still holds (an estimate, with a margin: see below). A caller that must not lose what
        it accepted (the HTTP ingest) asks before it accepts; on one event loop nothing else
        emits between the question and its :meth:`emit` calls."""
        queued = len(self._queue)
        if self._closing or queued + events > self.max_queue:
            return False
        if self._mode is EmitterMode.SPOOLING and events:
            # What the queue holds goes to the spool too. A spooled record is the event as the
            # emitter encodes it (defaults written out) plus key and header: counted as twice
            # the caller's share of ``nbytes`` plus 64 bytes, for queued events as well.
            per_event = 2 * nbytes / events + 64
            needed = (queued + events) * per_event
            if self.spool.used_bytes + needed > self.spool.max_bytes:
                return False
            # The spool's own bound is not the disk's: a full file system refuses the append
            # (and the events would be dropped) long before. So: no room while the last append
            # failed, nor while the disk has less free than this needs.
            if self.spool.write_failed:
                return False
            try:
                return shutil.disk_usage(self.spool.directory).free >= needed
            except OSError:
                return False
        return True

    @property
    def dropped_total(self) -> int:
        """Events not kept so far (queue or spool full, refused, invalid, emitted after close)."""
        return self._drops.not_kept

    def durable_mark(self, dropped_before: int | None = None) -> Future[bool]:
        """A future that completes once every event emitted before this call (by any thread)
        is acknowledged by Kafka or written to the spool (synced, unless the spool was made
        with ``spool_fsync=False``): True, or False if the emitter is closed or some event was
        dropped since ``dropped_before`` (:attr:`dropped_total` read before the caller's own
        emits; default: now). Not only the caller's: a drop is not traced to its caller, so a
        False may be another's. A caller that must not answer before its events are safe (the
        HTTP ingest) waits on it; it costs about one linger and one acknowledgement while Kafka
        answers, one spool write while it does not."""
        mark = _Mark(self._drops.not_kept if dropped_before is None else dropped_before)
        if self._closing:
            mark.future.set_result(False)
            return mark.future
        self._queue.append(mark)
        self._wake_sender.set()
        return mark.future

    async def wait_durable(self, timeout: float, dropped_before: int | None = None) -> bool:
        """:meth:`durable_mark`, awaited at most ``timeout`` seconds (False after that)."""
        mark = self.durable_mark(dropped_before)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(mark), timeout)
        except TimeoutError:
            return False

    def _timed(self) -> float:
        """The start time of a call timed for metering_emit_seconds (one in _TIME_EVERY), else
        0. A race between threads only shifts which call is timed."""
        self._calls = calls = self._calls + 1
        return time.perf_counter() if not calls & (_TIME_EVERY - 1) else 0.0

    def _room(self) -> int | None:
        """The queue's length if one more event may join it; None (counted) if not."""
        if self._closing:
            self._drops.drop("closed")
            return None
        queued = len(self._queue)
        if queued >= self.max_queue:
            self._drops.drop("queue_full")
            return None
        return queued

    def _queued(self, queued: int, started: float) -> None:
        # The idle sender polls every linger_ms anyway; a wake-up (a futex call on the caller's
        # time) is only worth it when a batch has built up.
        if self._sender_idle and queued >= _WAKE_AT:
            self._wake_sender.set()
        if started:
            EMIT_SECONDS.observe(time.perf_counter() - started)

    @property
    def mode(self) -> EmitterMode:
        return self._mode

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is acknowledged by Kafka or durably spooled.

        Returns False if that did not happen within ``timeout`` seconds, or if any event was
        dropped instead (counted in ``metering_events_dropped``: a full queue or spool, refused
        by Kafka, invalid, emitted after close) since the last flush that did not time out, or
        since the start. It says that something was lost, not what; the drop is counted once
        (a concurrent flush may report it instead). A spooled record lost later (refused on
        replay, cut from a damaged spool) is counted, not reported here: a flush already
        reported it kept."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._queue or self._sender_busy or self._unacked:
            if time.monotonic() >= deadline:
                return False
            self._wake_sender.set()
            time.sleep(0.002)
        before, self._not_kept_at_flush = self._not_kept_at_flush, self._drops.not_kept
        return self._not_kept_at_flush == before

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting events; deliver what can be delivered within ``timeout`` seconds
        (including what waits in the spool); spool the rest. Idempotent."""
        if self._stop_sender:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        deadline = time.monotonic() + timeout
        self._close_deadline = deadline
        self._closing = True
        # Give the replayer the time left to empty the spool while Kafka answers.
        while time.monotonic() < deadline - 0.05:
            idle = not (self._queue or self._sender_busy)
            if idle and (self._mode is EmitterMode.DIRECT or self._kafka_reachable is False):
                break
            self._wake_sender.set()
            time.sleep(0.005)
        # A replayer stuck connecting to an unreachable Kafka is not waited for past the deadline:
        # it finds the stop flag when it wakes, and what it had not committed stays spooled.
        self._stop_replayer = True
        self._wake_replayer.set()
        self._replayer.join(max(0.1, deadline - time.monotonic()))
        self._stop_sender = True
        self._wake_sender.set()
        self._sender.join(max(0.0, deadline - time.monotonic()) + 2.0)
        self._update_spool_gauges()
        self.spool.close()
        if self.spool.pending_events:
            log.warning(
                "emitter closed with %d events in the spool %s; they are sent on the next start",
                self.spool.pending_events,
                self.spool.directory,
            )

    async def aflush(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Emitter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the sender thread ---------------------------------------------------------------------
    def _new_producer(self) -> Any:
        """kafka-python's ``KafkaProducer``, or librdkafka's behind the same calls."""
        if self.kafka_client == "confluent":
            from metering.kafka_producer import ConfluentProducer

            return ConfluentProducer(**self._producer_config)
        return KafkaProducer(**self._producer_config)

    def _send_loop(self) -> None:
        while True:
            self._sender_busy = True
            batch = self._take(2000)
            try:
                if batch:
                    self._dispatch(batch)
                    if self._taken_marks:
                        self._deliver_now()
                self._sweep()
                if self._taken_marks or self._marks:
                    self._complete_marks()
            except Exception:  # never let the thread die: spool what it held
                log.exception("emitter sender failed; spooling")
                try:  # part of the batch may be in Kafka already: a resend, never a loss
                    self._to_spool("sender error", batch, abort=True)
                except Exception:
                    log.exception("emitter could not spool after an error")
                    self._drops.drop("error", len(batch))
            finally:
                self._sender_busy = False
            QUEUE_EVENTS.set(len(self._queue))
            if batch or self._queue:
                continue
            if self._stop_sender:
                self._finish()
                return
            self._sender_idle = True
            if not self._queue:
                self._wake_sender.wait(self._idle_poll)
            self._wake_sender.clear()
            self._sender_idle = False

    def _take(self, n: int) -> list[Record]:
        q = self._queue
        items: list[UsageEvent | Record | _Mark] = []
        with contextlib.suppress(IndexError):
            for _ in range(n):
                items.append(q.popleft())
        records: list[Record] = []
        for item in items:
            if type(item) is tuple:
                records.append(item)
                continue
            if type(item) is _Mark:
                self._taken_marks.append(item)
                continue
            assert isinstance(item, UsageEvent)
            try:
                records.append((item.subject.encode(), encode_event(item)))
            except EventDecodeError as exc:
                log.error("usage event %s not sent: %s", item.id, exc)
                self._drops.drop("invalid")
        return records

    def _dispatch(self, records: list[Record]) -> None:
        EVENTS_EMITTED.inc(len(records))
        if len(self._unacked) + len(records) > self.max_unacked:
            self._sweep()  # may leave DIRECT
        # Only the replayer leaves SPOOLING (under the lock), so a False here means DIRECT.
        if self._mode is EmitterMode.SPOOLING and self._dispatch_spooled(records):
            return
        # kafka-python's accumulator has no memory bound: cap what waits on Kafka, and let the
        # disk take a backlog rather than RAM.
        if len(self._queue) > self.max_queue // 2:
            self._to_spool("the handoff queue is backing up", records, abort=False)
            return
        if len(self._unacked) + len(records) > self.max_unacked:
            self._to_spool("Kafka is not keeping up", records, abort=False)
            return
        producer = self._producer
        assert producer is not None
        sent_at = time.monotonic()
        send = producer.send
        topic = self.topic
        unacked = self._unacked
        appended = 0
        try:
            for i, (key, value) in enumerate(records):
                try:
                    future = send(topic, value=value, key=key)
                except Exception as exc:
                    PRODUCER_ERRORS.labels(type(exc).__name__).inc()
                    if not _is_retriable(exc):
                        log.error("Kafka refused a usage event: %s", exc)
                        self._drops.drop("refused")
                        continue
                    self._sent_total += appended  # before _to_spool empties _unacked
                    appended = 0
                    self._to_spool(f"send failed: {exc!r}", records[i:], abort=True)
                    return
                unacked.append(_Unacked(key, value, future, sent_at))
                appended += 1
        finally:
            self._sent_total += appended

    def _deliver_now(self) -> None:
        """Someone waits on a mark (the HTTP ingest, before its 202): have the producer send
        what it holds now, not after its linger, and wait here for the acknowledgements (at
        most a second; the sweep then deals with what failed or is still out). Only this
        thread waits: without it the mark waited a linger and a sender's idle turn, ~45 ms."""
        producer = self._producer
        if producer is None or not self._unacked:
            return
        with contextlib.suppress(Exception):  # a timeout or a failed record: the sweep sees it
            producer.flush(timeout=1.0)

    def _complete_marks(self) -> None:
        """Place the marks taken with the last batch, and complete those whose events are all
        retired. Sender thread."""
        marks = self._marks
        if self._taken_marks:
            for mark in self._taken_marks:  # everything taken with them is dispatched now
                marks.append((self._sent_total, mark))
            self._taken_marks.clear()
        retired = self._sent_total - len(self._unacked)
        not_kept = self._drops.not_kept
        while marks and marks[0][0] <= retired:
            _, mark = marks.popleft()
            if not mark.future.done():
                mark.future.set_result(not_kept == mark.drops_before)

    def _dispatch_spooled(self, records: list[Record]) -> bool:
        """Append to the spool if (still) SPOOLING; False if the replayer just left it."""
        with self._mode_lock:
            if self._mode is EmitterMode.SPOOLING:
                self._append_to_spool(records)
                return True
        return False

    def _sweep(self) -> None:
        """Retire acknowledged records (oldest first); turn to the spool when Kafka fails."""
        poll = getattr(self._producer, "poll", None)  # librdkafka reports on the polling thread
        if poll is not None:
            poll(0)
        unacked = self._unacked
        delivered = 0
        refused: list[Record] = []
        first_refusal: BaseException | None = None
        while unacked and unacked[0].future.is_done:
            rec = unacked[0]
            if rec.future.succeeded():
                unacked.popleft()
                delivered += 1
                continue
            exc = rec.future.exception
            PRODUCER_ERRORS.labels(type(exc).__name__).inc()
            if _is_retriable(exc):
                EVENTS_DELIVERED.inc(delivered)
                self._to_spool(f"delivery failed: {exc!r}", refused, abort=True)
                return
            unacked.popleft()
            refused.append((rec.key, rec.value))
            first_refusal = first_refusal or exc
        EVENTS_DELIVERED.inc(delivered)
        if refused:
            # The broker refuses a whole record batch for one record in it (too large for the
            # topic, say): the good records refused with it must not be dropped. The replayer
            # sends them again, one per request, and drops only a record refused on its own
            # (see _replay_batch). kafka-python's idempotent producer fails every later record
            # after a refusal, so it is not handed over.
            log.warning(
                "Kafka refused a batch of %d usage events (%s); sending them again one by one",
                len(refused),
                first_refusal,
            )
            self._to_spool(
                "Kafka refused a record batch",
                refused,
                abort=isinstance(self._producer, KafkaProducer),
            )
            return
        if unacked and time.monotonic() - unacked[0].sent_at > self.down_after:
            self._to_spool(f"no acknowledgement for {self.down_after:g}s", [], abort=True)

    def _to_spool(self, why: str, rest: list[Record], *, abort: bool) -> None:
        """Leave DIRECT: spool every unacknowledged record, in order, then ``rest``."""
        producer, self._producer = self._producer, None
        if not abort and producer is not None:
            with contextlib.suppress(Exception):
                producer.flush(timeout=1.0)
            abort = any(not (u.future.is_done and u.future.succeeded()) for u in self._unacked)
        if abort:
            _close_producer_now(producer)
        else:
            self._handover = producer  # all acknowledged: the replayer goes on with it
        leftovers: list[Record] = []
        delivered = 0
        for u in self._unacked:
            if u.future.is_done and u.future.succeeded():
                delivered += 1
            else:
                leftovers.append((u.key, u.value))
        self._unacked.clear()
        EVENTS_DELIVERED.inc(delivered)
        with self._mode_lock:
            if self._mode is EmitterMode.DIRECT:
                log.warning("emitter spooling to %s: %s", self.spool.directory, why)
            self._mode = EmitterMode.SPOOLING
            KAFKA_DIRECT.set(0)
            self._append_to_spool(leftovers + rest)
        self._kafka_reachable = None if not abort else False
        self._wake_replayer.set()

    def _append_to_spool(self, records: list[Record]) -> None:
        """Caller holds ``_mode_lock``."""
        if not records:
            return
        accepted = self.spool.append(records)
        EVENTS_SPOOLED.inc(accepted)
        if accepted < len(records):
            self._drops.drop("spool_full", len(records) - accepted)
        self._update_spool_gauges()

    def _finish(self) -> None:
        """On close: deliver in the time left, else spool."""
        if self._mode is EmitterMode.DIRECT and self._producer is not None:
            left = max(0.0, self._close_deadline - time.monotonic())
            with contextlib.suppress(Exception):
                self._producer.flush(timeout=left)
            self._sweep()
            if self._unacked:
                self._to_spool("closing with unacknowledged events", [], abort=True)
            else:
                with contextlib.suppress(Exception):
                    self._producer.close(timeout=0)
                self._producer = None
        _close_producer_now(self._handover)
        self._complete_marks()  # everything is acknowledged or spooled by now
        for _, mark in self._marks:  # not if the spool refused it: those events are dropped
            if not mark.future.done():
                mark.future.set_result(False)
        self._marks.clear()

    # --- the replayer thread -------------------------------------------------------------------
    def _replay_loop(self) -> None:
        backoff = self.retry_backoff[0]
        producer: KafkaProducer | None = None
        next_orphan_scan = 0.0  # at once when DIRECT: a start's own slot first, then the others
        while not self._stop_replayer:
            if self._mode is EmitterMode.DIRECT:
                if time.monotonic() >= next_orphan_scan:
                    self._replay_orphans()
                    next_orphan_scan = time.monotonic() + self.orphan_scan_every
                self._wake_replayer.wait(0.5)
                self._wake_replayer.clear()
                continue
            try:
                producer = producer or self._handover or self._new_producer()
                self._handover = None
                producer = self._replay_once(producer)  # None: handed to the sender
                backoff = self.retry_backoff[0]
            except Exception as exc:
                PRODUCER_ERRORS.labels(type(exc).__name__).inc()
                if self._kafka_reachable or backoff == self.retry_backoff[0]:
                    log.warning("emitter cannot reach Kafka (%r); retrying", exc)
                self._kafka_reachable = False
                _close_producer_now(producer)
                producer = None
                self._wake_replayer.wait(backoff)
                self._wake_replayer.clear()
                backoff = min(backoff * 2, self.retry_backoff[1])
        _close_producer_now(producer)

    def _replay_once(self, producer: KafkaProducer) -> KafkaProducer | None:
        """Send one spool batch; return the producer to go on with, or None when the spool was
        empty, DIRECT resumed and the producer went to the sender."""
        batch: SpoolBatch = self.spool.read(max_records=self.replay_batch)
        if not batch.records:
            with self._mode_lock:
                if self.spool.pending_events == 0 and not self._stop_replayer:
                    self._producer = producer
                    self._mode = EmitterMode.DIRECT
                    KAFKA_DIRECT.set(1)
                    self._kafka_reachable = True
                    log.info("emitter sending directly to Kafka topic %s", self.topic)
                    return None
            return producer
        producer = self._replay_batch(producer, self.spool, batch)
        self._kafka_reachable = True
        self._update_spool_gauges()
        return producer

    def _replay_batch(
        self, producer: KafkaProducer, spool: Spool, batch: SpoolBatch
    ) -> KafkaProducer:
        """Send ``batch`` and remove it from ``spool`` once every record is acknowledged or
        refused for itself (dropped, counted); raise, keeping it, on an error that may pass.
        Returns the producer to go on with (a new one after a refusal: see :meth:`_trusted`)."""
        futures = []
        refused: list[BaseException] = []  # refused by the client: the record alone is at fault
        for record in batch.records:
            try:
                futures.append((record, producer.send(self.topic, value=record[1], key=record[0])))
            except _RECORD_REFUSED as exc:
                refused.append(exc)
        self._flush(producer, self._close_deadline - time.monotonic())
        delivered = 0
        suspects: list[Record] = []  # refused by the broker
        for record, future in futures:
            if future.succeeded():
                delivered += 1
                continue
            error = future.exception
            if _is_retriable(error):
                raise error or KafkaError("replay not acknowledged")
            suspects.append(record)
        if suspects:
            # The broker refuses a whole record batch for one record (too large for the topic,
            # say): the others refused with it are sent again, one per request.
            producer, passed, errors = self._send_alone(producer, suspects)
            delivered += passed
            refused += errors
        spool.commit(batch)
        if refused:
            for error in refused:
                PRODUCER_ERRORS.labels(type(error).__name__).inc()
            log.error(
                "Kafka refused %d spooled usage events (%s); dropped, the replay goes on",
                len(refused),
                refused[0],
            )
            self._drops.drop("refused", len(refused), from_spool=True)
        EVENTS_REPLAYED.inc(delivered)
        EVENTS_DELIVERED.inc(delivered)
        return producer

    def _send_alone(
        self, producer: KafkaProducer, records: list[Record]
    ) -> tuple[KafkaProducer, int, list[BaseException]]:
        """Send each record in a request of its own, in order, on a producer no refusal has
        touched; return that producer, how many records were delivered and the errors of those
        Kafka refused. Raise on an error that may pass, or at close."""
        delivered = 0
        refused: list[BaseException] = []
        producer = self._trusted(producer)
        try:
            for key, value in records:
                left = self._close_deadline - time.monotonic()
                if left <= 0:
                    raise KafkaError("closing: refused records not sent again")
                try:
                    future = producer.send(self.topic, value=value, key=key)
                except _RECORD_REFUSED as exc:
                    refused.append(exc)
                    continue
                self._flush(producer, left)
                if future.succeeded():
                    delivered += 1
                elif _is_retriable(future.exception):
                    raise future.exception or KafkaError("replay not acknowledged")
                else:
                    refused.append(future.exception)
                    producer = self._trusted(producer)
        except BaseException:
            _close_producer_now(producer)
            raise
        return producer, delivered, refused

    def _trusted(self, producer: KafkaProducer) -> KafkaProducer:
        """A producer to send with after the broker refused a record: kafka-python's idempotent
        producer then fails every later record with that refusal (a fatal state), so it is
        replaced; librdkafka's goes on."""
        if not isinstance(producer, KafkaProducer):
            return producer
        _close_producer_now(producer)
        return self._new_producer()

    @staticmethod
    def _flush(producer: KafkaProducer, left: float) -> None:
        """Flush within ``left`` seconds (0.1 at least, 30 at most). kafka-python's flush
        raises "Future not done" when it split a batch the broker refused as too large, before
        the split parts are answered: it is flushed again."""
        deadline = time.monotonic() + max(0.1, min(30.0, left))
        for _ in range(32):  # a batch is split in halves: 32 levels are more than it has
            try:
                producer.flush(timeout=max(0.0, deadline - time.monotonic()))
                return
            except KafkaTimeoutError:
                raise
            except KafkaError:
                if time.monotonic() >= deadline:
                    raise
        producer.flush(timeout=max(0.0, deadline - time.monotonic()))

    def _replay_orphans(self) -> None:
        """Send what stopped processes left in the other spool slots (module docstring). Runs
        on the replayer thread while DIRECT; stops when Kafka fails, the emitter leaves DIRECT
        or closes, and what it did not send stays in the slot for the next scan."""
        root = self.spool.directory.parent
        try:
            slots = sorted(
                p for p in root.iterdir() if p.name.isdigit() and p != self.spool.directory
            )
        except OSError:
            return
        producer: KafkaProducer | None = None
        try:
            for slot in slots:
                if self._stop_replayer or self._mode is not EmitterMode.DIRECT:
                    return
                if not _holds_records(slot):
                    continue
                try:
                    orphan = Spool(slot, max_bytes=self.spool.max_bytes, fsync=self.spool.fsync)
                except SpoolLocked:
                    continue  # a live process holds it and replays it itself
                try:
                    self._count_cuts(orphan)
                    if orphan.pending_events:
                        log.warning(
                            "emitter sending %d events a stopped process left in %s",
                            orphan.pending_events,
                            orphan.directory,
                        )
                    while not self._stop_replayer and self._mode is EmitterMode.DIRECT:
                        batch = orphan.read(max_records=self.replay_batch)
                        if not batch.records:
                            break
                        producer = producer or self._new_producer()
                        producer = self._replay_batch(producer, orphan, batch)
                finally:
                    orphan.close()
        except Exception as exc:
            PRODUCER_ERRORS.labels(type(exc).__name__).inc()
            log.warning("emitter could not send an orphaned spool slot (%r); retrying later", exc)
        finally:
            _close_producer_now(producer)

    def _count_cuts(self, spool: Spool) -> None:
        """Count as dropped what ``spool`` cut when it was opened (torn or corrupt records)."""
        for cut in spool.cuts:
            if cut.records is None:
                self._drops.drop("spool_cut", from_spool=True)
            else:
                self._drops.drop("spool_corrupt", cut.records, from_spool=True)

    def _update_spool_gauges(self) -> None:
        SPOOL_BYTES.set(self.spool.pending_bytes)
        SPOOL_EVENTS.set(self.spool.pending_events)


__all__ = [
    "DROP_REASONS",
    "EVENTS_DELIVERED",
    "EVENTS_DROPPED",
    "EVENTS_EMITTED",
    "EVENTS_REPLAYED",
    "EVENTS_SPOOLED",
    "DropReason",
    "Emitter",
    "EmitterMode",
    "default_compression",
    "producer_config",
]
