"""The local stack signals only the processes it started: a PID in ``state.json`` that names
another process by now (after a reboot, or the recorded server died and its PID was reused)
survives ``up`` and ``down``, while a recorded server, also one recorded by an older version
(no identity), is still reused and stopped. Each test has its own stack folder and ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering.localstack import LocalStack
from metering.localstack.stack import free_port, pid_alive, process_identity, redis_ping


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A process the stack never started, as a reused PID would be."""
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def plant(root: Path, pid: int | None, port: int, identity: str | None) -> None:
    """A ``state.json`` whose Redis entry names ``pid`` on ``port``, as an older version
    (``identity`` None) or this one wrote it."""
    entry: dict[str, object] = {
        "name": "redis",
        "pids": {"redis": pid} if pid is not None else {},
        "ports": {"redis": port},
        "paths": {},
        "started_at": 0,
    }
    if identity is not None:
        entry["identities"] = {"redis": identity}
    root.mkdir(parents=True, exist_ok=True)
    (root / "state.json").write_text(json.dumps({"redis": entry}))


@pytest.mark.parametrize("written_by", ["older version", "this version"])
def test_a_stale_pid_in_the_state_file_is_never_signalled(
    tmp_path: Path, unrelated: subprocess.Popen[bytes], written_by: str
) -> None:
    """The audit's r4: ``up`` found the entry unhealthy and stopped its PID, an unrelated
    ``sleep``; ``down`` would have too. An entry of this version carries the identity of the
    server it started (here one that is not the sleep's), an older one none."""
    stack = LocalStack(tmp_path / "stack")
    port = free_port()
    stale = "an-earlier-boot:12345" if written_by == "this version" else None
    plant(stack.root, unrelated.pid, port, stale)
    assert stack.status()["redis"] == {
        "running": {"redis": False},
        "ports": {"redis": port},
        "healthy": False,
    }
    try:
        stack.up(["redis"])
        assert unrelated.poll() is None, "up signalled a process it did not start"
        server = stack.service("redis")
        assert server is not None and server.pids["redis"] != unrelated.pid
        assert server.identities["redis"] == process_identity(server.pids["redis"])
    finally:
        assert stack.down() == ["redis"]
    assert unrelated.poll() is None, "down signalled a process it did not start"
    assert not pid_alive(server.pids["redis"])


def test_a_server_recorded_by_an_older_version_is_reused_and_stopped(tmp_path: Path) -> None:
    """Without an identity, the recorded PID is taken for the server while its command line
    names redis-server and the recorded port: ``up`` keeps it (and records its identity),
    ``down`` stops it."""
    stack = LocalStack(tmp_path / "stack")
    plant(stack.root, None, free_port(), None)  # no process yet: only a private port
    try:
        stack.up(["redis"])
        state = json.loads(stack.state_file.read_text())
        pid = state["redis"]["pids"]["redis"]
        del state["redis"]["identities"]
        stack.state_file.write_text(json.dumps(state))
        assert stack.status()["redis"]["healthy"]
        stack.up(["redis"])
        server = stack.service("redis")
        assert server is not None and server.pids["redis"] == pid
        assert server.identities["redis"] == process_identity(pid)
        assert redis_ping(server.ports["redis"])
    finally:
        assert stack.down() == ["redis"]
    assert not pid_alive(pid)


def test_dev_up_and_down_leave_a_stale_pid_alone(
    tmp_path: Path, unrelated: subprocess.Popen[bytes]
) -> None:
    """The same through ``metering dev up`` / ``dev down``, as the audit ran them."""
    root = tmp_path / "stack"
    plant(root, unrelated.pid, free_port(), None)
    env = dict(os.environ, METERING_DATA_DIR=str(tmp_path))

    def dev(*args: str) -> str:
        cmd = [str(Path(sys.executable).with_name("metering")), "dev", *args, "--root", str(root)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dev("up", "--only", "redis")
    assert unrelated.poll() is None
    server = LocalStack(root).service("redis")
    assert server is not None and pid_alive(server.pids["redis"])
    assert "stopped: redis" in dev("down")
    assert unrelated.poll() is None
    assert not pid_alive(server.pids["redis"])
