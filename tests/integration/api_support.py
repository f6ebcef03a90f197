"""What the API integration tests share: settings on the real services (unique Kafka topic, a
private SQLite quota DB), signed tokens, the app with its lifespan behind an httpx client, and a
Kafka reader for the events the app emitted."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import jwt
import uvicorn
from kafka import KafkaAdminClient, KafkaConsumer

from metering.api import create_app
from metering.events import UsageEvent, decode_event
from metering.quota_db import migrate
from metering.settings import Settings, load_settings
from metering.topics import ensure_topics, pipeline_topics

SECRET = "integration-secret-0123456789abcdef0123"
AUDIENCE = "metering-api"
ADMIN_SCOPE = "metering:admin"


def make_token(
    tenant: str, scope: str = "", *, ttl: float = 600, key: str = SECRET, **claims: Any
) -> str:
    now = time.time()
    body = {"sub": tenant, "aud": AUDIENCE, "exp": int(now + ttl), "iat": int(now)}
    if scope:
        body["scope"] = scope
    body.update(claims)
    return jwt.encode(body, key, algorithm="HS256")


def auth(tenant: str, scope: str = "", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(tenant, scope, **claims)}"}


def admin() -> dict[str, str]:
    return auth(f"ops-{uuid.uuid4().hex[:6]}", ADMIN_SCOPE)


#: Each (bootstrap, topic) :func:`api_settings` made, deleted with its ``.dlq`` at the end of
#: the session (tests/conftest.py, ``kafka_bootstrap``'s teardown). Left behind, they piled up in
#: the broker (1,400 on a dev machine) and every new topic took longer to make; deleted one test
#: at a time, they cost ~0.3 s each.
made_topics: list[tuple[str, str]] = []


def drop_made_topics() -> None:
    """Delete the topics in :data:`made_topics` and their DLQs, one request per broker; one
    that cannot be deleted is a warning, not a failed run."""
    by_bootstrap: dict[str, set[str]] = {}
    while made_topics:
        bootstrap, topic = made_topics.pop()
        by_bootstrap.setdefault(bootstrap, set()).update((topic, f"{topic}.dlq"))
    for bootstrap, names in by_bootstrap.items():
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
            try:
                doomed = sorted(names & set(admin.list_topics()))
                if doomed:
                    admin.delete_topics(doomed, timeout_ms=30000)
            finally:
                admin.close()
        except Exception as exc:  # cleanup only: never fails the run
            warnings.warn(f"{len(names)} test topics not deleted: {exc!r}", stacklevel=1)


def api_settings(
    tmp_path: Path,
    redis_url: str,
    kafka_bootstrap: str,
    *,
    topics: bool = False,
    migrate_quota_db: bool = True,
    **over: Any,
) -> Settings:
    """Settings on the shared services; with ``topics``, a fresh one-partition topic pair;
    the quota DB migrated unless ``migrate_quota_db`` is false (a test of a DB that is down).
    The pair is deleted when the session ends (:data:`made_topics`)."""
    topic = f"api-test-{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "metering_data_dir": tmp_path,
        "rate_limit_redis_url": redis_url,
        "kafka_bootstrap_servers": kafka_bootstrap,
        "usage_events_topic": topic,
        "usage_events_dlq_topic": f"{topic}.dlq",
        "usage_events_partitions": 1,
        "quota_db_url": f"sqlite:///{tmp_path / 'quota.db'}",
        "jwt_secret": SECRET,
        "jwt_audience": AUDIENCE,
        "jwt_leeway": 5,
        "quota_local_ttl": 60,  # a change must arrive by invalidation, not by expiry
        "tenant_quota_cache_ttl": 60,
    }
    values.update(over)
    settings = load_settings(**values)
    if settings.usage_events_topic == topic:
        made_topics.append((settings.kafka_bootstrap_servers, topic))
    if migrate_quota_db:
        migrate(settings.quota_db_url)
    if topics:
        ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))
    return settings


def own_redis_database(url: str, db: int) -> str:
    """The Redis at ``url`` with database ``db`` instead of the one ``url`` names (or the default
    0): keys of the test's own, which it may flush. The URL may name a database or not, in its
    path or as ``?db=``, with credentials and options; a ``unix://`` URL keeps its socket path."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "db"]
    if parts.scheme == "unix":  # urlunsplit would drop the empty host: unix:/path
        return f"{url.partition('?')[0]}?{urlencode([*query, ('db', str(db))])}"
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


@contextlib.asynccontextmanager
async def api_client(settings: Settings, **parts: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app (built from ``settings`` unless parts are given) with its lifespan running."""
    app = create_app(settings, **parts)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@contextlib.contextmanager
def running_server(settings: Settings, **parts: Any) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port (in a thread); yields its base URL."""
    app = create_app(settings, **parts)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def put_quota_sync(base_url: str, tenant: str, **limits: Any) -> None:
    r = httpx.put(f"{base_url}/v1/tenants/{tenant}/quota", json=limits, headers=admin())
    assert r.status_code == 200, r.text


async def put_quota(
    client: httpx.AsyncClient,
    tenant: str,
    *,
    rate_per_sec: float,
    burst: int,
    daily_limit: int,
    **extra: Any,
) -> dict[str, Any]:
    body = {"rate_per_sec": rate_per_sec, "burst": burst, "daily_limit": daily_limit, **extra}
    r = await client.put(f"/v1/tenants/{tenant}/quota", json=body, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def read_events(
    settings: Settings, expected: int, subject: str | None = None, timeout: float = 30.0
) -> list[UsageEvent]:
    """The events on the settings' topic (of ``subject`` only, when given), read until
    ``expected`` of them arrived or ``timeout``; what arrives right after is read too, so an
    extra event would show."""
    consumer = KafkaConsumer(
        settings.usage_events_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=1000,
    )
    events: list[UsageEvent] = []

    def poll() -> None:
        for batch in consumer.poll(timeout_ms=500).values():
            for message in batch:
                event = decode_event(message.value, max_future_skew=3600)
                if subject is None or event.subject == subject:
                    events.append(event)

    deadline = time.monotonic() + timeout
    try:
        while len(events) < expected and time.monotonic() < deadline:
            poll()
        poll()
    finally:
        consumer.close()
    return events


def problem(response: httpx.Response) -> dict[str, Any]:
    """The body of a problem response, checked to be one."""
    assert response.headers["content-type"].startswith("application/problem+json"), (
        response.status_code,
        response.headers.get("content-type"),
        response.text[:300],
    )
    body = json.loads(response.content)
    assert body["status"] == response.status_code
    assert isinstance(body["detail"], str) and body["detail"]
    return body  # type: ignore[no-any-return]
