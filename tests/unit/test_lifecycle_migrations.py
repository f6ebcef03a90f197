"""A store a newer release migrated is one line naming both versions (password masked), and the
process holding the embedded engine is known by what it recorded in the folder, not by its
process title (which Faust rewrites). Run for real in ``tests/integration/
test_lifecycle_migrations.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering.clickhouse.schema import NewerSchemaError
from metering.commands.store_errors import embedded_holder, store_failure
from metering.quota_db import NewerRevisionError

# A process holding a folder as the engine does (its pid in ``status``, the file locked) that
# recorded itself as `metering up` on argv[2]:argv[3] when argv[4] is "record"; its cmdline
# names no `metering` command. It holds until a line on stdin.
HOLDER = """
import fcntl, os, sys
from pathlib import Path
from metering.commands.store_errors import forget_holder, record_holder

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
status = open(folder / "status", "w")
status.write(f"PID: {os.getpid()}\\n")
status.flush()
fcntl.flock(status, fcntl.LOCK_EX)
record = None
if sys.argv[4] == "record":
    record = record_holder(f"chdb://{folder}", "up", sys.argv[2], int(sys.argv[3]))
print("holding", flush=True)
sys.stdin.readline()
forget_holder(record)
"""


@pytest.fixture
def holder(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    host, port, mode = request.param
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "ch"), host, str(port), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "holding\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(30)


def test_a_quota_db_a_newer_release_migrated_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUOTA_DB_URL", "postgresql://app:dbpass@db:5432/quota")
    assert store_failure(NewerRevisionError("0002", "0001")) == (
        "the quota DB (QUOTA_DB_URL=postgresql://app:***@db:5432/quota) is at revision 0002, "
        "newer than this release knows (0001): deploy the newer release"
    )


def test_a_clickhouse_schema_a_newer_release_migrated_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLICKHOUSE_URL", "http://app:chpass@ch:8123")
    assert store_failure(NewerSchemaError(6, 5)) == (
        "ClickHouse (CLICKHOUSE_URL=http://app:***@ch:8123) is at schema version 6, newer than "
        "this release knows (5): deploy the newer release"
    )


@pytest.mark.parametrize("holder", [("0.0.0.0", 18123, "record")], indirect=True)
def test_the_holder_is_the_command_it_recorded_serving_where_it_said(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    found = embedded_holder(f"chdb://{tmp_path / 'ch'}")
    assert found is not None and found.pid == holder.pid
    assert found.describe() == f"`metering up` (pid {holder.pid})"
    assert found.api_url == "http://127.0.0.1:18123"  # a wildcard host is asked on loopback
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(30) == 0
    assert not list((tmp_path / "ch").glob("metering-holder-*"))  # removed as it stopped


@pytest.mark.parametrize("holder", [("127.0.0.1", 18124, "none")], indirect=True)
def test_a_record_left_by_a_process_gone_is_not_taken_for_the_holder(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    """The same pid, another start time: a process gone whose pid the holder got again."""
    stale = {"pid": holder.pid, "started": "1", "command": "up", "host": "::", "port": 8000}
    (tmp_path / "ch" / f"metering-holder-{holder.pid}.json").write_text(json.dumps(stale))
    found = embedded_holder(f"chdb://{tmp_path / 'ch'}")
    assert found is not None and found.pid == holder.pid
    assert found.describe() == f"another process (pid {holder.pid})"
    assert found.api_url is None
