"""The API's request-path cost, with the variants interleaved inside one served process.

``bench_api.py`` serves each variant (``bare``, ``auth``, ``limit``, ``full``) from its own
uvicorn process and compares whole runs or adjacent 2 s slices. On this kind of VM the speed
drifts by tens of percent within a minute, so those ratios spread widely (pairs 0.48-0.81 for
the same code). Here one uvicorn process (pinned to CPU 0, ``metering api``'s configuration)
holds every variant's app, built by ``bench_api.build_app``, behind a one-line dispatcher; a
thread switches the variant every ``--slice`` seconds while ``wrk`` (CPU 1) keeps the same
``--connections`` busy throughout. Each variant is charged the requests answered and the
process's CPU time (all threads) while it was the live one, so every variant sees the same
machine, connections and heap, slice after slice.

Reported per variant: requests/s while live, CPU per request, and both as a ratio to ``bare``
(the issue-6 target is full >= 0.7x bare). The dispatcher's frame is paid by every variant
alike. The apps that are not live stay up: their threads (the emitter's sender polling every
20 ms, the quota cache's refresher) run in every slice, charged to whichever variant is live.

``instant`` and ``turn`` (from ``bench_api_stack.py``) are JWT + ``RateLimitMiddleware`` with a
limiter that answers without Redis, at once or after one event-loop turn: with ``auth`` and
``limit`` they split the limiter path into the middleware's own work, the request's suspension and
the Redis round trip.

``--emit-off`` adds ``full-no-emit``: the ``full`` app with the middleware's emit skipped (same
limiter, same emitter threads idling), so ``full`` minus ``full-no-emit`` is what emitting the
decision event costs a served request. ``full-null-emit`` (a variant to name in ``--variants``)
hands the event over as ``full`` does, to a queue nobody reads: ``full-null-emit`` minus
``full-no-emit`` is the event's cost on the request's own thread, and ``full`` minus
``full-null-emit`` the emitter's threads' share (the sender, librdkafka).

p99 is not split by variant here (wrk's histogram spans the run); ``bench_api.py`` measures it.

Usage: ``python benchmarks/bench_api_interleaved.py [--duration 40] [--slice 0.5]
[--variants bare,auth,limit,full] [--emit-off] [--rounds 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_api import (  # type: ignore[import-not-found]  # noqa: E402
    AUDIENCE,
    KINDS,
    SECRET,
    SERVER_CPU,
    build_app,
    check_answers,
    free_port,
    pinned,
    wait_or_kill,
    wait_serving,
    wrk,
    wrk_argv,
)

from metering.commands.argtypes import positive_int  # noqa: E402

NO_EMIT = "full-no-emit"
NULL_EMIT = "full-null-emit"
FAKE = ("instant", "turn")  # bench_api_stack's limiters that answer without Redis


def _null_emit(app: Any) -> Any:
    """``app`` (a ``full`` app) whose middleware encodes each decision event as ``full`` does
    but hands the bytes to a bounded deque nobody reads instead of the Emitter: the event's
    cost on the request's own thread, without the emitter's threads (which send it) at work."""
    import collections

    node = _middleware(app)
    sink: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=1024)
    node._emit_encoded = lambda key, value: sink.append((key, value))
    return app


def _middleware(app: Any) -> Any:
    """The ``RateLimitMiddleware`` instance in ``app``. Starlette builds the middleware stack on
    the first request; it is built here so the instance can be found."""
    from limiter.middleware import RateLimitMiddleware

    app.middleware_stack = app.build_middleware_stack()
    node = app.middleware_stack
    while node is not None and not isinstance(node, RateLimitMiddleware):
        node = getattr(node, "app", None)
    if node is None:
        raise SystemExit("no RateLimitMiddleware in the full app")
    return node


def _without_emit(app: Any) -> Any:
    """``app`` (a ``full`` app) with its RateLimitMiddleware's emit skipped: the middleware
    returns from ``_emit`` at once when it has no emitter."""
    _middleware(app).emitter = None
    return app


#: the variants made from a ``full`` app, and how; ``full-null-emit`` is named only in --variants
FULL_VARIANTS = {NO_EMIT: _without_emit, NULL_EMIT: _null_emit}
DIAGNOSTIC = {NULL_EMIT}


class Interleaver:
    """ASGI dispatcher to the live variant's app; counts requests and CPU per variant."""

    def __init__(self, apps: dict[str, Any], slice_s: float, out: Path) -> None:
        self.apps = apps
        self.order = list(apps)
        self.live = self.order[0]
        self.app = apps[self.live]
        self.slice_s = slice_s
        self.out = out
        self.done = 0
        self.acc = {name: {"seconds": 0.0, "cpu": 0.0, "requests": 0} for name in apps}
        self.measuring = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.apps[self.order[0]](scope, receive, send)  # lifespan: the first app
            return
        await self.app(scope, receive, send)
        self.done += 1

    def run(self) -> None:
        """Switch variants every slice, in a rotating order so none always follows another."""
        rotation = 0
        while True:
            k = rotation % len(self.order)
            names = self.order[k:] + self.order[:k]
            rotation += 1
            for name in names:
                self.live, self.app = name, self.apps[name]
                t0, c0, n0 = time.perf_counter(), time.process_time(), self.done
                time.sleep(self.slice_s)
                t1, c1, n1 = time.perf_counter(), time.process_time(), self.done
                if self.measuring:
                    a = self.acc[name]
                    a["seconds"] += t1 - t0
                    a["cpu"] += c1 - c0
                    a["requests"] += n1 - n0
            tmp = self.out.with_suffix(".tmp")  # replaced whole: the driver never reads half
            tmp.write_text(json.dumps(self.acc))
            tmp.replace(self.out)


def serve(variants: list[str], port: int, data_dir: Path, tenant: str, slice_s: float) -> None:
    import uvicorn
    from bench_api_stack import fake_limited_app  # type: ignore[import-not-found]

    from metering.commands import settle_heap
    from metering.commands.api import server_config

    apps: dict[str, Any] = {}
    for name in variants:
        if name in FAKE:
            apps[name] = fake_limited_app(name == "turn", tenant)
            continue
        derive = FULL_VARIANTS.get(name)
        app = build_app("full" if derive else name, data_dir / name, tenant)
        apps[name] = derive(app) if derive else app
    box = Interleaver(apps, slice_s, data_dir / "acc.json")

    async def control(scope: Any, receive: Any, send: Any) -> None:
        # The driver opens the measured window (/__measure) once wrk is running and closes it
        # (/__stop) before wrk ends, so every counted slice was under load.
        if scope["type"] == "http" and scope["path"] in ("/__measure", "/__stop"):
            if scope["path"] == "/__measure":
                box.acc = {name: {"seconds": 0.0, "cpu": 0.0, "requests": 0} for name in apps}
            box.measuring = scope["path"] == "/__measure"  # a slice ending after this is dropped
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await box(scope, receive, send)

    threading.Thread(target=box.run, name="interleaver", daemon=True).start()
    config = server_config(control, "127.0.0.1", port, log_level="warning", access_log=False)
    settle_heap()
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()


def one_round(args: argparse.Namespace, variants: list[str]) -> dict[str, dict[str, float]]:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    token = jwt.encode(
        {"sub": tenant, "aud": AUDIENCE, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256"
    )
    with tempfile.TemporaryDirectory(prefix="bench-api-il-") as tmp:
        port = free_port()
        argv = [sys.executable, __file__, "--serve", ",".join(variants), "--port", str(port)]
        argv += ["--data-dir", tmp, "--tenant", tenant, "--slice", str(args.slice)]
        proc = subprocess.Popen(pinned(SERVER_CPU, argv), stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_serving(proc, url, "the server", timeout=90)
            warm = max(2, math.ceil(args.slice * len(variants) * 2))
            wrk(url, token, args.connections, warm, proc.pid)  # every variant warm
            load = subprocess.Popen(
                wrk_argv(url, token, args.connections, args.duration + 2),
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)
            httpx.get(f"{url}/__measure", timeout=5)
            time.sleep(args.duration)
            httpx.get(f"{url}/__stop", timeout=5)
            out_text, _ = load.communicate(timeout=60)
            if load.returncode != 0:
                raise SystemExit(f"wrk failed:\n{out_text}")
            check_answers(url, out_text)
            time.sleep(args.slice * (len(variants) + 1))  # the last rotation's totals written
            acc = json.loads((Path(tmp) / "acc.json").read_text())
        finally:
            proc.send_signal(signal.SIGINT)
            wait_or_kill(proc)
            from metering.topics import drop_topics

            drop_topics(args.kafka, tenant)
    out: dict[str, dict[str, float]] = {}
    for name in variants:
        a = acc[name]
        out[name] = {
            "rps": a["requests"] / a["seconds"] if a["seconds"] else 0.0,
            "cpu_us": a["cpu"] / a["requests"] * 1e6 if a["requests"] else float("nan"),
            "requests": a["requests"],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--duration", type=positive_int, default=40, help="whole seconds of wrk per round"
    )
    ap.add_argument("--slice", type=float, default=0.5, help="seconds each variant is live")
    ap.add_argument("--variants", default="bare,auth,limit,full")
    ap.add_argument("--emit-off", action="store_true", help=f"also run '{NO_EMIT}'")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each a fresh server")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--kafka", default="127.0.0.1:9092", help=argparse.SUPPRESS)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tenant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve.split(","), args.port, args.data_dir, args.tenant, args.slice)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(KINDS) - set(FAKE) - DIAGNOSTIC
    if unknown or "bare" not in variants:
        ap.error(
            f"--variants: known {[*KINDS, *FAKE, *sorted(DIAGNOSTIC)]}, "
            "and 'bare' is needed as the baseline"
        )
    if args.emit_off:
        variants.append(NO_EMIT)
    if args.slice <= 0 or args.duration <= 0 or args.rounds < 1:
        ap.error("--slice, --duration and --rounds must be positive")

    rounds = []
    for r in range(args.rounds):
        got = one_round(args, variants)
        rounds.append(got)
        base = got["bare"]
        for name in variants:
            g = got[name]
            print(
                f"round {r + 1} {name:13s} {g['rps']:7.0f} req/s ({g['rps'] / base['rps']:.2f}x) "
                f"{g['cpu_us']:6.1f} us CPU/request ({base['cpu_us'] / g['cpu_us']:.2f}x) "
                f"[{g['requests']} requests]",
                flush=True,
            )
    summary: dict[str, Any] = {"slice": args.slice, "duration": args.duration}
    summary["rounds"] = args.rounds
    for name in variants:
        summary[name] = {
            "rps": round(statistics.median(g[name]["rps"] for g in rounds)),
            "cpu_us": round(statistics.median(g[name]["cpu_us"] for g in rounds), 1),
            "ratio_rps": round(
                statistics.median(g[name]["rps"] / g["bare"]["rps"] for g in rounds), 3
            ),
            "ratio_cpu": round(
                statistics.median(g["bare"]["cpu_us"] / g[name]["cpu_us"] for g in rounds), 3
            ),
        }
    print(json.dumps(summary))
    if "full" in variants:
        f = summary["full"]
        verdict = "met" if min(f["ratio_rps"], f["ratio_cpu"]) >= 0.7 else "NOT met"
        print(
            f"full / bare, interleaved: {f['ratio_rps']:.2f}x req/s, {f['ratio_cpu']:.2f}x by "
            f"CPU per request (target >= 0.7: {verdict})"
        )
    if NO_EMIT in variants:
        cost = summary["full"]["cpu_us"] - summary[NO_EMIT]["cpu_us"]
        print(f"emitting the decision event: {cost:+.1f} us CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
