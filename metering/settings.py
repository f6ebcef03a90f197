"""Settings: one validated object, read from environment variables.

Every name DESIGN.md and the seed note give is kept verbatim as the environment variable
(``TENANT_QUOTA_CACHE_TTL``, ``RATE_LIMIT_REDIS_URL``, ...). A bad value stops start-up with a
:class:`SettingsError` whose message names the variable and the value it had.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from metering.redact import MASK, redact

HostPort = tuple[str, int]

#: A number of seconds, a rate: > 0 and finite (pydantic's PositiveFloat takes ``inf``, with
#: which a breaker would never half-open and a ceiling would not limit).
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]

HOUR = 3600
DAY = 86_400
#: The most ``EVENT_MAX_LATENESS`` may be: a batch's rows span this many daily partitions of
#: ``usage_events`` at most (ClickHouse refuses an insert into more than 100), and the recent-id
#: set holds every id for this long.
MAX_LATENESS_SECONDS = 31 * DAY
#: Costs are Lua doubles in the limiter's scripts (``limiter.core.MAX_COST``).
MAX_ROUTE_COST = 2**53
RouteCost = Annotated[int, Field(ge=1, le=MAX_ROUTE_COST, strict=True)]


#: The emitter's Kafka producers (``EMITTER_KAFKA_CLIENT``).
KafkaClient = Literal["confluent", "kafka-python"]


def _check_host_port(parts: SplitResult) -> None:
    """A network URL names a host, and its port (if any) is a valid one."""
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"has a bad port ({exc})") from None


def _check_data_dir(path: Path) -> None:
    """``path`` is a folder, or can be made one: it is not something else (a file, a dangling
    link), and its nearest existing ancestor is a folder this process may write in. Nothing is
    made here."""
    where = Path(os.path.abspath(path))  # relative to the working folder, as mkdir would read it
    try:
        if where.is_dir():
            return
        if os.path.lexists(where):
            raise ValueError(f"must be a folder: {where} exists and is not one")
        ancestor = where.parent
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ValueError(
                f"must be a folder or a path where one can be made: {ancestor} is not a folder"
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(
                f"must be a folder or a path where one can be made: {ancestor} is not writable"
            )
    except OSError as exc:  # a parent that may not be searched, a name too long, ...
        raise ValueError(f"cannot be used as a folder ({exc})") from None


#: settings whose values no message shows
SECRET_FIELDS = frozenset({"jwt_secret", "rate_limit_redis_password"})
MIN_HS256_KEY_BYTES = 32


class SettingsError(ValueError):
    """A setting has a value the product cannot run with; the message names the variable."""


def parse_host_ports(value: str | list[Any] | None) -> list[HostPort]:
    """Parse ``host:port,host:port`` (IPv6 as ``[::1]:port``) into a list of pairs."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [p for p in value.split(",") if p.strip()]
    out: list[HostPort] = []
    for item in items:
        if isinstance(item, tuple | list) and len(item) == 2:
            host, port_s = str(item[0]), str(item[1])
        else:
            text = str(item).strip()
            host, sep, port_s = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not host:port")
            host = host.strip("[]")
        if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
            raise ValueError(f"{item!r} has no valid port (1-65535)")
        out.append((host, int(port_s)))
    return out


HostPortList = Annotated[list[HostPort], NoDecode]


class Settings(BaseSettings):
    """Every setting of the product. Field names map to environment variables (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", validate_default=True
    )

    # --- where local state lives -------------------------------------------------------------
    metering_data_dir: Path = Field(
        Path("./var"), description="Embedded engine, spool, local stack."
    )

    # --- limiter / Redis (names from the seed note) ---------------------------------------------
    tenant_quota_cache_ttl: PositiveInt = Field(
        30, le=DAY, description="Seconds a quota stays in Redis (at most a day)."
    )
    rate_limit_redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Single Redis node: redis://, rediss:// (TLS) or unix://.",
    )
    rate_limit_redis_cluster_nodes: HostPortList = Field(
        default_factory=list,
        description="host:port,... of Redis Cluster nodes; when set, Cluster is used.",
    )
    rate_limit_redis_sentinels: HostPortList = Field(
        default_factory=list,
        description="host:port,... of Sentinels; when set (and no Cluster), Sentinel is used.",
    )
    rate_limit_redis_sentinel_master: str = Field(
        "mymaster", min_length=1, description="The master name the Sentinels monitor."
    )
    rate_limit_redis_password: str | None = Field(
        None, description="Password for Redis (Sentinel and Cluster modes; a URL carries its own)."
    )
    rate_limit_redis_socket_timeout: PositiveFloat = Field(
        0.25, le=HOUR, description="Seconds a Redis call may take before it counts as a failure."
    )
    rate_limit_redis_connect_timeout: PositiveFloat = Field(
        0.5, le=HOUR, description="Seconds to connect to Redis before it counts as a failure."
    )
    rate_limit_fail_mode: Literal["open", "closed"] = Field(
        "open",
        description="While Redis is down: open lets requests through, closed answers 503.",
    )
    rate_limit_breaker_failures: PositiveInt = Field(
        3, description="Consecutive Redis failures that open the circuit breaker."
    )
    rate_limit_breaker_reset: PositiveFloat = Field(
        1.0, le=HOUR, description="Seconds the breaker stays open before a half-open probe."
    )
    rate_limit_local_ceiling_per_sec: PositiveFloat = Field(
        100.0, description="Per-process, per-tenant ceiling while Redis is down."
    )
    rate_limit_shadow_mode: bool = Field(
        False, description="Decide and count, but never block (dry run of new limits)."
    )
    rate_limit_emit_decisions: bool = Field(
        True,
        description=(
            "Emit every limiter decision as a metering.ratelimit usage event. They are what"
            " tenant_daily_usage totals by default (WORKER_BACKFILL_MEASURE): off, a lost daily"
            " counter is seeded with 0 unless the measure is meter."
        ),
    )

    # --- quotas --------------------------------------------------------------------------------
    quota_db_url: str = Field(
        "", description="sqlite:///… (default under the data dir) or postgresql://…"
    )
    quota_local_ttl: PositiveFloat = Field(
        5.0, le=DAY, description="Seconds a quota lives in process memory."
    )
    quota_unknown_tenant: Literal["default", "reject"] = Field(
        "default",
        description="A tenant with no quota: default gets QUOTA_DEFAULT_PLAN, reject refuses it.",
    )
    quota_default_plan: str = Field(
        "free", description="Plan for unknown tenants (free, pro, enterprise)."
    )

    # --- Kafka ---------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="host:port,... of the Kafka brokers."
    )
    usage_events_topic: str = Field(
        "usage.events",
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Topic of usage events (key = tenant).",
    )
    usage_events_dlq_topic: str = Field(
        "usage.events.dlq",
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Topic of dead letters (original bytes and the reason).",
    )
    usage_events_partitions: PositiveInt = Field(
        6, description="Partitions of the usage topic when created (half that for the DLQ)."
    )
    usage_events_retention_ms: PositiveInt = Field(
        7 * 24 * 3600 * 1000, description="Retention of the usage topic."
    )
    usage_events_dlq_retention_ms: PositiveInt = Field(
        30 * 24 * 3600 * 1000, description="Retention of the dead-letter topic."
    )
    emitter_spool_max_bytes: PositiveInt = Field(
        256 * 1024 * 1024,
        description="Disk the emitter's spool may use while Kafka is away (then: drop, count).",
    )
    emitter_kafka_client: KafkaClient = Field(
        "confluent",
        description="The emitter's producer: librdkafka (confluent-kafka, native threads, a few "
        "us per event) or pure-Python kafka-python (~100-200 us per event under the GIL).",
    )

    # --- events --------------------------------------------------------------------------------
    event_max_future_skew: PositiveFloat = Field(
        300.0, le=DAY, description="Seconds an event may be ahead (at most a day)."
    )
    event_max_lateness: PositiveFloat = Field(
        3 * 3600.0,
        le=MAX_LATENESS_SECONDS,
        description=(
            "Seconds after which an event is too late to count (dead letter); at most 31 days"
            " and less than CLICKHOUSE_RETENTION_DAYS."
        ),
    )

    # --- ClickHouse ----------------------------------------------------------------------------
    clickhouse_url: str = Field(
        "", description="chdb:///path (default under the data dir) or http(s)://…"
    )
    clickhouse_database: str = Field(
        "metering",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="ClickHouse database of the tables.",
    )
    clickhouse_query_timeout: PositiveFloat = Field(
        30.0,
        le=HOUR,
        description="Seconds an API or CLI query to a ClickHouse server may wait for its answer"
        " (then 503 / a one-line error); the worker's inserts keep the client's 300.",
    )
    clickhouse_retention_days: PositiveInt = Field(
        400,
        # The TTL is a DateTime (seconds, to 2106): today + ~29,000 days wraps into the past,
        # and the tables deleted every row as they stored it (the billing audit, 36,500).
        le=10000,
        description="Days usage_events and its rollups keep rows (table TTL, applied by every"
        " migration, so a change reaches existing tables); at most 10000.",
    )

    # --- streams worker ------------------------------------------------------------------------
    worker_batch_size: PositiveInt = Field(
        50000,
        description=(
            "Most events the sink inserts in one batch (an insert has a fixed cost and makes"
            " parts to merge: larger batches cost less per event; WORKER_BATCH_WITHIN bounds"
            " the wait)."
        ),
    )
    worker_batch_within: PositiveFloat = Field(
        0.5, le=60, description="Seconds the sink waits to fill a batch."
    )
    worker_backfill_interval: PositiveFloat = Field(
        5.0, le=HOUR, description="Seconds between upserts of daily totals into the quota DB."
    )
    worker_table_sweep_interval: PositiveFloat = Field(
        60.0,
        le=HOUR,
        description="Seconds between sweeps of the Faust tables: closed days and expired"
        " windows leave them, with a changelog tombstone.",
    )
    worker_aggregate_interval: PositiveFloat = Field(
        5.0,
        le=HOUR,
        description=(
            "Seconds between hand-offs of the inserted events' per-minute sums to the Faust"
            " tables (the live per-day and sliding-window view). Each hand-off updates every"
            " (tenant, minute) touched since the last one: shorter is fresher and costs more."
        ),
    )
    worker_session_timeout: float | None = Field(
        None,
        ge=6,
        le=300,
        description=(
            "Seconds Kafka waits for a silent worker before giving its partitions to the others"
            " (Faust's broker_session_timeout and the sink consumer's session timeout); unset,"
            " Faust keeps its 60 s and the sink takes 45 s (Kafka's consumer default since 3.0;"
            " aiokafka's 10 s evicted a worker whose process stalled briefly). After a crash, a"
            " restarted or surviving worker resumes after about this long."
        ),
    )
    worker_instance_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description=(
            "Kafka static membership (group.instance.id) for this worker: unique per worker and"
            " stable across its restarts (a StatefulSet pod name, a host name). A worker"
            " restarted with the same id takes its partitions back at once instead of after the"
            " session timeout; unset, membership is dynamic."
        ),
    )
    worker_group: str = Field(
        "metering-worker",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Faust app id; the sink's Kafka consumer group is <worker_group>.sink.",
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (0 = off)."
    )
    worker_backfill_measure: Literal["decisions", "meter"] = Field(
        "decisions",
        description=(
            "What tenant_daily_usage holds (the seed of a lost daily counter, and what"
            " reconcile compares): decisions = the cost of the limiter's allowed decisions on"
            " every meter, as the daily counter counts it; meter = the billable usage of"
            " WORKER_BACKFILL_METER (services that meter with usage events of their own)."
        ),
    )
    worker_backfill_meter: str = Field(
        "requests",
        description=(
            "Meter whose billable daily totals go to tenant_daily_usage when"
            " WORKER_BACKFILL_MEASURE=meter."
        ),
    )

    # --- HTTP API ------------------------------------------------------------------------------
    jwt_secret: str | None = Field(
        None,
        description="HS256 key of API tokens (metering up makes a dev one if no key is set).",
    )
    jwt_public_key: str | None = Field(
        None, description="PEM (or a path to one) for RS256/ES256 API tokens."
    )
    jwt_audience: str | None = Field(
        None,
        description="Required aud claim of API tokens; unset, tokens with an aud are refused.",
    )
    jwt_algorithms: str = Field("HS256,RS256,ES256", description="Token algorithms accepted.")
    jwt_leeway: float = Field(
        10.0,
        ge=0,
        le=300,
        allow_inf_nan=False,
        description="Seconds of clock leeway for exp and nbf (0-300).",
    )
    api_max_batch: PositiveInt = Field(1000, description="Most events in one POST /v1/events.")
    api_max_body_bytes: PositiveInt = Field(
        4 * 1024 * 1024, description="Largest request body (413 beyond)."
    )
    api_ingest_lateness_margin: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None,
        description="Seconds of EVENT_MAX_LATENESS that POST /v1/events leaves to the pipeline: "
        "it refuses an event older than the lateness minus this, so what it accepts is still on "
        "time when the worker reads it (default: a tenth of the lateness, at most 300).",
    )
    api_ingest_future_margin: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None,
        description="Seconds of EVENT_MAX_FUTURE_SKEW that POST /v1/events leaves for clock "
        "differences between its host and the worker's: it refuses an event further ahead than "
        "the skew minus this, so what it accepts is not too far ahead by the worker's clock "
        "(default: a tenth of the skew, at most 30).",
    )
    api_ingest_ack_timeout: PositiveFloat = Field(
        10.0,
        le=300,
        description="Seconds POST /v1/events waits for its events to be acknowledged by Kafka "
        "or written to the spool before it answers 202 (503 after that: send them again, the "
        "worker counts a repeated id once).",
    )
    api_ingest_max_concurrent: PositiveInt = Field(
        32,
        le=10_000,
        description="POST /v1/events requests taken at once (read, checked, awaiting Kafka); "
        "one more is answered 503 with Retry-After before its body is read, so a burst of large "
        "batches cannot take the API's memory (each holds up to API_MAX_BODY_BYTES, and its "
        "events parsed).",
    )
    api_shutdown_timeout: PositiveInt = Field(
        15,
        le=3600,
        description="Whole seconds metering api gives the requests still running when it is "
        "told to stop (SIGTERM); then they are cancelled and answered 503 with Retry-After "
        "(the decisions Redis made for them are still emitted), and the emitter is flushed.",
    )
    api_opentelemetry: bool = Field(
        False,
        description="Let FastAPI trace and measure each request through the OpenTelemetry "
        "providers you configure (opentelemetry-instrument, an SDK). Off, no request pays for "
        "looking them up (~4 us).",
    )
    rate_limit_route_costs: dict[str, RouteCost] = Field(
        default_factory=dict,
        description='JSON: cost per route, e.g. {"POST /v1/events": 5, "/v1/usage": 2}; else 1.',
    )
    rate_limit_route_meters: dict[str, str] = Field(
        default_factory=dict,
        description='JSON: meter per route, e.g. {"/v1/usage": "queries"}; else "requests".',
    )

    # ----------------------------------------------------------------------------------------
    @field_validator("metering_data_dir")
    @classmethod
    def _data_dir(cls, v: Path) -> Path:
        """A folder, or a path where one can be made; checked here, made by whoever needs it."""
        _check_data_dir(v)
        return v

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret(cls, v: str | None) -> str | None:
        """RFC 7518 3.2: an HS256 key of at least 256 bits. A shorter one is found offline
        from any one token (a 3-byte key in 0.03 s), and with it an admin token is forged."""
        if v is not None and len(v.encode()) < MIN_HS256_KEY_BYTES:
            raise ValueError(
                f"{len(v.encode())} bytes; an HS256 key needs at least {MIN_HS256_KEY_BYTES} "
                "(RFC 7518 3.2): make one with `openssl rand -hex 32`"
            )
        return v

    @field_validator("rate_limit_redis_cluster_nodes", "rate_limit_redis_sentinels", mode="before")
    @classmethod
    def _host_ports(cls, v: Any) -> list[HostPort]:
        return parse_host_ports(v)

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix":
            _check_host_port(parts)
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"names database {database!r}; a Redis database is a number (/0)")
        from redis.connection import parse_url

        try:
            parse_url(v)  # redis-py's own reading of the query options (?socket_timeout=...)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        if not parse_host_ports(v):
            raise ValueError("names no host:port")
        return v

    @field_validator("quota_db_url")
    @classmethod
    def _quota_db(cls, v: str) -> str:
        if not v:
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError("is not a URL; use sqlite:///path or postgresql://host/db") from None
        if url.get_backend_name() not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        if url.get_backend_name() != "sqlite" and not url.host:
            raise ValueError("has no host")
        return v

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse(cls, v: str) -> str:
        if v:
            parts = urlsplit(v)
            if parts.scheme not in {"chdb", "http", "https", "clickhouse", "clickhouses"}:
                raise ValueError("must be chdb:///path or an http(s):// ClickHouse URL")
            if parts.scheme == "chdb" and not (parts.netloc + parts.path).strip("/"):
                raise ValueError("chdb:// names no folder (chdb:///path)")
            if parts.scheme != "chdb":
                _check_host_port(parts)
        return v

    @field_validator("quota_default_plan")
    @classmethod
    def _plan(cls, v: str) -> str:
        from metering.plans import plan_limits

        # QuotaError (a ValueError) naming the known plans, or saying that this one (custom)
        # has no limits to give an unknown tenant.
        plan_limits(v)
        return v

    @field_validator("worker_backfill_meter")
    @classmethod
    def _meter(cls, v: str) -> str:
        from metering.ids import InvalidIdentifier, validate_meter

        try:
            return validate_meter(v)
        except InvalidIdentifier as exc:
            raise ValueError(str(exc)) from None

    @field_validator("rate_limit_route_costs", "rate_limit_route_meters")
    @classmethod
    def _routes(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Route keys and meters, checked as ``RateLimitMiddleware`` will use them."""
        from limiter.middleware import build_route_rules

        if info.field_name == "rate_limit_route_costs":
            build_route_rules(costs=v)  # a ValueError naming the route
        else:
            build_route_rules(meters=v)
        return v

    @model_validator(mode="after")
    def _lateness_within_retention(self) -> Settings:
        if self.event_max_lateness >= self.clickhouse_retention_days * DAY:
            raise ValueError(
                f"EVENT_MAX_LATENESS={self.event_max_lateness:g}: must be less than"
                f" CLICKHOUSE_RETENTION_DAYS={self.clickhouse_retention_days} days (the table"
                " would delete rows as soon as it stored them)"
            )
        margin = self.api_ingest_lateness_margin
        if margin is not None and margin >= self.event_max_lateness:
            raise ValueError(
                f"API_INGEST_LATENESS_MARGIN={margin:g}: must be less than"
                f" EVENT_MAX_LATENESS={self.event_max_lateness:g} (no event could be accepted)"
            )
        ahead = self.api_ingest_future_margin
        if ahead is not None and ahead >= self.event_max_future_skew:
            raise ValueError(
                f"API_INGEST_FUTURE_MARGIN={ahead:g}: must be less than"
                f" EVENT_MAX_FUTURE_SKEW={self.event_max_future_skew:g} (no event ahead of the"
                " API's clock could be accepted)"
            )
        return self

    @property
    def ingest_max_age(self) -> float:
        """Seconds old an event may be for POST /v1/events: the lateness less the margin."""
        margin = self.api_ingest_lateness_margin
        if margin is None:
            margin = min(300.0, self.event_max_lateness / 10)
        return self.event_max_lateness - margin

    @property
    def ingest_max_ahead(self) -> float:
        """Seconds ahead of the API's clock an event may be for POST /v1/events: the skew less
        the margin. The worker checks the skew again by its own clock, which may be behind."""
        margin = self.api_ingest_future_margin
        if margin is None:
            margin = min(30.0, self.event_max_future_skew / 10)
        return self.event_max_future_skew - margin

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        data = self.metering_data_dir.resolve()
        if not self.quota_db_url:
            self.quota_db_url = f"sqlite:///{data / 'quota.db'}"
        if not self.clickhouse_url:
            self.clickhouse_url = f"chdb://{data / 'clickhouse'}"
        if self.quota_db_url.startswith("postgres://"):
            self.quota_db_url = "postgresql://" + self.quota_db_url[len("postgres://") :]
        return self

    # ----------------------------------------------------------------------------------------
    @property
    def redis_mode(self) -> Literal["single", "sentinel", "cluster"]:
        if self.rate_limit_redis_cluster_nodes:
            return "cluster"
        if self.rate_limit_redis_sentinels:
            return "sentinel"
        return "single"

    @property
    def clickhouse_embedded(self) -> bool:
        return self.clickhouse_url.startswith("chdb:")

    def __repr_args__(self) -> Any:
        """``repr(settings)`` (in a traceback, a debug log, a dataclass's repr) with secrets and
        URL passwords masked, as ``metering config`` shows them."""
        for name, value in super().__repr_args__():
            if name in SECRET_FIELDS and value is not None:
                value = MASK
            elif isinstance(value, str):
                value = redact(value)
            yield name, value

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables (what ``metering dev up`` prints)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if name in {"rate_limit_redis_cluster_nodes", "rate_limit_redis_sentinels"}:
                value = ",".join(f"{h}:{p}" for h, p in value)
            elif isinstance(value, dict):
                value = json.dumps(value)
            out[name.upper()] = str(value)
        return out


def _describe(exc: ValidationError, env: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across settings: its message names them
            lines.append(msg)
            continue
        field = str(err["loc"][0])
        var = field.upper()
        raw = env.get(var, env.get(field, "<default>"))
        # An error message goes to logs and terminals: no secret, no URL's password, neither
        # in the value shown nor in the check's message, which may quote it or an item of it.
        if field in SECRET_FIELDS:
            raw = MASK
        else:
            for part in {raw, *raw.split(",")}:
                if part and (masked := redact(part)) != part:
                    msg = msg.replace(part, masked)
            raw = redact(raw)
        lines.append(f"{var}={raw!r}: {msg}")
    return "invalid setting(s): " + "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and ``overrides``); raise :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        env = {k.upper(): v for k, v in os.environ.items()}
        env.update({k.upper(): str(v) for k, v in overrides.items()})
        raise SettingsError(_describe(exc, env)) from None
    except PydanticSettingsError as exc:  # a value pydantic-settings cannot even parse (JSON)
        named = re.search(r'field "(\w+)"', str(exc))
        var = named[1].upper() if named else "a setting"
        raise SettingsError(
            f"invalid setting(s): {var}: not valid JSON ({exc.__cause__})"
        ) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


__all__ = [
    "HostPort",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
    "parse_host_ports",
]
