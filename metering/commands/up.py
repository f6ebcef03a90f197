"""``metering up``: the whole product in one process (embedded mode), and ``metering token``.

Services the settings name are used as they are; those not named (no ``RATE_LIMIT_REDIS_*``,
no ``KAFKA_BOOTSTRAP_SERVERS`` in the environment) are started from the local stack. The API and
the worker then run in ONE process, on one event loop, because the embedded ClickHouse engine
allows one process per data folder. Ctrl-C (SIGINT) or SIGTERM stops both cleanly: the worker
commits what it inserted, the API drains and flushes its emitter.

Without ``JWT_SECRET`` / ``JWT_PUBLIC_KEY`` a development secret is generated once under
``$METERING_DATA_DIR/jwt-secret`` (mode 0600); ``metering token TENANT [--admin]`` signs a token
with it, so a newcomer can call the API at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from metering.cli import CommandError
from metering.commands.api import _port  # the same port argument as `metering api`
from metering.settings import Settings, get_settings

log = logging.getLogger("metering.up")

REDIS_VARS = (
    "RATE_LIMIT_REDIS_URL",
    "RATE_LIMIT_REDIS_CLUSTER_NODES",
    "RATE_LIMIT_REDIS_SENTINELS",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="run the API and the worker in one process (embedded mode)")
    up.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    up.add_argument("--port", type=_port, default=8000, help="API port (default 8000)")
    up.add_argument(
        "--keep-services",
        action="store_true",
        help="leave the local Redis/Kafka it started running after it stops",
    )
    up.set_defaults(handler=_up)

    token = sub.add_parser("token", help="sign a JWT for a tenant (development secret)")
    token.add_argument("tenant", help="the tenant id the token speaks for")
    token.add_argument("--admin", action="store_true", help="add the metering:admin scope")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.set_defaults(handler=_token)


def dev_secret_path(settings: Settings) -> Path:
    return settings.metering_data_dir.resolve() / "jwt-secret"


def ensure_dev_secret(settings: Settings) -> str | None:
    """The JWT secret to use when the settings name none: made once, kept under the data dir."""
    if settings.jwt_secret or settings.jwt_public_key:
        return None
    path = dev_secret_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def sign_token(settings: Settings, tenant: str, *, admin: bool = False, ttl: int = 3600) -> str:
    import jwt

    from metering.ids import validate_tenant_id

    secret = settings.jwt_secret or ensure_dev_secret(settings)
    if not secret:
        raise CommandError("JWT_PUBLIC_KEY is set: tokens are signed by your identity provider")
    now = dt.datetime.now(dt.UTC)
    claims: dict[str, Any] = {
        "sub": validate_tenant_id(tenant),
        "tenant_id": tenant,
        "iat": now,
        "exp": now + dt.timedelta(seconds=ttl),
    }
    if admin:
        claims["scope"] = "metering:admin"
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, secret, algorithm="HS256")


def _token(args: argparse.Namespace) -> int:
    if args.ttl <= 0:
        raise CommandError("--ttl must be positive")
    try:
        print(sign_token(get_settings(), args.tenant, admin=args.admin, ttl=args.ttl))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0


def start_missing_services(settings: Settings) -> tuple[dict[str, str], list[str]]:
    """Start local Redis/Kafka for those the environment does not name; export their settings.
    Returns the settings exported and the services this call started (not those already up)."""
    from metering.localstack import StackError

    wanted = []
    if not any(os.environ.get(v) for v in REDIS_VARS):
        wanted.append("redis")
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        wanted.append("kafka")
    if not wanted:
        return {}, []
    stack = local_stack(settings)
    running = {name for name, st in stack.status().items() if st["healthy"]}
    try:
        env = stack.up(wanted)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    env.pop("METERING_DATA_DIR", None)
    os.environ.update(env)
    return env, [s for s in wanted if s not in running]


def local_stack(settings: Settings) -> Any:
    from metering.localstack import LocalStack

    return LocalStack(settings.metering_data_dir.resolve() / "stack")


def prepare(settings: Settings) -> None:
    """Migrations (quota DB, ClickHouse) and topics, all idempotent."""
    from metering.clickhouse.schema import migrate as migrate_clickhouse
    from metering.quota_db import migrate as migrate_quota_db
    from metering.topics import ensure_topics, pipeline_topics

    migrate_quota_db(settings.quota_db_url)
    migrate_clickhouse(settings)
    ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))


def _up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    settings = get_settings()
    exported, started = start_missing_services(settings)
    try:
        secret = ensure_dev_secret(settings)
        if secret:
            os.environ["JWT_SECRET"] = secret
        get_settings.cache_clear()
        settings = get_settings()
        prepare(settings)
        run_together(settings, args.host, args.port, started=exported, t0=t0)
    except SystemExit as exc:  # the worker leaves through SystemExit on a signal
        return int(exc.code or 0)
    finally:
        if started and not args.keep_services:
            local_stack(settings).down(started)
    return 0


def run_together(
    settings: Settings, host: str, port: int, *, started: dict[str, str], t0: float
) -> None:
    """Serve the API from inside the Faust worker's event loop, as one of its tasks."""
    import asyncio

    import clickhouse_connect
    import faust
    import uvicorn

    from metering.api.app import create_app
    from streams.app import app as worker_app

    # A connection of its own onto the same embedded engine: the worker's client is used from
    # the worker's ClickHouse thread only.
    api = create_app(
        settings, clickhouse=clickhouse_connect.get_client(dsn=settings.clickhouse_url)
    )

    class EmbeddedServer(uvicorn.Server):
        def install_signal_handlers(self) -> None:  # the worker owns SIGINT/SIGTERM
            pass

        @property
        def capture_signals(self) -> Any:  # uvicorn >= 0.29 uses this context manager
            import contextlib

            return contextlib.nullcontext

    server = EmbeddedServer(
        uvicorn.Config(
            api, host=host, port=port, log_level="warning", lifespan="on", access_log=False
        )
    )

    @worker_app.task
    async def serve_api() -> None:
        try:
            await server.serve()
        except asyncio.CancelledError:
            # The worker is stopping: drain connections and run the API's shutdown (which
            # flushes the emitter) before letting the cancellation through.
            server.should_exit = True
            await server.shutdown()
            raise

    @worker_app.task
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        base = f"http://{host}:{port}"
        lines = [
            f"metering up: API on {base} (docs {base}/docs, metrics {base}/metrics), "
            f"worker consuming {settings.usage_events_topic}; "
            f"ready in {time.monotonic() - t0:.1f}s",
        ]
        for key, value in started.items():
            lines.append(f"  started locally: {key}={value}")
        lines.append("  a token: metering token <tenant> [--admin]   stop: Ctrl-C")
        print("\n".join(lines), file=sys.stderr, flush=True)

    @worker_app.on_before_shutdown.connect  # type: ignore[misc]
    async def stop_api(app: Any, **_: Any) -> None:
        server.should_exit = True

    logging.getLogger("faust").setLevel(logging.WARNING)
    worker = faust.Worker(worker_app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()
