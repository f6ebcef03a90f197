"""The async limiter's transport at tens of callers: ``answer_chunk`` on and off, alternating.

Run: ``python benchmarks/bench_batching.py [--callers 8,16,32,64] [--pairs 3] [--seconds 2]``

N callers each await ``AsyncRateLimiter.acquire`` and call again at once (a closed loop: a
service with N requests in flight). With tens of callers there is often one pipelined write in
flight, and all of its callers come back together. Answered all at once (``answer_chunk=0``,
the transport before), every caller runs on before any next call is written, so Redis waits for
the whole wave and the client then waits for Redis: the two take turns. Answered 8 at a time
(``answer_chunk=8``, the default), the first callers' next calls are written while the later
ones are still being answered.

For each caller count, the two settings run in adjacent slices, alternating which goes first
(``--pairs``); the process is pinned to one core and its private ``redis-server`` to the others,
as in ``bench_limiter.py``. Prints each slice's decisions per second, CPU per decision, p50/p99
latency and calls per write, and the median ratio (chunked / all at once) over the pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio as aredis
import uvloop
from bench_limiter import pin_one_core, private_redis
from prometheus_client import REGISTRY

from limiter import AsyncRateLimiter, Quota

BIG = Quota(rate_per_sec=1e9, burst=10**9, daily_limit=10**12)
TENANTS = [f"bench-batching-{i}" for i in range(64)]


def batch_totals() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("rate_limiter_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("rate_limiter_batch_size_sum") or 0.0
    return count, total


async def closed_loop(url: str, callers: int, chunk: int, seconds: float) -> dict[str, float]:
    client = aredis.Redis.from_url(url)
    limiter = AsyncRateLimiter(client, answer_chunk=chunk)
    for i in range(300):  # connection made, scripts loaded, keys exist
        await limiter.acquire(TENANTS[i % len(TENANTS)], 1, BIG)
    lat: list[float] = []
    stop = False
    perf = time.perf_counter

    async def caller(k: int) -> None:
        i = k
        while not stop:
            t0 = perf()
            await limiter.acquire(TENANTS[i % len(TENANTS)], 1, BIG)
            lat.append(perf() - t0)
            i += callers

    tasks = [asyncio.create_task(caller(k)) for k in range(callers)]
    await asyncio.sleep(0.2)  # steady state
    lat.clear()
    writes0, calls0 = batch_totals()
    start, cpu0 = perf(), time.thread_time()
    await asyncio.sleep(seconds)
    n = len(lat)
    elapsed, cpu = perf() - start, time.thread_time() - cpu0
    writes1, calls1 = batch_totals()
    stop = True
    await asyncio.gather(*tasks)
    await client.aclose()
    done = sorted(lat[:n])
    return {
        "rate": n / elapsed,
        "cpu_us": cpu / n * 1e6,
        "p50_us": done[n // 2] * 1e6,
        "p99_us": done[int(n * 0.99)] * 1e6,
        "per_write": (calls1 - calls0) / max(1.0, writes1 - writes0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--callers", default="8,16,32,64", help="comma-separated caller counts")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--chunk", type=int, default=8, help="the answer_chunk compared with 0")
    ap.add_argument("--redis-url", help="measure against this Redis (default: start one)")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.callers.split(",")]
    except ValueError:
        ap.error("--callers takes comma-separated integers, e.g. 8,16,32")
    if any(c < 1 for c in counts) or args.pairs < 1 or args.seconds <= 0 or args.chunk < 1:
        ap.error("--callers, --pairs and --chunk must be >= 1, --seconds > 0")

    cpu = pin_one_core()
    print(f"pinned to CPU {cpu}" if cpu is not None else "could not pin to one core")
    stack: Any = None
    url = args.redis_url
    if url is None:
        url, stack = private_redis(cpu, "other")
        print("private redis-server pinned to the other CPUs")
    gc.collect()
    gc.freeze()
    try:
        for callers in counts:
            ratios: dict[str, list[float]] = {"rate": [], "cpu_us": [], "p50_us": [], "p99_us": []}
            for pair in range(args.pairs):
                order = (args.chunk, 0) if pair % 2 == 0 else (0, args.chunk)
                res = {}
                for chunk in order:
                    res[chunk] = uvloop.run(closed_loop(url, callers, chunk, args.seconds))
                    r = res[chunk]
                    print(
                        f"{callers:3d} callers, answer_chunk {chunk:2d}: {r['rate']:8,.0f}/s "
                        f"{r['cpu_us']:6.1f} us CPU/decision  p50 {r['p50_us']:6.0f} us  "
                        f"p99 {r['p99_us']:6.0f} us  {r['per_write']:5.1f} calls/write",
                        flush=True,
                    )
                for k in ratios:
                    ratios[k].append(res[args.chunk][k] / res[0][k])
            med = {k: statistics.median(v) for k, v in ratios.items()}
            print(
                f"{callers:3d} callers: answer_chunk {args.chunk} / 0, median of {args.pairs} "
                f"pairs: rate {med['rate']:.2f}x, CPU per decision {med['cpu_us']:.2f}x, "
                f"p50 {med['p50_us']:.2f}x, p99 {med['p99_us']:.2f}x\n",
                flush=True,
            )
    finally:
        if stack is not None:
            stack.down()
    print(
        f"command: python benchmarks/bench_batching.py --callers {args.callers} "
        f"--pairs {args.pairs} --seconds {args.seconds} --chunk {args.chunk}"
    )


if __name__ == "__main__":
    main()
