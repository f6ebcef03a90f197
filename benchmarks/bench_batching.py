"""The async limiter's transport: two variants in adjacent slices, alternating.

Run: ``python benchmarks/bench_batching.py [--callers 8,16,32,64] [--pairs 3] [--seconds 2]``
     ``python benchmarks/bench_batching.py --baseline-ref REV [--paced 10000,20000]``

The variants: ``answer_chunk`` on and off (the default), or, with ``--baseline-ref``, the
transport as it is now against ``limiter/batching.py`` at a git revision (loaded from git into
this process, the rest of the limiter unchanged), e.g. the writer and reader tasks that the
event-loop callbacks replaced. ``--paced`` adds open loops: calls arriving at those fixed rates,
each issued at its own time and measured from it (``bench_limiter.open_loop``).

N callers each await ``AsyncRateLimiter.acquire`` and call again at once (a closed loop: a
service with N requests in flight). With tens of callers there is often one pipelined write in
flight, and all of its callers come back together. Answered all at once (``answer_chunk=0``,
the transport before), every caller runs on before any next call is written, so Redis waits for
the whole wave and the client then waits for Redis: the two take turns. Answered 8 at a time
(``answer_chunk=8``, the default), the first callers' next calls are written while the later
ones are still being answered.

For each caller count (and rate), the two variants run in adjacent slices, alternating which
goes first (``--pairs``); the process is pinned to one core and its private ``redis-server`` to
the others, as in ``bench_limiter.py``. Prints each slice's decisions per second, CPU per
decision, p50/p99 latency and calls per write, and the median ratio (first variant / second)
over the pairs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis.asyncio as aredis
import uvloop
from baseline import source_at
from bench_limiter import closed_loop, open_loop, pin_one_core, private_redis

from limiter import AsyncRateLimiter, Quota

BIG = Quota(rate_per_sec=1e9, burst=10**9, daily_limit=10**12)
TENANTS = [f"bench-batching-{i}" for i in range(64)]
ROOT = Path(__file__).resolve().parents[1]

#: A variant: makes the limiter under test on a client.
Variant = Callable[[aredis.Redis], AsyncRateLimiter]


def batcher_at(ref: str) -> type:
    """``ScriptBatcher`` as ``limiter/batching.py`` defines it at git revision ``ref``."""
    source = source_at(ref, "limiter/batching.py")
    path = Path(tempfile.mkdtemp(prefix="bench-batching-")) / f"batching_at_{ref}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type = module.ScriptBatcher
    return cls


def with_batcher(cls: type) -> Variant:
    def make(client: aredis.Redis) -> AsyncRateLimiter:
        limiter = AsyncRateLimiter(client)
        limiter._batcher = cls(client)
        return limiter

    return make


async def measure(
    url: str, variant: Variant, load: int, seconds: float, paced: bool
) -> dict[str, float]:
    """``load`` closed-loop callers, or (``paced``) an open loop at ``load`` calls/s."""
    client = aredis.Redis.from_url(url)
    limiter = variant(client)

    def acquire(i: int) -> Any:
        return limiter.acquire(TENANTS[i % len(TENANTS)], 1, BIG)

    if paced:
        res = await open_loop(acquire, seconds, load, paced=True)
        cpu_us = math.nan  # the paced generator spins: its CPU time is not a cost
    else:
        res = await closed_loop(acquire, seconds, load)
        cpu_us = 1e6 / res["cpu_rate"]
    await client.aclose()
    return {
        "rate": res["rate"],
        "cpu_us": cpu_us,
        "p50_us": res["p50"] * 1e6,
        "p99_us": res["p99"] * 1e6,
        "per_write": res["per_write"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--callers", default="8,16,32,64", help="comma-separated caller counts")
    ap.add_argument("--paced", default="", help="comma-separated open-loop rates (calls/s)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--chunk", type=int, default=8, help="the answer_chunk compared with 0")
    ap.add_argument(
        "--baseline-ref",
        help="compare the transport now with limiter/batching.py at this git revision",
    )
    ap.add_argument("--redis-url", help="measure against this Redis (default: start one)")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.callers.split(",") if c]
        rates = [int(r) for r in args.paced.split(",") if r]
    except ValueError:
        ap.error("--callers and --paced take comma-separated integers, e.g. 8,16,32")
    if any(c < 1 for c in counts + rates) or args.pairs < 1 or args.seconds <= 0 or args.chunk < 1:
        ap.error("--callers, --paced, --pairs and --chunk must be >= 1, --seconds > 0")
    if not counts and not rates:
        ap.error("nothing to measure: give --callers or --paced")

    variants: dict[str, Variant]
    if args.baseline_ref:
        try:
            old = batcher_at(args.baseline_ref)
        except subprocess.CalledProcessError as exc:
            ap.error(f"--baseline-ref {args.baseline_ref}: {exc.stderr.strip()}")
        variants = {"now": AsyncRateLimiter, args.baseline_ref: with_batcher(old)}
    else:
        variants = {
            f"answer_chunk {args.chunk}": lambda c: AsyncRateLimiter(c, answer_chunk=args.chunk),
            "answer_chunk 0": lambda c: AsyncRateLimiter(c, answer_chunk=0),
        }
    first, second = variants

    cpu = pin_one_core()
    print(f"pinned to CPU {cpu}" if cpu is not None else "could not pin to one core")
    stack: Any = None
    url = args.redis_url
    if url is None:
        url, stack = private_redis(cpu, "other")
        print("private redis-server pinned to the other CPUs")
    gc.collect()
    gc.freeze()
    loads = [(c, False) for c in counts] + [(r, True) for r in rates]
    try:
        for load, paced in loads:
            what = f"{load}/s paced" if paced else f"{load} callers"
            ratios: dict[str, list[float]] = {"rate": [], "cpu_us": [], "p50_us": [], "p99_us": []}
            for pair in range(args.pairs):
                order = (first, second) if pair % 2 == 0 else (second, first)
                res = {}
                for name in order:
                    res[name] = r = uvloop.run(
                        measure(url, variants[name], load, args.seconds, paced)
                    )
                    print(
                        f"{what:>14s}, {name:>14s}: {r['rate']:8,.0f}/s "
                        f"{r['cpu_us']:6.1f} us CPU/decision  p50 {r['p50_us']:6.0f} us  "
                        f"p99 {r['p99_us']:6.0f} us  {r['per_write']:5.1f} calls/write",
                        flush=True,
                    )
                for k in ratios:
                    ratios[k].append(res[first][k] / res[second][k])
            med = {k: statistics.median(v) for k, v in ratios.items()}
            print(
                f"{what}: {first} / {second}, median of {args.pairs} pairs: "
                f"rate {med['rate']:.2f}x, CPU per decision {med['cpu_us']:.2f}x, "
                f"p50 {med['p50_us']:.2f}x, p99 {med['p99_us']:.2f}x\n",
                flush=True,
            )
    finally:
        if stack is not None:
            stack.down()
    print("command: python benchmarks/bench_batching.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
