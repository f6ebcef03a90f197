"""Time bounds of the API's input. ``POST /v1/events``'s future bound leaves a margin for the
worker's clock: the worker checks ``EVENT_MAX_FUTURE_SKEW`` again by its own clock, so an event the
API accepted at the skew itself was dead-lettered by a worker whose clock is a little behind, after
its 202. A usage read's ``from``/``to`` whose offset's ``+`` was sent unencoded is told so."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI

from metering.api.auth import Principal, current_principal
from metering.api.problems import Problem, install_problem_handlers
from metering.api.routes_events import _checked_batch
from metering.api.routes_usage import router as usage_router
from metering.settings import Settings, SettingsError, load_settings
from streams.sink import ClickHouseSink, Record, SinkStorage

TENANT = "bounds-tenant"
PRINCIPAL = Principal(TENANT, frozenset(), {})


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for var in ("EVENT_MAX_FUTURE_SKEW", "API_INGEST_FUTURE_MARGIN"):
        monkeypatch.delenv(var, raising=False)
    return load_settings(metering_data_dir=tmp_path)


def event(ahead: float) -> dict[str, Any]:
    """A usage event of ``TENANT`` timed ``ahead`` seconds after the current time."""
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ahead)
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "urn:test:bounds",
        "type": "metering.usage",
        "subject": TENANT,
        "time": when.isoformat(),
        "data": {"meter": "requests", "quantity": 1, "dimensions": {}},
    }


def check(settings: Settings, items: list[dict[str, Any]]) -> list[str]:
    """The ids ``POST /v1/events`` accepts of ``items`` (its checks, as the route runs them)."""
    body = json.dumps(items).encode()
    return [e.id for e in _checked_batch(body, "application/json", settings, PRINCIPAL)]


def test_an_event_beyond_the_apis_future_bound_is_refused_by_index(settings: Settings) -> None:
    skew = settings.event_max_future_skew
    assert settings.ingest_max_ahead == skew - 30  # a tenth of 300 s, capped at 30
    near_skew = event(skew - 5)
    with pytest.raises(Problem) as refused:
        check(settings, [event(0), near_skew])
    assert refused.value.status == 422
    [error] = refused.value.extra["errors"]
    assert error["index"] == 1
    assert error["message"].startswith("time: is ")
    assert error["message"].endswith(f"s in the future (at most {skew - 30:g}s allowed)")
    inside = event(settings.ingest_max_ahead - 20)  # 20 s for this test to run
    assert check(settings, [inside]) == [inside["id"]]


@pytest.mark.parametrize("ahead", [1, 25])
def test_what_the_api_accepts_a_worker_with_its_clock_behind_counts(
    settings: Settings, ahead: float
) -> None:
    """An event accepted ``ahead`` seconds before the API's bound (or refused) is inserted by
    the worker's sink even with its clock 2 s behind the API's: never accepted, then
    dead-lettered."""
    worker = ClickHouseSink(
        cast(SinkStorage, object()),  # prepare() touches no storage
        topic="usage.events",
        lateness_seconds=settings.event_max_lateness,
        max_future_skew=settings.event_max_future_skew,
        clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2),
    )
    for item in (
        event(settings.ingest_max_ahead - ahead),
        event(settings.event_max_future_skew - ahead),
    ):
        try:
            check(settings, [item])
        except Problem:
            continue
        batch = worker.prepare(
            [Record("usage.events", 0, 0, TENANT.encode(), json.dumps(item).encode())]
        )
        assert batch.dead_letters == [], batch.dead_letters[0].error
        assert len(batch.events) == 1


def test_the_future_margin_must_leave_part_of_the_skew(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a tenth of the skew, at most 30 s; set, it must be less than the skew, and
    start-up says so naming both settings."""
    monkeypatch.setenv("EVENT_MAX_FUTURE_SKEW", "100")
    monkeypatch.delenv("API_INGEST_FUTURE_MARGIN", raising=False)
    assert load_settings().ingest_max_ahead == 90
    monkeypatch.setenv("API_INGEST_FUTURE_MARGIN", "0")
    assert load_settings().ingest_max_ahead == 100
    monkeypatch.setenv("API_INGEST_FUTURE_MARGIN", "100")
    with pytest.raises(
        SettingsError,
        match="API_INGEST_FUTURE_MARGIN=100: must be less than EVENT_MAX_FUTURE_SKEW=100",
    ):
        load_settings()
    monkeypatch.setenv("API_INGEST_FUTURE_MARGIN", "-1")
    with pytest.raises(SettingsError, match="API_INGEST_FUTURE_MARGIN"):
        load_settings()


async def test_an_offset_whose_plus_was_sent_unencoded_is_named_as_such() -> None:
    """``?from=...+01:00`` sent as is arrives as ``...  01:00`` (``+`` is a space in a query
    string): the 422 says to encode the ``+``, not that the offset is missing."""
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(usage_router)
    app.dependency_overrides[current_principal] = lambda: PRINCIPAL
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get(
            "/v1/usage?meter=requests&from=2026-12-07T00:00:00+01:00&to=2026-12-08T00:00:00Z"
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"] == [
            {
                "location": "query.from",
                "message": "'2026-12-07T00:00:00 01:00' has a space where its offset's '+' "
                "was: a '+' in a query string means a space, so send it encoded as %2B "
                "(e.g. 2026-03-01T00:00:00%2B01:00)",
            }
        ]
        # a time with no offset at all is still told it needs one
        r = await client.get(
            "/v1/usage?meter=requests&from=2026-12-07T00:00:00&to=2026-12-08 01:00"
        )
        assert r.status_code == 422, r.text
        assert [e["message"] for e in r.json()["errors"]] == [
            "must be an RFC 3339 time with an offset, e.g. 2026-03-01T00:00:00Z"
        ]


def test_an_integer_too_long_for_python_is_a_422_naming_the_event() -> None:
    """JSON allows an integer of any length; Python refuses to convert one of more than 4,300
    digits with a bare ValueError, which escaped the per-event checks as a 500."""
    settings = load_settings()
    huge = json.dumps({**event(0), "abc": "HUGE"}).replace('"HUGE"', "9" * 5000)
    body = f"[{json.dumps(event(0))}, {huge}]".encode()
    with pytest.raises(Problem) as refused:
        _checked_batch(body, "application/json", settings, PRINCIPAL)
    assert refused.value.status == 422
    [error] = refused.value.extra["errors"]
    assert error["index"] == 1
    assert error["message"].startswith("event: holds a number of more than")
