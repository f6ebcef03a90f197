"""The demo: the product started with ``metering up``, driven by synthetic tenants, then checked.

1. ``metering up`` runs in a child process (API + worker; local Redis and Kafka as needed).
2. A few dozen tenants get quotas from three plans, some deliberately tight, through the admin
   API (``PUT /v1/tenants/{t}/quota``).
3. Traffic runs for about a minute through the API (each request is one limiter decision and one
   usage event), with a progress bar. Each answer is counted as allowed, rejected by the token
   bucket, or rejected by the daily quota (from the ``RateLimit`` field the API sets).
4. After the traffic, once the pipeline has caught up, three sources are compared per tenant:
   the Redis daily counter (``GET /v1/limits``), ClickHouse (``GET /v1/usage``) and the quota
   DB's backfilled ``tenant_daily_usage``; they must agree with what the client saw allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from metering.settings import Settings

# plan name -> (rate per second, burst, daily limit); "tight" tenants hit the daily quota.
DEMO_PLANS: dict[str, tuple[float, int, int]] = {
    "free": (2.0, 5, 60),
    "pro": (10.0, 20, 100_000),
    "enterprise": (50.0, 100, 1_000_000),
}


MAX_TENANT_RATE = 5.0  # requests/s per tenant: 30 tenants offer ~120/s, well inside one process
MAX_IN_FLIGHT = 4  # per tenant: a slow server sheds offered load instead of stretching the run


@dataclass
class TenantRun:
    tenant: str
    plan: str
    rate: float  # requests per second this tenant sends
    sent: int = 0
    allowed: int = 0
    rejected_bucket: int = 0
    rejected_daily: int = 0
    rejected_other: int = 0
    errors: int = 0
    skipped: int = 0  # not sent because MAX_IN_FLIGHT of this tenant's requests were pending
    # filled after the run
    redis: int | None = None
    clickhouse: int | None = None
    quota_db: int | None = None

    @property
    def agrees(self) -> bool:
        """The three sources record the same usage, and it is what the client saw allowed,
        give or take answers the client never got (a timeout after the server had decided)."""
        if self.redis is None or not self.redis == self.clickhouse == self.quota_db:
            return False
        return self.allowed <= self.redis <= self.allowed + self.errors


@dataclass
class DemoResult:
    tenants: list[TenantRun] = field(default_factory=list)
    seconds: float = 0.0
    traffic_seconds: float = 0.0  # how long the traffic really took (a busy server stretches it)
    caught_up_after: float | None = None

    @property
    def all_agree(self) -> bool:
        return bool(self.tenants) and all(t.agrees for t in self.tenants)


def make_tenants(count: int, seed: int = 7, run_id: str | None = None) -> list[TenantRun]:
    """Tenants over the plans; each sends at a rate around (sometimes above) its plan's rate.

    Each run has tenants of its own (``demo-<run>-<plan>-NN``): the daily counters are per UTC
    day, so a second run the same day must not start from the first run's usage."""
    run_id = run_id or time.strftime("%H%M%S", time.gmtime())
    rng = random.Random(seed)
    plans = ["free", "pro", "enterprise"]
    out = []
    for i in range(count):
        plan = plans[i % 3]
        rate, _, _ = DEMO_PLANS[plan]
        factor = rng.choice([0.5, 0.9, 1.5, 3.0])
        name = f"demo-{run_id}-{plan}-{i:02d}"
        out.append(TenantRun(name, plan, min(rate * factor, MAX_TENANT_RATE)))
    return out


def rejection_policy(headers: httpx.Headers) -> str:
    """The exhausted policy of a 429, from the ``RateLimit`` field, which lists every policy
    ('"burst";r=0;t=1, "daily";r=0;t=3600' -> 'daily'). When several are at 0 the one that
    lasts longest is named: the daily quota, then the rolling window, then the bucket."""
    exhausted = []
    for item in headers.get("ratelimit", "").split(","):
        name, _, params = item.strip().partition(";")
        fields = dict(p.split("=", 1) for p in params.split(";") if "=" in p)
        if fields.get("r") == "0":
            exhausted.append(name.strip().strip('"'))
    for name in ("daily", "window", "burst"):
        if name in exhausted:
            return name
    return exhausted[0] if exhausted else ""


class DemoClient:
    def __init__(self, base: str, tokens: dict[str, str], admin_token: str) -> None:
        self.base = base
        self.tokens = tokens
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.http = httpx.AsyncClient(
            base_url=base, timeout=10.0, limits=httpx.Limits(max_connections=64)
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def set_quota(self, run: TenantRun) -> None:
        rate, burst, daily = DEMO_PLANS[run.plan]
        r = await self.http.put(
            f"/v1/tenants/{run.tenant}/quota",
            headers=self.admin,
            json={"plan": run.plan, "rate_per_sec": rate, "burst": burst, "daily_limit": daily},
        )
        r.raise_for_status()

    async def request(self, run: TenantRun) -> None:
        headers = {"Authorization": f"Bearer {self.tokens[run.tenant]}"}
        run.sent += 1
        try:
            r = await self.http.get(f"/v1/limits/{run.tenant}", headers=headers)
        except httpx.HTTPError:
            run.errors += 1
            return
        if r.status_code == 200:
            run.allowed += 1
        elif r.status_code == 429:
            policy = rejection_policy(r.headers)
            if policy == "daily":
                run.rejected_daily += 1
            elif policy == "burst":
                run.rejected_bucket += 1
            else:
                run.rejected_other += 1
        else:
            run.errors += 1

    async def limits(self, tenant: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/limits/{tenant}", headers=self.admin)
        r.raise_for_status()
        return dict(r.json())

    async def usage_today(self, tenant: str, day: dt.date) -> int:
        start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        r = await self.http.get(
            "/v1/usage",
            headers=self.admin,
            params={
                "meter": "requests",
                "tenant": tenant,
                "window": "DAY",
                "aggregation": "SUM",
                "from": start.isoformat(),
                "to": (start + dt.timedelta(days=1)).isoformat(),
            },
        )
        r.raise_for_status()
        return round(sum(row["value"] for row in r.json()["data"]))


async def reconciled(client: DemoClient, day: dt.date, timeout: float) -> bool:
    """Wait until the API's reconcile (never metered) finds every tenant agreeing for ``day``,
    or ``timeout`` passes. The demo's operator is a tenant too, metered for each read
    ``collect`` made: its last reads reach ClickHouse and the backfill after the comparison,
    and stopping the product before they did left ``metering reconcile`` showing it apart."""
    end = time.monotonic() + timeout
    while True:
        r = await client.http.get(
            "/v1/admin/reconcile", headers=client.admin, params={"day": day.isoformat()}
        )
        if r.status_code == 200 and r.json().get("drifted") == 0:
            return True
        if time.monotonic() > end:
            return False
        await asyncio.sleep(1.0)


async def drive(
    client: DemoClient, runs: list[TenantRun], seconds: float, progress: Any = None
) -> float:
    """Each tenant sends at its rate for ``seconds`` (open loop, bounded concurrency); return
    the seconds until the last answer arrived (a busy server stretches the traffic)."""
    began = time.monotonic()
    sem = asyncio.Semaphore(48)
    end = time.monotonic() + seconds

    async def one(run: TenantRun) -> None:
        async with sem:
            await client.request(run)

    async def tenant_loop(run: TenantRun) -> None:
        pending: set[asyncio.Task[None]] = set()
        interval = 1.0 / run.rate
        nxt = time.monotonic() + random.random() * interval
        while nxt < end:
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            nxt += interval
            if len(pending) >= MAX_IN_FLIGHT:
                run.skipped += 1  # the server is behind: do not queue more for this tenant
                continue
            task = asyncio.create_task(one(run))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)

    async def tick() -> None:
        start = time.monotonic()
        while time.monotonic() < end:
            if progress is not None:
                progress(min(seconds, time.monotonic() - start), sum(r.sent for r in runs))
            await asyncio.sleep(0.25)

    await asyncio.gather(tick(), *(tenant_loop(r) for r in runs))
    if progress is not None:
        progress(seconds, sum(r.sent for r in runs))
    return time.monotonic() - began


async def collect(
    client: DemoClient, runs: list[TenantRun], store: Any, day: dt.date, timeout: float
) -> float | None:
    """Read the three sources until they match what the client saw, or ``timeout`` passes;
    return the seconds it took to catch up (None if it did not)."""
    start = time.monotonic()
    while True:
        for run in runs:
            run.redis = int((await client.limits(run.tenant))["daily"]["used"])
            run.clickhouse = await client.usage_today(run.tenant, day)
            run.quota_db = store.daily_usage(run.tenant, day)
        if all(r.agrees for r in runs):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        await asyncio.sleep(1.0)


@contextlib.contextmanager
def metering_up(
    port: int, env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``metering up`` as a child process; SIGINT (Ctrl-C) on the way out, as a person would."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metering.cli", "up", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"metering up exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    raise RuntimeError(f"metering up did not answer {base}/readyz within {timeout:.0f}s")


OPERATOR = "demo-operator"


def provision_operator(settings: Settings) -> None:
    """Give the demo's operator (the admin token's tenant) room for its own admin calls, the way
    an operator would with ``metering tenants set``: database, Redis entry, published change."""
    import redis

    from limiter.quotas import QuotaAdmin
    from metering.localstack import LocalStack
    from metering.quota_db import QuotaStore

    url = os.environ.get("RATE_LIMIT_REDIS_URL") or LocalStack(
        settings.metering_data_dir.resolve() / "stack"
    ).env().get("RATE_LIMIT_REDIS_URL")
    client = redis.Redis.from_url(url) if url else None
    try:
        QuotaAdmin(
            QuotaStore(settings.quota_db_url), client, redis_ttl=settings.tenant_quota_cache_ttl
        ).set_quota(
            OPERATOR, plan="enterprise", rate_per_sec=1000.0, burst=1000, daily_limit=10_000_000
        )
    finally:
        if client is not None:
            client.close()


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("METERING_DATA_DIR", str(settings.metering_data_dir.resolve()))
    return env
