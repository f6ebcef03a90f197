"""``metering up``: the whole product in one process (embedded mode), and ``metering token``.

Services the settings name are used as they are; those not named (no ``RATE_LIMIT_REDIS_*``,
no ``KAFKA_BOOTSTRAP_SERVERS`` in the environment) are started from the local stack, side by
side. The API and the worker run in ONE process (the embedded ClickHouse engine allows one
process per data folder): the API on its own thread and event loop, serving its port from the
first second (``/healthz`` 200, everything else 503 "starting" until Redis answers and the
stores are migrated; :mod:`metering.embedded`), the worker on the main thread once Kafka
answers and the topics exist. ``/readyz`` does not wait for Kafka: events wait in the emitter's
spool. Ctrl-C (SIGINT) or SIGTERM stops both cleanly: the worker commits what it inserted, the
API drains and flushes its emitter.

Without ``JWT_SECRET`` / ``JWT_PUBLIC_KEY`` a development secret is generated once under
``$METERING_DATA_DIR/jwt-secret`` (mode 0600); ``metering token TENANT [--admin]`` signs a token
with it, so a newcomer can call the API at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metering.cli import CommandError
from metering.commands.api import _port  # the same port argument as `metering api`
from metering.commands.argtypes import bounded_int, tenant_id
from metering.settings import Settings, get_settings

log = logging.getLogger("metering.up")

MAX_TOKEN_TTL = 10 * 365 * 86400

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
    token.add_argument("tenant", type=tenant_id, help="the tenant id the token speaks for")
    token.add_argument("--admin", action="store_true", help="add the metering:admin scope")
    token.add_argument(
        "--ttl",
        type=bounded_int(1, MAX_TOKEN_TTL),
        default=3600,
        help=f"seconds until it expires (1-{MAX_TOKEN_TTL}, ten years)",
    )
    token.set_defaults(handler=_token)


def dev_secret_path(settings: Settings) -> Path:
    return settings.metering_data_dir.resolve() / "jwt-secret"


def ensure_dev_secret(settings: Settings) -> str | None:
    """The JWT secret to use when the settings name none: made once, kept under the data dir."""
    if settings.jwt_secret or settings.jwt_public_key:
        return None
    path = dev_secret_path(settings)
    if not path.exists():
        # Written whole under another name and linked into place: two first starts at once
        # (`metering up &` and `metering token`) both read one secret, never a half-written
        # one, and the second's link finds the first's file.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".jwt-secret-")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links (vfat, some network mounts)
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(Path(tmp).read_text())
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


def sign_token(settings: Settings, tenant: str, *, admin: bool = False, ttl: int = 3600) -> str:
    import jwt

    from metering.api.auth import algorithm_names
    from metering.ids import validate_tenant_id

    secret = settings.jwt_secret or ensure_dev_secret(settings)
    if not secret:
        raise CommandError("JWT_PUBLIC_KEY is set: tokens are signed by your identity provider")
    if not 0 < ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"ttl must be 1-{MAX_TOKEN_TTL} seconds (ten years), got {ttl}")
    # The API would refuse the token: say so here, not with a 401.
    if "HS256" not in algorithm_names(settings.jwt_algorithms.split(",")):
        raise CommandError(
            f"JWT_ALGORITHMS={settings.jwt_algorithms!r} does not accept HS256, the algorithm "
            "metering token signs with JWT_SECRET"
        )
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
    try:
        print(sign_token(get_settings(), args.tenant, admin=args.admin, ttl=args.ttl))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return 0


class KafkaStartingFilter(logging.Filter):
    """Drops the emitter's "connection refused" lines while the Kafka this process started is
    still starting (the API serves before it answers: refusals are expected, not news)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and "Connection refused" in record.getMessage())


EMITTER_KAFKA_LOGGER = "metering.emitter.librdkafka"
KAFKA_STARTING = KafkaStartingFilter()


def start_missing_services(settings: Settings) -> Any:
    """Begin starting local Redis/Kafka for those the environment does not name and export
    their settings at once (the ports are chosen before the servers answer). Returns the
    :class:`~metering.localstack.StackStart` (None when every service is named)."""
    from metering.localstack import LocalStack, StackError

    wanted = []
    if not any(os.environ.get(v) for v in REDIS_VARS):
        wanted.append("redis")
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        wanted.append("kafka")
    if not wanted:
        return None
    # A Kafka started here creates no topic because a client named it: events sent before the
    # pipeline's topics exist wait in the emitter's spool, and the topics get their partitions.
    stack = LocalStack(local_stack_root(settings), kafka_auto_create_topics=False)
    try:
        starting = stack.start(wanted)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    # Only the services asked for (StackStart.env): a stack that also runs PostgreSQL, a
    # Cluster or Sentinels (`metering dev up --all`) must not switch the quota DB or the Redis
    # mode behind the settings' back.
    env = dict(starting.env)
    env.pop("METERING_DATA_DIR", None)
    os.environ.update(env)
    return starting


def local_stack_root(settings: Settings) -> Path:
    return settings.metering_data_dir.resolve() / "stack"


def migrate(settings: Settings) -> None:
    """The quota DB and ClickHouse migrations, side by side (both idempotent)."""
    from concurrent.futures import ThreadPoolExecutor

    from metering.clickhouse.schema import migrate as migrate_clickhouse
    from metering.quota_db import migrate as migrate_quota_db

    with ThreadPoolExecutor(1, thread_name_prefix="migrate-quota-db") as pool:
        quota_db = pool.submit(migrate_quota_db, settings.quota_db_url)
        migrate_clickhouse(settings)
        quota_db.result()


def ensure_pipeline_topics(settings: Settings) -> None:
    from kafka.errors import KafkaError

    from metering.topics import ensure_topics, pipeline_topics

    try:
        ensure_topics(settings.kafka_bootstrap_servers, pipeline_topics(settings))
    except KafkaError as exc:
        raise CommandError(
            f"Kafka at {settings.kafka_bootstrap_servers} could not create the pipeline's "
            f"topics: {exc!r}"
        ) from None


def warn_or_refuse_redis(settings: Settings) -> None:
    """Refuse to start (SettingsError) when the limiter's Redis answers but refuses the
    configured connection (a database it lacks, wrong credentials) or is a Cluster node named
    as a single server; log a warning when it does not answer (the limiter decides by its fail
    mode until it does) or evicts keys at maxmemory (see ``check_redis_setup``)."""
    from limiter.redis_factory import check_redis_setup

    warning = check_redis_setup(settings)
    if warning:
        logging.getLogger("metering").warning(warning)


def _up(args: argparse.Namespace) -> int:
    """The start-up, soonest first: the local services begin starting and the API serves its
    port (answering "starting" for now) while the stores are migrated; the API opens once Redis
    answers and the migrations are done; the worker starts once Kafka answers and the topics
    exist. Ctrl-C at any point stops what was started."""
    from metering.commands.store_errors import forget_holder, record_holder
    from metering.embedded import ApiStartError
    from metering.localstack import LocalStack, StackError

    t0 = time.monotonic()
    settings = get_settings()
    starting = start_missing_services(settings)
    api = None
    # Who holds the embedded engine, for `metering reconcile`/`usage` beside this process.
    record = record_holder(settings.clickhouse_url, "up", args.host, args.port)
    try:
        secret = ensure_dev_secret(settings)
        if secret:
            os.environ["JWT_SECRET"] = secret
        get_settings.cache_clear()
        settings = get_settings()
        own_kafka = starting is not None and "kafka" in starting.started
        if own_kafka:
            logging.getLogger(EMITTER_KAFKA_LOGGER).addFilter(KAFKA_STARTING)
        api = embedded_api(settings, args.host, args.port, starting, t0)
        api.start()
        with _sigterm_as_interrupt():
            migrate(settings)
            if not own_kafka:  # Kafka is expected up: the topics before the first event
                ensure_pipeline_topics(settings)
            if starting is not None:
                starting.ready("redis")
            warn_or_refuse_redis(settings)
            api.open()
            if starting is not None:
                starting.wait()
            if own_kafka:
                ensure_pipeline_topics(settings)
            api.wait_serving()
        run_worker(settings, api, t0)
    except SystemExit as exc:  # the worker leaves through SystemExit on a signal
        return int(exc.code or 0)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) before the worker ran: a clean stop
        return 0
    except (StackError, ApiStartError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if api is not None:
            api.stop()
        forget_holder(record)
        if starting is not None:
            with contextlib.suppress(BaseException):
                starting.wait()  # the stack stays locked until every start has finished
            if starting.started and not args.keep_services:
                LocalStack(local_stack_root(settings)).down(starting.started)
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Until the worker (which handles SIGTERM itself) runs, SIGTERM stops like Ctrl-C."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def embedded_api(settings: Settings, host: str, port: int, starting: Any, t0: float) -> Any:
    """The API for this process: its own connection onto the embedded ClickHouse engine (the
    worker's client is used from the worker's ClickHouse thread only)."""
    from metering.embedded import EmbeddedApi

    def preload() -> None:
        import clickhouse_connect  # noqa: F401

        import metering.api.app  # noqa: F401

    def build() -> Any:
        import clickhouse_connect

        from metering.api.app import create_app

        return create_app(
            settings, clickhouse=clickhouse_connect.get_client(dsn=settings.clickhouse_url)
        )

    def announce() -> None:
        announce_api(f"http://{host}:{port}", starting, t0)

    return EmbeddedApi(host, port, build, preload=preload, on_serving=announce)


def announce_api(base: str, starting: Any, t0: float) -> None:
    lines = [
        f"metering up: API on {base} (docs {base}/docs, metrics {base}/metrics); "
        f"ready in {time.monotonic() - t0:.1f}s",
    ]
    if starting is not None:
        for key, value in starting.env.items():
            if key != "METERING_DATA_DIR":
                lines.append(f"  started locally: {key}={value}")
    lines.append("  a token: metering token <tenant> [--admin]   stop: Ctrl-C")
    print("\n".join(lines), file=sys.stderr, flush=True)


def run_worker(settings: Settings, api: Any, t0: float) -> None:
    """The Faust worker, on the main thread's event loop (it owns SIGINT/SIGTERM), until a
    signal stops it; the API is told to stop at the same time."""
    import faust

    settings.metering_data_dir.mkdir(parents=True, exist_ok=True)  # Faust's datadir goes here
    from streams.app import app as worker_app

    @worker_app.task
    async def announce() -> None:
        KAFKA_STARTING.active = False
        print(
            f"metering up: worker consuming {settings.usage_events_topic}; "
            f"in {time.monotonic() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )

    @worker_app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_api(app: Any, **_: Any) -> None:
        if api.server is not None:
            api.server.should_exit = True  # drains while the worker stops

    logging.getLogger("faust").setLevel(logging.WARNING)
    worker = faust.Worker(worker_app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()
