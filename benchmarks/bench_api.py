"""Cost of the API's request path: auth + rate limiting on a trivial endpoint.

Two servers, the same FastAPI app with one trivial endpoint (``GET /v1/ping``; FastAPI's native
OpenTelemetry off, as ``metering api`` runs by default), each served by uvicorn (one process,
pinned to CPU 0; uvloop and httptools, from ``uvicorn[standard]``) on loopback:

- **bare**: the app alone;
- **full**: the app behind ``JWTAuthMiddleware`` (HS256 bearer token) and
  ``RateLimitMiddleware`` (the real ``AsyncRateLimiter`` on Redis, quota from the real
  ``QuotaCache`` over a SQLite quota DB, every decision emitted through the real ``Emitter`` to
  Kafka). The tenant's quota is large enough that nothing is rejected: we measure the cost of
  deciding, not of refusing.

The load generator is ``wrk`` (pinned to CPU 1), run in the same script against each server in
turn, alternating bare/full for ``--rounds`` rounds; the medians are reported:

- throughput: requests/s at ``--connections`` concurrent connections (target: full >= 0.7 x bare);
- latency: p99 with one connection (requests back to back, so p99 is service time, not queueing;
  target: full - bare < 2 ms).

On a shared machine wall-clock rates mostly measure how much CPU the scheduler gave each server
(a server with more threads gets more), so the script also reports the server's own CPU time per
request (all its threads, from /proc): bare / full of that is the capacity ratio of one core.
``--breakdown`` adds three servers to show where the time goes: ``auth`` (JWT only), ``redis``
(the bare app behind one raw redis-py ``INCR`` per request, no JWT: the floor of any limiter
that asks Redis on every request, as the seed's Lua limiter does) and ``limit`` (JWT + limiter,
no emitter).

Usage: ``python benchmarks/bench_api.py [--duration 10] [--rounds 3] [--connections 32]
[--breakdown]``.
Redis and Kafka come from ``RATE_LIMIT_REDIS_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` (defaults:
127.0.0.1:6379, 127.0.0.1:9092).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
from procstat import cpu_seconds, stat_cpu_seconds

from metering.commands.argtypes import positive_int

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-secret-0123456789abcdef0123456789"
AUDIENCE = "metering-bench"
KINDS = ["bare", "auth", "redis", "limit", "full"]
SERVER_CPU = "0"
LOADGEN_CPU = "1"


# --- the servers ----------------------------------------------------------------------------------
def build_app(kind: str, data_dir: Path, tenant: str):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI

    from metering.api.app import telemetry_argument

    app = FastAPI(**telemetry_argument(False))  # as `metering api` builds it by default

    @app.get("/v1/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    if kind == "bare":
        return app
    if kind == "redis":
        return OneRedisCall(app, tenant)
    if kind == "auth":
        from metering.api.auth import JWTAuthMiddleware, TokenVerifier
        from metering.settings import load_settings

        settings = load_settings(jwt_secret=SECRET, jwt_audience=AUDIENCE)
        app.add_middleware(JWTAuthMiddleware, verifier=TokenVerifier.from_settings(settings))
        return app

    from limiter import AsyncRateLimiter, CircuitBreaker, LocalLimiter
    from limiter.middleware import RateLimitMiddleware
    from limiter.quotas import QuotaCache
    from limiter.redis_factory import async_redis_from_settings
    from metering.api.auth import JWTAuthMiddleware, TokenVerifier
    from metering.emitter import Emitter
    from metering.quota_db import QuotaStore, migrate
    from metering.settings import load_settings
    from metering.topics import ensure_topics, pipeline_topics

    topic = f"{tenant}-{kind}"  # the driver drops the run's topics by the tenant's prefix
    settings = load_settings(
        metering_data_dir=data_dir,
        quota_db_url=f"sqlite:///{data_dir / 'quota.db'}",
        usage_events_topic=topic,
        usage_events_dlq_topic=f"{topic}.dlq",
        usage_events_partitions=1,
        jwt_secret=SECRET,
        jwt_audience=AUDIENCE,
    )
    migrate(settings.quota_db_url)
    ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))
    store = QuotaStore(settings.quota_db_url)
    store.set_quota(tenant, rate_per_sec=1e9, burst=10**12, daily_limit=10**15)
    redis = async_redis_from_settings(settings)
    quotas = QuotaCache.from_settings(settings, store=store, aredis=redis)
    limiter = AsyncRateLimiter(
        redis,
        quotas,
        fail_mode=settings.rate_limit_fail_mode,
        breaker=CircuitBreaker(
            settings.rate_limit_breaker_failures, settings.rate_limit_breaker_reset
        ),
        local_limiter=LocalLimiter(settings.rate_limit_local_ceiling_per_sec),
    )
    emitter = Emitter(settings) if kind == "full" else None
    app.add_middleware(RateLimitMiddleware, limiter=limiter, emitter=emitter, routes=["/v1/ping"])
    app.add_middleware(JWTAuthMiddleware, verifier=TokenVerifier.from_settings(settings))
    return app


class OneRedisCall:
    """The ``redis`` variant: the bare app behind one raw redis-py round trip per request (an
    ``INCR``, redis.asyncio's own connection pool), and nothing else: no token, no decision, no
    headers, no event. Any limiter that asks Redis on every request pays at least this."""

    def __init__(self, app, tenant: str) -> None:  # type: ignore[no-untyped-def]
        import redis.asyncio

        self.app = app
        self.key = f"bench-raw:{tenant}"
        url = os.environ.get("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/0")
        self.redis = redis.asyncio.Redis.from_url(url, max_connections=64)
        self.expiry_set = False

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            if not self.expiry_set:
                self.expiry_set = True
                await self.redis.set(self.key, 0, ex=3600)
            await self.redis.incr(self.key)
        await self.app(scope, receive, send)


def serve(kind: str, port: int, data_dir: Path, tenant: str) -> None:
    """Serve as ``metering api`` does: its uvicorn configuration and its settled heap."""
    import uvicorn

    from metering.commands import settle_heap
    from metering.commands.api import server_config

    app = build_app(kind, data_dir, tenant)
    config = server_config(app, "127.0.0.1", port, log_level="warning", access_log=False)
    settle_heap()
    with contextlib.suppress(KeyboardInterrupt):  # the driver stops it with SIGINT
        uvicorn.Server(config).run()


# --- the driver -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


def start_server(kind: str, data_dir: Path, tenant: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    argv += ["--data-dir", str(data_dir), "--tenant", tenant]
    proc = subprocess.Popen(pinned(SERVER_CPU, argv), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_serving(proc, url, f"{kind} server")
    return proc, url


def wait_serving(proc: subprocess.Popen[bytes], url: str, what: str, timeout: float = 60) -> None:
    """Return once the server at ``url`` answers HTTP at all (an error status too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            httpx.get(f"{url}/v1/ping", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not start")


def wait_or_kill(proc: subprocess.Popen[bytes]) -> None:
    """After SIGINT (uvicorn's graceful stop): wait 30 s for the server to end, then kill it."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """The process's CPU time so far by kind of thread: ``loop`` (the main thread: uvicorn's event
    loop), ``emitter`` (the emitter's threads), ``librdkafka`` (its producer's threads, named
    ``rdk:*``) and ``other``. The project names its threads in the OS (metering/threads.py)."""
    out = dict.fromkeys(("loop", "emitter", "librdkafka", "other"), 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if task.name == str(pid):
            kind = "loop"
        elif name.startswith("emitter-"):
            kind = "emitter"
        elif name.startswith("rdk:"):
            kind = "librdkafka"
        else:
            kind = "other"
        out[kind] += stat_cpu_seconds(stat)
    return out


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_us_per_request: float
    #: the same, by kind of thread (see :func:`thread_cpu_seconds`)
    cpu_us_by_thread: dict[str, float]

    def threads_text(self) -> str:
        """``loop 190 / emitter 5 / librdkafka 3 / other 1 us``, or ``""`` with the loop alone."""
        if sum(v for k, v in self.cpu_us_by_thread.items() if k != "loop") < 0.5:
            return ""
        return " / ".join(f"{k} {v:.0f}" for k, v in self.cpu_us_by_thread.items()) + " us"


def wrk_argv(url: str, token: str, connections: int, duration: int) -> list[str]:
    """``wrk`` on the load generator's CPU: one thread, ``connections``, GET /v1/ping, for
    ``duration`` whole seconds (``wrk -d`` takes an integer: ``-d1.5s`` makes it exit 1)."""
    if type(duration) is not int or duration < 1:
        raise ValueError(f"wrk runs whole seconds (>= 1), not {duration!r}")
    return pinned(
        LOADGEN_CPU,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            f"{url}/v1/ping",
        ],
    )


def check_answers(url: str, out: str) -> None:
    """Stop the benchmark if ``wrk`` saw any answer other than 2xx (a measured error path)."""
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise SystemExit(f"{url}: {bad.group(1)} non-2xx responses")


def wrk(url: str, token: str, connections: int, duration: int, pid: int) -> Run:
    """One wrk run; also the server's CPU time per request (less sensitive to other load on a
    shared machine than wall-clock rates: it is what the server itself spent)."""
    argv = wrk_argv(url, token, connections, duration)
    cpu_before, threads_before = cpu_seconds(pid), thread_cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu_before
    threads = thread_cpu_seconds(pid)
    check_answers(url, out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    per = 1e6 / max(1, requests)
    return Run(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        requests=requests,
        cpu_us_per_request=cpu * per,
        cpu_us_by_thread={k: (v - threads_before[k]) * per for k, v in threads.items()},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=positive_int,
        default=10,
        help="whole seconds per wrk run at --connections (the one-connection run takes half, "
        "rounded up)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--pairs", type=int, default=10, help="adjacent bare/full slices after the rounds (0: none)"
    )
    parser.add_argument(
        "--slice", type=positive_int, default=2, help="whole seconds per paired slice"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also serve 'auth' (JWT only), 'redis' (one raw redis-py round trip per request) "
        "and 'limit' (JWT + limiter, no emitter)",
    )
    parser.add_argument(
        "--redis-cpu",
        choices=("env", "same", "other"),
        default="env",
        help="env: the Redis RATE_LIMIT_REDIS_URL names, wherever it runs (default); same / "
        "other: a private redis-server pinned to the server's CPU or to the load generator's. "
        "On loopback the writer's system call does the reader's wake-up, so a Redis on another "
        "CPU charges the server for an inter-processor wake-up per round trip",
    )
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tenant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir, args.tenant)
        return 0
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (Debian: apt-get install wrk)")

    kinds = KINDS if args.breakdown else ["bare", "full"]
    stack = None
    if args.redis_cpu != "env":
        from metering.localstack import LocalStack

        stack = LocalStack(ROOT / "var" / "bench-api-stack")
        os.environ["RATE_LIMIT_REDIS_URL"] = stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
        state = stack.service("redis")
        assert state is not None
        cpu = SERVER_CPU if args.redis_cpu == "same" else LOADGEN_CPU
        os.sched_setaffinity(state.pids["redis"], {int(cpu)})
        print(f"private redis-server pinned to CPU {cpu} (server on {SERVER_CPU})", flush=True)
    try:
        return run(args, kinds)
    finally:
        if stack is not None:
            stack.down()


def run(args: argparse.Namespace, kinds: list[str]) -> int:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    token = jwt.encode(
        {"sub": tenant, "aud": AUDIENCE, "exp": int(time.time()) + 3600},
        SECRET,
        algorithm="HS256",
    )
    results: dict[str, dict[str, list[float]]] = {
        k: {"rps": [], "p50": [], "p99": [], "cpu": []} for k in kinds
    }
    try:
        return measure(args, kinds, tenant, token, results)
    finally:
        from metering.topics import drop_topics

        drop_topics(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"), tenant)


def paired_slices(
    args: argparse.Namespace,
    servers: dict[str, tuple[subprocess.Popen[bytes], str]],
    token: str,
) -> list[tuple[float, float]]:
    """``--pairs`` short bare/full slices back to back (alternating which goes first): each
    pair's (req/s ratio, CPU capacity ratio). On a VM whose speed drifts by tens of percent
    within minutes, two adjacent slices see nearly the same machine; whole rounds do not."""
    out: list[tuple[float, float]] = []
    order = ["bare", "full"]
    for i in range(args.pairs):
        got = {}
        for kind in order if i % 2 == 0 else order[::-1]:
            proc, url = servers[kind]
            got[kind] = wrk(url, token, args.connections, args.slice, proc.pid)
        out.append(
            (
                got["full"].rps / got["bare"].rps,
                got["bare"].cpu_us_per_request / got["full"].cpu_us_per_request,
            )
        )
    return out


def measure(
    args: argparse.Namespace,
    kinds: list[str],
    tenant: str,
    token: str,
    results: dict[str, dict[str, list[float]]],
) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        servers = {kind: start_server(kind, Path(tmp) / kind, tenant) for kind in kinds}
        try:
            for proc, url in servers.values():  # warm-up: caches, pooled connections
                wrk(url, token, args.connections, 2, proc.pid)
            for n in range(args.rounds):
                for kind, (proc, url) in servers.items():
                    load = wrk(url, token, args.connections, args.duration, proc.pid)
                    single = wrk(url, token, 1, -(-args.duration // 2), proc.pid)
                    r = results[kind]
                    r["rps"].append(load.rps)
                    r["cpu"].append(load.cpu_us_per_request)
                    r["p50"].append(single.p50_ms)
                    r["p99"].append(single.p99_ms)
                    print(
                        f"round {n + 1} {kind:5s}: {load.rps:7.0f} req/s at {args.connections} "
                        f"connections ({load.cpu_us_per_request:5.0f} us server CPU/request); "
                        f"1 connection: p50 {single.p50_ms:6.2f} ms, p99 {single.p99_ms:6.2f} ms",
                        flush=True,
                    )
                    if by_thread := load.threads_text():
                        print(f"        {kind} CPU/request by thread: {by_thread}")
            pairs = paired_slices(args, servers, token)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
            for proc, _ in servers.values():
                wait_or_kill(proc)

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    bare, full = med["bare"], med["full"]
    ratio = full["rps"] / bare["rps"]
    cpu_ratio = bare["cpu"] / full["cpu"]  # capacity of one core, full vs bare
    added_p99 = full["p99"] - bare["p99"]
    added_p50 = full["p50"] - bare["p50"]
    summary = {
        "bare_rps": round(bare["rps"]),
        "full_rps": round(full["rps"]),
        "ratio": round(ratio, 3),
        "bare_cpu_us_per_request": round(bare["cpu"]),
        "full_cpu_us_per_request": round(full["cpu"]),
        "cpu_capacity_ratio": round(cpu_ratio, 3),
        "bare_p50_ms": round(bare["p50"], 3),
        "full_p50_ms": round(full["p50"], 3),
        "bare_p99_ms": round(bare["p99"], 3),
        "full_p99_ms": round(full["p99"], 3),
        "p50_added_ms": round(added_p50, 3),
        "p99_added_ms": round(added_p99, 3),
        "cpus": os.cpu_count(),
        "redis_cpu": args.redis_cpu,
        "loadavg_at_end": os.getloadavg()[0],
    }
    if pairs:
        summary["pairs"] = len(pairs)
        summary["pair_ratio"] = round(statistics.median(r for r, _ in pairs), 3)
        summary["pair_cpu_capacity_ratio"] = round(statistics.median(c for _, c in pairs), 3)
    if args.breakdown:
        summary["cpu_us_per_request"] = {k: round(v["cpu"]) for k, v in med.items()}
        summary["raw_redis_ratio"] = round(med["redis"]["rps"] / bare["rps"], 3)
        summary["raw_redis_cpu_capacity_ratio"] = round(bare["cpu"] / med["redis"]["cpu"], 3)
    print(json.dumps(summary))
    print(
        f"baseline (bare app): {bare['rps']:.0f} req/s, {bare['cpu']:.0f} us CPU/request, "
        f"p99 {bare['p99']:.2f} ms; with auth + rate limiting: {full['rps']:.0f} req/s, "
        f"{full['cpu']:.0f} us CPU/request, p99 {full['p99']:.2f} ms"
    )
    if pairs:
        print(
            f"adjacent slice pairs ({len(pairs)} x {args.slice:g} s each): median ratio "
            f"{summary['pair_ratio']:.2f}x req/s, {summary['pair_cpu_capacity_ratio']:.2f}x by "
            f"server CPU per request (the VM's drift between two slices is smallest); by CPU, "
            f"sorted: {' '.join(f'{c:.2f}' for c in sorted(c for _, c in pairs))}"
        )
    if args.breakdown:
        print(
            f"one raw redis-py round trip per request (no auth, no limiter): "
            f"{summary['raw_redis_ratio']:.2f}x req/s, "
            f"{summary['raw_redis_cpu_capacity_ratio']:.2f}x by server CPU per request"
        )
    print(
        f"ratio {ratio:.2f}x req/s, {cpu_ratio:.2f}x by server CPU per request "
        f"(target >= 0.7: {'met' if min(ratio, cpu_ratio) >= 0.7 else 'NOT met'}); "
        f"p99 added {added_p99:.2f} ms, p50 added {added_p50:.2f} ms "
        f"(target < 2 ms: {'met' if added_p99 < 2 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
