"""What one limiter decision costs Redis itself: instructions per acquire.lua call (issue 3).

Run: ``python benchmarks/bench_script_cost.py [--calls 5000] [--baseline-ref HEAD~1]``
(needs valgrind: ``apt-get install valgrind``).

Redis runs every decision of every service that embeds the limiter, on one thread per shard, so
the script's own cost bounds a shard's decisions per second; on the 2-CPU development VM the
async limiter's rate is bounded by it too (Redis 85-94% busy in ``bench_limiter.py``). Timing the
script on that VM moves by +-30% from minute to minute, so this benchmark counts instead: a
private ``redis-server`` runs under callgrind, and the instructions it executes for ``--calls``
calls of each case (sent in pipelines of 50 through redis-py, with the limiter's own argument
encoding) are divided by the calls. The count is the same from run to run within ~0.1%.

Cases, each on a fresh tenant:

- **no-op EVALSHA**: ``return 1`` with no keys: what any script call costs (parse, lookup, reply);
- **allowed**: the common path, a quota without a rolling window, every call allowed;
- **rejected**: the daily limit reached, every call rejected;
- **allowed, rolling window**: a quota with a window of 10**9 per hour;

for the working tree's ``limiter/acquire.lua`` and, with ``--baseline-ref``, the same file at a
git revision (loaded under its own SHA). Prints instructions per call, the ratio to the no-op and
the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from baseline import source_at

from limiter import Quota
from limiter.scripts import ACQUIRE, CallEncoder
from metering.localstack.stack import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = 50


class CallgrindRedis:
    """A private redis-server under callgrind; :meth:`count` counts what it runs for a call."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/callgrind.out",
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=folder,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=120)
        wait_until(self.client.ping, 60, "redis-server under valgrind")
        self.dumps = 0

    def _control(self, flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(self.proc.pid)], check=True, capture_output=True
        )

    def count(self, run: Callable[[], None]) -> int:
        """Instructions the server executes while ``run()`` does its calls."""
        self._control("-z")
        run()
        self._control("-d")
        self.dumps += 1
        deadline = time.monotonic() + 30
        path = self.folder / f"callgrind.out.{self.dumps}"
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no {path.name}")
            time.sleep(0.05)
        for line in path.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {path}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def send(client: redis.Redis, calls: list[tuple[object, ...]]) -> None:
    for start in range(0, len(calls), PIPELINE):
        pipe = client.pipeline(transaction=False)
        for args in calls[start : start + PIPELINE]:
            pipe.execute_command(*args)
        pipe.execute()


def script_source(ref: str | None) -> str:
    if ref is None:
        return ACQUIRE.source
    return source_at(ref, "limiter/acquire.lua")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--baseline-ref", help="also count acquire.lua at this git revision")
    opts = parser.parse_args()
    if opts.calls < 100:
        parser.error("--calls must be at least 100")
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install valgrind redis-server)")

    folder = Path(tempfile.mkdtemp(prefix="bench-script-cost-"))
    server = CallgrindRedis(folder)
    try:
        c = server.client
        noop = c.script_load("return 1")
        encoder = CallEncoder()
        # The server's own day, as the limiter learns it (the script refuses another day).
        now_s = int(c.time()[0])
        day = now_s // 86400
        plain = Quota(rate_per_sec=1e9, burst=10**9, daily_limit=10**12)
        windowed = Quota(
            rate_per_sec=1e9,
            burst=10**9,
            daily_limit=10**12,
            window_limit=10**9,
            window_seconds=3600,
        )
        exhausted = Quota(rate_per_sec=1e9, burst=10**9, daily_limit=1)
        versions = {"now": c.script_load(script_source(None))}
        if opts.baseline_ref:
            versions[opts.baseline_ref] = c.script_load(script_source(opts.baseline_ref))

        def calls_for(sha: str, tenant: str, quota: Quota, n: int) -> list[tuple[object, ...]]:
            args = list(encoder.acquire_args(tenant, day, 1, quota, b"0"))
            args[1] = sha
            return [tuple(args)] * n

        n = opts.calls
        results: dict[str, dict[str, float]] = {}
        print(f"redis-server under callgrind on port {server.port}; {n} calls per case")
        noop_calls = [("EVALSHA", noop, 0)] * n
        send(c, noop_calls[:200])
        base = server.count(lambda: send(c, noop_calls)) / n
        print(f"{'no-op EVALSHA (return 1)':<34}{base:>12,.0f} instructions/call")
        for v, (name, sha) in enumerate(versions.items()):
            results[name] = {}
            for k, (case, quota) in enumerate(
                (
                    ("allowed", plain),
                    ("rejected (daily limit)", exhausted),
                    ("allowed, rolling window", windowed),
                )
            ):
                calls = calls_for(sha, f"cost-{os.getpid()}-{v}-{k}", quota, n)
                send(c, calls[:200])  # warm: keys exist, the daily limit is reached
                per_call = server.count(lambda calls=calls: send(c, calls)) / n
                results[name][case] = per_call
                print(
                    f"{case + ' [' + name + ']':<34}{per_call:>12,.0f} instructions/call"
                    f"  ({per_call / base:.1f}x the no-op)"
                )
        if opts.baseline_ref:
            print()
            for case, now in results["now"].items():
                was = results[opts.baseline_ref][case]
                print(f"{case:<34}now / {opts.baseline_ref}: {now / was:.3f} ({now - was:+,.0f})")
        print(
            "\ncommand: python benchmarks/bench_script_cost.py --calls "
            f"{n}" + (f" --baseline-ref {opts.baseline_ref}" if opts.baseline_ref else "")
        )
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
