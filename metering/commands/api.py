"""``metering api [--host H] [--port P]``: serve the HTTP API with uvicorn.

SIGINT/SIGTERM stop it gracefully: uvicorn stops accepting, finishes requests in flight, then the
app's shutdown flushes the emitter (events not yet in Kafka stay in the durable spool). With Kafka
unreachable the API still serves; events wait in the spool.

Before serving, it refuses to start (one line, exit 1, as ``metering worker`` and ``metering db
migrate`` do) when the quota DB or ClickHouse was migrated by a newer release (a deploy rolled
back): its tables may not be what this code reads. The check only reads the stores' schema
versions; a store not migrated yet or unreachable is served as before (requests needing it fail,
``/readyz`` says which).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from metering.commands import settle_heap
from metering.commands.argtypes import tcp_port
from metering.settings import Settings, load_settings

log = logging.getLogger("metering.api")

#: uvicorn's graceful-shutdown timeout when none is given: ``API_SHUTDOWN_TIMEOUT``'s default
GRACEFUL_SHUTDOWN_SECONDS: int = Settings.model_fields["api_shutdown_timeout"].default
#: Seconds the start-up schema check waits for a ClickHouse server (then serves unchecked).
VERSION_CHECK_TIMEOUT = 5.0


_port = tcp_port  # the name `metering up` imports


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    api = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    api.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    api.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )
    api.set_defaults(handler=_serve)


def server_config(
    app: Any,
    host: str,
    port: int,
    log_level: str = "info",
    shutdown_timeout: int = GRACEFUL_SHUTDOWN_SECONDS,
    **extra: Any,
) -> Any:
    """The uvicorn configuration ``metering api`` serves with (the benchmark serves with it too);
    ``shutdown_timeout``: seconds the requests still running at a shutdown get before they are
    cancelled (``API_SHUTDOWN_TIMEOUT``); ``extra``: more ``uvicorn.Config`` arguments."""
    import uvicorn

    from metering.api.shutdown import AnswerCancelledAtShutdown

    return uvicorn.Config(
        # A request still running when the shutdown times out gets 503, not uvicorn's 500.
        AnswerCancelledAtShutdown(app),
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=shutdown_timeout,
        **extra,
    )


def check_clickhouse_version(url: str, database: str, timeout: float) -> None:
    """Raise :class:`metering.clickhouse.schema.NewerSchemaError` if ClickHouse was migrated by
    a newer release. Reads only; an embedded folder is opened for the check and closed again
    (the API opens it on its first usage query, as before), and one that another process holds
    (a worker) or that does not exist yet is not checked."""
    from metering.clickhouse.schema import check_not_newer
    from metering.commands.store_errors import _folder, embedded_folder_in_use

    folder = _folder(url)
    if folder is not None:
        if not folder.is_dir() or embedded_folder_in_use(url):
            return
        import clickhouse_connect

        client = clickhouse_connect.get_client(dsn=url)
    else:
        from metering.clickhouse.client import clickhouse_client

        client = clickhouse_client(url, timeout=timeout)
    try:
        check_not_newer(client, database)
    finally:
        client.close()


def check_store_versions(settings: Settings) -> None:
    """Refuse (raise) if a store was migrated by a newer release; a store that cannot be asked
    is logged and served as before."""
    from metering.clickhouse.schema import NewerSchemaError
    from metering.commands.store_errors import store_failure
    from metering.quota_db import NewerRevisionError, check_revision

    checks = [
        lambda: check_revision(settings.quota_db_url),
        lambda: check_clickhouse_version(
            settings.clickhouse_url,
            settings.clickhouse_database,
            min(VERSION_CHECK_TIMEOUT, settings.clickhouse_query_timeout),
        ),
    ]
    for check in checks:
        try:
            check()
        except (NewerRevisionError, NewerSchemaError):
            raise
        except Exception as exc:  # unreachable, held, not migrated: serve as without the check
            why = store_failure(exc, settings) or f"{type(exc).__name__}: {exc}"
            log.warning("schema version not checked at start: %s", why)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from metering.api import create_app
    from metering.commands.store_errors import forget_holder, record_holder
    from metering.commands.up import warn_or_refuse_redis

    settings = load_settings()
    warn_or_refuse_redis(settings)
    check_store_versions(settings)
    app = create_app(settings)
    settle_heap()
    server = uvicorn.Server(
        server_config(app, args.host, args.port, args.log_level, settings.api_shutdown_timeout)
    )
    # Who holds the embedded engine once it opens, for `metering reconcile`/`usage` beside it.
    record = record_holder(settings.clickhouse_url, "api", args.host, args.port)
    try:
        server.run()
    finally:
        forget_holder(record)
    return 0 if server.started else 1
