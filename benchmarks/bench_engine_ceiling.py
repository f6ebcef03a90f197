"""Benchmark: what the embedded ClickHouse alone absorbs, with no Kafka and no per-event Python.

Run: ``python benchmarks/bench_engine_ceiling.py [--events 600000] [--batch-size 50000]``
(``bench_worker.py`` runs it in the same run as the worker, in a process of its own: chdb holds
one session per process.)

The sink's own insert path (``ClickHouseStorage.insert_events``: the ``usage_events`` insert
and its four materialized rollups, as ``metering db migrate`` makes them) is fed rows built
before the clock starts, in batches of ``--batch-size``, into a fresh folder. What is left is
clickhouse-connect's column serialisation and the engine: no fetch, no decode, no checks, no
dedupe, no Faust. ``--no-rollups`` drops the views first, to show their share. Prints one JSON
line: rows/s (wall) and CPU per row (all threads of this process, the engine's included).

Issue 7 asks a worker for 0.5x of a raw aiokafka consumer. Every event a worker stores costs at
least the raw consumer's CPU (fetching it) plus this benchmark's (storing it); on this
machine's CPUs that sum bounds any worker, whatever its Python does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from procstat import cpu_seconds

from metering.clickhouse.client import clickhouse_client
from metering.clickhouse.schema import migrate_client
from streams.sink import REPAIRED_ROLLUPS, ClickHouseStorage

TENANTS = [f"bench-{i:03d}" for i in range(200)]  # as bench_worker.py's events


def batches(
    events: int, batch_size: int, partitions: int, kind: str = "usage"
) -> list[tuple[list[tuple], list[int]]]:
    """Rows as the sink builds them (the columns of ``EVENT_COLUMNS``) with their millis:
    ``metering.usage`` events, or with ``kind="decisions"`` the limiter's allowed decisions."""
    typ, decision = ("metering.usage", "")
    if kind == "decisions":
        typ, decision = ("metering.ratelimit", "allowed")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    out = []
    for start in range(0, events, batch_size):
        rows, millis = [], []
        for i in range(start, min(events, start + batch_size)):
            when = now - dt.timedelta(milliseconds=i % 60_000)
            tenant = TENANTS[i % len(TENANTS)]
            rows.append((
                str(uuid.uuid4()), typ, "urn:bench", tenant, "requests", decision,
                1, when, 1.0, {"route": "/v1/x"}, "bench.events",
                (i % len(TENANTS)) % partitions, i // partitions,
            ))  # fmt: skip
            millis.append((when - epoch) // dt.timedelta(milliseconds=1))
        out.append((rows, millis))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--batch-size", type=int, default=50_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--no-rollups", action="store_true", help="drop the materialized views")
    ap.add_argument(
        "--kind",
        choices=("usage", "decisions"),
        default="decisions",
        help="usage events, or the limiter's decisions (what a limited request emits)",
    )
    args = ap.parse_args()
    if args.events <= 0 or args.batch_size <= 0:
        ap.error("--events and --batch-size must be positive")
    folder = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        client = clickhouse_client(f"chdb://{folder}")
        migrate_client(client, "metering", retention_days=400)
        if args.no_rollups:
            for table in REPAIRED_ROLLUPS:
                client.command(f"DROP VIEW metering.{table}_mv")
        storage = ClickHouseStorage(client, "metering")
        work = batches(args.events, args.batch_size, args.partitions, args.kind)
        pid = __import__("os").getpid()
        started, cpu0 = time.perf_counter(), cpu_seconds(pid)
        for rows, millis in work:
            storage.insert_events(rows, millis)
        wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu0
        stored = client.query("SELECT count() FROM metering.usage_events").result_rows[0][0]
        if stored != args.events:
            print(f"stored {stored} rows of {args.events}", file=sys.stderr)
            return 1
        print(json.dumps({
            "events": args.events, "batch_size": args.batch_size,
            "rollups": not args.no_rollups, "kind": args.kind, "rows_per_s": args.events / wall,
            "cpu_us_per_row": cpu / args.events * 1e6,
        }))  # fmt: skip
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
