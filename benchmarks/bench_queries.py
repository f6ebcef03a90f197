"""Query latency over 10 million usage events, through the query layer, rollup path vs raw path.

    python benchmarks/bench_queries.py [--events 10000000] [--runs 200] [--gc-freeze]
                                       [--baseline-ref 97af58c]

The data lives in its own embedded-engine folder (``var/bench-queries``) and is generated once by
ClickHouse itself (``INSERT ... SELECT FROM numbers()`` into ``usage_events``; the materialized
views fill the rollups), then reused. 1,000 tenants with a skewed share (tenant ``t0000`` is the
heaviest, about 3% of all events), three meters, 5% of requests rejected, times uniform over
October 2026 (UTC). "Now" is the end of the data, so the last hour is always full.

Measured, each as p50/p99 over ``--runs`` calls (after warm-up), rollup path and raw path:
- the October statement of the heaviest tenant (UTC: daily rollup; Europe/Berlin: hourly);
- a 24-hour per-minute usage series of that tenant (minute rollup);
- the top 10 tenants over the last hour (time-ordered minute rollup).
Target: each rollup path under 20 ms at p99.

Baseline in the same run: ``--baseline-ref REF`` loads that revision's query layer
(``metering/query_sql.py``, ``queries.py``, ``billing.py``; the rest is today's) into this process
and times its rollup path on the same client and data. The calls of one shape are interleaved in
random order, round by round (the raw path every fourth round), so the load of a shared machine
falls on all of them alike; the answers of all paths must be equal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import importlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clickhouse_connect  # noqa: E402
from baseline import source_at  # noqa: E402

import metering.billing as billing_module  # noqa: E402
import metering.queries as queries_module  # noqa: E402
import metering.query_sql as query_sql_module  # noqa: E402
from metering.clickhouse.schema import migrate  # noqa: E402

DATA_DIR = ROOT / "var" / "bench-queries"
DATABASE = "bench"
MONTH_START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
MONTH_MS = 31 * 86400 * 1000
NOW = MONTH_START + dt.timedelta(milliseconds=MONTH_MS)
HEAVY = "t0000"
TARGET_MS = 20.0

GENERATE = """
INSERT INTO bench.usage_events
    (id, type, source, tenant, meter, decision, billable, time, quantity, dimensions,
     kafka_topic, kafka_partition, kafka_offset)
SELECT
    toString(number) AS id,
    if(m = 'requests', 'metering.ratelimit', 'metering.usage') AS type,
    'urn:bench' AS source,
    concat('t', leftPad(toString(toUInt32(pow(randCanonical(), 2) * 1000)), 4, '0')) AS tenant,
    multiIf(r < 80, 'requests', r < 95, 'tokens', 'storage') AS m,
    if(m = 'requests', if(number % 20 = 0, 'rejected', 'allowed'), '') AS decision,
    if(decision = 'rejected', 0, 1) AS billable,
    fromUnixTimestamp64Milli(toInt64({start_ms:Int64} + rand64() % {span_ms:UInt64}), 'UTC'),
    toFloat64(1 + number % 7) AS quantity,
    map('route', concat('/r', toString(number % 20))) AS dimensions,
    'usage.events', toInt32(number % 6), toInt64(number)
FROM (SELECT number, rand() % 100 AS r FROM numbers({first:UInt64}, {count:UInt64}))
"""


def ensure_data(client: Any, events: int) -> int:
    migrate(client, DATABASE)
    have = client.query(f"SELECT count() FROM {DATABASE}.usage_events").result_rows[0][0]
    chunk = 1_000_000
    if have < events:
        print(f"generating {events - have:,} events (have {have:,}) ...", flush=True)
        started = time.perf_counter()
        for first in range(have, events, chunk):
            client.command(
                GENERATE,
                parameters={
                    "start_ms": int(MONTH_START.timestamp() * 1000),
                    "span_ms": MONTH_MS,
                    "first": first,
                    "count": min(chunk, events - first),
                },
            )
            print(f"  {min(first + chunk, events):,}", flush=True)
        for table in (
            "usage_events",
            "usage_minute",
            "usage_hour",
            "usage_day",
            "usage_minute_by_time",
        ):
            client.command(f"OPTIMIZE TABLE {DATABASE}.{table} FINAL")
        print(f"generated in {time.perf_counter() - started:.0f} s", flush=True)
        have = client.query(f"SELECT count() FROM {DATABASE}.usage_events").result_rows[0][0]
    return int(have)


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    return interleaved({"fn": (fn, 1)}, runs)["fn"]


def interleaved(
    fns: dict[str, tuple[Callable[[], Any], int]], rounds: int
) -> dict[str, tuple[float, float]]:
    """p50/p99 (ms) of each function; ``(fn, every)`` runs in every ``every``-th round, the
    functions of a round in random order (after a warm-up of each)."""
    for fn, _ in fns.values():
        for _ in range(max(3, rounds // 20)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for n in range(rounds):
        random.shuffle(order)
        for name in order:
            fn, every = fns[name]
            if n % every:
                continue
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
    return {name: percentiles(values) for name, values in samples.items()}


BASELINE_MODULES = ("query_sql", "queries", "billing")


def load_baseline(ref: str) -> dict[str, ModuleType]:
    """``ref``'s query layer as the package ``baseline_query_layer`` (a temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-queries-baseline-"))
    package = folder / "baseline_query_layer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in BASELINE_MODULES:
        text = source_at(ref, f"metering/{name}.py")
        for other in BASELINE_MODULES:
            text = text.replace(f"from metering.{other} ", f"from baseline_query_layer.{other} ")
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return {
        name: importlib.import_module(f"baseline_query_layer.{name}") for name in BASELINE_MODULES
    }


def shapes(
    client: Any, query_sql: Any, queries_module: Any, billing: Any
) -> list[tuple[str, Callable[[bool], Any]]]:
    """The measured questions, asked through one version of the query layer."""
    queries = queries_module.UsageQueries(client, DATABASE)
    series = query_sql.UsageQuery(
        HEAVY, "requests", NOW - dt.timedelta(hours=24), NOW, window="MINUTE"
    )
    return [
        (
            "billing statement, month, UTC",
            lambda raw: billing.billing_statement(queries, HEAVY, "2026-10", "UTC", force_raw=raw),
        ),
        (
            "billing statement, month, Europe/Berlin",
            lambda raw: billing.billing_statement(
                queries, HEAVY, "2026-10", "Europe/Berlin", force_raw=raw
            ),
        ),
        (
            "24 h per-minute series, one tenant",
            lambda raw: queries.usage(series, force_raw=raw).rows,
        ),
        (
            "top 10 tenants, last hour",
            lambda raw: queries.top_tenants(
                "requests", 60, 10, now=NOW - dt.timedelta(seconds=1), force_raw=raw
            ),
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after start-up, as a long-running server would: the objects made at"
        " start-up leave the collector's generations, so full collections stop adding"
        " milliseconds to the tail",
    )
    parser.add_argument(
        "--baseline-ref",
        help="also time this git revision's query layer, interleaved with today's",
    )
    args = parser.parse_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    baseline = load_baseline(args.baseline_ref) if args.baseline_ref else None
    client = clickhouse_connect.get_client(dsn=f"chdb://{args.data_dir}")
    total = ensure_data(client, args.events)
    heavy_events = client.query(
        f"SELECT count() FROM {DATABASE}.usage_events WHERE tenant = {{t:String}}",
        parameters={"t": HEAVY},
    ).result_rows[0][0]
    print(
        f"{total:,} events, 1,000 tenants; {HEAVY} has {heavy_events:,};"
        f" now = {NOW:%Y-%m-%d %H:%M}Z"
    )

    checks = shapes(client, query_sql_module, queries_module, billing_module)
    before = (
        shapes(client, baseline["query_sql"], baseline["queries"], baseline["billing"])
        if baseline
        else [(name, None) for name, _ in checks]
    )
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    print(f"garbage collector: {'frozen after start-up' if args.gc_freeze else 'default'}")
    print("load average (1/5/15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    floor = measure(lambda: client.query("SELECT 1").result_rows, args.runs)
    print(f"engine floor (SELECT 1): p50 {floor[0]:.2f} ms, p99 {floor[1]:.2f} ms")
    base_head = f" {'baseline p50/p99':>17}" if baseline else ""
    print(
        f"\n{'query':40} {'rollup p50/p99 ms':>18}{base_head} {'raw p50/p99 ms':>15}"
        f" {'raw/rollup':>10}  target: rollup p99 < {TARGET_MS:.0f} ms"
    )
    met = True
    for (name, run), (_, old) in zip(checks, before, strict=True):
        answer = run(False)
        if answer != run(True) or (old is not None and _plain(old(False)) != _plain(answer)):
            print(f"{name}: the paths give different answers", file=sys.stderr)
            return 1
        fns: dict[str, tuple[Callable[[], Any], int]] = {
            "rollup": (functools.partial(run, False), 1),
            "raw": (functools.partial(run, True), 4),
        }
        if old is not None:
            fns["baseline"] = (functools.partial(old, False), 1)
        got = interleaved(fns, args.runs)
        fast, slow = got["rollup"], got["raw"]
        ok = fast[1] < TARGET_MS
        met &= ok
        base_cell = ""
        if "baseline" in got:
            base_cell = f" {got['baseline'][0]:8.2f}/{got['baseline'][1]:<8.2f}"
        print(
            f"{name:40} {fast[0]:8.2f}/{fast[1]:<9.2f}{base_cell} {slow[0]:6.2f}/{slow[1]:<8.2f}"
            f" {slow[0] / fast[0]:9.1f}x  {'met' if ok else 'NOT met'}"
        )
    same = "all paths" if baseline else "both paths"
    print(f"\nsame answers on {same}; machine shared with other engineers (2 cores)")
    print("load average (1/5/15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0 if met else 2


def _plain(answer: Any) -> Any:
    """An answer as plain data, so two versions' result classes compare by value."""
    if hasattr(answer, "to_dict"):
        return answer.to_dict()
    if isinstance(answer, list):
        return [_plain(item) for item in answer]
    if isinstance(answer, tuple):
        return tuple(_plain(item) for item in answer)
    return answer


if __name__ == "__main__":
    sys.exit(main())
