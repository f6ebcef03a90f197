"""``metering worker`` as real processes: exact totals end to end, SIGKILL, a rebalance.

Each worker process owns its embedded ClickHouse folder (the engine allows one folder per
process), so results are read afterwards by a short-lived process on that folder. With two
workers the data is split over two folders: the rebalance test proves that every event is in
exactly one folder, once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faust.serializers import codecs
from kafka import KafkaProducer

from metering.events import encode_event, usage_event
from metering.quota_db import QuotaStore
from streams.handoff import usage
from tests.integration.streams_support import (
    committed_offsets,
    event_day,
    event_message,
    one_event_time,
    partition_of,
    produce,
    read_all,
    tenants_covering,
    unique_topics,
    wait_until_committed,
)

ROOT = Path(__file__).resolve().parents[2]
LATENESS = 3600
#: what aiokafka logs when the group coordinator has dropped this member (session timed out)
EVICTED = "Heartbeat session expired"


class Worker:
    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "METERING_DATA_DIR": str(self.data_dir)}
        log = open(self.data_dir / "worker.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metering.cli", "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_for_log(self, text: str, timeout: float, count: int = 1) -> None:
        """Wait until ``text`` is in the log ``count`` times (the log spans restarts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.data_dir / "worker.log").read_text(errors="replace").count(text) >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} not in {self.data_dir / 'worker.log'}")

    def log_text(self) -> str:
        return (self.data_dir / "worker.log").read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        """The end of the worker's log, for an assertion message."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"worker did not stop on SIGTERM; see {self.data_dir}") from None

    def query(self, sql: str) -> list[list]:  # type: ignore[type-arg]
        """Run ``sql`` on this worker's ClickHouse folder (the worker must be stopped)."""
        script = textwrap.dedent(
            """
            import json, sys, clickhouse_connect
            client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
            rows = client.query(sys.argv[2]).result_rows
            print(json.dumps([list(r) for r in rows], default=str))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(self.data_dir / "clickhouse"), sql],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return json.loads(out.stdout)


@pytest.fixture(autouse=True)
def _events_of_one_day() -> Iterator[None]:
    """These tests run for minutes and work out "today" after their events are in: the events
    carry one instant (``one_event_time``), so crossing 00:00 UTC cannot split their totals."""
    with one_event_time():
        yield


@pytest.fixture
def pipeline(kafka_bootstrap: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    topic, dlq = unique_topics(kafka_bootstrap, partitions=4)
    group = f"wg-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "QUOTA_DB"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        USAGE_EVENTS_TOPIC=topic,
        USAGE_EVENTS_DLQ_TOPIC=dlq,
        USAGE_EVENTS_PARTITIONS="4",
        WORKER_GROUP=group,
        WORKER_BATCH_SIZE="200",
        WORKER_BATCH_WITHIN="0.1",
        WORKER_BACKFILL_INTERVAL="1",
        WORKER_AGGREGATE_INTERVAL="1",
        WORKER_SESSION_TIMEOUT="10",
        EVENT_MAX_LATENESS=str(LATENESS),
    )
    workers: list[Worker] = []

    def make(name: str) -> Worker:
        w = Worker(env, tmp_path / name)
        workers.append(w)
        return w

    yield topic, dlq, group, make
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


def sink_group(group: str) -> str:
    return f"{group}.sink"


def table_key(raw: bytes) -> Any:
    """A changelog key as the table holds it (a window key ``[key, [start, end]]`` is a tuple)."""
    key = json.loads(raw)
    if isinstance(key, list):
        return tuple(tuple(k) if isinstance(k, list) else k for k in key)
    return key


def changelog_latest(bootstrap: str, topic: str) -> dict[Any, float]:
    """The latest quantity per key of a table's changelog (values ``{"q": ..., "m": ...}``); a
    key whose latest record is a tombstone is not there."""
    latest: dict[Any, float] = {}
    for m in read_all(bootstrap, topic):
        if m.value is None:
            latest.pop(table_key(m.key), None)
        else:
            latest[table_key(m.key)] = usage(json.loads(m.value))
    return latest


def handoff_history(bootstrap: str, group: str, key: str) -> str:
    """What reached the daily table for ``key`` (``"<tenant>|<meter>|<day>"``), for a failure
    message: the hand-offs of its tenant on ``accepted_usage`` (partition, offset, time, source
    range, quantity) and each changelog record of the key (quantity and marks)."""
    tenant = key.partition("|")[0]
    lines = [f"hand-offs of {tenant} (partition@offset time source [start, end) quantity):"]
    for m in read_all(bootstrap, f"{group}-accepted-usage"):
        value = json.loads(m.value) if m.value is not None else None
        if not isinstance(value, dict) or value.get("tenant") != tenant:
            continue
        quantity = sum(s[2] for s in value.get("sums", []))
        lines.append(
            f"  {m.partition}@{m.offset} {m.timestamp} {value.get('source')}"
            f" [{value.get('start')}, {value.get('end')}) {quantity}"
        )
    lines.append(f"changelog records of {key} (partition@offset time value):")
    for m in read_all(bootstrap, f"{group}-tenant_daily_usage-changelog"):
        if table_key(m.key) == key:
            lines.append(f"  {m.partition}@{m.offset} {m.timestamp} {m.value!r}")
    return "\n".join(lines)


def wait_for_daily_total(
    bootstrap: str,
    group: str,
    key: str,
    total: float,
    timeout: float,
    workers: tuple[Worker, ...] = (),
) -> None:
    changelog = f"{group}-tenant_daily_usage-changelog"
    deadline = time.monotonic() + timeout
    while (got := changelog_latest(bootstrap, changelog).get(key)) != total:
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {w.data_dir.name}:\n{w.log_tail(200)}" for w in workers)
            pytest.fail(
                f"the daily table holds {got} for {key}, not {total}\n"
                f"{handoff_history(bootstrap, group, key)}\n{logs}"
            )
        time.sleep(1)


@pytest.mark.timeout(240)
def test_worker_counts_each_event_once_in_clickhouse_the_faust_table_and_the_quota_db(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    topic, dlq, group, make = pipeline
    other = f"{tenant}-b"
    # The limiter's allowed decisions: what the quota DB's day totals count.
    allowed = {"decision": "allowed"}
    messages = [event_message(tenant, 2, id=f"a{i}", **allowed) for i in range(300)]
    messages += [event_message(other, 1, id=f"b{i}", **allowed) for i in range(200)]
    messages += [event_message(tenant, 2, id=f"a{i}", **allowed) for i in range(0, 300, 3)]
    messages += [event_message(other, 50, id="b-old", age_seconds=LATENESS + 60, **allowed)]
    messages += [(b"k", b"\xff\xfe not utf-8"), (b"k", b"[]")]
    produce(kafka_bootstrap, topic, messages)

    worker = make("w1").start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120)
    store = QuotaStore(f"sqlite:///{worker.data_dir / 'quota.db'}")
    today = event_day()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and store.daily_usage(other, today) == 0:
        time.sleep(0.5)  # the backfill timer runs every second
    # The Faust table's changelog is written on the agent's own schedule: wait for it rather
    # than for a fixed time (1.5 s was once not enough on a loaded machine).
    for key, total in ((f"{tenant}|requests|{today}", 600.0), (f"{other}|requests|{today}", 200.0)):
        wait_for_daily_total(kafka_bootstrap, group, key, total, timeout=60, workers=(worker,))
    worker.stop()

    assert store.daily_usage(tenant, today) == 600
    assert store.daily_usage(other, today) == 200
    counts = worker.query(
        "SELECT tenant, count(), uniqExact(id), sum(quantity) FROM metering.usage_events"
        " GROUP BY tenant ORDER BY tenant"
    )
    assert counts == [[tenant, 300, 300, 600.0], [other, 200, 200, 200.0]]
    day = worker.query(
        "SELECT tenant, sum(event_count), sum(quantity_sum) FROM metering.usage_day"
        " WHERE billable = 1 GROUP BY tenant ORDER BY tenant"
    )
    assert day == [[tenant, 300, 600.0], [other, 200, 200.0]]
    letters = read_all(kafka_bootstrap, dlq)
    assert sorted(dict(m.headers)["dlq.reason"] for m in letters) == [
        b"invalid",
        b"invalid",
        b"late",
    ]
    table = changelog_latest(kafka_bootstrap, f"{group}-tenant_daily_usage-changelog")
    assert table[f"{tenant}|requests|{today}"] == 600.0
    assert table[f"{other}|requests|{today}"] == 200.0


def run_worker_expecting_failure(
    env: dict[str, str], data_dir: Path
) -> subprocess.CompletedProcess[str]:
    """``metering worker`` run to its end (``timeout`` stops it after 120 s: exit code 124)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["timeout", "120", sys.executable, "-m", "metering.cli", "worker"],
        cwd=ROOT,
        env={
            **env,
            "METERING_DATA_DIR": str(data_dir),
            "QUOTA_DB_URL": f"sqlite:///{data_dir / 'quota.db'}",
        },
        capture_output=True,
        text=True,
        timeout=150,
    )


def assert_one_line_store_error(run: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 1 and, as the last line of stderr, ``message`` (the CLI's line for a store
    failure): no Faust crash, no traceback."""
    tail = "\n".join(run.stderr.splitlines()[-30:])
    assert run.returncode == 1, f"exit code {run.returncode}:\n{tail}"
    assert "Traceback" not in run.stderr, tail
    assert "We experienced a crash" not in run.stderr, tail
    assert run.stderr.splitlines()[-1].startswith(message), tail


@pytest.mark.timeout(180)
def test_the_worker_with_clickhouse_unreachable_at_start_fails_with_the_one_line_store_error(
    pipeline, tmp_path: Path
) -> None:
    """ClickHouse is reached and migrated before Faust starts, like the quota DB and Kafka: an
    unreachable server is the CLI's one line naming CLICKHOUSE_URL (password masked), not a
    crash inside Faust's task with a 118-line traceback."""
    _, _, _, make = pipeline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    env = {**make("w").env, "CLICKHOUSE_URL": f"http://default:hunter2@127.0.0.1:{port}"}
    run = run_worker_expecting_failure(env, tmp_path / "dead-port")
    assert_one_line_store_error(
        run, f"metering: ClickHouse (CLICKHOUSE_URL=http://default:***@127.0.0.1:{port}): "
    )
    assert "hunter2" not in run.stderr


@pytest.mark.timeout(180)
def test_the_worker_on_an_embedded_folder_another_process_holds_fails_with_one_line(
    pipeline, tmp_path: Path
) -> None:
    """The embedded engine allows one process per data folder: a worker started on a folder
    another process holds says so in one line (it crashed inside Faust's task)."""
    _, _, _, make = pipeline
    folder = tmp_path / "held" / "clickhouse"
    folder.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, clickhouse_connect\n"
            "client = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
            "client.command('SELECT 1')\n"
            "print('holding', flush=True)\n"
            "sys.stdin.read()\n",
            str(folder),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        env = {**make("w").env, "CLICKHOUSE_URL": f"chdb://{folder}"}
        run = run_worker_expecting_failure(env, tmp_path / "held")
    finally:
        holder.communicate(timeout=30)  # stdin closed: it lets the folder go
    assert_one_line_store_error(
        run,
        f"metering: ClickHouse (CLICKHOUSE_URL=chdb://{folder}): cannot open the embedded"
        " engine: the folder is in use by another process",
    )


@pytest.mark.timeout(240)
def test_a_graceful_stop_hands_the_last_sums_to_the_faust_tables(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    """Sums not yet handed to the tables when the worker stops (an interval far longer than the
    run) go to accepted_usage at shutdown, and the agent folds them in on the next start."""
    topic, _, group, make = pipeline
    produce(kafka_bootstrap, topic, [event_message(tenant, 3, id=f"g{i}") for i in range(50)])
    worker = make("w1")
    worker.env = {**worker.env, "WORKER_AGGREGATE_INTERVAL": "3600"}
    worker.start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120)
    worker.stop()
    accepted = [json.loads(m.value) for m in read_all(kafka_bootstrap, f"{group}-accepted-usage")]
    assert sum(q for a in accepted if a["tenant"] == tenant for _, _, q in a["sums"]) == 150.0
    today = event_day()
    worker.start()  # the agent resumes after its committed offset: the last sums come in now
    wait_for_daily_total(
        kafka_bootstrap, group, f"{tenant}|requests|{today}", 150.0, timeout=90, workers=(worker,)
    )
    worker.stop()


@pytest.mark.timeout(240)
def test_each_meter_has_its_own_values_in_the_faust_tables(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    """Quantities of different meters (units) are never added up: 14 ``requests`` and 64
    ``tokens`` of one tenant were one daily value of 78, and its windows likewise."""
    topic, _, group, make = pipeline
    now = dt.datetime.now(dt.UTC)
    events = [usage_event(tenant, "requests", 1, time=now, id=f"r{i}") for i in range(14)]
    events += [usage_event(tenant, "tokens", 32, time=now, id=f"t{i}") for i in range(2)]
    produce(kafka_bootstrap, topic, [(tenant.encode(), encode_event(ev)) for ev in events])
    worker = make("w1").start()
    # Faust creates the changelog topics at start: read them only after (reading a topic that
    # does not exist yet creates it, with one partition).
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120)
    today = now.date()
    wait_for_daily_total(
        kafka_bootstrap, group, f"{tenant}|requests|{today}", 14.0, timeout=90, workers=(worker,)
    )
    wait_for_daily_total(kafka_bootstrap, group, f"{tenant}|tokens|{today}", 64.0, timeout=30)
    worker.stop()
    daily = changelog_latest(kafka_bootstrap, f"{group}-tenant_daily_usage-changelog")
    assert daily == {f"{tenant}|requests|{today}": 14.0, f"{tenant}|tokens|{today}": 64.0}
    windows = changelog_latest(kafka_bootstrap, f"{group}-tenant_recent_usage-changelog")
    per_key: dict[str, list[float]] = {}
    for (key, _), q in windows.items():
        per_key.setdefault(key, []).append(q)
    assert set(per_key) == {f"{tenant}|requests", f"{tenant}|tokens"}
    assert max(per_key[f"{tenant}|requests"]) == 14.0  # every event in the window of its minute
    assert max(per_key[f"{tenant}|tokens"]) == 64.0


def inject(bootstrap: str, topic: str, partition: int, records: list[tuple[Any, Any]]) -> None:
    """Write table records into a changelog as the worker writes them (Faust's JSON codec)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for key, value in records:
            producer.send(
                topic,
                key=codecs.dumps("json", key),
                value=codecs.dumps("json", value),
                partition=partition,
            )
        producer.flush(30)
    finally:
        producer.close()


def changelog_records(bootstrap: str, topic: str) -> dict[Any, list[tuple[int, bool]]]:
    """Per key, its records in order: (partition, is a tombstone)."""
    out: dict[Any, list[tuple[int, bool]]] = {}
    for m in read_all(bootstrap, topic):
        out.setdefault(table_key(m.key), []).append((m.partition, m.value is None))
    return out


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_sweep_deletes_recovered_closed_days_and_expired_windows(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    """Daily values of days no event can reach any more and windows past their expiry, in the
    changelogs from an earlier life (the audit saw hours-old windows come back at every restart
    and stay, and every tenant-day ever written), are deleted after a restart: a tombstone in
    the key's own partition, so they do not come back. Current values stay."""
    topic, _, group, make = pipeline
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"s{i}") for i in range(5)])
    worker = make("w1").start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120)  # see above
    daily_topic = f"{group}-tenant_daily_usage-changelog"
    windows_topic = f"{group}-tenant_recent_usage-changelog"
    deadline = time.monotonic() + 90
    while not any(
        str(k).startswith(tenant) for k in changelog_latest(kafka_bootstrap, daily_topic)
    ):
        assert time.monotonic() < deadline, "the worker wrote nothing to the daily table"
        time.sleep(1)
    worker.stop()
    # The agent writes a tenant's keys to the partition of its hand-offs (keyed by tenant).
    partition = partition_of(tenant, 4)
    written = changelog_records(kafka_bootstrap, windows_topic)
    written.update(changelog_records(kafka_bootstrap, daily_topic))
    assert {p for recs in written.values() for p, _ in recs} == {partition}
    current_windows = [k for k in written if isinstance(k, tuple)]

    # What an earlier life left in the changelogs (the earlier key formats too).
    now = time.time()
    today = event_day()
    closed = today - dt.timedelta(days=3)  # LATENESS is an hour: closed for two days already
    kept = today - dt.timedelta(days=1)  # still open (the day's margin)
    start = (now - 7200) // 60 * 60
    old = (start, start + 299.9)  # a window two hours old (expiry: 30 minutes)
    old_days = [f"{tenant}|requests|{closed}", f"{tenant}|{closed}"]
    old_windows = [(f"{tenant}|requests", old), (tenant, (start - 60, start + 239.9))]
    value = {"q": 5.0, "m": {}}
    inject(
        kafka_bootstrap,
        daily_topic,
        partition,
        [*((k, value) for k in old_days), (f"{tenant}|requests|{kept}", value)],
    )
    inject(
        kafka_bootstrap, windows_topic, partition, [([k, list(w)], value) for k, w in old_windows]
    )

    # It recovers them from the changelogs; the sweep runs every minute, here every 3 s.
    worker.env = {**worker.env, "WORKER_TABLE_SWEEP_INTERVAL": "3"}
    worker.start()
    deadline = time.monotonic() + 180
    while True:
        days = changelog_latest(kafka_bootstrap, daily_topic)
        windows = changelog_latest(kafka_bootstrap, windows_topic)
        if not any(k in days for k in old_days) and not any(k in windows for k in old_windows):
            break
        assert time.monotonic() < deadline, (
            f"still there: {[k for k in old_days if k in days]},"
            f" {[k for k in old_windows if k in windows]}\n" + worker.log_tail()
        )
        time.sleep(2)
    worker.stop()
    worker.wait_for_log("table sweep: ", timeout=1)

    days = changelog_latest(kafka_bootstrap, daily_topic)
    assert days == {f"{tenant}|requests|{today}": 5.0, f"{tenant}|requests|{kept}": 5.0}
    windows = changelog_latest(kafka_bootstrap, windows_topic)
    assert sorted(windows) == sorted(current_windows)
    # Each tombstone is in the partition of its key's records: compaction and the next
    # recovery drop the key.
    records = changelog_records(kafka_bootstrap, daily_topic)
    records.update(changelog_records(kafka_bootstrap, windows_topic))
    for key in [*old_days, *old_windows]:
        assert records[key] == [(partition, False), (partition, True)], key


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigkill_in_the_middle_of_a_stream_then_restart_keeps_totals_exact(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    topic, _, group, make = pipeline
    # The limiter's allowed decisions: counted in every rollup, decisions_day among them, and
    # in the quota DB's day total (the seed of a lost Redis counter).
    first = [event_message(tenant, 1, id=f"e{i}", decision="allowed") for i in range(4000)]
    produce(kafka_bootstrap, topic, first)
    worker = make("w1")
    base_env = worker.env
    # First life: no hand-off to the Faust tables before the kill, so every row it inserted
    # reaches them only through the next life's recovery (from ClickHouse).
    worker.env = {**base_env, "WORKER_AGGREGATE_INTERVAL": "3600"}
    worker.start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120, at_least=800)
    worker.kill()  # no shutdown: whatever was inserted and not yet committed stays so
    at_kill = sum(committed_offsets(kafka_bootstrap, sink_group(group), topic).values())
    assert at_kill < 4000, "the kill should land mid-stream"
    second = [event_message(tenant, 1, id=f"e{i}", decision="allowed") for i in range(4000, 6000)]
    second += first[:500]  # producer retries of events the first life may have inserted
    produce(kafka_bootstrap, topic, second)
    worker.env = base_env
    worker.start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120)
    today = event_day()
    wait_for_daily_total(
        kafka_bootstrap, group, f"{tenant}|requests|{today}", 6000.0, timeout=60, workers=(worker,)
    )
    time.sleep(2)  # a second flush after the total: it must not add anything more
    worker.kill()  # and a replay of accepted_usage after this kill must not either
    assigned = worker.log_text().count("sink assigned")  # an earlier eviction logs one more
    worker.start()
    # Once the group let the killed member go, the sink recovers (resending its last range)
    # and the agent replays accepted_usage from its committed offset: the marks drop both.
    worker.wait_for_log("sink assigned", timeout=120, count=assigned + 1)
    time.sleep(5)
    worker.stop()
    assert changelog_latest(kafka_bootstrap, f"{group}-tenant_daily_usage-changelog") == {
        f"{tenant}|requests|{today}": 6000.0
    }
    assert worker.query(
        "SELECT count(), uniqExact(id), sum(quantity) FROM metering.usage_events"
    ) == [[6000, 6000, 6000.0]]
    assert worker.query(
        "SELECT sum(event_count), sum(quantity_sum) FROM metering.usage_minute"
    ) == [[6000, 6000.0]]
    assert worker.query(
        "SELECT sum(event_count), sum(quantity_sum) FROM metering.decisions_day"
    ) == [[6000, 6000.0]]
    # The last backfill round ran as the worker stopped.
    store = QuotaStore(f"sqlite:///{worker.data_dir / 'quota.db'}")
    assert store.daily_usage(tenant, today) == 6000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_worker_joining_mid_stream_keeps_totals_exact(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    """Each worker has its own embedded folder here, so a partition's next owner cannot read
    the rows the previous one inserted: every handover must be the graceful one, where the
    previous owner hands its open ranges off when revoked. An eviction (a member that missed
    its session timeout) skips that; with a shared ClickHouse server, the supported way to run
    several workers, the next owner recovers those rows from ClickHouse (the SIGKILL tests
    show that recovery), but across two folders they were lost from the tables, and the
    evicted worker, rejoining, read again what the other had inserted. So the session timeout
    here is long enough that a loaded machine cannot evict a member (10 s once did, in CI),
    and an eviction fails the test by its name."""
    topic, _, group, make = pipeline
    tenants = tenants_covering(tenant, partitions=4, per_partition=2)
    produce(
        kafka_bootstrap, topic, [event_message(tenants[i % 8], 1, id=f"a{i}") for i in range(4000)]
    )

    def make_member(name: str) -> Worker:
        w = make(name)
        w.env = {**w.env, "WORKER_SESSION_TIMEOUT": "45"}
        return w

    a = make_member("wa").start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120, at_least=1000)
    b = make_member("wb").start()
    b.wait_for_log("sink assigned", timeout=90)  # b's sink joined: the group rebalanced
    produce(
        kafka_bootstrap,
        topic,
        [event_message(tenants[i % 8], 1, id=f"b{i}") for i in range(4000)],
    )
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=150)
    # b never owned every partition while a ran: it said its folder holds a part only
    assert "writes them to an embedded ClickHouse folder" in b.log_text(), b.log_tail()
    for w in (a, b):
        assert EVICTED not in w.log_text(), (
            f"{w.data_dir.name} was evicted from its group (its event loop stalled past the"
            f" session timeout): with two embedded folders its rows cannot be recovered\n"
            + w.log_tail(200)
        )
    # The Faust tables too: the partitions b took over were handed off by a before they moved
    # and by b after, with nothing counted twice or left out.
    today = event_day()
    for t in tenants:
        wait_for_daily_total(
            kafka_bootstrap, group, f"{t}|requests|{today}", 1000.0, timeout=60, workers=(a, b)
        )
    a.stop()
    b.stop()
    ids_a = {r[0] for r in a.query("SELECT id FROM metering.usage_events")}
    ids_b = {r[0] for r in b.query("SELECT id FROM metering.usage_events")}
    assert len(ids_b) > 0, "the second worker took no partitions over:\n" + b.log_tail()
    assert ids_a.isdisjoint(ids_b)
    assert len(ids_a) + len(ids_b) == 8000
    rows_a = a.query("SELECT count() FROM metering.usage_events")[0][0]
    rows_b = b.query("SELECT count() FROM metering.usage_events")[0][0]
    assert rows_a + rows_b == 8000  # no id twice within a folder either


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_restarted_with_its_instance_id_takes_its_partitions_back_at_once(
    kafka_bootstrap: str, pipeline, tenant: str
) -> None:
    """Static membership (WORKER_INSTANCE_ID): after a SIGKILL the restarted worker replaces its
    dead self in both consumer groups instead of waiting out the 60 s session timeout, and the
    totals stay exact."""
    topic, _, group, make = pipeline
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"s{i}") for i in range(3000)])
    worker = make("w1")
    worker.env = {**worker.env, "WORKER_INSTANCE_ID": "w1", "WORKER_SESSION_TIMEOUT": "60"}
    worker.start()
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=120, at_least=500)
    worker.kill()
    produce(kafka_bootstrap, topic, [event_message(tenant, 1, id=f"t{i}") for i in range(1000)])
    worker.start()
    # Without the instance id the group would hold the dead member's partitions for 60 s.
    worker.wait_for_log("sink assigned", timeout=40, count=2)
    wait_until_committed(kafka_bootstrap, sink_group(group), topic, timeout=60)
    today = event_day()
    wait_for_daily_total(
        kafka_bootstrap, group, f"{tenant}|requests|{today}", 4000.0, timeout=60, workers=(worker,)
    )
    worker.stop()
    assert worker.query("SELECT count(), uniqExact(id) FROM metering.usage_events") == [
        [4000, 4000]
    ]
