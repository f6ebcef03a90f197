"""An event with CloudEvents extension attributes (``traceparent``, as SDKs with OpenTelemetry
add it) and ``dataschema``, through ``POST /v1/events`` on real Kafka: accepted (202), and what
the API forwarded is what the worker's decoder then counts, as are the producer's own bytes."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

from metering.settings import Settings
from streams.sink import ClickHouseSink, Record
from tests.integration.api_support import api_client, api_settings, auth, problem
from tests.integration.streams_support import read_at_least
from tests.unit.test_streams_sink import RecordedStorage

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced_event(tenant: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "urn:test:extensions",
        "type": "metering.usage",
        "subject": tenant,
        "time": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "dataschema": "https://schemas.example.com/metering/usage/v1.json",
        "traceparent": TRACEPARENT,
        "tracestate": "rojo=00f067aa0ba902b7",
        "data": {"meter": "tokens", "quantity": 7.5, "dimensions": {"model": "m1"}},
    }
    body.update(over)
    return body


def read_records(settings: Settings, expected: int) -> list[Record]:
    """The raw records on the settings' topic, once ``expected`` arrived."""
    messages = read_at_least(
        settings.kafka_bootstrap_servers, settings.usage_events_topic, expected
    )
    return [Record(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]


def worker_sink(storage: RecordedStorage, settings: Settings) -> ClickHouseSink:
    return ClickHouseSink(
        storage,
        topic=settings.usage_events_topic,
        lateness_seconds=settings.event_max_lateness,
        max_future_skew=settings.event_max_future_skew,
    )


async def test_an_event_with_extensions_is_accepted_and_the_worker_counts_it(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, tenant: str
) -> None:
    settings = api_settings(
        tmp_path, redis_url, kafka_bootstrap, topics=True, rate_limit_emit_decisions=False
    )
    sent = traced_event(tenant)
    async with api_client(settings) as client:
        documented = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert "dataschema" in documented["UsageEvent"]["properties"]
        assert documented["UsageEvent"]["patternProperties"]  # extension attributes
        r = await client.post("/v1/events", json=[sent], headers=auth(tenant))
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 1, "ids": [sent["id"]]}
        r = await client.post(
            "/v1/events", json=[traced_event(tenant, sampled=None)], headers=auth(tenant)
        )
        assert r.status_code == 422
        assert [e["message"] for e in problem(r)["errors"]] == [
            "sampled: an extension attribute must be a string, an integer or a boolean, not null"
        ]

    forwarded = read_records(settings, expected=1)
    assert len(forwarded) == 1
    storage = RecordedStorage()
    sink = worker_sink(storage, settings)
    batch = sink.prepare(forwarded)
    assert batch.dead_letters == []
    sink.write(batch)
    assert [(row[0], row[3], row[8]) for row in storage.rows] == [(sent["id"], tenant, 7.5)]

    # The producer's own bytes, as one that writes to Kafka directly would send them.
    own = traced_event(tenant)
    storage = RecordedStorage()
    sink = worker_sink(storage, settings)
    batch = sink.prepare([Record("direct", 0, 0, tenant.encode(), json.dumps(own).encode())])
    assert batch.dead_letters == []
    sink.write(batch)
    assert [(row[0], row[3], row[8]) for row in storage.rows] == [(own["id"], tenant, 7.5)]
