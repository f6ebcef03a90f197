"""Benchmark: one ``metering worker`` process into the embedded ClickHouse, beside a raw consumer.

Run: ``python benchmarks/bench_worker.py [--events 300000] [--partitions 4] [--minutes 10]``
(Kafka from KAFKA_BOOTSTRAP_SERVERS, default 127.0.0.1:9092; a fresh topic per run.)

Phase 1, throughput: ``--events`` events (``--kind``: the limiter's allowed decisions, what a
limited request emits and the default, or ``metering.usage`` events) are written to a fresh
topic first; then
(a) a raw aiokafka consumer reads them all (the ceiling: fetch + no processing; its CPU per
event too), then ``bench_engine_ceiling.py`` stores as many prepared rows through the sink's
insert path alone (the other ceiling: store, no fetch; ``--no-engine`` skips it), and
(b) the worker (a subprocess, exactly as deployed) consumes the same topic from the beginning:
decode + validate + dedupe + ClickHouse insert + progress + commit. Its rate is measured
from its first committed offset to the last (start-up excluded), by polling the group's
committed offsets.
Phase 2, delay and memory: events are produced at half the measured worker rate for
``--minutes``; the end-to-end delay (event time = emit time, to the insert having returned,
i.e. queryable) comes from the worker's ``streams_end_to_end_delay_seconds`` histogram
(Prometheus, bucket bounds), and the worker's RSS is sampled every 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from procstat import cpu_seconds, rss_mb

from metering.commands.argtypes import positive
from metering.settings import Settings
from metering.topics import drop_topics

ROOT = Path(__file__).resolve().parents[1]
TENANTS = [f"bench-{i:03d}" for i in range(200)]


#: what the events are: "decisions" (the limiter's, allowed) or "usage" (set by --kind)
KIND = {"kind": "decisions"}


def event_bytes(i: int, when: dt.datetime) -> tuple[bytes, bytes]:
    tenant = TENANTS[i % len(TENANTS)]
    t = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if KIND["kind"] == "decisions":
        typ, decision = "metering.ratelimit", ',"decision":"allowed"'
    else:
        typ, decision = "metering.usage", ""
    return tenant.encode(), (
        f'{{"specversion":"1.0","id":"{uuid.uuid4()}","source":"urn:bench",'
        f'"type":"{typ}","subject":"{tenant}","time":"{t}",'
        f'"data":{{"meter":"requests","quantity":1.0,"dimensions":{{"route":"/v1/x"}}{decision}}}}}'
    ).encode()


async def produce(
    bootstrap: str, topic: str, n: int, partitions: int, rate: float | None = None
) -> float:
    """Write ``n`` events (tenant i % 200 always to partition (i % 200) % partitions), in
    producer batches of up to 500 events per partition, paced to ``rate`` per second if given."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.monotonic()
    try:
        i = 0
        while i < n:
            chunk = min(500 * partitions, n - i)
            if rate is not None:
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            now = dt.datetime.now(dt.UTC)
            batches = [producer.create_batch() for _ in range(partitions)]
            for j in range(i, i + chunk):
                key, value = event_bytes(j, now)
                batches[(j % len(TENANTS)) % partitions].append(
                    key=key, value=value, timestamp=None
                )
            sends = [
                await producer.send_batch(b, topic, partition=p)
                for p, b in enumerate(batches)
                if b.record_count()
            ]
            await asyncio.gather(*sends)
            i += chunk
    finally:
        await producer.stop()
    return time.monotonic() - started


async def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    got, started = 0, None
    try:
        while got < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if batch and started is None:
                started = time.monotonic()
            got += sum(len(v) for v in batch.values())
        return n / (time.monotonic() - (started or time.monotonic()))
    finally:
        await consumer.stop()


def engine_ceiling(events: int, batch_size: int, partitions: int) -> dict[str, float]:
    """``bench_engine_ceiling.py``'s figures for the same number of events, in its own process."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("bench_engine_ceiling.py")),
         "--events", str(events), "--batch-size", str(batch_size),
         "--partitions", str(partitions), "--kind", KIND["kind"]],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(c.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        c.close(autocommit=False)


def histogram(port: int, name: str) -> list[tuple[float, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M):
        out.append((float(m.group(1)), float(m.group(2))))
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return float("inf")


#: the worker's histograms watched per 10 s window in phase 2, and the bound (a bucket's) above
#: which an observation counts as slow
WATCHED = {"streams_end_to_end_delay_seconds": 1.5, "streams_sink_insert_seconds": 1.0}


def over_count(buckets: list[tuple[float, float]], bound: float) -> float:
    """How many observations of a (cumulative) histogram lie above ``bound``."""
    total = buckets[-1][1] if buckets else 0.0
    below = max((c for le, c in buckets if le <= bound), default=0.0)
    return total - below


def diff(after: list[tuple[float, float]], before: list[tuple[float, float]]):  # type: ignore[no-untyped-def]
    b = dict(before)
    return [(le, c - b.get(le, 0.0)) for le, c in after]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument(
        "--batch-size", type=int, default=Settings.model_fields["worker_batch_size"].default
    )
    ap.add_argument("--batch-within", type=float, default=0.5)
    ap.add_argument("--lateness", type=float, default=120.0)
    ap.add_argument(
        "--kind",
        choices=("decisions", "usage"),
        default="decisions",
        help="the limiter's allowed decisions (what a limited request emits), or usage events",
    )
    ap.add_argument("--metrics-port", type=int, default=19108)
    ap.add_argument(
        "--phase2-rate",
        type=positive(float),
        default=None,
        help="events/s of phase 2 (default: half the worker's phase-1 rate, as issue 7 asks);"
        " a fixed rate compares code at the same load",
    )
    ap.add_argument(
        "--no-engine",
        dest="engine",
        action="store_false",
        help="skip the engine-alone measurement (bench_engine_ceiling.py) after the raw consumer",
    )
    args = ap.parse_args()
    KIND["kind"] = args.kind
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    base = f"bench-{uuid.uuid4().hex[:8]}"
    topic, dlq, group = f"{base}.events", f"{base}.dlq", base
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, args.partitions, 1), NewTopic(dlq, 1, 1)])
    admin.close()

    took = asyncio.run(produce(bootstrap, topic, args.events, args.partitions))
    print(f"produced {args.events} events in {took:.1f}s ({args.events / took:,.0f}/s)")
    raw_cpu0 = time.process_time()
    raw_rate = asyncio.run(raw_consume(bootstrap, topic, args.events))
    raw_cpu = (time.process_time() - raw_cpu0) / args.events  # all of this process's threads
    print(
        f"raw aiokafka consumer (ceiling): {raw_rate:,.0f} events/s, "
        f"{raw_cpu * 1e6:.1f} us CPU per event"
    )
    engine = engine_ceiling(args.events, args.batch_size, args.partitions) if args.engine else None
    if engine is not None:
        bound = (os.cpu_count() or 1) / (raw_cpu + engine["cpu_us_per_row"] / 1e6)
        print(
            f"engine alone (bench_engine_ceiling.py: the sink's insert of prepared rows, "
            f"rollups included): {engine['rows_per_s']:,.0f} rows/s, "
            f"{engine['cpu_us_per_row']:.1f} us CPU per row; fetch + store bound any worker at "
            f"{bound:,.0f} events/s on {os.cpu_count()} CPUs ({bound / raw_rate:.2f}x the raw "
            "consumer) with no Python work per event"
        )

    data = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "QUOTA_DB"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        USAGE_EVENTS_TOPIC=topic,
        USAGE_EVENTS_DLQ_TOPIC=dlq,
        USAGE_EVENTS_PARTITIONS=str(args.partitions),
        WORKER_GROUP=group,
        WORKER_BATCH_SIZE=str(args.batch_size),
        WORKER_BATCH_WITHIN=str(args.batch_within),
        WORKER_METRICS_PORT=str(args.metrics_port),
        EVENT_MAX_LATENESS=str(args.lateness),
        METERING_DATA_DIR=str(data),
    )
    log = open(data / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "metering.cli", "worker"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    sink_group = f"{group}.sink"
    try:
        first_at = first_n = None
        first_cpu = 0.0
        deadline = time.monotonic() + 600
        done = 0
        while done < args.events and time.monotonic() < deadline:
            if worker.poll() is not None:
                print(f"worker exited with {worker.returncode}; its log: {data / 'worker.log'}")
                return 1
            done = committed_total(bootstrap, sink_group, topic, args.partitions)
            if done and first_at is None:
                first_at, first_n, first_cpu = time.monotonic(), done, cpu_seconds(worker.pid)
            time.sleep(0.2)
        if done < args.events:
            print(f"worker did not finish: {done}/{args.events} committed")
            return 1
        assert first_at is not None and first_n is not None
        worker_rate = (args.events - first_n) / (time.monotonic() - first_at)
        worker_cpu = cpu_seconds(worker.pid) - first_cpu
        print(
            f"worker: {worker_rate:,.0f} events/s (batch_size={args.batch_size}, "
            f"batch_within={args.batch_within}s, {args.partitions} partitions); "
            f"ratio to raw consumer {worker_rate / raw_rate:.2f}"
            + (
                f", to the engine alone {worker_rate / engine['rows_per_s']:.2f}"
                if engine is not None
                else ""
            )
        )
        # On a shared machine the wall-clock rate is the share of the CPUs the worker got; the
        # CPU time it used per event is the cost of an event (ClickHouse's threads included).
        per_event = worker_cpu / max(1, args.events - first_n)
        print(
            f"worker CPU: {per_event * 1e6:.1f} us per event ({1 / per_event:,.0f} events per "
            f"CPU-second); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(f"worker RSS after phase 1: {rss_mb(worker.pid):.0f} MB")

        rate = args.phase2_rate or worker_rate / 2
        seconds = args.minutes * 60
        n2 = int(rate * seconds)
        print(f"phase 2: {n2} events at {rate:,.0f}/s for {seconds:.0f}s")
        before = histogram(args.metrics_port, "streams_end_to_end_delay_seconds")
        samples: list[tuple[float, float]] = []

        slow: list[str] = []  # the 10 s windows with a slow delay sample or insert

        async def sample_rss() -> None:
            t0 = time.monotonic()
            last = {n: histogram(args.metrics_port, n) for n in WATCHED}
            while True:
                samples.append((time.monotonic() - t0, rss_mb(worker.pid)))
                await asyncio.sleep(10)
                now = {n: histogram(args.metrics_port, n) for n in WATCHED}
                over = {n: over_count(diff(now[n], last[n]), b) for n, b in WATCHED.items()}
                if any(over.values()):
                    slow.append(
                        f"{time.monotonic() - t0:.0f}s: "
                        + ", ".join(f"{n.split('_', 1)[1]} {c:.0f}" for n, c in over.items())
                    )
                last = now

        async def phase2() -> float:
            sampler = asyncio.create_task(sample_rss())
            try:
                return await produce(bootstrap, topic, n2, args.partitions, rate=rate)
            finally:
                sampler.cancel()

        took2 = asyncio.run(phase2())
        target = args.events + n2
        deadline = time.monotonic() + 120
        while committed_total(bootstrap, sink_group, topic, args.partitions) < target:
            if time.monotonic() > deadline:
                print("worker fell behind in phase 2")
                break
            time.sleep(0.5)
        after = histogram(args.metrics_port, "streams_end_to_end_delay_seconds")
        delay = diff(after, before)
        print(
            f"phase 2 produced at {n2 / took2:,.0f}/s; end-to-end delay (bucket upper bounds): "
            f"p50 <= {quantile(delay, 0.5)}s, p99 <= {quantile(delay, 0.99)}s"
        )
        print("delay histogram (le: count): " + ", ".join(f"{le:g}: {c:.0f}" for le, c in delay))
        print("worker RSS (s, MB): " + ", ".join(f"({t:.0f}, {m:.0f})" for t, m in samples))
        print(
            "10 s windows with delay samples over 1.5 s or inserts over 1 s (window end: counts): "
            + ("; ".join(slow) or "none")
        )
        if len(samples) >= 4:
            half = len(samples) // 2
            first_half = sum(m for _, m in samples[:half]) / half
            second_half = sum(m for _, m in samples[half:]) / (len(samples) - half)
            print(f"RSS mean first half {first_half:.0f} MB, second half {second_half:.0f} MB")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        # The run's topics (events, dead letters, Faust's changelogs) would pile up in a
        # long-lived dev Kafka: every run makes fresh ones.
        drop_topics(bootstrap, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
