"""Emitter benchmark: the caller's cost of ``emit`` and the delivered rate, beside a raw
kafka-python producer sending the same payloads in the same run; and the process's memory while
Kafka is down (the spool, not RAM, should absorb the backlog).

    python benchmarks/bench_emitter.py [--events 50000] [--down-events 200000]

Targets (issue 5): emit p99 < 50 µs for the caller; delivered rate >= 0.8x the raw producer's;
RSS bounded while Kafka is unreachable. Uses KAFKA_BOOTSTRAP_SERVERS (default 127.0.0.1:9092).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer
from prometheus_client import REGISTRY

from metering.emitter import Emitter, EmitterMode, producer_config
from metering.events import UsageEvent, encode_event, usage_event
from metering.topics import TopicSpec, drop_topics, ensure_topics


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def delivered() -> float:
    return REGISTRY.get_sample_value("metering_events_delivered_total") or 0.0


def make_events(n: int) -> list[UsageEvent]:
    return [
        usage_event(f"tenant-{i % 50}", "api.calls", 1, {"route": "/v1/search", "seq": str(i)})
        for i in range(n)
    ]


def pace_until(start: float, i: int, rate: float | None) -> None:
    """Sleep until event ``i`` is due at ``rate`` events/s (no pacing when rate is None)."""
    if rate:
        due = start + i / rate
        if (ahead := due - time.perf_counter()) > 0:
            time.sleep(ahead)


def bench_raw(
    bootstrap: str, topic: str, events: list[UsageEvent], rate: float | None = None
) -> tuple[float, float, float]:
    payloads = [(ev.subject.encode(), encode_event(ev)) for ev in events]
    producer = KafkaProducer(**producer_config(bootstrap, client_id="bench-raw"))
    producer.send(topic, value=payloads[0][1], key=payloads[0][0]).get(timeout=30)
    lat = []
    gc.disable()
    start = time.perf_counter()
    for i, (key, value) in enumerate(payloads):
        pace_until(start, i, rate)
        t0 = time.perf_counter()
        producer.send(topic, value=value, key=key)
        lat.append(time.perf_counter() - t0)
    producer.flush(timeout=120)
    elapsed = time.perf_counter() - start
    gc.enable()
    producer.close()
    return len(payloads) / elapsed, pct(lat, 0.5), pct(lat, 0.99)


def bench_emitter(
    bootstrap: str, topic: str, events: list[UsageEvent], rate: float | None = None
) -> tuple[float, float, float, int]:
    with tempfile.TemporaryDirectory() as spool:
        em = Emitter(bootstrap, topic=topic, spool_dir=spool)
        em.emit(events[0])
        while em.mode is not EmitterMode.DIRECT:
            time.sleep(0.01)
        assert em.flush(30)
        base = delivered()
        lat = []
        gc.disable()
        start = time.perf_counter()
        for i, ev in enumerate(events):
            pace_until(start, i, rate)
            t0 = time.perf_counter()
            em.emit(ev)
            lat.append(time.perf_counter() - t0)
        while delivered() - base < len(events):
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        gc.enable()
        em.close(30)
        spooled = int(REGISTRY.get_sample_value("metering_events_spooled_total") or 0)
    return len(events) / elapsed, pct(lat, 0.5), pct(lat, 0.99), spooled


def bench_down(n: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as spool:
        em = Emitter(dead, topic="usage.events", spool_dir=spool)
        gc.collect()
        before = rss_mib()
        samples = []
        step = n // 10
        for i in range(n):
            em.emit(usage_event(f"tenant-{i % 50}", "api.calls", 1, {"seq": str(i)}))
            if (i + 1) % step == 0:
                samples.append((i + 1, rss_mib(), em.spool.pending_bytes / 2**20))
        em.flush(60)
        em.close(5)
        spool_mib = sum(p.stat().st_size for p in Path(spool).rglob("*.seg")) / 2**20
        dropped = sum(
            REGISTRY.get_sample_value("metering_events_dropped_total", {"reason": r}) or 0
            for r in ("queue_full", "spool_full")
        )
    print(f"\nKafka down ({dead}, nothing listening): {n} events emitted")
    print(f"  RSS before: {before:.1f} MiB")
    for count, rss, spooled in samples:
        print(f"  after {count:>7} events: RSS {rss:6.1f} MiB, spool {spooled:6.1f} MiB")
    first_half = max(r for c, r, _ in samples[: len(samples) // 2])
    second_half = max(r for c, r, _ in samples[len(samples) // 2 :])
    print(
        f"  spool on disk at close: {spool_mib:.1f} MiB; dropped: {int(dropped)}; "
        f"RSS peak first half {first_half:.1f} MiB, second half {second_half:.1f} MiB "
        f"(growth {second_half - first_half:+.1f} MiB while the spool grew "
        f"{samples[-1][2] - samples[len(samples) // 2 - 1][2]:.1f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--down-events", type=int, default=200_000)
    parser.add_argument("--paced-rate", type=float, default=2000.0)
    parser.add_argument("--paced-events", type=int, default=10_000)
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    topic = f"bench.emitter.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [TopicSpec(topic, partitions=6, retention_ms=3_600_000)])
    try:
        events = make_events(args.events)
        print(f"{args.events} events of ~{len(encode_event(events[0]))} bytes, 50 tenants, {topic}")
        print("(shared 2-core machine: figures are noisy)\n")
        print("as fast as the caller can (a burst; the emitter may spool part of it):")
        print(f"{'':22}{'events/s':>10}{'p50 µs':>9}{'p99 µs':>9}")
        raw_rates, em_rates, em_p99s = [], [], []
        for r in range(args.rounds):
            rate, p50, p99 = bench_raw(bootstrap, topic, events)
            raw_rates.append(rate)
            print(f"raw producer send #{r + 1:<3}{rate:>10.0f}{p50 * 1e6:>9.1f}{p99 * 1e6:>9.1f}")
            rate, p50, p99, spooled = bench_emitter(bootstrap, topic, events)
            em_rates.append(rate)
            em_p99s.append(p99)
            print(
                f"Emitter.emit      #{r + 1:<3}{rate:>10.0f}{p50 * 1e6:>9.1f}{p99 * 1e6:>9.1f}"
                f"   (events spooled so far in this process: {spooled})"
            )
        ratio = statistics.median(em_rates) / statistics.median(raw_rates)
        print(
            f"\nemit p99 (median of rounds): {statistics.median(em_p99s) * 1e6:.1f} µs "
            f"(target < 50 µs); delivered rate / raw rate = {ratio:.2f} (target >= 0.8)"
        )
        print(
            f"\npaced at {args.paced_rate:.0f} events/s (a service's request path), "
            f"{args.paced_events} events:"
        )
        paced = events[: args.paced_events]
        for r in range(args.rounds):
            _, p50, p99 = bench_raw(bootstrap, topic, paced, args.paced_rate)
            print(f"raw producer send #{r + 1:<3}{'':>10}{p50 * 1e6:>9.1f}{p99 * 1e6:>9.1f}")
            _, p50, p99, _ = bench_emitter(bootstrap, topic, paced, args.paced_rate)
            print(f"Emitter.emit      #{r + 1:<3}{'':>10}{p50 * 1e6:>9.1f}{p99 * 1e6:>9.1f}")
    finally:
        drop_topics(bootstrap, topic)  # a fresh topic per run: do not let them pile up
    bench_down(args.down_events)


if __name__ == "__main__":
    main()
