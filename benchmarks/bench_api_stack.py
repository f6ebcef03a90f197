"""Where the API's per-request cost goes, without HTTP: the app driven in-process.

``bench_api.py`` measures the served app end to end; this one calls the same ASGI apps
(``bench_api.build_app``) directly from ``--tasks`` concurrent tasks on uvloop, in one process
pinned to one CPU, and reports the CPU time per request of each variant, so the socket, uvicorn
and the load generator are out of the figure:

- ``bare``, ``auth``, ``limit``, ``full``: as in ``bench_api.py`` (``limit`` and ``full`` use
  the real limiter on Redis, ``full`` the real emitter to Kafka);
- ``instant``: JWT + ``RateLimitMiddleware`` with a limiter that answers at once (no Redis):
  the middleware's own cost inside FastAPI;
- ``turn``: the same, answering after one event-loop turn, as a Redis reply arrives: what a
  suspension of the request's coroutine stack costs.

Variants alternate for ``--rounds`` rounds (each in a fresh process); medians are printed.

Usage: ``python benchmarks/bench_api_stack.py [--seconds 4] [--rounds 3] [--tasks 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ["bare", "auth", "instant", "turn", "limit", "full"]


def fake_limited_app(answer_after_turn: bool, tenant: str) -> Any:
    """The bench app behind JWT + RateLimitMiddleware, with a limiter that needs no Redis."""
    from bench_api import AUDIENCE, SECRET, build_app  # type: ignore[import-not-found]

    from limiter import Quota
    from limiter.core import LimiterCore
    from limiter.middleware import RateLimitMiddleware
    from metering.api.auth import JWTAuthMiddleware, TokenVerifier
    from metering.settings import load_settings

    quota = Quota(rate_per_sec=1e9, burst=10**12, daily_limit=10**15)
    core = LimiterCore(None, 3600)
    reply = [1, 0, 10**15 * 1000, 0, 1, 0, int(time.time() // 86400), int(time.time())]

    class Limiter:
        async def acquire(self, tenant: str, cost: int = 1) -> Any:
            if answer_after_turn:
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut
            return core.decision(reply, tenant, cost, quota, time.perf_counter())

    app = build_app("bare", Path(tempfile.mkdtemp(prefix="bench-stack-")), tenant)
    app.add_middleware(RateLimitMiddleware, limiter=Limiter(), routes=["/v1/ping"])
    settings = load_settings(jwt_secret=SECRET, jwt_audience=AUDIENCE)
    app.add_middleware(JWTAuthMiddleware, verifier=TokenVerifier.from_settings(settings))
    return app


def ping_scope(headers: list[tuple[bytes, bytes]], state: dict[str, Any] | None = None) -> Any:
    """The ASGI scope of one ``GET /v1/ping``, as a server hands it to the app."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/ping",
        "raw_path": b"/v1/ping",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {} if state is None else state,
    }


async def drive(app: Any, token: str, tasks: int, seconds: float) -> float:
    """CPU seconds of this thread per request, ``tasks`` callers for ``seconds``."""
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            statuses.append(message["status"])

    done = 0
    stop = False

    async def caller() -> None:
        nonlocal done
        while not stop:
            await app(ping_scope(headers), receive, send)
            done += 1
            await asyncio.sleep(0)  # as a server's next request arrives on a later loop turn

    running = [asyncio.create_task(caller()) for _ in range(tasks)]
    await asyncio.sleep(1.0)  # warm up: connections, caches
    n0, cpu0 = done, time.thread_time()
    await asyncio.sleep(seconds)
    n, cpu = done - n0, time.thread_time() - cpu0
    stop = True
    await asyncio.gather(*running)
    if statuses:
        raise SystemExit(f"{len(statuses)} answers were not 200 (first: {statuses[0]})")
    return cpu / max(1, n)


def child(variant: str, tasks: int, seconds: float, gc_threshold: int = 0) -> None:
    import jwt
    import uvloop
    from bench_api import AUDIENCE, SECRET, build_app

    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    if variant in ("instant", "turn"):
        app = fake_limited_app(variant == "turn", tenant)
    else:
        app = build_app(variant, Path(tempfile.mkdtemp(prefix="bench-stack-")), tenant)
    token = jwt.encode(
        {"sub": tenant, "aud": AUDIENCE, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256"
    )
    import gc

    from metering.commands import settle_heap

    # As `metering api` does after start-up; --gc-threshold: another young generation.
    young, *older = gc.get_threshold()
    settle_heap((gc_threshold or young, *older))
    per_request = uvloop.run(drive(app, token, tasks, seconds))
    print(json.dumps({"variant": variant, "us": per_request * 1e6}), flush=True)
    if variant in ("limit", "full"):
        from metering.topics import drop_topics

        drop_topics(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"), tenant)
    os._exit(0)  # the emitter's and the quota cache's threads need no orderly stop here


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="young-generation threshold of the collector (default: the interpreter's)",
    )
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tasks, args.seconds, args.gc_threshold)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)} (known: {VARIANTS})")
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    got: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            argv = [*pin, sys.executable, __file__, "--child", v]
            argv += ["--tasks", str(args.tasks), "--seconds", str(args.seconds)]
            argv += ["--gc-threshold", str(args.gc_threshold)]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"{v} failed:\n{out.stderr[-2000:]}")
            us = json.loads(lines[-1])["us"]
            got[v].append(us)
            print(f"round {r + 1} {v:8s} {us:6.1f} us CPU per request", flush=True)
    med = {v: statistics.median(xs) for v, xs in got.items()}
    print(json.dumps({"tasks": args.tasks, "median_us": {v: round(x, 1) for v, x in med.items()}}))
    if "bare" in med:
        for v, x in med.items():
            print(f"{v:8s} {x:6.1f} us per request ({x - med['bare']:+6.1f} us over bare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
