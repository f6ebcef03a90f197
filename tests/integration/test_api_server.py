"""``metering api`` as operators run it: a uvicorn process configured by environment variables.

With Kafka unreachable it still serves and accepts events (they wait in the spool); SIGTERM
stops it gracefully after flushing the emitter, and an emitter started later on
the same spool delivers every accepted event to Kafka."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.emitter import Emitter
from metering.settings import Settings
from tests.integration.api_support import (
    ADMIN_SCOPE,
    AUDIENCE,
    SECRET,
    api_settings,
    auth,
    read_events,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"metering api exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("metering api did not start")


def api_environ(env: dict[str, str]) -> dict[str, str]:
    """``env`` over this process's environment and the tests' JWT settings: what a
    ``metering`` subprocess of these tests runs with."""
    # PYTHONFAULTHANDLER: a server that will not stop is made to print every thread's stack
    # (stop_api), so a hang seen once on CI says where it was.
    return {
        **os.environ,
        "JWT_SECRET": SECRET,
        "JWT_AUDIENCE": AUDIENCE,
        "PYTHONFAULTHANDLER": "1",
        **env,
    }


def start_api(env: dict[str, str], output: int = subprocess.DEVNULL) -> tuple[Any, str]:
    """``metering api`` on a free port, in :func:`api_environ` of ``env``, writing stdout and
    stderr to ``output``; and its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "metering.cli", "api", "--port", str(port)],
        env=api_environ(env),
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def stop_api(proc: Any, timeout: float = 60) -> str:
    """SIGTERM ``proc`` (from :func:`start_api` with ``output=subprocess.PIPE``) and return what
    it wrote. One that has not exited within ``timeout`` fails the test with every thread's
    stack: SIGABRT, which ``PYTHONFAULTHANDLER`` turns into a dump. (CI once saw a ``metering
    api`` still running 60 s after SIGTERM, with no way to tell where it waited.)"""
    proc.send_signal(signal.SIGTERM)
    try:
        return str(proc.communicate(timeout=timeout)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out = proc.communicate(timeout=15)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
        raise AssertionError(
            f"metering api still running {timeout:g} s after SIGTERM; its output and threads:\n"
            + out[-12000:]
        ) from None


def served_by(tmp_path: Path, settings: Settings, redis_url: str, kafka: str) -> dict[str, str]:
    """The environment of a ``metering api`` over ``settings``' topic and quota DB."""
    return {
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "USAGE_EVENTS_TOPIC": settings.usage_events_topic,
        "QUOTA_DB_URL": settings.quota_db_url,
    }


def usage_events(tenant: str, ids: list[str], quantity: float = 1) -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC).isoformat()
    return [
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "urn:test",
            "type": "metering.usage",
            "subject": tenant,
            "time": now,
            "data": {"meter": "tokens", "quantity": quantity},
        }
        for event_id in ids
    ]


def test_serves_without_kafka_and_flushes_to_the_spool_on_sigterm(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, tenant: str
) -> None:
    settings = api_settings(tmp_path, redis_url, kafka_bootstrap, topics=True)
    nothing_there = f"127.0.0.1:{free_port()}"
    proc, url = start_api(
        served_by(tmp_path, settings, redis_url, nothing_there), output=subprocess.PIPE
    )
    try:
        wait_until_serving(url, proc)
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        ids = [str(uuid.uuid4()) for _ in range(3)]
        batch = usage_events(tenant, ids, quantity=2)
        r = httpx.post(f"{url}/v1/events", json=batch, headers=auth(tenant), timeout=10)
        assert r.status_code == 202, r.text
        admin = auth(f"ops-{uuid.uuid4().hex[:6]}", ADMIN_SCOPE)
        r = httpx.get(f"{url}/v1/limits/{tenant}", headers=admin, timeout=10)
        assert r.json()["daily"]["used"] == 1  # the ingest request, counted while Kafka is down
    finally:
        output = stop_api(proc)
    # uvicorn re-raises the signal after its graceful shutdown: "terminated by SIGTERM".
    assert proc.returncode in (0, -signal.SIGTERM), output[-2000:]
    assert "Application shutdown complete" in output

    # A later emitter on the same spool (Kafka reachable now) delivers what the API accepted.
    with Emitter(settings, spool_dir=tmp_path / "spool") as emitter:
        assert emitter.flush(timeout=30)
    arrived = read_events(settings, expected=3, subject=tenant)
    assert [e.id for e in arrived if e.type == "metering.usage"] == ids


def test_a_redis_database_the_server_lacks_stops_the_start_naming_the_variable(
    tmp_path: Path, redis_url: str
) -> None:
    """``RATE_LIMIT_REDIS_URL=redis://host/99`` on a server with 16 databases: Redis answers and
    refuses every connection's SELECT, so no request could ever reach it. ``metering api``
    refuses to start, naming the variable, instead of serving a degraded answer forever."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    env = {
        **os.environ,
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": f"{base}/99",
        "JWT_SECRET": SECRET,
    }
    done = subprocess.run(
        [sys.executable, "-m", "metering.cli", "api", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "RATE_LIMIT_REDIS_URL" in done.stderr
    assert "DB index is out of range" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kafka", ["up", "down"])
def test_events_answered_202_survive_a_sigkill_right_after(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, tenant: str, kafka: str
) -> None:
    """202 promises the events count, so they must be out of the process's memory when it is
    sent: acknowledged by Kafka, or synced to the spool. Killed (SIGKILL, as an OOM kill)
    right after the answer, the process loses none of them: a later emitter on the same spool
    delivers the rest. (Answered from memory, 4158 of 5000 were lost this way.)"""
    settings = api_settings(tmp_path, redis_url, kafka_bootstrap, topics=True)
    nothing_there = f"127.0.0.1:{free_port()}"
    env = served_by(
        tmp_path, settings, redis_url, kafka_bootstrap if kafka == "up" else nothing_there
    )
    env["RATE_LIMIT_EMIT_DECISIONS"] = "false"  # only the ingested events reach the topic
    proc, url = start_api(env)
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    batch = usage_events(tenant, ids)
    try:
        wait_until_serving(url, proc)
        r = httpx.post(f"{url}/v1/events", json=batch, headers=auth(tenant), timeout=30)
        proc.kill()  # at once: nothing gets to flush
        assert r.status_code == 202, r.text
    finally:
        proc.kill()
        proc.wait(timeout=30)

    with Emitter(settings, spool_dir=tmp_path / "spool") as emitter:
        assert emitter.flush(timeout=30)
    arrived = read_events(settings, expected=len(ids), subject=tenant)
    assert sorted({e.id for e in arrived}) == sorted(ids)
