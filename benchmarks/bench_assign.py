"""What a partition assignment costs the sink as ``usage_events`` grows (issue 7).

Run: ``python benchmarks/bench_assign.py [--rows 20000000] [--partitions 4] [--rounds 5]``

On every assignment the sink asks ClickHouse whether the rollups of rows stored past a
partition's recorded progress (a crash between an insert and its progress row) are complete, and
for its resume offsets (``ClickHouseStorage.repair_unfinished_batch``, ``stored_next_offsets``:
the progress itself; the rows' end only for a partition that has none).
Before migration 005 both read ``max(kafka_offset)`` over every row of the topic; now each
partition's query is bounded by its progress and the ``kafka_offset_minmax`` skip index leaves
out the parts below it.

The script fills an embedded ClickHouse (``chdb://``, a temporary folder) with ``--rows`` rows
over ``--partitions`` partitions, inserted in 1M-row blocks in offset order as the sink writes
them, records each partition's progress at its end (the common case: a rebalance or a restart
after a clean stop; after a crash between an insert and its progress row both versions also
complete that batch's rollups, the same work in each), and times, alternating, in the same run:

- **baseline**: the two full-scan queries the sink sent before (kept here verbatim);
- **now**: ``repair_unfinished_batch`` + ``stored_next_offsets`` for the assigned partitions.

Both give the same offsets (checked). Prints the medians in ms and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metering.clickhouse.client import clickhouse_client
from metering.clickhouse.schema import migrate
from streams.sink import ClickHouseStorage

TOPIC = "usage.events"
BLOCK = 1_000_000


def fill(client, db: str, rows: int, partitions: int) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """``rows`` rows, partition = n % partitions, offset = n // partitions; returns the ends."""
    for start in range(0, rows, BLOCK):
        n = min(BLOCK, rows - start)
        client.command(
            f"INSERT INTO {db}.usage_events (id, type, source, tenant, meter, decision, billable,"
            f" time, quantity, dimensions, kafka_topic, kafka_partition, kafka_offset)"
            f" SELECT toString(number), 'metering.usage', 'urn:bench',"
            f" concat('tenant-', toString(number % 200)), 'requests', '', 1,"
            f" now64(3) - toIntervalSecond(({rows} - number) / 1000), 1, map('route', '/v1/x'),"
            f" '{TOPIC}', toInt32(number % {partitions}), toInt64(intDiv(number, {partitions}))"
            f" FROM numbers({start}, {n})"
        )
    per = rows // partitions
    return {p: per + (1 if p < rows % partitions else 0) for p in range(partitions)}


def old_queries(storage: ClickHouseStorage, partitions: list[int]) -> dict[int, int]:
    """What the sink sent on each assignment before: every row of the topic, twice."""
    db, client = storage.database, storage.client
    client.query(
        f"SELECT kafka_partition, max(kafka_offset) + 1 FROM {db}.usage_events"
        f" WHERE kafka_topic = {{t:String}} GROUP BY kafka_partition",
        parameters={"t": TOPIC},
    )
    rows = client.query(
        f"SELECT p, max(n) FROM ("
        f" SELECT kafka_partition AS p, max(kafka_offset) + 1 AS n"
        f" FROM {db}.usage_events WHERE kafka_topic = {{t:String}} GROUP BY p"
        f" UNION ALL SELECT partition AS p, max(next_offset) AS n"
        f" FROM {db}.sink_progress WHERE topic = {{t:String}} GROUP BY p"
        f") GROUP BY p",
        parameters={"t": TOPIC},
    ).result_rows
    stored = {int(p): int(n) for p, n in rows}
    return {p: stored[p] for p in partitions if p in stored}


def new_queries(storage: ClickHouseStorage, partitions: list[int]) -> dict[int, int]:
    storage.repair_unfinished_batch(TOPIC, partitions)
    return storage.stored_next_offsets(TOPIC, partitions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.rows < args.partitions * 20_000 or args.partitions < 1 or args.rounds < 1:
        ap.error("need --rows >= 20,000 per partition, --partitions >= 1, --rounds >= 1")

    folder = tempfile.mkdtemp(prefix="bench-assign-")
    client = clickhouse_client(f"chdb://{folder}")
    db = "bench"
    migrate(client, db)
    storage = ClickHouseStorage(client, db)
    started = time.perf_counter()
    ends = fill(client, db, args.rows, args.partitions)
    print(f"filled {args.rows:,} rows in {time.perf_counter() - started:.1f}s ({folder})")
    storage.record_progress(TOPIC, ends)
    parts = client.query(
        f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'usage_events'"
        " AND active"
    ).result_rows[0][0]
    print(f"usage_events: {parts} active parts; progress recorded at each partition's end")

    partitions = list(range(args.partitions))
    assert old_queries(storage, partitions) == new_queries(storage, partitions) == ends
    times: dict[str, list[float]] = {"baseline (full scans)": [], "now (bounded)": []}
    for _ in range(args.rounds):
        for name, fn in (("baseline (full scans)", old_queries), ("now (bounded)", new_queries)):
            t0 = time.perf_counter()
            fn(storage, partitions)
            times[name].append(time.perf_counter() - t0)
    for name, values in times.items():
        print(
            f"{name:24s} median {statistics.median(values) * 1e3:8.1f} ms"
            f"  (min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f}, {args.rounds} rounds)"
        )
    base = statistics.median(times["baseline (full scans)"])
    now = statistics.median(times["now (bounded)"])
    print(f"ratio: the assignment's queries take {now / base:.3f}x the baseline's time")
    print(
        f"command: python benchmarks/bench_assign.py --rows {args.rows} "
        f"--partitions {args.partitions} --rounds {args.rounds}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
