"""``metering worker``: run the streams worker (Faust app: sink, tables, quota backfill)."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = sub.add_parser(
        "worker", help="consume usage.events into ClickHouse and backfill the quota DB"
    )
    worker.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from metering.settings import get_settings

    settings = get_settings()  # a bad setting fails here, named, before Faust starts
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    from metering.quota_db import migrate as migrate_quota_db
    from metering.topics import ensure_topics, pipeline_topics

    ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))
    migrate_quota_db(settings.quota_db_url)

    import faust

    from streams.app import app

    level = "debug" if args.verbose else "info"
    worker = faust.Worker(app, loglevel=level, quiet=True)
    logging.getLogger("faust").setLevel(logging.WARNING)
    worker.execute_from_commandline()
    return 0
