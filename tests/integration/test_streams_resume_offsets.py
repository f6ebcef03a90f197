"""The sink's resume offsets on the embedded engine: a partition's recorded progress, never the
end of rows stored past it (a batch cut short, which may lack rows at lower offsets: it is read
again, and the rebuilt id set drops what was stored); the end of its rows only for a partition
with rows and no progress at all (tables from before progress was recorded), read once."""

from __future__ import annotations

import datetime as dt
import re

from metering.clickhouse.schema import migrate
from metering.events import encode_event, usage_event
from streams.sink import ClickHouseSink, ClickHouseStorage, Record

TOPIC = "usage.events"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def records(partition: int, start: int, n: int) -> list[Record]:
    return [
        Record(
            TOPIC,
            partition,
            i,
            b"acme",
            encode_event(usage_event("acme", "requests", 1, time=NOW, id=f"p{partition}-{i}")),
        )
        for i in range(start, start + n)
    ]


def test_resume_offsets_are_the_progress_and_the_rows_end_only_without_progress(  # type: ignore[no-untyped-def]
    clickhouse_client, clickhouse_db
):
    migrate(clickhouse_client, clickhouse_db)
    indexes = clickhouse_client.query(
        "SELECT name, type FROM system.data_skipping_indices"
        " WHERE database = {d:String} AND table = 'usage_events'",
        parameters={"d": clickhouse_db},
    ).result_rows
    assert ("kafka_offset_minmax", "minmax") in indexes

    sink = ClickHouseSink(
        ClickHouseStorage(clickhouse_client, clickhouse_db),
        topic=TOPIC,
        lateness_seconds=3600,
        max_future_skew=300,
    )
    storage = sink.storage
    assert isinstance(storage, ClickHouseStorage)
    sink.write(sink.prepare(records(0, 0, 40)))  # rows and progress 40
    sink.write(sink.prepare(records(0, 40, 10)))  # progress 50
    storage.insert_events(sink.prepare(records(0, 50, 7)).rows())  # killed before progress
    sink.write(sink.prepare(records(1, 0, 30)))  # progress 30, nothing past it
    storage.insert_events(sink.prepare(records(2, 0, 12)).rows())  # rows, never any progress
    storage.record_progress(TOPIC, {3: 5})  # progress, no rows (all dead letters)

    # Partition 0 resumes at its progress (50), not after the rows stored past it (57).
    expected = {0: 50, 1: 30, 2: 12, 3: 5}
    assert storage.stored_next_offsets(TOPIC) == expected
    assert storage.stored_next_offsets(TOPIC, [0, 1, 2, 3, 4]) == expected
    assert storage.stored_next_offsets(TOPIC, [2]) == {2: 12}
    assert storage.stored_next_offsets(TOPIC, []) == {}
    assert storage.stored_next_offsets("other.topic", [0, 1]) == {}

    # The assignment records what it resumes from, so partition 2 (and 4, which has nothing)
    # get progress and the next assignment of each reads no rows at all.
    assert sink.on_assigned([0, 1, 2, 3, 4]) == expected
    progress = storage._progress(TOPIC)
    assert progress == {0: 50, 1: 30, 2: 12, 3: 5, 4: 0}
    assert storage.stored_next_offsets(TOPIC, [0, 1, 2, 3, 4]) == expected | {4: 0}
    # The rows 50-56 read again are recognised by their offsets: stored, not inserted again.
    replay = sink.prepare(records(0, 50, 7))
    assert (replay.events, replay.duplicates, replay.next_offsets) == ([], 0, {0: 57})
    assert [r.offset for r, _, _ in replay.stored] == list(range(50, 57))


class RecordingClient:
    """The real client, keeping the text and parameters of each query sent through it."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.queries: list[tuple[str, dict]] = []  # type: ignore[type-arg]

    def query(self, sql: str, parameters=None, **kwargs):  # type: ignore[no-untyped-def]
        self.queries.append((sql, parameters or {}))
        return self.client.query(sql, parameters=parameters, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.client, name)


def test_the_queries_of_an_assignment_let_the_index_skip_older_parts(  # type: ignore[no-untyped-def]
    clickhouse_client, clickhouse_db
):
    """EXPLAIN of the very queries the repair sends on assignment: the skip index leaves out the
    parts wholly below the partition's progress."""
    migrate(clickhouse_client, clickhouse_db)
    db = clickhouse_db
    for start in range(0, 40_000, 10_000):  # four inserts, four parts, offsets in order
        clickhouse_client.command(
            f"INSERT INTO {db}.usage_events (id, type, source, tenant, meter, decision, billable,"
            f" time, quantity, dimensions, kafka_topic, kafka_partition, kafka_offset)"
            f" SELECT toString(number), 'metering.usage', 'urn:test', 'acme', 'requests', '', 1,"
            f" now64(3), 1, map(), '{TOPIC}', 0, number FROM numbers({start}, 10000)"
        )
    recording = RecordingClient(clickhouse_client)
    storage = ClickHouseStorage(recording, db)
    storage.record_progress(TOPIC, {0: 35_000})
    assert storage.stored_next_offsets(TOPIC, [0]) == {0: 35_000}
    # Rows 35000.. are past the progress: the repair looks at them, and finds the views wrote them.
    assert storage.repair_unfinished_batch(TOPIC, [0]) == 0
    reads = [(sql, ps) for sql, ps in recording.queries if "kafka_offset >=" in sql]
    assert reads
    for sql, parameters in reads:
        plan = "\n".join(
            row[0]
            for row in clickhouse_client.query(
                f"EXPLAIN indexes = 1 {sql}", parameters=parameters
            ).result_rows
        )
        skip = plan[plan.index("kafka_offset_minmax") :]
        read, total = (int(x) for x in re.findall(r"Parts: (\d+)/(\d+)", skip)[0])
        assert (read, total) == (1, 4), plan
