"""``metering worker``: run the streams worker (Faust app: sink, tables, quota backfill)."""

from __future__ import annotations

import argparse
import logging

from metering.cli import CommandError
from metering.commands.argtypes import tcp_port_or_zero


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


def _run(args: argparse.Namespace) -> int:
    from metering.settings import get_settings

    settings = get_settings()  # a bad setting fails here, named, before Faust starts
    port = settings.worker_metrics_port if args.metrics_port is None else args.metrics_port
    if not 0 <= port <= 65535:
        raise CommandError(f"--metrics-port {port}: must be 0-65535")
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
