"""What the limiter adds to a request in Python, counted in instructions rather than timed.

Run: ``python benchmarks/bench_request_cost.py [--requests 10000] [--baseline-ref HEAD~1]``
(needs valgrind: ``apt-get install valgrind``).

Timed A/B runs of the request path (``bench_api_stack.py``) spread by 30% and more on a shared
VM, far more than a change to the path costs. This one counts instead: a child process drives
``RateLimitMiddleware`` + ``AsyncRateLimiter`` (quota from a provider, as the API's, and the
decision event encoded for an emitter) around a one-route FastAPI app, in one event loop, with the
script's reply canned instead of a Redis round trip (the I/O is ``bench_api.py``'s business),
under callgrind; the instructions of ``2,000 + --requests`` requests less those of 2,000 (start-up
and warm-up cancel out) are divided by ``--requests``. The same for the bare app alone gives
the baseline (what the bare app of ``bench_api.py`` costs in Python). Children run with
``PYTHONHASHSEED=0``, so the count is the same from run to run within ~0.1%.

With ``--baseline-ref``, the same child runs in a git worktree of that revision (its packages),
and the ratio of the two counts is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_api_stack import ping_scope  # noqa: E402  (the scope bench_api_stack drives)

WARM = 2000


def child(variant: str, n: int) -> None:
    """Drive ``n`` requests (``variant``: ``bare`` or ``limited``); the cwd's packages."""
    sys.path.insert(0, os.getcwd())
    from limiter import AsyncRateLimiter, Quota
    from limiter.middleware import RateLimitMiddleware

    quota = Quota(rate_per_sec=1e9, burst=10**12, daily_limit=10**15)
    day = int(time.time() // 86400)
    reply = [1, 0, 10**15 * 1000, 0, 1, 0, day, int(time.time())]

    class Quotas:  # the QuotaCache's interface, answered from memory
        def get(self, tenant: str) -> Quota:
            return quota

        async def aget(self, tenant: str) -> Quota:
            return quota

        def daily_seed(self, tenant: str, day: Any) -> int:
            return 0

        async def adaily_seed(self, tenant: str, day: Any) -> int:
            return 0

    class Batcher:  # Redis's reply, at once
        packed = True

        async def submit(self, call: Any) -> list[int]:
            return reply

    class Emitter:
        sent = 0

        def emit(self, event: Any) -> None:
            raise AssertionError("the middleware hands the Emitter encoded bytes")

        def emit_encoded(self, key: bytes, value: bytes) -> None:
            Emitter.sent += 1

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/v1/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    async def main() -> None:
        target: Any = app
        if variant == "limited":
            limiter = AsyncRateLimiter(object(), Quotas())
            limiter._batcher = Batcher()  # type: ignore[assignment]
            target = RateLimitMiddleware(app, limiter, emitter=Emitter(), routes=["/v1/ping"])

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        for i in range(n):
            scope = ping_scope([(b"host", b"bench")], {"tenant_id": f"t{i % 64}"})
            await target(scope, receive, send)
        if variant == "limited":
            assert Emitter.sent == n, Emitter.sent

    asyncio.run(main())


def count(variant: str, n: int, cwd: Path) -> int:
    """Instructions callgrind counts for a child driving ``n`` requests from ``cwd``."""
    with tempfile.TemporaryDirectory(prefix="bench-request-cost-") as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                variant,
                str(n),
            ],
            cwd=cwd,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"callgrind printed no count:\n{out[-2000:]}")
    return int(found.group(1))


def per_request(variant: str, requests: int, cwd: Path) -> float:
    return (count(variant, WARM + requests, cwd) - count(variant, WARM, cwd)) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--baseline-ref", help="also count the code at this git revision")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.child[0], int(opts.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    if opts.requests < 1000:
        raise SystemExit("--requests: at least 1000, for a count that start-up does not blur")
    bare = per_request("bare", opts.requests, ROOT)
    limited = per_request("limited", opts.requests, ROOT)
    print(f"bare FastAPI app:                   {bare:>10,.0f} instructions per request")
    print(f"with RateLimitMiddleware + limiter: {limited:>10,.0f} instructions per request")
    print(
        f"the limiter adds {limited - bare:,.0f}: the bare app's count is"
        f" {bare / limited:.2f}x the limited one's (no I/O on either side)"
    )
    if opts.baseline_ref:
        with tempfile.TemporaryDirectory(prefix="bench-request-cost-ref-") as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "worktree",
                    "add",
                    "-q",
                    "--detach",
                    str(tree),
                    opts.baseline_ref,
                ],
                check=True,
            )
            try:
                was = per_request("limited", opts.requests, tree)
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=True,
                )
        print(
            f"at {opts.baseline_ref}: {was:,.0f} instructions per request; now / then:"
            f" {limited / was:.4f} ({limited - was:+,.0f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
