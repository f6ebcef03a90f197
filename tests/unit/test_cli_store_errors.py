"""A store's failure is one line from the CLI: which store, the setting that names it (password
masked), what went wrong, and a hint where one helps; the traceback only under ``--verbose``.

The quota DB, ClickHouse and Redis failures are run for real in the integration tests
(``test_quota_cli``, ``test_query_cli``, ``test_reconcile``). Kafka's is raised here: its client
takes 30 s to give up on a broker that refuses connections."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError
from kafka.errors import KafkaTimeoutError
from sqlalchemy.exc import OperationalError

from metering.cli import main
from metering.commands.store_errors import redis_setting, store_failure
from metering.settings import load_settings


@pytest.fixture
def unreachable_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")

    def refused(*args: object, **kwargs: object) -> list[str]:
        raise KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:1")

    monkeypatch.setattr("metering.commands.kafka.ensure_topics", refused)


def test_kafka_unreachable_is_one_line_naming_the_setting(
    unreachable_kafka: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kafka", "init"]) == 1
    assert capsys.readouterr().err == (
        "metering: Kafka (KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1): "
        "KafkaTimeoutError: Unable to bootstrap from 127.0.0.1:1\n"
    )


def test_verbose_shows_the_traceback(unreachable_kafka: None) -> None:
    with pytest.raises(KafkaTimeoutError):
        main(["--verbose", "kafka", "init"])


def test_the_asyncio_kafka_client_error_names_kafka_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    message = store_failure(KafkaConnectionError("Unable to bootstrap from [('broker', 9092)]"))
    assert message == (
        "Kafka (KAFKA_BOOTSTRAP_SERVERS=broker:9092): "
        "KafkaConnectionError: Unable to bootstrap from [('broker', 9092)]"
    )


def test_a_password_the_driver_echoes_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTA_DB_URL", "postgresql://app:dbpass@db:5432/quota")
    echoed = OperationalError(
        "SELECT 1",
        {},
        Exception("password=dbpass rejected for postgresql://app:dbpass@db:5432/quota\nmore"),
    )
    assert store_failure(echoed) == (
        "the quota DB (QUOTA_DB_URL=postgresql://app:***@db:5432/quota): "
        "password=*** rejected for postgresql://app:***@db:5432/quota"
    )


def test_an_error_of_no_store_is_left_to_propagate() -> None:
    assert store_failure(ValueError("a bug")) is None


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"rate_limit_redis_url": "rediss://:pw@cache:6380/1"},
            "RATE_LIMIT_REDIS_URL=rediss://:***@cache:6380/1",
        ),
        (
            {"rate_limit_redis_cluster_nodes": "a:7000,b:7001"},
            "RATE_LIMIT_REDIS_CLUSTER_NODES=a:7000,b:7001",
        ),
        (
            {"rate_limit_redis_sentinels": "s:26379", "rate_limit_redis_sentinel_master": "m"},
            "RATE_LIMIT_REDIS_SENTINELS=s:26379, RATE_LIMIT_REDIS_SENTINEL_MASTER=m",
        ),
    ],
)
def test_redis_is_named_by_the_setting_of_its_mode(settings: dict[str, str], named: str) -> None:
    assert redis_setting(load_settings(**settings)) == named


@pytest.mark.parametrize(
    "said",
    [
        "table tenant_daily_usage has no column named measure",  # SQLite, an INSERT
        "no such column: tenant_daily_usage.measure",  # SQLite, a SELECT
    ],
)
def test_a_quota_db_without_a_column_of_this_release_says_to_migrate(
    monkeypatch: pytest.MonkeyPatch, said: str
) -> None:
    """The second review's case: a SQLite quota DB still at revision 0001 was named, without
    the hint PostgreSQL's wording of the same got."""
    monkeypatch.setenv("QUOTA_DB_URL", "sqlite:///var/quota.db")
    error = OperationalError("INSERT INTO tenant_daily_usage", {}, Exception(said))
    assert store_failure(error) == (
        f"the quota DB (QUOTA_DB_URL=sqlite:///var/quota.db): {said}; run `metering db migrate`"
    )
