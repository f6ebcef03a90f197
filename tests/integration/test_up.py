"""`metering up` with nothing named: it starts its own Redis and Kafka, serves its port before
they answer, says ready only once it can decide, runs the pipeline end to end (its topics made
with their partitions, not auto-created), and Ctrl-C leaves no process behind."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from kafka import KafkaAdminClient

from metering.localstack import LocalStack
from metering.localstack.stack import processes_naming
from metering.settings import load_settings

NAMED_SERVICES = (
    "RATE_LIMIT_REDIS_URL",
    "RATE_LIMIT_REDIS_CLUSTER_NODES",
    "RATE_LIMIT_REDIS_SENTINELS",
    "KAFKA_BOOTSTRAP_SERVERS",
    "QUOTA_DB_URL",
    "CLICKHOUSE_URL",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()  # type: ignore[operator]
            if got:
                return got
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout:.0f}s")


def test_up_starts_its_own_services_serves_early_and_stops_clean(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in NAMED_SERVICES}
    env["METERING_DATA_DIR"] = str(tmp_path)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metering.cli", "up", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # The port serves HTTP; /readyz is 503 (starting) or 200, never a refused connection
        # once /healthz answered.
        _until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 90, "healthz")
        assert httpx.get(f"{base}/readyz", timeout=5).status_code in {200, 503}
        _until(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 90, "ready")

        tenant = f"up-{os.getpid()}-{int(time.time())}"
        token = subprocess.run(
            [sys.executable, "-m", "metering.cli", "token", tenant],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/v1/limits/{tenant}", headers=auth, timeout=10).status_code == 200

        # The decision event goes through the emitter, Kafka and the worker into ClickHouse.
        today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        params = {
            "meter": "requests",
            "from": today.isoformat(),
            "to": (today + dt.timedelta(days=1)).isoformat(),
        }

        def counted() -> bool:
            r = httpx.get(f"{base}/v1/usage", headers=auth, params=params, timeout=10)
            return r.status_code == 200 and sum(row["value"] for row in r.json()["data"]) >= 1

        _until(counted, 90, "the request's usage in ClickHouse")
        assert b"worker consuming" in log.read_bytes()

        # The pipeline's topic has the partitions the settings give it (made by ensure_topics,
        # not auto-created by the first producer).
        bootstrap = LocalStack(tmp_path / "stack").env()["KAFKA_BOOTSTRAP_SERVERS"]
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-up")
        try:
            (topic,) = admin.describe_topics(["usage.events"])
        finally:
            admin.close()
        assert len(topic["partitions"]) == load_settings().usage_events_partitions
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert processes_naming(str(tmp_path)) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
