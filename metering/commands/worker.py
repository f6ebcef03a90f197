"""``metering worker``: run the streams worker (Faust app: sink, tables, quota backfill).

``metering worker-health``: whether a running worker makes progress, from its ``/metrics``
(a container health check): unhealthy when the metrics do not answer, or when messages wait
(``streams_consumer_lag`` above 0) and the sink has written nothing for ``--stuck-after``
seconds (``streams_sink_last_write_timestamp_seconds``). An idle worker, with nothing to
write, is healthy however long it has not written."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from metering.cli import CommandError
from metering.commands.argtypes import positive, tcp_port_or_zero


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = sub.add_parser(
        "worker", help="consume usage.events into ClickHouse and backfill the quota DB"
    )
    worker.add_argument(
        "--metrics-port",
        type=tcp_port_or_zero,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (default: WORKER_METRICS_PORT, 0 = off)",
    )
    worker.set_defaults(handler=_run)

    health = sub.add_parser(
        "worker-health",
        help="exit 0 if a running worker makes progress, 1 (and why) if it is stuck or silent",
    )
    health.add_argument(
        "--url",
        default=None,
        help="its /metrics (default: http://127.0.0.1:<WORKER_METRICS_PORT>/metrics)",
    )
    health.add_argument(
        "--stuck-after",
        type=positive(float),
        default=300.0,
        metavar="SECONDS",
        help="unhealthy when messages wait and nothing was written for this long (300)",
    )
    health.set_defaults(handler=_health)


def stuck_reason(metrics_text: str, now: float, stuck_after: float) -> str | None:
    """Why a worker whose ``/metrics`` read ``metrics_text`` is stuck at ``now``, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    lag = 0.0
    last_write: float | None = None
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "streams_consumer_lag":
            lag = sum(sample.value for sample in family.samples)
        elif family.name == "streams_sink_last_write_timestamp_seconds":
            last_write = max((sample.value for sample in family.samples), default=None)
    if last_write is None:
        return "its metrics have no streams_sink_last_write_timestamp_seconds (not a worker?)"
    idle = now - last_write
    if lag > 0 and idle > stuck_after:
        return (
            f"{lag:.0f} messages wait and the sink has written nothing for {idle:.0f}s "
            f"(more than {stuck_after:g}s)"
        )
    return None


def _health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        from metering.settings import get_settings

        port = get_settings().worker_metrics_port
        if not port:
            raise CommandError("WORKER_METRICS_PORT is 0 (no /metrics): pass --url")
        url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - an operator's URL
            text = r.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"metering worker-health: {url} does not answer: {exc}", file=sys.stderr)
        return 1
    reason = stuck_reason(text, time.time(), args.stuck_after)
    if reason is not None:
        print(f"metering worker-health: stuck: {reason}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from metering.settings import get_settings

    settings = get_settings()  # a bad setting fails here, named, before Faust starts
    # Both are checked already: the flag by its argument type, the setting by Settings.
    port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
    from metering.clickhouse.schema import migrate as migrate_clickhouse
    from metering.quota_db import migrate as migrate_quota_db
    from metering.topics import ensure_topics, pipeline_topics

    # Every store is reached (and migrated) here, before Faust starts: a store that fails now
    # raises out of this command, and metering.cli prints its one line (store_errors.py);
    # inside Faust the same error was a crash with a 100-line traceback.
    ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))
    migrate_quota_db(settings.quota_db_url)
    # ClickHouse: opened through clickhouse_client, which keeps one client per embedded
    # (chdb://) folder in this process, so the worker's own _clickhouse() (streams/app.py, in
    # its ClickHouse thread) gets this very client back rather than opening the folder twice; a
    # server's client is made again there.
    migrate_clickhouse(settings)
    settings.metering_data_dir.mkdir(parents=True, exist_ok=True)  # Faust's datadir goes here

    # The worker's heap is mostly long-lived (Faust, aiokafka, ClickHouse client): keep it out
    # of the collector, and collect the young generation every 1,000,000 allocations instead of
    # 700 (a sink batch allocates ~10 containers per event, alive until its insert: each young
    # collection walked them again; at 50,000 the collector was ~7% of the worker's CPU in
    # perf). The sink's batches make next to no cyclic garbage (7 objects per insert), so the
    # larger generation costs no memory: RSS after phase 1 ~730 MB either way.
    import faust

    from metering.commands import settle_heap
    from streams.app import app

    settle_heap((1_000_000, 20, 100))

    level = "debug" if args.verbose else "info"
    worker = faust.Worker(app, loglevel=level, quiet=True)
    logging.getLogger("faust").setLevel(logging.WARNING)
    worker.execute_from_commandline()
    return 0
