"""Benchmark: what ``POST /v1/events`` takes, now that its 202 waits for the events to be safe.

Run: ``python benchmarks/bench_ingest.py [--requests 100] [--batch 100] [--baseline-ref REF]``
(Redis and Kafka from RATE_LIMIT_REDIS_URL / KAFKA_BOOTSTRAP_SERVERS, defaults 127.0.0.1:6379 and
127.0.0.1:9092; a fresh topic and data folder per server.)

A real ``metering api`` (a subprocess, as deployed) takes ``--requests`` batches of ``--batch``
events back to back from one client, after ``--warmup`` unmeasured ones; the latency of each
answer is reported (p50, p90, max). ``--baseline-ref`` serves the same with the code of a git
revision (its ``metering``, ``limiter`` and ``streams`` folders), alternately with this tree,
twice each: e.g. the revision before the route waited for Kafka's acknowledgement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import jwt

from metering.commands.argtypes import positive_int

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-ingest-secret-0123456789abcdef0123"
AUDIENCE = "bench-ingest"
TENANT = "bench-ingest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(code: Path, requests: int, batch: int, warmup: int) -> list[float]:
    """Milliseconds per answered batch, from a ``metering api`` running ``code``'s packages."""
    data = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(code),  # its packages before the installed ones
        "METERING_DATA_DIR": str(data),
        "QUOTA_DB_URL": f"sqlite:///{data / 'quota.db'}",
        "CLICKHOUSE_URL": f"chdb://{data / 'clickhouse'}",
        "USAGE_EVENTS_TOPIC": f"bench-ingest-{uuid.uuid4().hex[:8]}",
        "JWT_SECRET": SECRET,
        "JWT_AUDIENCE": AUDIENCE,
        "RATE_LIMIT_REDIS_URL": os.environ.get("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "KAFKA_BOOTSTRAP_SERVERS": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    }
    cli = [sys.executable, "-m", "metering.cli"]
    subprocess.run([*cli, "db", "migrate"], env=env, cwd=code, check=True, capture_output=True)
    subprocess.run(
        [*cli, "tenants", "set", TENANT, "--plan", "enterprise"],
        env=env, cwd=code, check=True, capture_output=True,
    )  # fmt: skip
    server = subprocess.Popen(
        [*cli, "api", "--port", str(port)],
        env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    token = jwt.encode(
        {"sub": TENANT, "aud": AUDIENCE, "exp": int(time.time()) + 3600}, SECRET, "HS256"
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"metering api ({code}) did not become ready")
            time.sleep(0.2)
        out: list[float] = []
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
            for i in range(warmup + requests):
                now = dt.datetime.now(dt.UTC).isoformat()
                events = [
                    {
                        "specversion": "1.0",
                        "id": str(uuid.uuid4()),
                        "source": "urn:bench",
                        "type": "metering.usage",
                        "subject": TENANT,
                        "time": now,
                        "data": {"meter": "tokens", "quantity": 1},
                    }
                    for _ in range(batch)
                ]
                started = time.perf_counter()
                r = client.post(f"{url}/v1/events", json=events)
                took = (time.perf_counter() - started) * 1000
                if r.status_code != 202:
                    raise SystemExit(f"{code}: {r.status_code} {r.text[:300]}")
                if i >= warmup:
                    out.append(took)
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def report(name: str, ms: list[float]) -> float:
    ms = sorted(ms)
    p50 = statistics.median(ms)
    print(
        f"{name}: {len(ms)} batches, p50 {p50:.1f} ms, p90 {ms[int(len(ms) * 0.9)]:.1f} ms, "
        f"max {ms[-1]:.1f} ms",
        flush=True,
    )
    return p50


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=positive_int, default=100)
    ap.add_argument("--batch", type=positive_int, default=100, help="events per request")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--baseline-ref", help="also serve this git revision's code, alternately")
    args = ap.parse_args()
    trees: list[tuple[str, Path]] = [("now", ROOT)]
    base_tree = None
    if args.baseline_ref:
        base_tree = Path(tempfile.mkdtemp(prefix="bench-ingest-baseline-"))
        packages = ["metering", "streams", "limiter"]
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline_ref, *packages],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive.stdout, check=True)
        trees.append((f"baseline {args.baseline_ref}", base_tree))
    try:
        p50s: dict[str, list[float]] = {name: [] for name, _ in trees}
        for _ in range(2 if base_tree else 1):
            for name, code in trees:
                p50s[name].append(
                    report(name, measure(code, args.requests, args.batch, args.warmup))
                )
        if base_tree:
            now, base = statistics.median(p50s["now"]), statistics.median(p50s[trees[1][0]])
            print(f"p50 now {now:.1f} ms, baseline {base:.1f} ms: {now - base:+.1f} ms per batch")
    finally:
        if base_tree:
            shutil.rmtree(base_tree, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
