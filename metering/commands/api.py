"""``metering api [--host H] [--port P]``: serve the HTTP API with uvicorn.

SIGINT/SIGTERM stop it gracefully: uvicorn stops accepting, finishes requests in flight, then the
app's shutdown flushes the emitter (events not yet in Kafka stay in the durable spool). With Kafka
unreachable the API still serves; events wait in the spool.
"""

from __future__ import annotations

import argparse
from typing import Any

from metering.commands import settle_heap
from metering.commands.argtypes import tcp_port
from metering.settings import load_settings

GRACEFUL_SHUTDOWN_SECONDS = 15


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


def server_config(app: Any, host: str, port: int, log_level: str = "info", **extra: Any) -> Any:
    """The uvicorn configuration ``metering api`` serves with (the benchmark serves with it too);
    ``extra``: more ``uvicorn.Config`` arguments."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        **extra,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from metering.api import create_app
    from metering.commands.store_errors import forget_holder, record_holder
    from metering.commands.up import warn_or_refuse_redis

    settings = load_settings()
    warn_or_refuse_redis(settings)
    app = create_app(settings)
    settle_heap()
    server = uvicorn.Server(server_config(app, args.host, args.port, args.log_level))
    # Who holds the embedded engine once it opens, for `metering reconcile`/`usage` beside it.
    record = record_holder(settings.clickhouse_url, "api", args.host, args.port)
    try:
        server.run()
    finally:
        forget_holder(record)
    return 0 if server.started else 1
