"""``POST /v1/events`` on real Kafka: accepted events arrive on the topic with their ids; a batch
with any bad event is refused whole, with errors by index, and nothing of it is sent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metering.emitter import EVENTS_DROPPED, Emitter
from metering.events import UsageEvent
from tests.integration.api_support import (
    admin,
    api_client,
    api_settings,
    auth,
    problem,
    put_quota,
    read_events,
)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, kafka_bootstrap: str):  # type: ignore[no-untyped-def]
    return api_settings(
        tmp_path,
        redis_url,
        kafka_bootstrap,
        topics=True,
        api_max_batch=10,
        api_max_body_bytes=64 * 1024,
        rate_limit_emit_decisions=False,  # only ingested events on the topic
    )


def unreachable_bootstrap() -> str:
    """A loopback host:port nothing listens on (Kafka away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def spooling_emitter(settings, tenant: str, spool: Path, max_bytes: int) -> Iterator[Emitter]:  # type: ignore[no-untyped-def]
    """An Emitter whose Kafka is away, once it has turned to its spool (one event in it)."""
    emitter = Emitter(
        settings.model_copy(update={"kafka_bootstrap_servers": unreachable_bootstrap()}),
        spool_dir=spool,
        spool_max_bytes=max_bytes,
        down_after=0.3,
    )
    try:
        emitter.emit(UsageEvent.model_validate(event(tenant)))
        wait_for(lambda: emitter.spool.pending_events >= 1 and emitter.mode.name == "SPOOLING")
        yield emitter
    finally:
        emitter.close(timeout=0.5)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def event(tenant: str, quantity: float = 1.0, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "urn:test:ingest",
        "type": "metering.usage",
        "subject": tenant,
        "time": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "data": {"meter": "tokens", "quantity": quantity, "dimensions": {"model": "m1"}},
    }
    body.update(over)
    return body


async def test_a_batch_arrives_on_kafka_with_its_ids(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    batch = [event(tenant, q) for q in (1, 2.5, 40)]
    async with api_client(settings) as client:
        r = await client.post("/v1/events", json=batch, headers=auth(tenant))
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 3, "ids": [e["id"] for e in batch]}
    arrived = read_events(settings, expected=3, subject=tenant)
    assert [(e.id, e.data.quantity) for e in arrived] == [
        (e["id"], e["data"]["quantity"]) for e in batch
    ]


async def test_cloudevents_content_types(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    one, two = event(tenant), event(tenant)
    async with api_client(settings) as client:
        r = await client.post(
            "/v1/events",
            content=json.dumps([one]),
            headers={**auth(tenant), "Content-Type": "application/cloudevents-batch+json"},
        )
        assert r.status_code == 202
        r = await client.post(
            "/v1/events",
            content=json.dumps(two),
            headers={**auth(tenant), "Content-Type": "application/cloudevents+json"},
        )
        assert r.status_code == 202
        r = await client.post(
            "/v1/events", content=b"x", headers={**auth(tenant), "Content-Type": "text/plain"}
        )
        assert r.status_code == 415
        problem(r)
    assert {e.id for e in read_events(settings, expected=2, subject=tenant)} == {
        one["id"],
        two["id"],
    }


async def test_bad_events_are_reported_by_index_and_nothing_is_sent(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
    batch = [
        event(tenant),
        event(tenant, time=future),
        {**event(tenant), "data": {"meter": "tokens", "quantity": "lots"}},
        "not an object",
        {k: v for k, v in event(tenant).items() if k != "id"},
        event(tenant, quantity=1.7e308),  # two of these would sum to infinity downstream
    ]
    async with api_client(settings) as client:
        r = await client.post("/v1/events", json=batch, headers=auth(tenant))
    body = problem(r)
    assert r.status_code == 422
    by_index = {e["index"]: e["message"] for e in body["errors"]}
    assert sorted(by_index) == [1, 2, 3, 4, 5]
    assert "time" in by_index[1] and "future" in by_index[1]
    assert "data.quantity" in by_index[2]
    assert "JSON object" in by_index[3]
    assert "id" in by_index[4] and "required" in by_index[4]
    assert by_index[5] == "data.quantity: must be finite, >= 0 and <= 1e+15"
    assert read_events(settings, expected=1, subject=tenant, timeout=2) == []


async def test_a_batch_repeating_an_id_is_refused_naming_the_first_occurrence(
    settings, tenant: str
) -> None:  # type: ignore[no-untyped-def]
    """The worker keeps only the first event of a (tenant, id): accepting the batch would tell
    the client that events count which never will. The same id under another subject is
    another event."""
    first = event(tenant, 1)
    again = {**event(tenant, 100), "id": first["id"]}
    other = f"{tenant}-b"
    batch = [first, event(tenant), again, {**event(other), "id": first["id"]}, dict(again)]
    async with api_client(settings) as client:
        r = await client.post("/v1/events", json=batch, headers=admin())
    body = problem(r)
    assert r.status_code == 422
    assert body["type"] == "urn:metering:problem:invalid-events"
    assert body["errors"] == [
        {"index": 2, "message": "id: repeats the id of event 0"},
        {"index": 4, "message": "id: repeats the id of event 0"},
    ]
    assert body["detail"].startswith("2 of 5 events refused, none accepted: [2] id: repeats")
    assert read_events(settings, expected=1, subject=tenant, timeout=2) == []


async def test_an_event_older_than_the_lateness_is_refused_by_index(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    """The worker dead-letters an event older than EVENT_MAX_LATENESS as late, judged when it
    reads the event: ingest refuses, like one too far in the future, an event older than the
    lateness less the margin left for the pipeline's delay (else one accepted near the lateness
    reached the worker late, after its 202), and one just inside that passes."""
    now = dt.datetime.now(dt.UTC)
    max_age = settings.ingest_max_age
    assert max_age == settings.event_max_lateness - 300  # 3 h: a tenth is over the 300 s cap
    near_lateness = event(
        tenant,
        time=(now - dt.timedelta(seconds=settings.event_max_lateness - 60)).isoformat(),
    )
    inside = event(tenant, time=(now - dt.timedelta(seconds=max_age - 60)).isoformat())
    async with api_client(settings) as client:
        r = await client.post(
            "/v1/events",
            json=[event(tenant), event(tenant, time="2000-01-01T00:00:00Z"), near_lateness],
            headers=auth(tenant),
        )
        body = problem(r)
        assert r.status_code == 422
        assert [e["index"] for e in body["errors"]] == [1, 2]
        for e in body["errors"]:
            assert e["message"].startswith("time: is ") and e["message"].endswith(
                f"s old; this API takes events at most {max_age:g}s old (EVENT_MAX_LATENESS "
                "less API_INGEST_LATENESS_MARGIN, left for the pipeline)"
            )
        r = await client.post("/v1/events", json=[inside], headers=auth(tenant))
        assert r.status_code == 202, r.text
    assert [e.id for e in read_events(settings, expected=1, subject=tenant)] == [inside["id"]]


async def test_a_tenant_cannot_send_another_tenants_events(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    other = f"{tenant}-b"
    async with api_client(settings) as client:
        r = await client.post(
            "/v1/events", json=[event(tenant), event(other)], headers=auth(tenant)
        )
        body = problem(r)
        assert r.status_code == 403
        assert body["errors"] == [
            {"index": 1, "message": f"subject: {other!r} is not your tenant ({tenant!r})"}
        ]
        # Limiter decisions come from the limiter, not from tenants.
        decision = event(tenant, type="metering.ratelimit")
        decision["data"]["decision"] = "rejected"
        r = await client.post("/v1/events", json=[decision], headers=auth(tenant))
        assert r.status_code == 403
        # An admin may send for any tenant.
        r = await client.post("/v1/events", json=[event(other)], headers=admin())
        assert r.status_code == 202
    assert read_events(settings, expected=1, subject=tenant, timeout=2) == []
    assert len(read_events(settings, expected=1, subject=other)) == 1


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b'{"a": 1}', 422, "JSON array"),
        (b"[]", 422, "empty"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "larger than"),
        (json.dumps([{"x": 1}] * 11).encode(), 413, "at most 10"),
        (b"[1, 2, NaN]", 422, "JSON object"),
    ],
)
async def test_bad_bodies_get_a_clear_4xx(
    settings, tenant: str, content: bytes, status: int, words: str
) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=100, burst=100, daily_limit=1000)
        r = await client.post(
            "/v1/events",
            content=content,
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    assert r.status_code == status
    assert words in problem(r)["detail"]


async def test_a_chunked_body_over_the_limit_gets_413(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async def chunks():  # type: ignore[no-untyped-def]
        yield b"["
        for _ in range(400):  # about 100 kB
            yield json.dumps(event(tenant)).encode() + b","
        yield b"{}]"

    async with api_client(settings) as client:
        r = await client.post(
            "/v1/events",
            content=chunks(),
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    assert r.status_code == 413
    assert "larger than 65536 bytes" in problem(r)["detail"]


async def test_a_batch_the_emitter_cannot_take_is_503_and_none_of_it_is_sent(
    settings, tenant: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Accepting what the emitter would drop (a full queue) would lose events the caller was
    told are accepted: the batch is refused whole, with Retry-After, and a smaller one passes."""
    emitter = Emitter(settings, max_queue=3, spool_dir=tmp_path / "spool")
    too_many = [event(tenant) for _ in range(4)]
    fits = [event(tenant) for _ in range(3)]
    try:
        async with api_client(settings, emitter=emitter) as client:
            r = await client.post("/v1/events", json=too_many, headers=auth(tenant))
            body = problem(r)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "cannot take 4 events" in body["detail"] and "none accepted" in body["detail"]
            r = await client.post("/v1/events", json=fits, headers=auth(tenant))
            assert r.status_code == 202, r.text
    finally:
        emitter.close(timeout=5)  # the app closes only what it made
    arrived = read_events(settings, expected=3, subject=tenant)
    assert sorted(e.id for e in arrived) == sorted(e["id"] for e in fits)


async def test_one_batch_more_than_the_api_takes_at_once_is_503_before_its_body_is_read(
    settings, tenant: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The overload audit's case: 100 concurrent 1,000-event batches took 185 MB and 14 s
    answers, never a 503. At most API_INGEST_MAX_CONCURRENT are taken at once; one more is
    refused whole with Retry-After, and a batch after the slot frees is accepted."""

    class HeldEmitter(Emitter):
        """Holds each batch in its wait for Kafka's acknowledgement until ``release``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.waiting = asyncio.Event()
            self.release = asyncio.Event()

        async def wait_durable(self, *args: Any, **kwargs: Any) -> bool:
            self.waiting.set()
            await self.release.wait()
            return await super().wait_durable(*args, **kwargs)

    one_at_a_time = settings.model_copy(update={"api_ingest_max_concurrent": 1})
    emitter = HeldEmitter(settings, spool_dir=tmp_path / "spool")
    first, second, third = ([event(tenant)] for _ in range(3))
    try:
        async with api_client(one_at_a_time, emitter=emitter) as client:
            held = asyncio.create_task(client.post("/v1/events", json=first, headers=auth(tenant)))
            await asyncio.wait_for(emitter.waiting.wait(), 10)
            r = await client.post("/v1/events", json=second, headers=auth(tenant))
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            body = problem(r)
            assert body["type"].endswith("ingest-busy")
            assert "at most 1 at once" in body["detail"] and "none of this one" in body["detail"]
            emitter.release.set()
            assert (await held).status_code == 202
            r = await client.post("/v1/events", json=third, headers=auth(tenant))
            assert r.status_code == 202, r.text
    finally:
        emitter.close(timeout=5)
    arrived = read_events(settings, expected=2, subject=tenant)
    assert sorted(e.id for e in arrived) == sorted(e["id"] for e in first + third)


async def test_with_kafka_away_a_batch_the_spool_cannot_hold_is_503(
    settings, tenant: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """While Kafka is unreachable, accepted events wait in the disk spool; a batch larger than
    the room left in it is refused (the spool would drop it), one that fits is accepted."""
    wide = {"meter": "tokens", "quantity": 1, "dimensions": {f"d{i}": "v" * 200 for i in range(16)}}
    with spooling_emitter(settings, tenant, tmp_path / "spool", 8192) as emitter:
        async with api_client(settings, emitter=emitter) as client:
            big = [event(tenant, data=wide) for _ in range(3)]  # ~11 KiB: more than the room
            refused = await client.post("/v1/events", json=big, headers=auth(tenant))
            assert refused.status_code == 503, refused.text
            assert "spool is full" in problem(refused)["detail"]
            fits = await client.post("/v1/events", json=[event(tenant)], headers=auth(tenant))
            assert fits.status_code == 202, fits.text
            await asyncio.to_thread(wait_for, lambda: emitter.spool.pending_events >= 2)
        assert emitter.spool.pending_events == 2  # both accepted events wait; none dropped


def test_back_to_back_batches_while_spooling_are_accepted_only_as_the_spool_can_hold_them(
    settings, tenant: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """What has_room answers yes to is never dropped afterwards: the events still queued count
    against the spool too, and an encoded event is larger than the client's JSON of it."""
    with spooling_emitter(settings, tenant, tmp_path / "spool", 3000) as emitter:
        dropped = EVENTS_DROPPED.labels("spool_full")._value.get()
        accepted = 0
        for _ in range(20):  # back to back: the sender has no time to spool in between
            doc = event(tenant)
            body = json.dumps([doc], separators=(",", ":")).encode()
            if emitter.has_room(1, len(body)):
                emitter.emit(UsageEvent.model_validate(doc))
                accepted += 1
        assert 0 < accepted < 20
        wait_for(lambda: emitter.spool.pending_events >= 1 + accepted)
        assert EVENTS_DROPPED.labels("spool_full")._value.get() == dropped


async def test_a_batch_over_the_limit_is_refused_before_any_event_is_parsed(
    settings, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """4 MB of empty objects were parsed whole (every item a Python dict) before the count
    refused them, holding the event loop ~0.17 s per request: a free tenant within its rate
    stalled every other request. The array is now only split, then counted."""
    import metering.api.routes_events as routes

    parsed: list[Any] = []
    real_loads = routes.json.loads

    def loads(raw: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(raw, bytes) and raw in (body, b"{}"):  # the batch, or one of its items
            parsed.append(raw[:10])
        return real_loads(raw, *args, **kwargs)

    body = b"[" + b",".join([b"{}"] * (settings.api_max_batch + 1)) + b"]"
    async with api_client(settings) as client:
        await put_quota(client, tenant, rate_per_sec=100, burst=100, daily_limit=1000)
        monkeypatch.setattr(routes.json, "loads", loads)
        r = await client.post(
            "/v1/events", content=body, headers={**auth(tenant), "Content-Type": "application/json"}
        )
    assert r.status_code == 413, r.text
    assert parsed == []


async def test_a_batch_is_checked_off_the_event_loop(
    settings, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Checking 1000 events is tens of ms of Python; on the loop's thread nothing else is
    served meanwhile."""
    import threading

    import metering.api.routes_events as routes

    threads: set[int] = set()
    real_check = routes._check_event

    def check(*args: Any) -> Any:
        threads.add(threading.get_ident())
        return real_check(*args)

    monkeypatch.setattr(routes, "_check_event", check)
    async with api_client(settings) as client:
        r = await client.post("/v1/events", json=[event(tenant)], headers=auth(tenant))
        assert r.status_code == 202, r.text
    assert threads and threading.get_ident() not in threads  # the test's loop serves the app
