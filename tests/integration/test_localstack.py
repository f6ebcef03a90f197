"""The local stack: idempotent ``up``, ``down`` by PID leaving nothing behind, clear errors."""

from __future__ import annotations

import pytest

from metering.localstack import LocalStack, StackError
from metering.localstack.stack import find_binary, pid_alive


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


def test_missing_binary_names_the_package() -> None:
    with pytest.raises(StackError, match="install"):
        find_binary("definitely-not-a-metering-binary")


def test_unknown_service_is_refused(dedicated_stack: LocalStack) -> None:
    with pytest.raises(StackError, match="unknown service"):
        dedicated_stack.up(["mongodb"])
