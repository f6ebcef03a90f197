"""The newcomer's path, end to end: `metering demo` starts `metering up` (API + worker in one
process, embedded ClickHouse), drives tenants through the API and finds the Redis counters,
ClickHouse and the quota DB in agreement with what the client saw."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from metering.demo import make_tenants, rejection_policy
from tests.integration.api_support import own_redis_database


def test_demo_tenants_cover_every_plan_and_rates_above_and_below_them() -> None:
    runs = make_tenants(30, run_id="r1")
    assert runs[0].tenant == "demo-r1-free-00"
    assert not {r.tenant for r in runs} & {r.tenant for r in make_tenants(30, run_id="r2")}
    assert {r.plan for r in runs} == {"free", "pro", "enterprise"}
    assert len({r.tenant for r in runs}) == 30
    assert all(0 < r.rate <= 5 for r in runs)


def test_rejection_policy_reads_the_first_ratelimit_item() -> None:
    assert rejection_policy(httpx.Headers({"ratelimit": '"daily";r=0;t=40'})) == "daily"
    assert rejection_policy(httpx.Headers({"ratelimit": '"burst";r=0;t=1, "daily";r=3'})) == (
        "burst"
    )
    assert rejection_policy(httpx.Headers({})) == ""


def test_the_demo_ends_with_the_three_sources_in_agreement(
    redis_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "METERING_DATA_DIR": str(tmp_path),
        "RATE_LIMIT_REDIS_URL": own_redis_database(redis_url, 8),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "USAGE_EVENTS_TOPIC": topic,
        "USAGE_EVENTS_DLQ_TOPIC": f"{topic}.dlq",
        "USAGE_EVENTS_PARTITIONS": "2",
        "WORKER_GROUP": f"{topic}-worker",
        "WORKER_BACKFILL_INTERVAL": "1",
    }
    import redis

    redis.Redis.from_url(env["RATE_LIMIT_REDIS_URL"]).flushdb()
    port = _free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metering.cli",
            "demo",
            "--tenants",
            "6",
            "--seconds",
            "10",
            "--port",
            str(port),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "the three sources agree" in out
    assert "-free-00" in out and "-enterprise-02" in out
    # `metering up` stopped cleanly: nothing listens on its port any more.
    with __import__("socket").socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # What the demo's closing lines point at: the three sources of its day, read directly now
    # that the product is stopped, agree for every tenant, the demo's operator included (its
    # own reads are metered too, and used to be left behind when the product stopped).
    rec = subprocess.run(
        [sys.executable, "-m", "metering.cli", "reconcile", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rec.returncode == 0, (rec.stdout + rec.stderr)[-4000:]
    assert "demo-operator" in rec.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agreement_needs_equal_sources_and_allows_only_answers_the_client_lost() -> None:
    from metering.demo import TenantRun

    def run(allowed: int, errors: int, r: int, c: int, q: int) -> TenantRun:
        t = TenantRun("t", "free", 1.0, allowed=allowed, errors=errors)
        t.redis, t.clickhouse, t.quota_db = r, c, q
        return t

    assert run(10, 0, 10, 10, 10).agrees
    assert run(9, 1, 10, 10, 10).agrees  # one answer timed out after the server allowed it
    assert not run(9, 0, 10, 10, 10).agrees  # allowed more than the client could have seen
    assert not run(10, 0, 10, 9, 10).agrees  # ClickHouse lost one
    assert not run(10, 0, 10, 10, 11).agrees  # the backfill counted one twice
