"""The local stack: idempotent ``up``, ``down`` by PID leaving nothing behind, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from metering.localstack import LocalStack, StackError
from metering.localstack.stack import (
    _kafka_cluster_id,
    adopt_class_data,
    class_data_archive,
    class_data_flags,
    find_binary,
    pid_alive,
    redis_ping,
)


def test_up_twice_reuses_and_down_stops_exactly_what_up_started(
    dedicated_stack: LocalStack,
) -> None:
    env1 = dedicated_stack.up(["redis"])
    pid = dedicated_stack.service("redis").pids["redis"]  # type: ignore[union-attr]
    env2 = dedicated_stack.up(["redis"])
    assert env1 == env2
    assert dedicated_stack.service("redis").pids["redis"] == pid  # type: ignore[union-attr]
    assert dedicated_stack.status()["redis"]["healthy"]
    assert dedicated_stack.down() == ["redis"]
    assert not pid_alive(pid)
    assert dedicated_stack.status() == {}


def test_a_killed_service_is_restarted_by_up(dedicated_stack: LocalStack) -> None:
    dedicated_stack.up(["redis"])
    old = dedicated_stack.kill("redis", "redis")
    assert not dedicated_stack.status()["redis"]["healthy"]
    dedicated_stack.up(["redis"])
    new = dedicated_stack.service("redis").pids["redis"]  # type: ignore[union-attr]
    assert new != old and pid_alive(new)


def test_restarting_a_member_that_still_runs_is_refused(dedicated_stack: LocalStack) -> None:
    """A second server could not bind the port; the first would go on answering and be lost
    to ``down`` (it was, in a failure test, before this check)."""
    dedicated_stack.up(["redis"])
    running = dedicated_stack.service("redis").pids["redis"]  # type: ignore[union-attr]
    with pytest.raises(StackError, match="still running: kill it before restarting"):
        dedicated_stack.restart_member("redis", "redis")
    assert dedicated_stack.service("redis").pids["redis"] == running  # type: ignore[union-attr]
    dedicated_stack.kill("redis", "redis")
    dedicated_stack.restart_member("redis", "redis")
    assert pid_alive(dedicated_stack.service("redis").pids["redis"])  # type: ignore[union-attr]


def test_env_can_name_only_some_services(dedicated_stack: LocalStack) -> None:
    """`metering up` exports the settings of the services it asked for only, so a stack that
    also runs other services cannot switch, say, the quota DB behind the settings' back."""
    env = dedicated_stack.up(["redis"])
    assert "RATE_LIMIT_REDIS_URL" in env
    assert (
        dedicated_stack.env(services=["redis"])["RATE_LIMIT_REDIS_URL"]
        == env["RATE_LIMIT_REDIS_URL"]
    )
    only_kafka = dedicated_stack.env(services=["kafka"])
    assert "RATE_LIMIT_REDIS_URL" not in only_kafka and "QUOTA_DB_URL" not in only_kafka


def test_missing_binary_names_the_package() -> None:
    with pytest.raises(StackError, match="install"):
        find_binary("definitely-not-a-metering-binary")


def test_unknown_service_is_refused(dedicated_stack: LocalStack) -> None:
    with pytest.raises(StackError, match="unknown service"):
        dedicated_stack.up(["mongodb"])


def test_start_names_the_settings_at_once_and_starts_services_side_by_side(
    tmp_path: Path,
) -> None:
    """`start` returns before any server answers, with ports that collide with nothing; Redis
    answers (and is recorded for other processes) while Kafka is still starting."""
    stack = LocalStack(tmp_path / "stack", kafka_auto_create_topics=False)
    try:
        starting = stack.start(["redis", "kafka"])
        assert set(starting.started) == {"redis", "kafka"}
        env = starting.env
        redis_port = int(env["RATE_LIMIT_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        kafka_port = int(env["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
        assert redis_port != kafka_port
        starting.ready("redis")
        assert redis_ping(redis_port)
        assert "redis" in LocalStack(tmp_path / "stack").env()["RATE_LIMIT_REDIS_URL"]
        assert starting.wait() == env
        assert {n for n, s in stack.status().items() if s["healthy"]} == {"redis", "kafka"}
        config = Path(stack.service("kafka").paths["config"]).read_text()  # type: ignore[union-attr]
        assert "auto.create.topics.enable=false" in config
    finally:
        assert sorted(stack.down()) == ["kafka", "redis"]
    assert stack.status() == {}


def test_kafka_class_data_archive_is_per_jdk_and_jars_and_only_a_whole_one_is_kept(
    tmp_path: Path,
) -> None:
    libs = tmp_path / "kafka-9.9" / "libs"
    libs.mkdir(parents=True)
    (libs / ".complete").write_text("9.9")
    java = find_binary("java")
    broker = class_data_archive(java, libs, "broker")
    assert broker.parent == libs.parent / "cds"
    assert class_data_archive(java, libs, "format") != broker
    (libs / ".complete").write_text("9.9 resolved again")
    assert class_data_archive(java, libs, "broker") != broker  # new jars, new archive

    flags, dump = class_data_flags(broker)
    assert dump is not None and f"-XX:ArchiveClassesAtExit={dump}" in flags
    dump.write_bytes(b"archive")
    adopt_class_data(dump, broker, exited_cleanly=False)  # killed: it may be cut short
    assert not broker.exists() and not dump.exists()

    flags, dump = class_data_flags(broker)
    assert dump is not None
    dump.write_bytes(b"archive")
    adopt_class_data(dump, broker, exited_cleanly=True)
    assert broker.read_bytes() == b"archive" and not dump.exists()
    flags, dump = class_data_flags(broker)
    assert dump is None and f"-XX:SharedArchiveFile={broker}" in flags


def test_kafka_cluster_ids_never_look_like_an_option() -> None:
    ids = {_kafka_cluster_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
