"""Limiter benchmark: decisions per second and p50/p99 latency on one core against local Redis.

Measured in the same run, for comparison:
  (a) a no-op ``EVALSHA`` (``return 1``) through plain redis-py, sync and asyncio;
  (b) the ``limits`` library's fixed-window, moving-window and sliding-window-counter strategies
      on the same Redis. ``limits[redis]`` wants redis-py < 8 and the project has redis-py 8, so
      that part runs in its own virtualenv (``var/bench-venv-limits``, created on first use) in a
      subprocess pinned to the same core.

Run:  python benchmarks/bench_limiter.py [--seconds 2] [--rounds 3] [--redis-url URL]

By default the benchmark starts its own ``redis-server`` (the project's local stack, under
``var/bench-stack``), pinned to another core than the benchmark, so other users of a shared
Redis do not skew it; ``--redis-url`` measures against a Redis you name instead.

Every figure is the median of ``--rounds`` interleaved rounds (the machine may be shared; the
best round is printed too). Within a round the two sync cases alternate in 0.1 s slices, and the
sync ratio is also given as the median over those adjacent slice pairs, which a burst of load
from elsewhere skews least. Targets (issue 3): async >= 40,000 decisions/s with p99 < 1 ms at
half that load; sync >= 0.9x the no-op EVALSHA rate, >= 1.1x limits' fixed window, p99 < 300 us.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from limiter import AsyncRateLimiter, Quota, RateLimiter  # noqa: E402

LIMITS_VENV = ROOT / "var" / "bench-venv-limits"
# All decisions are allowed (a huge quota), so every call does the full consume path.
BIG = Quota(rate_per_sec=1e9, burst=10**12, daily_limit=10**15)
TENANTS = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(64)]


def pin_one_core() -> int | None:
    """Pin this process to one core (the last one allowed); return it (None if unsupported)."""
    try:
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def private_redis(cpu: int | None, placement: str) -> tuple[str, Any]:
    """Start a redis-server for this run, pinned away from ``cpu`` (``placement="other"``) or
    onto it (``"same"``); return its URL and stack."""
    from metering.localstack import LocalStack

    stack = LocalStack(ROOT / "var" / "bench-stack")
    url = stack.up(["redis"])["RATE_LIMIT_REDIS_URL"]
    state = stack.service("redis")
    others = set(os.sched_getaffinity(0) if cpu is None else range(os.cpu_count() or 1)) - {cpu}
    target = {cpu} if placement == "same" and cpu is not None else others
    if state is not None and target:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(state.pids["redis"], target)
    return url, stack


def redis_benchmark(url: str, cpu: int | None, args: list[str]) -> list[str] | None:
    """Run Redis's own C client, ``redis-benchmark`` (pinned like this process), against
    ``url``; its output lines, or None when it is not installed."""
    import shutil
    from urllib.parse import urlparse

    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    u = urlparse(url)
    cmd = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), *args]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    return [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip()]


def transport_floor(url: str, cpu: int | None) -> str:
    """One connection's round trip as Redis's own C client sees it (``redis-benchmark PING``):
    the floor under every sync figure, Python aside."""
    lines = redis_benchmark(url, cpu, ["-c", "1", "-n", "20000", "-t", "ping_mbulk"])
    if lines is None:
        return "redis-benchmark not installed: transport floor not measured"
    for i, line in enumerate(lines):
        if "throughput summary" in line and i + 3 < len(lines):
            rate = line.split(":")[1].split()[0]
            _avg, _min, p50, _p95, p99, _max = lines[i + 3].split()[:6]
            return (
                "transport floor (redis-benchmark PING, 1 connection, C client): "
                f"{float(rate):,.0f}/s, p50 {float(p50) * 1e3:.0f} us, "
                f"p99 {float(p99) * 1e3:.0f} us"
            )
    return "redis-benchmark gave no summary: transport floor not measured"


def script_ceiling(url: str, cpu: int | None) -> tuple[str, float | None]:
    """What Redis itself serves of ``acquire.lua`` (``redis-benchmark``, C client, 64 calls
    pipelined per connection, 4 connections): the ceiling under the async figures."""
    import datetime as dt

    from limiter.keys import tenant_keys
    from limiter.scripts import NUM_KEYS_NO_WINDOW, SCRIPTS

    acquire = next(sc for sc in SCRIPTS if "acquire" in sc.name)
    client = redis.Redis.from_url(url)
    sha = client.script_load(acquire.source)
    keys = [
        k.decode()
        for k in tenant_keys(
            f"bench-ceiling-{uuid.uuid4().hex[:8]}", dt.datetime.now(dt.UTC).date()
        )[:NUM_KEYS_NO_WINDOW]  # no window: the bucket and the day, as the limiter sends it
    ]
    args = ["1", "1000000000", str(10**12), str(10**15), "0", "0", "0", "3600"]
    call = ["evalsha", sha, str(NUM_KEYS_NO_WINDOW), *keys, *args]
    lines = redis_benchmark(url, cpu, ["-c", "4", "-P", "64", "-n", "200000", *call])
    client.delete(*keys)
    if lines is None:
        return "redis-benchmark not installed: script ceiling not measured", None
    for line in lines:
        if "throughput summary" in line:
            rate = float(line.split(":")[1].split()[0])
            text = (
                f"script ceiling (redis-benchmark EVALSHA acquire.lua, 4 x 64 pipelined, C "
                f"client): {rate:,.0f}/s"
            )
            return text, rate
    return "redis-benchmark gave no summary: script ceiling not measured", None


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))]


def batch_totals() -> tuple[float, float]:
    """The async limiter's pipelined writes so far, and the calls they carried."""
    count = REGISTRY.get_sample_value("rate_limiter_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("rate_limiter_batch_size_sum") or 0.0
    return count, total


def per_write(before: tuple[float, float]) -> float:
    """Calls per pipelined write of the async limiter since ``before`` (nan: none written)."""
    writes, calls = (b - a for a, b in zip(before, batch_totals(), strict=True))
    return calls / writes if writes else math.nan


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def steal_ticks() -> list[int]:
    """Per CPU, the time the hypervisor ran something else while this VM's CPU wanted to run
    (``steal`` in /proc/stat, in clock ticks); empty where /proc/stat is not there."""
    try:
        with open("/proc/stat") as fh:
            rows = [line.split() for line in fh if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return []
    return [int(row[8]) for row in rows if len(row) > 8]


def steal_share(before: list[int], seconds: float) -> float:
    """The largest share of ``seconds`` stolen from any one CPU since ``before``: a host that
    takes a CPU away for milliseconds at a time delays every call in flight meanwhile, so with
    more than ~1% stolen a p99 under 1 ms cannot be measured at all."""
    after = steal_ticks()
    if not before or len(after) != len(before) or seconds <= 0:
        return float("nan")
    return max(b - a for a, b in zip(before, after, strict=True)) / _TICK / seconds


class RedisStalls:
    """What Redis itself saw while a case ran: the commands that took it longer than
    ``threshold_us`` to execute (its SLOWLOG, which times each command inside the server).

    A command of this benchmark takes Redis ~1-10 us; one that took over 0.5 ms means the server
    was held up mid-command (on a VM: the host ran something else on its CPU), and every call
    arriving meanwhile waits for it, whatever the client. The server's settings are put back
    afterwards; a Redis that refuses CONFIG (a managed one) is simply not watched."""

    def __init__(self, url: str, threshold_us: int = 500) -> None:
        self.client = redis.Redis.from_url(url)
        self.threshold_us = threshold_us
        self._saved: dict[str, str] | None = None

    def begin(self) -> None:
        try:
            saved = self.client.config_get("slowlog-*")
            self.client.config_set("slowlog-log-slower-than", self.threshold_us)
            self.client.config_set("slowlog-max-len", 4096)
            self.client.slowlog_reset()
            self._saved = {k: saved[k] for k in ("slowlog-log-slower-than", "slowlog-max-len")}
        except redis.RedisError:
            self._saved = None

    def end(self) -> dict[str, float]:
        """``redis_stalls`` (count) and ``redis_stall_max`` (seconds); empty if not watched."""
        if self._saved is None:
            return {}
        try:
            entries = self.client.slowlog_get(4096)
            for name, value in self._saved.items():
                self.client.config_set(name, value)
        except redis.RedisError:
            return {}
        durations = [e["duration"] / 1e6 for e in entries]
        return {"redis_stalls": len(durations), "redis_stall_max": max(durations, default=0.0)}


async def watched(stalls: RedisStalls, case: Any) -> dict[str, float]:
    """Run the awaitable ``case`` (an open or closed loop) with ``stalls`` watching Redis."""
    stalls.begin()
    out = await case
    out.update(stalls.end())
    return out


# --- sync ------------------------------------------------------------------------------------
def run_sync_interleaved(
    cases: dict[str, Callable[[int], Any]], seconds: float, slice_s: float = 0.1
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Run the sync cases in alternating slices of ``slice_s`` until each had ``seconds``, so
    a burst of load from elsewhere hits them alike. Returns per-case figures and, per pair of
    adjacent slices, the rate of the second case over the first."""
    perf = time.perf_counter
    for call in cases.values():
        for i in range(300):
            call(i)
    lat: dict[str, list[float]] = {n: [] for n in cases}
    calls = dict.fromkeys(cases, 0)
    wall = dict.fromkeys(cases, 0.0)
    cpu = dict.fromkeys(cases, 0.0)
    pair_ratios: list[float] = []
    stolen0, began = steal_ticks(), perf()
    while min(wall.values()) < seconds:
        rates = []
        for name, call in cases.items():
            samples = lat[name]
            n = 0
            start, cpu0 = perf(), time.thread_time()
            end = start + slice_s
            while True:
                t0 = perf()
                call(n)
                t1 = perf()
                samples.append(t1 - t0)
                n += 1
                if t1 >= end:
                    break
            took = perf() - start
            wall[name] += took
            cpu[name] += time.thread_time() - cpu0
            calls[name] += n
            rates.append(n / took)
        pair_ratios.append(rates[-1] / rates[0])
    out = {
        name: {
            "rate": calls[name] / wall[name],
            "cpu_rate": calls[name] / cpu[name],
            "p50": pct(lat[name], 0.5),
            "p99": pct(lat[name], 0.99),
            "steal": steal_share(stolen0, perf() - began),
        }
        for name in cases
    }
    return out, pair_ratios


def sync_cases(url: str) -> dict[str, Callable[[int], Any]]:
    client = redis.Redis.from_url(url)
    sha = client.script_load("return 1")
    limiter = RateLimiter(redis.Redis.from_url(url))
    n = len(TENANTS)
    return {
        "sync no-op EVALSHA (redis-py)": lambda i: client.evalsha(sha, 0),
        "sync limiter acquire": lambda i: limiter.acquire(TENANTS[i % n], 1, BIG),
    }


# --- async -----------------------------------------------------------------------------------
async def closed_loop(
    call: Callable[[int], Any], seconds: float, concurrency: int
) -> dict[str, float]:
    """``concurrency`` callers, each calling again as soon as its answer comes back."""
    count = 0
    stop = False
    lat: list[float] = []
    perf = time.perf_counter

    async def caller(k: int) -> None:
        nonlocal count
        i = k
        while not stop:
            t0 = perf()
            await call(i)
            lat.append(perf() - t0)
            count += 1
            i += concurrency

    for i in range(200):  # warm up: connections, scripts loaded
        await call(i)
    tasks = [asyncio.create_task(caller(k)) for k in range(concurrency)]
    await asyncio.sleep(0.2)  # let the callers reach a steady state
    lat.clear()
    start, cpu0, count0, stolen0 = perf(), time.thread_time(), count, steal_ticks()
    writes0 = batch_totals()
    await asyncio.sleep(seconds)
    stop = True
    done = count - count0
    elapsed, cpu = perf() - start, time.thread_time() - cpu0
    calls_per_write = per_write(writes0)
    await asyncio.gather(*tasks)
    return {
        "rate": done / elapsed,
        "cpu_rate": done / cpu,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "steal": steal_share(stolen0, elapsed),
        "per_write": calls_per_write,
    }


async def open_loop(
    call: Callable[[int], Any], seconds: float, rate: float, *, paced: bool = False
) -> dict[str, float]:
    """Calls arriving at a fixed ``rate``, latency of each.

    Unpaced, the generator sleeps on a 1 ms timer and issues the calls that fell due meanwhile
    (in bursts: the timer oversleeps on a busy machine), and latency runs from a call's start.
    ``paced``: between arrivals the generator yields to the event loop (``sleep(0)``: the loop
    polls its sockets and runs the replies), so each call is issued at its own arrival time,
    and latency runs from the scheduled arrival, so a call issued late counts its delay too
    (no coordinated omission). The paced generator spins: its CPU-time rate is not a cost."""
    lat: list[float] = []
    perf = time.perf_counter
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        t0 = due if paced else perf()
        await call(i)
        lat.append(perf() - t0)

    interval, tick = 1.0 / rate, 0.0 if paced else 0.001
    if paced:
        for i in range(200):  # warm up, as the closed loops do
            await call(i)
    start = perf()
    cpu0, stolen0, writes0 = time.thread_time(), steal_ticks(), batch_totals()
    sent = 0
    while (now := perf()) - start < seconds:
        while (due := start + sent * interval) <= now:
            t = asyncio.create_task(one(sent, due))
            pending.add(t)
            t.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(tick)
    await asyncio.gather(*pending)
    elapsed, cpu = perf() - start, time.thread_time() - cpu0
    return {
        "rate": len(lat) / elapsed,
        "cpu_rate": len(lat) / cpu,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "steal": steal_share(stolen0, elapsed),
        "per_write": per_write(writes0),
    }


async def async_round(
    url: str, seconds: float, concurrency: int, target_half: float = 0, **limiter_options: int
) -> dict[str, dict[str, float]]:
    client = aredis.Redis.from_url(url, max_connections=concurrency)
    sha = await client.script_load("return 1")
    limiter = AsyncRateLimiter(aredis.Redis.from_url(url), **limiter_options)
    n = len(TENANTS)

    def noop(i: int) -> Any:
        return client.evalsha(sha, 0)

    def acquire(i: int) -> Any:
        return limiter.acquire(TENANTS[i % n], 1, BIG)

    out = {
        "async no-op EVALSHA (redis-py)": await closed_loop(noop, seconds, concurrency),
        "async limiter acquire": await closed_loop(acquire, seconds, concurrency),
    }
    half = out["async limiter acquire"]["rate"] / 2
    stalls = RedisStalls(url)
    out["async limiter at half load"] = await watched(stalls, open_loop(acquire, seconds, half))
    out["async limiter at half load (paced)"] = await watched(
        stalls, open_loop(acquire, seconds, half, paced=True)
    )
    if target_half:
        # "half that load" read as half the 40,000/s target: a fixed rate, the same in every
        # round whatever the maximum of the moment (on a fast spell half the measured maximum
        # is ~30,000/s, well above what the target asks).
        out[TARGET_HALF_CASE] = await watched(
            stalls, open_loop(acquire, seconds, target_half, paced=True)
        )
    # Half load again, with arrivals driven by completions instead of a 1 ms timer (which,
    # oversleeping on a busy machine, delivers bursts): the fewest callers whose closed-loop
    # rate reaches half the maximum, as a load generator with that many connections would.
    probes = {}
    callers = 1
    while callers <= concurrency:
        probes[callers] = (await closed_loop(acquire, min(0.3, seconds), callers))["rate"]
        if probes[callers] >= half:
            break
        callers *= 2
    callers = min(probes, key=lambda c: abs(probes[c] - half))
    closed = await watched(stalls, closed_loop(acquire, seconds, callers))
    closed["callers"] = callers
    out["async limiter at half load (closed)"] = closed
    # The latency floor of the half-load target: one caller, nothing queued, the same event
    # loop and Redis; plain redis-py beside the limiter.
    out["async no-op EVALSHA, 1 caller"] = await closed_loop(noop, seconds, 1)
    out["async limiter, 1 caller"] = await closed_loop(acquire, seconds, 1)
    await client.aclose()
    await limiter.redis.aclose()
    stalls.client.close()
    return out


TARGET_HALF_CASE = "async limiter at target/2 (paced)"


def run_loop(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# --- the limits library (own venv, subprocess) -----------------------------------------------
LIMITS_CHILD = r"""
import json, os, sys, time, uuid
os.sched_setaffinity(0, {int(sys.argv[3])}) if sys.argv[3] != "-" else None
from limits import parse, storage, strategies
url, seconds = sys.argv[1], float(sys.argv[2])
store = storage.storage_from_string(url)
item = parse("1000000000/second")
out = {}
for name, cls in [("fixed-window", strategies.FixedWindowRateLimiter),
                  ("moving-window", strategies.MovingWindowRateLimiter),
                  ("sliding-window-counter", strategies.SlidingWindowCounterRateLimiter)]:
    lim = cls(store)
    keys = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(64)]
    for i in range(500):
        lim.hit(item, keys[i % 64])
    lat = []
    perf = time.perf_counter
    end = perf() + seconds
    start = perf()
    cpu0 = time.thread_time()
    i = 0
    while True:
        t0 = perf(); lim.hit(item, keys[i % 64]); t1 = perf()
        lat.append(t1 - t0); i += 1
        if t1 >= end: break
    lat.sort()
    cpu = time.thread_time() - cpu0
    out["limits " + name] = {"rate": i / (perf() - start), "cpu_rate": i / cpu,
                              "p50": lat[len(lat) // 2], "p99": lat[int(0.99 * len(lat))]}
print(json.dumps(out))
"""


def ensure_limits_venv() -> Path:
    python = LIMITS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {LIMITS_VENV} with limits[redis] (redis-py < 8) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LIMITS_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "limits[redis]>=4", "hiredis"],
            check=True,
        )
    return python


def limits_round(url: str, seconds: float, cpu: int | None) -> dict[str, dict[str, float]]:
    python = ensure_limits_venv()
    proc = subprocess.run(
        [str(python), "-c", LIMITS_CHILD, url, str(seconds), "-" if cpu is None else str(cpu)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- report ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", help="measure against this Redis (default: start one)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=256, help="async callers")
    ap.add_argument("--skip-limits", action="store_true", help="leave out the limits library")
    ap.add_argument(
        "--redis-cpu",
        choices=("other", "same"),
        default="other",
        help="pin the private redis-server to the other CPUs (default) or to the benchmark's "
        "own core: on a VM whose idle CPUs halt, every cross-CPU round trip pays a wake-up",
    )
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the async cases (the API serves on uvloop); both sides alike",
    )
    ap.add_argument(
        "--target-half-rate",
        type=float,
        default=20000.0,
        help="also run the paced open loop at this fixed rate (default 20000: half the "
        "40,000/s target); 0 leaves it out",
    )
    ap.add_argument("--max-batch", type=int, help="AsyncRateLimiter(max_batch=...)")
    ap.add_argument("--max-inflight", type=int, help="AsyncRateLimiter(max_inflight=...)")
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after set-up, as `metering api` and `metering worker` do",
    )
    args = ap.parse_args()
    if args.target_half_rate < 0:
        ap.error("--target-half-rate must be >= 0")

    cpu = pin_one_core()
    if args.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    print(f"pinned to CPU {cpu}" if cpu is not None else "could not pin to one core")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    stack = None
    if args.redis_url is None:
        args.redis_url, stack = private_redis(cpu, args.redis_cpu)
        where = "this core" if args.redis_cpu == "same" else "the other CPUs"
        print(f"private redis-server pinned to {where}")
    try:
        report(args, cpu)
    finally:
        if stack is not None:
            stack.down()


def report(args: argparse.Namespace, cpu: int | None) -> None:
    print(
        f"Redis {args.redis_url}; {args.rounds} rounds x {args.seconds}s each; "
        f"async concurrency {args.concurrency}"
    )
    print(transport_floor(args.redis_url, cpu))
    limiter_options = {
        k: v for k, v in (("max_batch", args.max_batch), ("max_inflight", args.max_inflight)) if v
    }
    ceiling_text, ceiling = script_ceiling(args.redis_url, cpu)
    print(ceiling_text)
    results: dict[str, list[dict[str, float]]] = {}
    sync_pairs: list[float] = []
    cases = sync_cases(args.redis_url)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        sync_res, pairs = run_sync_interleaved(cases, args.seconds)
        sync_pairs += pairs
        for name, res in sync_res.items():
            results.setdefault(name, []).append(res)
        for name, res in run_loop(
            async_round(
                args.redis_url,
                args.seconds,
                args.concurrency,
                args.target_half_rate,
                **limiter_options,
            ),
            args.loop,
        ).items():
            results.setdefault(name, []).append(res)
        if not args.skip_limits:
            for name, res in limits_round(args.redis_url, args.seconds, cpu).items():
                results.setdefault(name, []).append(res)

    med: dict[str, dict[str, float]] = {}
    print()
    print(
        f"{'case':38s} {'median/s':>9s} {'best/s':>9s} {'per cpu-s':>10s} {'p50 us':>7s} "
        f"{'p99 us':>7s} {'steal %':>7s}"
    )
    for name, rounds in results.items():
        med[name] = {
            k: statistics.median(r[k] for r in rounds)
            for k in ("rate", "cpu_rate", "p50", "p99", "callers", "steal")
            if k in rounds[0]
        }
        best = max(r["rate"] for r in rounds)
        m = med[name]
        print(
            f"{name:38s} {m['rate']:9.0f} {best:9.0f} {m['cpu_rate']:10.0f} "
            f"{m['p50'] * 1e6:7.0f} {m['p99'] * 1e6:7.0f} {m.get('steal', math.nan) * 100:7.1f}"
        )

    watched_cases = {n: r for n, r in results.items() if "redis_stalls" in r[0]}
    if watched_cases:
        print()
        print(
            "Redis's own view of the latency cases, per round: the commands it took over 0.5 ms "
            "to execute (SLOWLOG; ~1-10 us is normal), against the case's p99"
        )
        for name, rounds in watched_cases.items():
            cells = [
                f"p99 {r['p99'] * 1e3:.2f} ms, {r['redis_stalls']:.0f} held up"
                + (f" (longest {r['redis_stall_max'] * 1e3:.2f} ms)" if r["redis_stalls"] else "")
                for r in rounds
            ]
            print(f"  {name}: " + "; ".join(cells))

    def ratio(a: str, b: str) -> float | None:
        return med[a]["rate"] / med[b]["rate"] if a in med and b in med else None

    def stolen(m: dict[str, float]) -> str:
        share = m.get("steal", math.nan)
        return "" if math.isnan(share) else f"; the host took {share:.1%} of a CPU meanwhile"

    sync_r = ratio("sync limiter acquire", "sync no-op EVALSHA (redis-py)")
    fixed_r = ratio("sync limiter acquire", "limits fixed-window")
    async_r = ratio("async limiter acquire", "async no-op EVALSHA (redis-py)")
    a = med["async limiter acquire"]
    s = med["sync limiter acquire"]
    h = med["async limiter at half load"]
    print(
        "(steal %: the largest share of the case's time the hypervisor took from any one CPU, "
        "median of rounds)"
    )
    print()
    print("targets (medians):")
    print(
        f"  async >= 40,000/s: {a['rate']:.0f}/s wall -> "
        f"{'MET' if a['rate'] >= 40000 else 'NOT MET'} ({async_r:.2f}x the async no-op "
        f"EVALSHA); per CPU-second of the pinned core: {a['cpu_rate']:.0f}/s -> "
        f"{'MET' if a['cpu_rate'] >= 40000 else 'NOT MET'}"
    )
    if ceiling:
        print(
            f"  (async limiter: {a['rate'] / ceiling:.2f}x of what Redis itself serves of the "
            f"script, {ceiling:,.0f}/s, measured before the rounds)"
        )
    print(
        f"  async p99 at half load < 1 ms: {h['p99'] * 1e3:.2f} ms (open loop, 1 ms ticks) -> "
        f"{'MET' if h['p99'] < 0.001 else 'NOT MET'}"
    )
    hp = med.get("async limiter at half load (paced)")
    if hp is not None:
        print(
            f"  async p99 at half load < 1 ms: {hp['p99'] * 1e3:.2f} ms (open loop, paced, "
            f"{hp['rate']:.0f}/s, from each call's scheduled arrival{stolen(hp)}) -> "
            f"{'MET' if hp['p99'] < 0.001 else 'NOT MET'}"
        )
    ht = med.get(TARGET_HALF_CASE)
    if ht is not None:
        print(
            f"  async p99 at half the 40,000/s target < 1 ms: {ht['p99'] * 1e3:.2f} ms (open "
            f"loop, paced, {ht['rate']:.0f}/s, from each call's scheduled arrival{stolen(ht)}) "
            f"-> {'MET' if ht['p99'] < 0.001 else 'NOT MET'}"
        )
    hc = med.get("async limiter at half load (closed)")
    if hc is not None:
        print(
            f"  async p99 at half load < 1 ms: {hc['p99'] * 1e3:.2f} ms (closed loop, "
            f"{hc['callers']:.0f} callers, {hc['rate']:.0f}/s{stolen(hc)}) -> "
            f"{'MET' if hc['p99'] < 0.001 else 'NOT MET'}"
        )
    one_noop, one_lim = med.get("async no-op EVALSHA, 1 caller"), med.get("async limiter, 1 caller")
    if one_noop is not None and one_lim is not None:
        print(
            f"  (floor: one caller alone, nothing queued: plain redis-py p99 "
            f"{one_noop['p99'] * 1e3:.2f} ms, the limiter p99 {one_lim['p99'] * 1e3:.2f} ms)"
        )
    pair_r = statistics.median(sync_pairs)
    print(
        f"  sync >= 0.9x no-op EVALSHA: {sync_r:.2f}x (medians of rounds); median of "
        f"{len(sync_pairs)} interleaved 0.1 s slice pairs: {pair_r:.2f}x -> "
        f"{'MET' if pair_r >= 0.9 else 'NOT MET'}"
    )
    if fixed_r is not None:
        print(
            f"  sync >= 1.1x limits fixed window: {fixed_r:.2f}x -> "
            f"{'MET' if fixed_r >= 1.1 else 'NOT MET'}"
        )
        for other in ("limits moving-window", "limits sliding-window-counter"):
            print(f"  (sync vs {other}: {ratio('sync limiter acquire', other):.2f}x)")
    print(
        f"  sync p99 < 300 us: {s['p99'] * 1e6:.0f} us{stolen(s)} -> "
        f"{'MET' if s['p99'] < 300e-6 else 'NOT MET'}"
    )
    print(f"load average at end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"event loop: {args.loop}; gc.freeze after set-up: {args.gc_freeze}")
    print("\ncommand: python benchmarks/bench_limiter.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
